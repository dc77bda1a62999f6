//! Stdio of container processes (see "Stdio streams" in agent.proto).
//!
//! Each wanted stream gets its own listener on a fresh port (2000 upward);
//! the host connects once, the listener is closed, and raw bytes flow
//! between the connection and the process' pipe (or pty master). The pipe
//! is not read before the connection is accepted, so a late host loses
//! nothing: the process blocks on a full pipe instead.
//!
//! Transports ([`Transport`]): vsock in the VM; in host test mode a Unix
//! socket `<run dir>/stdio-<port>.sock` per port (vsock does not exist
//! there), removed once its one connection is accepted.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{oneshot, watch};

/// How stdio listeners are bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// vsock, any CID (the VM).
    Vsock,
    /// Unix sockets `<dir>/stdio-<port>.sock` (host test mode).
    Unix(PathBuf),
}

/// After the process exited, how long the output may stay idle before
/// WaitProcess stops waiting for EOF (a background grandchild may hold
/// the pipe open, or the host never connected). Reset by every chunk.
pub const DRAIN_IDLE: Duration = Duration::from_secs(5);

/// How long CloseStdin keeps forwarding bytes that are already in flight.
const STDIN_CLOSE_DRAIN: Duration = Duration::from_millis(200);

const BUF: usize = 64 * 1024;

pub trait Conn: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Conn for T {}

/// A listener for one stream.
pub enum Listener {
    Vsock(tokio_vsock::VsockListener),
    Unix(tokio::net::UnixListener, SocketFile),
}

/// Removes a Unix socket file when dropped.
pub struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Listener {
    /// Accept the one connection, then close the listener.
    pub async fn accept_one(self) -> io::Result<Pin<Box<dyn Conn>>> {
        match self {
            Listener::Vsock(l) => {
                let (s, _) = l.accept().await?;
                Ok(Box::pin(s))
            }
            Listener::Unix(l, file) => {
                let r = l.accept().await;
                drop(file);
                Ok(Box::pin(r?.0))
            }
        }
    }
}

/// Port allocator: 2000 upward (never 1024), skipping ports in use.
pub struct Ports {
    next: AtomicU32,
}

impl Default for Ports {
    fn default() -> Self {
        Ports {
            next: AtomicU32::new(ember_proto::STDIO_PORT_BASE),
        }
    }
}

impl Ports {
    /// Bind a listener on the next free port.
    pub fn bind(&self, transport: &Transport) -> io::Result<(u32, Listener)> {
        for _ in 0..1000 {
            let mut port = self.next.fetch_add(1, Ordering::Relaxed);
            if port < ember_proto::STDIO_PORT_BASE || port == ember_proto::AGENT_VSOCK_PORT {
                self.next
                    .store(ember_proto::STDIO_PORT_BASE + 1, Ordering::Relaxed);
                port = ember_proto::STDIO_PORT_BASE;
            }
            let r = match transport {
                Transport::Vsock => tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(
                    tokio_vsock::VMADDR_CID_ANY,
                    port,
                ))
                .map(Listener::Vsock),
                Transport::Unix(dir) => {
                    let path = dir.join(format!("stdio-{port}.sock"));
                    tokio::net::UnixListener::bind(&path)
                        .map(|l| Listener::Unix(l, SocketFile(path)))
                }
            };
            match r {
                Ok(l) => return Ok((port, l)),
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "no free stdio port",
        ))
    }
}

/// The descriptors a new process gets as 0, 1, 2 (closed in the agent
/// once the process is cloned).
pub struct ChildFds {
    pub fds: [OwnedFd; 3],
    pub terminal: bool,
}

impl ChildFds {
    pub fn raw(&self) -> [RawFd; 3] {
        [
            self.fds[0].as_raw_fd(),
            self.fds[1].as_raw_fd(),
            self.fds[2].as_raw_fd(),
        ]
    }
}

/// The agent's side of a process' stdio, before forwarding starts.
pub struct HostSide {
    stdin: Option<(Listener, OwnedFd)>,
    stdout: Option<(Option<Listener>, OwnedFd)>,
    stderr: Option<(Option<Listener>, OwnedFd)>,
    pty: Option<Arc<OwnedFd>>,
}

/// Running forwarders of one process.
pub struct ProcessIo {
    stdin_close: std::sync::Mutex<Option<oneshot::Sender<()>>>,
    done: watch::Receiver<usize>,
    progress: watch::Receiver<u64>,
    outputs: usize,
    pub pty: Option<Arc<OwnedFd>>,
}

fn cloexec_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    Ok((r, w))
}

