//! Fewer syscalls per ttrpc message.
//!
//! ttrpc 0.9 writes a message as five writes (length, stream id, type and
//! flags of the 10-byte header, each on its own, a flush, then the
//! payload), and reads it as two reads. In a guest where a syscall costs
//! ~2.4 ms that is ~12 ms per reply. [`Coalescing`] wraps an accepted
//! connection so that each complete ttrpc frame leaves in ONE write and
//! reads are buffered.
//!
//! It relies on what ttrpc writes: a sequence of frames, each a 10-byte
//! header starting with the big-endian u32 payload length, then the
//! payload. Bytes are buffered until they complete a frame; a complete
//! frame is written out before the `poll_write` that completed it returns
//! Ready, so nothing lingers in the buffer once the writer stops writing.
//! `poll_flush` sends only complete frames (ttrpc flushes between header
//! and payload); `poll_shutdown` sends everything.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncBufRead, AsyncRead, AsyncWrite, BufReader, ReadBuf};

/// ttrpc frame header: length u32, stream id u32, type u8, flags u8.
pub const HEADER_LEN: usize = 10;

/// Read buffer size: a whole typical request in one read.
pub const READ_BUFFER: usize = 16 * 1024;

/// Length of the longest prefix of `buf` made of whole frames.
pub fn complete_frames(buf: &[u8]) -> usize {
    let mut pos = 0;
    while buf.len() - pos >= HEADER_LEN {
        let len = u32::from_be_bytes([buf[pos], buf[pos + 1], buf[pos + 2], buf[pos + 3]]);
        let end = pos + HEADER_LEN + len as usize;
        if end > buf.len() {
            break;
        }
        pos = end;
    }
    pos
}

/// A connection whose writes leave one whole ttrpc frame at a time and
/// whose reads are buffered. See the module docs.
pub struct Coalescing<S> {
    inner: BufReader<S>,
    /// Unsent bytes; `wbuf[0]` is always at a frame boundary, except while
    /// a prefix is partly sent (`sent` > 0).
    wbuf: Vec<u8>,
    /// Bytes of `wbuf` already written to `inner`.
    sent: usize,
    /// Length of the caller's buffer appended by a `poll_write` that
    /// returned Pending (the caller retries with the same buffer).
    appended: Option<usize>,
}

