//! Stdio of container processes: containerd's fifos on the host, one vsock
//! stream per stream to the agent (see "Stdio streams" in
//! `proto/agent.proto`).
//!
//! - stdout/stderr: bytes from the agent's stream go into containerd's fifo
//!   until the agent closes the stream (EOF). The exit of a process is
//!   published only after these copies are done, so no output is lost.
//!   The fifo is opened read-write: opening never blocks, and, as with
//!   runc's shim (which keeps a reader open), the process does not get
//!   EPIPE when the client goes away (`ctr run -d`); a full pipe blocks it
//!   instead.
//! - stdin: bytes from containerd's fifo go to the agent; EOF on the fifo
//!   (every writer closed) half-closes the stream, which closes the
//!   process' stdin in the guest in order, after the last byte.
//!
//! Backpressure, never buffering: each copy holds one [`BUF_SIZE`] buffer
//! and finishes writing it before it reads again. When containerd reads the
//! fifo slower than the guest writes, the copy stops reading the stream, the
//! VMM stops giving the guest vsock credit (256 KiB a connection), and the
//! writer in the guest blocks. If the fifo fails, output is read and
//! dropped so that the guest does not hang.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ember_proto::agent::{Stdio, StdioPorts};
use ember_vmm::connect_hybrid_timeout;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};

const BUF_SIZE: usize = 32 * 1024;
/// Output copies that make no progress for this long after the process
/// exited are given up (nobody reads the fifo and it is full).
const OUTPUT_STALL: Duration = Duration::from_secs(5);
/// How long `CloseIO` lets stdin drain to EOF before cutting it.
const STDIN_DRAIN: Duration = Duration::from_secs(5);

/// What containerd asked for: fifo paths (empty = not wanted) and whether
/// the process gets a terminal.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

impl StdioPaths {
    /// The streams to ask the agent for. With a terminal, stderr is part of
    /// the pty output and has no stream of its own.
    pub fn request(&self) -> Stdio {
        let mut s = Stdio::new();
        s.stdin = !self.stdin.is_empty();
        s.stdout = !self.stdout.is_empty();
        s.stderr = !self.stderr.is_empty() && !self.terminal;
        s.terminal = self.terminal;
        s
    }
}

/// The running copies of one process' stdio.
pub struct ProcessIo {
    pub outputs: OutputCopies,
    pub stdin: Option<StdinForwarder>,
}

/// The stdout/stderr copies of one process.
pub struct OutputCopies {
    label: String,
    tasks: Vec<JoinHandle<()>>,
    /// Bytes written to the output fifos, to tell a slow reader from none.
    progress: Arc<AtomicU64>,
}

/// The stdin copy of one process.
pub struct StdinForwarder {
    label: String,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl ProcessIo {
    /// A process without stdio streams.
    pub fn none(label: impl Into<String>) -> Self {
        ProcessIo {
            outputs: OutputCopies {
                label: label.into(),
                tasks: Vec::new(),
                progress: Arc::new(AtomicU64::new(0)),
            },
            stdin: None,
        }
    }

    /// Connects to the ports the agent allocated and starts copying. All
    /// streams are connected before any copy starts; if one cannot be
    /// connected, the others are dropped and the error returned.
    pub async fn connect(
        uds: &Path,
        paths: &StdioPaths,
        ports: &StdioPorts,
        timeout: Duration,
        label: impl Into<String>,
    ) -> Result<ProcessIo> {
        let label = label.into();
        let wanted = paths.request();
        let connect = |port: u32, want: bool, name: &'static str| {
            let uds = uds.to_path_buf();
            let label = label.clone();
            async move {
                match (want, port) {
                    (false, 0) => Ok(None),
                    (false, p) => {
                        tracing::warn!(process = %label, "agent opened {name} port {p} that was not asked for; ignored");
                        Ok(None)
                    }
                    (true, 0) => {
                        tracing::warn!(process = %label, "agent set up no {name} stream; {name} is discarded");
                        Ok(None)
                    }
                    (true, p) => connect_hybrid_timeout(&uds, p, timeout)
                        .await
                        .map(Some)
                        .map_err(|e| {
                            Error::Unavailable(format!(
                                "connecting {name} of {label} (vsock port {p}): {e}"
                            ))
                        }),
                }
            }
        };
        let (stdin, stdout, stderr) = tokio::join!(
            connect(ports.stdin_port, wanted.stdin, "stdin"),
            connect(ports.stdout_port, wanted.stdout, "stdout"),
            connect(ports.stderr_port, wanted.stderr, "stderr"),
        );
        let (stdin, stdout, stderr) = (stdin?, stdout?, stderr?);

        let mut io = ProcessIo::none(label.clone());
        for (stream, path, name) in [
            (stdout, &paths.stdout, "stdout"),
            (stderr, &paths.stderr, "stderr"),
        ] {
            if let Some(stream) = stream {
                io.outputs.tasks.push(tokio::spawn(forward_output(
                    stream,
                    PathBuf::from(path),
                    io.outputs.progress.clone(),
                    format!("{label} {name}"),
                )));
            }
        }
        if let Some(stream) = stdin {
            let (stop, stop_rx) = watch::channel(false);
            let task = tokio::spawn(forward_stdin(
                stream,
                PathBuf::from(&paths.stdin),
                stop_rx,
                format!("{label} stdin"),
            ));
            io.stdin = Some(StdinForwarder {
                label: label.clone(),
                stop,
                task,
            });
        }
        Ok(io)
    }
}