/// Register an owned (non-blocking) descriptor with the reactor.
pub fn async_fd(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd stays open and keeps its number for as long as
    // it lives, i.e. as long as the AsyncFd that owns it.
    Ok(unsafe { AsyncFd::register(fd) }?)
}

pub fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

fn dev_null() -> io::Result<OwnedFd> {
    Ok(std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?
        .into())
}

fn dup(fd: &OwnedFd) -> io::Result<OwnedFd> {
    fd.try_clone()
}

/// Create the pipes / pty and listeners for `req`.
pub fn setup(
    req: &ember_proto::agent::Stdio,
    transport: &Transport,
    ports: &Ports,
) -> io::Result<(ChildFds, HostSide, ember_proto::agent::StdioPorts)> {
    let mut out_ports = ember_proto::agent::StdioPorts::new();
    let null = dev_null()?;
    if req.terminal {
        // SAFETY: plain syscalls; results checked.
        let master = unsafe {
            libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC | libc::O_NONBLOCK)
        };
        if master < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh descriptor.
        let master = unsafe { OwnedFd::from_raw_fd(master) };
        // SAFETY: valid pty master.
        if unsafe { libc::unlockpt(master.as_raw_fd()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // TIOCGPTPEER opens the slave without a path lookup.
        // SAFETY: valid pty master; the flags are open(2) flags.
        let slave = unsafe {
            libc::ioctl(
                master.as_raw_fd(),
                libc::TIOCGPTPEER,
                libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
            )
        };
        if slave < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh descriptor.
        let slave = unsafe { OwnedFd::from_raw_fd(slave) };
        let stdin = if req.stdin {
            let (port, l) = ports.bind(transport)?;
            out_ports.stdin_port = port;
            Some((l, dup(&master)?))
        } else {
            None
        };
        let out_listener = if req.stdout {
            let (port, l) = ports.bind(transport)?;
            out_ports.stdout_port = port;
            Some(l)
        } else {
            None
        };
        let pty = Arc::new(dup(&master)?);
        let child = ChildFds {
            fds: [dup(&slave)?, dup(&slave)?, slave],
            terminal: true,
        };
        return Ok((
            child,
            HostSide {
                stdin,
                stdout: Some((out_listener, master)),
                stderr: None,
                pty: Some(pty),
            },
            out_ports,
        ));
    }

    let mut host = HostSide {
        stdin: None,
        stdout: None,
        stderr: None,
        pty: None,
    };
    let stdin_fd = if req.stdin {
        let (r, w) = cloexec_pipe()?;
        set_nonblocking(&w)?;
        let (port, l) = ports.bind(transport)?;
        out_ports.stdin_port = port;
        host.stdin = Some((l, w));
        r
    } else {
        dup(&null)?
    };
    let mut outputs = [None, None];
    for (i, wanted) in [req.stdout, req.stderr].into_iter().enumerate() {
        if wanted {
            let (r, w) = cloexec_pipe()?;
            set_nonblocking(&r)?;
            let (port, l) = ports.bind(transport)?;
            if i == 0 {
                out_ports.stdout_port = port;
            } else {
                out_ports.stderr_port = port;
            }
            outputs[i] = Some(((Some(l), r), w));
        }
    }
    let [o, e] = outputs;
    let stdout_fd = match o {
        Some((h, w)) => {
            host.stdout = Some(h);
            w
        }
        None => dup(&null)?,
    };
    let stderr_fd = match e {
        Some((h, w)) => {
            host.stderr = Some(h);
            w
        }
        None => null,
    };
    Ok((
        ChildFds {
            fds: [stdin_fd, stdout_fd, stderr_fd],
            terminal: false,
        },
        host,
        out_ports,
    ))
}

impl HostSide {
    /// Start the forwarding tasks.
    pub fn start(self) -> ProcessIo {
        let (done_tx, done) = watch::channel(0usize);
        let (progress_tx, progress) = watch::channel(0u64);
        let done_tx = Arc::new(done_tx);
        let progress_tx = Arc::new(progress_tx);
        let mut outputs = 0;
        let is_pty = self.pty.is_some();
        for (listener, fd) in [self.stdout, self.stderr].into_iter().flatten() {
            outputs += 1;
            let done_tx = done_tx.clone();
            let progress_tx = progress_tx.clone();
            tokio::spawn(async move {
                if let Err(e) = forward_output(listener, fd, is_pty, &progress_tx).await {
                    tracing::debug!("stdio output: {e}");
                }
                done_tx.send_modify(|n| *n += 1);
            });
        }
        let mut stdin_close = None;
        if let Some((listener, fd)) = self.stdin {
            let (tx, rx) = oneshot::channel();
            stdin_close = Some(tx);
            tokio::spawn(async move {
                if let Err(e) = forward_input(listener, fd, rx).await {
                    tracing::debug!("stdio input: {e}");
                }
            });
        }
        ProcessIo {
            stdin_close: std::sync::Mutex::new(stdin_close),
            done,
            progress,
            outputs,
            pty: self.pty,
        }
    }
}

impl ProcessIo {
    /// Close the process' stdin (CloseStdin). Returns false if there was
    /// no stdin stream (or it is closed already).
    pub fn close_stdin(&self) -> bool {
        let tx = self
            .stdin_close
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        match tx {
            Some(tx) => {
                let _ = tx.send(());
                true
            }
            None => false,
        }
    }

    /// Wait until all output streams reached EOF and were forwarded; gives
    /// up after [`DRAIN_IDLE`] without progress (call after the exit).
    pub async fn drained(&self) {
        let mut done = self.done.clone();
        let mut progress = self.progress.clone();
        loop {
            if *done.borrow_and_update() >= self.outputs {
                return;
            }
            progress.borrow_and_update();
            tokio::select! {
                r = done.changed() => if r.is_err() { return },
                r = progress.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(DRAIN_IDLE) => {
                    tracing::info!("stdio: output still open {DRAIN_IDLE:?} after exit; not waiting longer");
                    return;
                }
            }
        }
    }
}

/// Read from a non-blocking descriptor; a pty's EIO (no slave left) is EOF.
async fn read_fd(fd: &AsyncFd<OwnedFd>, buf: &mut [u8], pty: bool) -> io::Result<usize> {
    loop {
        let mut guard = fd.readable().await?;
        match guard.try_io(|fd| {
            // SAFETY: reads into `buf`.
            let n =
                unsafe { libc::read(fd.get_ref().as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        }) {
            Ok(Err(e)) if pty && e.raw_os_error() == Some(libc::EIO) => return Ok(0),
            Ok(r) => return r,
            Err(_would_block) => continue,
        }
    }
}

async fn write_all_fd(fd: &AsyncFd<OwnedFd>, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        let mut guard = fd.writable().await?;
        match guard.try_io(|fd| {
            // SAFETY: writes from `data`.
            let n =
                unsafe { libc::write(fd.get_ref().as_raw_fd(), data.as_ptr().cast(), data.len()) };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        }) {
            Ok(Ok(n)) => data = &data[n..],
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
    Ok(())
}

async fn forward_output(
    listener: Option<Listener>,
    fd: OwnedFd,
    pty: bool,
    progress: &watch::Sender<u64>,
) -> io::Result<()> {
    // Accept first: until then the pipe is not read (back-pressure).
    let mut conn = match listener {
        Some(l) => Some(l.accept_one().await?),
        None => None,
    };
    let fd = async_fd(fd)?;
    let mut buf = vec![0u8; BUF];
    loop {
        let n = read_fd(&fd, &mut buf, pty).await?;
        if n == 0 {
            break;
        }
        if let Some(c) = conn.as_mut() {
            if let Err(e) = c.write_all(&buf[..n]).await {
                // The host went away: keep draining so the process does
                // not block on a full pipe.
                tracing::debug!("stdio: host connection: {e}; discarding output");
                conn = None;
            }
        }
        progress.send_modify(|p| *p += n as u64);
    }
    if let Some(mut c) = conn {
        // Half-close: the host sees EOF.
        let _ = c.shutdown().await;
    }
    Ok(())
}

async fn forward_input(
    listener: Listener,
    fd: OwnedFd,
    mut close: oneshot::Receiver<()>,
) -> io::Result<()> {
    let mut conn = tokio::select! {
        c = listener.accept_one() => c?,
        _ = &mut close => return Ok(()),
    };
    let fd = async_fd(fd)?;
    let mut buf = vec![0u8; BUF];
    let mut closing = false;
    loop {
        let n = if closing {
            match tokio::time::timeout(STDIN_CLOSE_DRAIN, conn.read(&mut buf)).await {
                Ok(r) => r?,
                Err(_) => 0,
            }
        } else {
            tokio::select! {
                r = conn.read(&mut buf) => r?,
                _ = &mut close => { closing = true; continue; }
            }
        };
        if n == 0 {
            break;
        }
        write_all_fd(&fd, &buf[..n]).await?;
    }
    // Dropping `fd` closes the pipe: the process reads EOF.
    Ok(())
}

/// TIOCSWINSZ on a pty master.
pub fn resize(pty: &OwnedFd, rows: u16, cols: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: valid descriptor and winsize struct.
    if unsafe { libc::ioctl(pty.as_raw_fd(), libc::TIOCSWINSZ, &ws) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
