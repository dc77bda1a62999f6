//! The hook runner: the one process of a serving shim that may exec.
//!
//! The serving shim's threads are confined before its runtime starts, and
//! their seccomp filter denies execve (`ember_vmm::confine`); a filter
//! cannot be lifted and a child inherits it. So [`start`] forks and execs
//! this process first (the shim binary again, as `ember-hook-runner`,
//! [`serve_if_runner`]), while the shim is still single-threaded and
//! unconfined. It never touches a guest: it waits on a socket pair for a
//! [`RunRequest`], runs that phase's hooks ([`phase::run`]) and answers
//! with the failures. It dies with the shim (`PR_SET_PDEATHSIG`).
//!
//! What it runs is bounded by what it reads itself: the hooks of the
//! bundle's `config.json`, and only for a bundle of this shim's containerd
//! (a directory beside the bundle the shim was started in, named after the
//! container). A thread of the shim that could write to the socket can
//! make it run hooks a client put in a spec, and nothing else.
//!
//! Without a runner (unit tests, `ember` CLI) hooks run in the calling
//! process.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use super::phase::{self, RunRequest};

/// The largest request (a few paths and names).
const MAX_REQUEST: usize = 64 << 10;
/// The largest answer (failures carry bounded hook output).
const MAX_REPLY: usize = 256 << 10;

/// The runner's `argv[0]` (and so its name in `ps`).
const RUNNER_ARGV0: &str = "ember-hook-runner";
/// Where the runner finds the socket pair's end.
const RUNNER_FD: RawFd = 3;
/// The directory of the shim's bundles, for the runner.
const BUNDLE_ROOT_ENV: &str = "EMBER_HOOK_RUNNER_BUNDLES";

static RUNNER: OnceLock<Mutex<OwnedFd>> = OnceLock::new();

/// In the runner process: serves until the shim goes, never returns. In
/// any other: returns at once. Call it first thing in `main`.
pub fn serve_if_runner() {
    let is_runner = std::env::args_os()
        .next()
        .is_some_and(|a| a == RUNNER_ARGV0);
    if !is_runner {
        return;
    }
    let root = std::env::var_os(BUNDLE_ROOT_ENV)
        .filter(|r| !r.is_empty())
        .map(PathBuf::from);
    // SAFETY: the descriptor the shim left at RUNNER_FD before exec is
    // this process' only owner of it.
    let sock = unsafe { OwnedFd::from_raw_fd(RUNNER_FD) };
    // SAFETY: getppid(2) has no preconditions.
    let shim = unsafe { libc::getppid() };
    serve_in_child(sock, shim, root)
}

/// Forks the hook runner. Call it while the process has one thread and
/// before it is confined; at most once.
pub fn start() -> io::Result<()> {
    if RUNNER.get().is_some() {
        return Ok(());
    }
    // containerd starts the shim in the bundle of its first container;
    // every bundle of this shim is a sibling.
    let bundle_root = std::env::current_dir()
        .ok()
        .and_then(|d| d.parent().map(Path::to_path_buf))
        .unwrap_or_default();
    // Everything the child needs, made before the fork.
    let exe = c"/proc/self/exe";
    let argv0 = std::ffi::CString::new(RUNNER_ARGV0).map_err(io::Error::other)?;
    let argv = [argv0.as_ptr(), std::ptr::null()];
    let root_env = std::ffi::CString::new(format!("{BUNDLE_ROOT_ENV}={}", bundle_root.display()))
        .map_err(io::Error::other)?;
    let envp = [root_env.as_ptr(), std::ptr::null()];
    let mut fds = [0 as RawFd; 2];
    // SAFETY: socketpair(2) fills the two-element array we pass.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned here only.
    let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: getpid(2) has no preconditions.
    let shim = unsafe { libc::getpid() };
    // SAFETY: the caller guarantees a single-threaded process, so the child
    // may run any code; it never returns from `serve`.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        // SAFETY: in the child of a single-threaded process: dup2 (which
        // clears close-on-exec on the copy), prctl, execve with argument
        // and environment arrays built above (null-terminated); _exit if
        // anything fails.
        0 => unsafe {
            if libc::dup2(theirs.as_raw_fd(), RUNNER_FD) == RUNNER_FD
                && libc::fcntl(RUNNER_FD, libc::F_SETFD, 0) == 0
                && libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) == 0
                && libc::getppid() == shim
            {
                libc::execve(exe.as_ptr(), argv.as_ptr(), envp.as_ptr());
            }
            libc::_exit(127)
        },
        _ => {
            drop(theirs);
            let _ = RUNNER.set(Mutex::new(ours));
            Ok(())
        }
    }
}

/// Runs the hooks of `req`: through the runner if there is one, else in
/// this process. Blocking. Returns the failures (see [`phase::run`]).
pub fn run(req: &RunRequest) -> Vec<String> {
    match RUNNER.get() {
        Some(sock) => {
            let sock = sock.lock().unwrap_or_else(|p| p.into_inner());
            ask(sock.as_raw_fd(), req).unwrap_or_else(|e| {
                vec![format!(
                    "{} hooks of {}: the hook runner process: {e}",
                    req.phase, req.id
                )]
            })
        }
        None => phase::run(req),
    }
}