impl OutputCopies {
    /// Waits until stdout and stderr reached EOF and were written out.
    /// Gives up (and says so) when the copies stop making progress for a
    /// while, or, with `limit`, after that long in total.
    pub async fn wait(mut self, limit: Option<Duration>) {
        let started = tokio::time::Instant::now();
        let mut last = self.progress.load(Ordering::Relaxed);
        while !self.tasks.iter().all(|t| t.is_finished()) {
            let remaining = limit.map(|l| l.saturating_sub(started.elapsed()));
            if remaining == Some(Duration::ZERO) {
                tracing::warn!(process = %self.label, "output not drained within {limit:?}; the rest is dropped");
                break;
            }
            let step = remaining.map_or(OUTPUT_STALL, |r| r.min(OUTPUT_STALL));
            if tokio::time::timeout(step, join_all(&mut self.tasks))
                .await
                .is_ok()
            {
                break;
            }
            let now = self.progress.load(Ordering::Relaxed);
            if now == last && limit.is_none() {
                tracing::warn!(process = %self.label, "output has not moved for {OUTPUT_STALL:?} (is anyone reading the fifo?); not waiting for the rest");
                break;
            }
            last = now;
        }
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

impl StdinForwarder {
    /// CloseIO: lets stdin run to EOF (containerd has closed its end) so
    /// every byte gets through, then the stream is half-closed.
    pub async fn close(mut self) {
        if tokio::time::timeout(STDIN_DRAIN, &mut self.task)
            .await
            .is_err()
        {
            tracing::info!(process = %self.label, "stdin still open {STDIN_DRAIN:?} after CloseIO; closing it");
            let _ = self.stop.send(true);
            let _ = self.task.await;
        }
    }

    /// The process is gone: stop forwarding at once.
    pub fn stop(self) {
        let _ = self.stop.send(true);
    }
}

/// Awaits every handle (without consuming them).
async fn join_all(handles: &mut [JoinHandle<()>]) {
    for h in handles.iter_mut() {
        if !h.is_finished() {
            let _ = h.await;
        }
    }
}

async fn forward_output(
    mut stream: UnixStream,
    path: PathBuf,
    progress: Arc<AtomicU64>,
    label: String,
) {
    let mut fifo = match tokio::net::unix::pipe::OpenOptions::new()
        .read_write(true)
        .open_sender(&path)
    {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::warn!(process = %label, "cannot open {}: {e}; output discarded", path.display());
            None
        }
    };
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(process = %label, "reading from the guest: {e}");
                break;
            }
        };
        if let Some(f) = fifo.as_mut() {
            // Keep reading after a write error so the guest never blocks.
            if let Err(e) = f.write_all(&buf[..n]).await {
                tracing::warn!(process = %label, "writing {}: {e}; the rest is discarded", path.display());
                fifo = None;
            } else {
                progress.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    }
    tracing::debug!(process = %label, "output stream ended");
}

/// Opens a fifo for reading, blocking until a writer opens it. Runs on its
/// own thread, not tokio's blocking pool: if no writer ever comes, the
/// thread must not keep the runtime from shutting down.
async fn open_fifo_for_reading(path: &Path) -> std::io::Result<std::fs::File> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let p = path.to_path_buf();
    std::thread::Builder::new()
        .name("ember-stdin-open".into())
        .spawn(move || {
            let _ = tx.send(std::fs::File::open(p));
        })?;
    rx.await
        .unwrap_or_else(|_| Err(std::io::Error::other("fifo open thread vanished")))
}

/// Releases a reader blocked in `open_fifo_for_reading` by opening and
/// closing the write side (which succeeds because that reader is waiting).
fn unblock_fifo_open(path: &Path) {
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path);
}

/// Resolves when `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