impl<S: AsyncRead> Coalescing<S> {
    pub fn new(inner: S) -> Self {
        Coalescing {
            inner: BufReader::with_capacity(READ_BUFFER, inner),
            wbuf: Vec::new(),
            sent: 0,
            appended: None,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Coalescing<S> {
    /// Write `wbuf[..upto]` out, then drop it from the buffer.
    fn poll_send(&mut self, cx: &mut Context<'_>, upto: usize) -> Poll<io::Result<()>> {
        while self.sent < upto {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.wbuf[self.sent..upto]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        if self.sent > 0 {
            self.wbuf.drain(..self.sent);
            self.sent = 0;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Coalescing<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Coalescing<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.appended.is_none() {
            this.wbuf.extend_from_slice(buf);
            this.appended = Some(buf.len());
        }
        let upto = complete_frames(&this.wbuf);
        let res = ready!(this.poll_send(cx, upto));
        let n = this.appended.take().unwrap_or(buf.len());
        Poll::Ready(res.map(|()| n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let upto = complete_frames(&this.wbuf);
        ready!(this.poll_send(cx, upto))?;
        if this.wbuf.is_empty() {
            Pin::new(&mut this.inner).poll_flush(cx)
        } else {
            // Only a partial frame (a header awaiting its payload) is left.
            Poll::Ready(Ok(()))
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let all = this.wbuf.len();
        ready!(this.poll_send(cx, all))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

// Keep BufReader's buffered-read fast path reachable for callers that want it.
impl<S: AsyncRead + AsyncWrite + Unpin> AsyncBufRead for Coalescing<S> {
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        Pin::new(&mut self.get_mut().inner).poll_fill_buf(cx)
    }

    fn consume(mut self: Pin<&mut Self>, amt: usize) {
        Pin::new(&mut self.inner).consume(amt)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn frame(stream_id: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        f.extend_from_slice(&stream_id.to_be_bytes());
        f.extend_from_slice(&[2, 0]);
        f.extend_from_slice(payload);
        f
    }

    /// Write a frame the way ttrpc 0.9 does.
    async fn write_like_ttrpc<W: AsyncWrite + Unpin>(w: &mut W, stream_id: u32, payload: &[u8]) {
        w.write_u32(payload.len() as u32).await.unwrap();
        w.write_u32(stream_id).await.unwrap();
        w.write_u8(2).await.unwrap();
        w.write_u8(0).await.unwrap();
        w.flush().await.unwrap();
        w.write_all(payload).await.unwrap();
    }

    #[test]
    fn frame_prefixes() {
        let a = frame(1, b"hello");
        let b = frame(3, b"");
        let mut both = a.clone();
        both.extend_from_slice(&b);
        assert_eq!(complete_frames(&[]), 0);
        assert_eq!(complete_frames(&a[..9]), 0);
        assert_eq!(complete_frames(&a[..14]), 0);
        assert_eq!(complete_frames(&a), a.len());
        assert_eq!(complete_frames(&both), both.len());
        assert_eq!(complete_frames(&both[..a.len() + 3]), a.len());
        // A huge declared length just waits for more bytes.
        assert_eq!(complete_frames(&[0xff; 12]), 0);
    }

    /// Records every write call's bytes; can be made to return Pending.
    struct Recorder {
        writes: Arc<Mutex<Vec<Vec<u8>>>>,
        max_per_write: usize,
        pending_every_other: bool,
        toggle: bool,
    }

    impl AsyncRead for Recorder {
        fn poll_read(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            _buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            if self.pending_every_other {
                self.toggle = !self.toggle;
                if self.toggle {
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
            }
            let n = buf.len().min(self.max_per_write);
            self.writes.lock().unwrap().push(buf[..n].to_vec());
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn recorder(max_per_write: usize, pending: bool) -> (Recorder, Arc<Mutex<Vec<Vec<u8>>>>) {
        let writes = Arc::new(Mutex::new(Vec::new()));
        (
            Recorder {
                writes: writes.clone(),
                max_per_write,
                pending_every_other: pending,
                toggle: false,
            },
            writes,
        )
    }

    #[tokio::test(flavor = "current_thread")]
    async fn one_write_per_frame() {
        let (rec, writes) = recorder(usize::MAX, false);
        let mut c = Coalescing::new(rec);
        write_like_ttrpc(&mut c, 1, b"\n\0\x12\x02\x08\x01").await;
        write_like_ttrpc(&mut c, 3, b"").await;
        write_like_ttrpc(&mut c, 5, &[7u8; 5000]).await;
        let w = writes.lock().unwrap();
        assert_eq!(w.len(), 3, "one write per frame");
        assert_eq!(w[0], frame(1, b"\n\0\x12\x02\x08\x01"));
        assert_eq!(w[1], frame(3, b""));
        assert_eq!(w[2], frame(5, &[7u8; 5000]));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn partial_and_pending_writes_keep_bytes_in_order() {
        let (rec, writes) = recorder(7, true);
        let mut c = Coalescing::new(rec);
        let mut expected = Vec::new();
        for (i, len) in [0usize, 1, 9, 10, 100, 3000].into_iter().enumerate() {
            let payload: Vec<u8> = (0..len).map(|b| (b + i) as u8).collect();
            write_like_ttrpc(&mut c, i as u32 * 2 + 1, &payload).await;
            expected.extend_from_slice(&frame(i as u32 * 2 + 1, &payload));
            // Everything written so far has left the buffer.
            assert!(c.wbuf.is_empty());
        }
        let got: Vec<u8> = writes.lock().unwrap().concat();
        assert_eq!(got, expected);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn shutdown_sends_partial_frame_and_reads_pass_through() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut c = Coalescing::new(a);
        c.write_all(&[0, 0, 0, 9, 1]).await.unwrap();
        c.flush().await.unwrap();
        c.shutdown().await.unwrap();
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, vec![0, 0, 0, 9, 1]);

        let (a, mut b) = tokio::io::duplex(64);
        let mut c = Coalescing::new(a);
        b.write_all(b"ping").await.unwrap();
        drop(b);
        let mut got = String::new();
        c.read_to_string(&mut got).await.unwrap();
        assert_eq!(got, "ping");
    }
}