fn ask(fd: RawFd, req: &RunRequest) -> io::Result<Vec<String>> {
    let msg = serde_json::to_vec(req).map_err(io::Error::other)?;
    send(fd, &msg)?;
    let reply = recv(fd, MAX_REPLY)?.ok_or_else(|| io::Error::other("it has exited"))?;
    serde_json::from_slice(&reply).map_err(|e| io::Error::other(format!("bad answer: {e}")))
}

fn send(fd: RawFd, msg: &[u8]) -> io::Result<()> {
    loop {
        // SAFETY: send(2) reads `msg.len()` bytes of a live slice.
        let n = unsafe { libc::send(fd, msg.as_ptr().cast(), msg.len(), libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// One message, `None` at end of stream; longer than `max`: an error.
fn recv(fd: RawFd, max: usize) -> io::Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; max];
    loop {
        // SAFETY: recv(2) writes at most `buf.len()` bytes into `buf`.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_TRUNC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let n = n as usize;
        if n == 0 {
            return Ok(None);
        }
        if n > max {
            return Err(io::Error::other(format!(
                "message of {n} bytes, more than {max}"
            )));
        }
        buf.truncate(n);
        return Ok(Some(buf));
    }
}

/// Whether the runner may run the hooks of `req`'s bundle.
fn check_bundle(req: &RunRequest, root: Option<&Path>) -> Result<(), String> {
    let Some(root) = root.filter(|r| r.is_absolute()) else {
        return Err("the shim's bundle directory is unknown; no hook can be run".into());
    };
    let named_after_id = req.bundle.file_name().and_then(|n| n.to_str()) == Some(req.id.as_str());
    if !crate::sandbox::paths::is_valid_id(&req.id)
        || !named_after_id
        || req.bundle.parent() != Some(root)
    {
        return Err(format!(
            "{} is not the bundle of container {:?} under {}",
            req.bundle.display(),
            req.id,
            root.display()
        ));
    }
    Ok(())
}

/// The child's whole life.
fn serve_in_child(sock: OwnedFd, shim: libc::pid_t, root: Option<PathBuf>) -> ! {
    // SAFETY: getppid has no preconditions; if the shim died before the
    // death signal (armed before exec, kept across it) could fire, exit.
    if unsafe { libc::getppid() } != shim || shim == 1 {
        // SAFETY: as below.
        unsafe { libc::_exit(0) };
    }
    detach_descriptors(&sock);
    let fd = sock.as_raw_fd();
    loop {
        let reply = match recv(fd, MAX_REQUEST) {
            Ok(None) => break,
            Ok(Some(msg)) => match serde_json::from_slice::<RunRequest>(&msg) {
                Ok(req) => match check_bundle(&req, root.as_deref()) {
                    Ok(()) => phase::run(&req),
                    Err(e) => vec![e],
                },
                Err(e) => vec![format!("bad request: {e}")],
            },
            Err(e) => vec![format!("reading the request: {e}")],
        };
        let mut msg = serde_json::to_vec(&reply).unwrap_or_default();
        if msg.len() > MAX_REPLY {
            msg = serde_json::to_vec(&["the hooks' failures are too long to report"])
                .unwrap_or_default();
        }
        if send(fd, &msg).is_err() {
            break;
        }
    }
    // SAFETY: _exit(2) ends this process without running the shim's
    // atexit handlers or destructors (they belong to the parent).
    unsafe { libc::_exit(0) }
}

/// The runner keeps none of the shim's descriptors: stdin, stdout and
/// stderr become /dev/null (`start` waits for the shim's stdout to close),
/// everything else but the socket is closed.
fn detach_descriptors(sock: &OwnedFd) {
    // SAFETY: open/dup2/close/fcntl on descriptors of this process only;
    // nothing else in the child uses the ones closed here.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            for fd in 0..3 {
                libc::dup2(null, fd);
            }
            if null > 2 {
                libc::close(null);
            }
        }
        let keep = sock.as_raw_fd();
        if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
            let fds: Vec<RawFd> = entries
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect();
            for fd in fds {
                if fd > 2 && fd != keep {
                    libc::close(fd);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::hooks::{Phase, Status};

    fn req(bundle: &str, id: &str) -> RunRequest {
        RunRequest {
            bundle: bundle.into(),
            phase: Phase::CreateRuntime,
            id: id.into(),
            status: Status::Creating,
            pid: 1,
        }
    }

    #[test]
    fn only_bundles_of_this_shim_are_run() {
        let root = Some(Path::new(
            "/run/containerd/io.containerd.runtime.v2.task/default",
        ));
        let ok = "/run/containerd/io.containerd.runtime.v2.task/default/c1";
        assert!(check_bundle(&req(ok, "c1"), root).is_ok());
        for (bundle, id) in [
            ("/tmp/evil/c1", "c1"),
            (ok, "c2"),
            (
                "/run/containerd/io.containerd.runtime.v2.task/default/../x/c1",
                "c1",
            ),
            (
                "/run/containerd/io.containerd.runtime.v2.task/default/..",
                "..",
            ),
        ] {
            let e = check_bundle(&req(bundle, id), root).unwrap_err();
            assert!(e.contains("is not the bundle"), "{bundle}: {e}");
        }
        assert!(check_bundle(&req(ok, "c1"), None).is_err());
    }
}