async fn forward_stdin(
    mut stream: UnixStream,
    path: PathBuf,
    mut stop: watch::Receiver<bool>,
    label: String,
) {
    let file = tokio::select! {
        f = open_fifo_for_reading(&path) => f,
        _ = stopped(&mut stop) => {
            unblock_fifo_open(&path);
            let _ = stream.shutdown().await;
            return;
        }
    };
    let mut fifo = match file.and_then(tokio::net::unix::pipe::Receiver::from_file) {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(process = %label, "cannot open {}: {e}; stdin closed", path.display());
            let _ = stream.shutdown().await;
            return;
        }
    };
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let n = tokio::select! {
            r = fifo.read(&mut buf) => match r {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(process = %label, "reading {}: {e}", path.display());
                    break;
                }
            },
            _ = stopped(&mut stop) => break,
        };
        if let Err(e) = stream.write_all(&buf[..n]).await {
            tracing::debug!(process = %label, "writing to the guest: {e}");
            return;
        }
    }
    // EOF: half-close, so the guest reads EOF after the last byte.
    if let Err(e) = stream.shutdown().await {
        tracing::debug!(process = %label, "half-closing stdin: {e}");
    }
    tracing::debug!(process = %label, "stdin closed");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requested_streams_follow_the_paths() {
        let p = StdioPaths {
            stdin: "/f/in".into(),
            stdout: "/f/out".into(),
            stderr: "/f/err".into(),
            terminal: false,
        };
        let r = p.request();
        assert!(r.stdin && r.stdout && r.stderr && !r.terminal);
        let t = StdioPaths {
            terminal: true,
            ..p.clone()
        };
        let r = t.request();
        assert!(r.stdin && r.stdout && !r.stderr && r.terminal);
        let r = StdioPaths::default().request();
        assert!(!r.stdin && !r.stdout && !r.stderr);
    }

    fn mkfifo(path: &Path) {
        nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    }

    #[tokio::test]
    async fn output_reaches_the_fifo_and_eof_ends_the_copy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stdout");
        mkfifo(&path);
        // The reader (containerd's side) is open before the shim writes.
        let mut reader = tokio::net::unix::pipe::OpenOptions::new()
            .open_receiver(&path)
            .unwrap();
        let (guest, host) = UnixStream::pair().unwrap();
        let mut io = ProcessIo::none("t");
        io.outputs.tasks.push(tokio::spawn(forward_output(
            host,
            path.clone(),
            io.outputs.progress.clone(),
            "t stdout".into(),
        )));
        let mut guest = guest;
        guest.write_all(b"hello\n").await.unwrap();
        drop(guest);
        io.outputs.wait(None).await;
        let mut got = vec![0u8; 6];
        reader.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello\n");
    }

    /// The guest writes stdout much faster than containerd reads the
    /// fifo (a fake guest stream; the fifo's reader stalls, then drains
    /// slowly): the guest's writes block once the pipe and socket buffers
    /// are full, the shim holds no more than its one copy buffer, and
    /// every byte arrives in order.
    #[tokio::test]
    async fn a_fast_guest_is_held_back_by_a_slow_reader() {
        const TOTAL: usize = 8 << 20;
        const CHUNK: usize = 64 << 10;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stdout");
        mkfifo(&path);
        let mut reader = tokio::net::unix::pipe::OpenOptions::new()
            .open_receiver(&path)
            .unwrap();
        let (guest, host) = UnixStream::pair().unwrap();
        let mut io = ProcessIo::none("t");
        io.outputs.tasks.push(tokio::spawn(forward_output(
            host,
            path.clone(),
            io.outputs.progress.clone(),
            "t stdout".into(),
        )));
        let pattern = |i: usize| (i % 251) as u8;
        let accepted = Arc::new(AtomicU64::new(0));
        let producer = {
            let accepted = accepted.clone();
            tokio::spawn(async move {
                let mut guest = guest;
                let mut sent = 0;
                while sent < TOTAL {
                    let chunk: Vec<u8> = (sent..sent + CHUNK).map(pattern).collect();
                    guest.write_all(&chunk).await.unwrap();
                    sent += CHUNK;
                    accepted.store(sent as u64, Ordering::Relaxed);
                }
            })
        };
        // Nobody reads: the producer stalls far short of the total.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let stalled = accepted.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            accepted.load(Ordering::Relaxed),
            stalled,
            "the guest is blocked"
        );
        // The socket's and the pipe's buffers plus one copy buffer.
        assert!(stalled < 2 << 20, "{stalled} bytes taken from the guest");
        assert!(!producer.is_finished());
        // A slow reader: everything arrives, in order.
        let mut got = 0;
        let mut buf = vec![0u8; 16 << 10];
        while got < TOTAL {
            let n = reader.read(&mut buf).await.unwrap();
            assert!(n > 0);
            for (k, &b) in buf[..n].iter().enumerate() {
                assert_eq!(b, pattern(got + k), "byte {}", got + k);
            }
            got += n;
            if got % (1 << 20) < n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        producer.await.unwrap();
        io.outputs.wait(None).await;
    }

    #[tokio::test]
    async fn stdin_is_forwarded_and_half_closed_at_eof() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stdin");
        mkfifo(&path);
        let (mut guest, host) = UnixStream::pair().unwrap();
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(forward_stdin(host, path.clone(), stop_rx, "t".into()));
        // The writer (containerd) opens after the shim started waiting.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut w = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        std::io::Write::write_all(&mut w, b"input").unwrap();
        drop(w);
        let mut got = Vec::new();
        guest.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"input");
        task.await.unwrap();
        drop(stop);
    }

    #[tokio::test]
    async fn stdin_without_a_writer_is_released_by_stop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stdin");
        mkfifo(&path);
        let (mut guest, host) = UnixStream::pair().unwrap();
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(forward_stdin(host, path.clone(), stop_rx, "t".into()));
        tokio::time::sleep(Duration::from_millis(50)).await;
        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("stop releases the blocked open")
            .unwrap();
        let mut got = Vec::new();
        guest.read_to_end(&mut got).await.unwrap();
        assert!(got.is_empty());
    }
}
