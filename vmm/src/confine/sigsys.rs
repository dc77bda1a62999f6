//! What happens when a thread makes a system call its seccomp filters
//! forbid: the filters answer `SECCOMP_RET_TRAP`, the kernel sends that
//! thread `SIGSYS`, and [`on_sigsys`] writes one preformatted line naming
//! the pod, the thread's role, its tid and the system call number to the
//! report fd (the shim's log fifo, which containerd copies into its log),
//! then ends the whole process with [`EXIT_STATUS`]. One serving shim is
//! one pod's VM, so this ends that VM and nothing else.
//!
//! The handler runs in a thread that may be compromised and is confined:
//! it allocates nothing, takes no lock, and makes only `write`, `gettid`
//! and `exit_group`, which every filter allows.

use std::cell::Cell;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, AtomicPtr, AtomicUsize, Ordering};
use std::sync::Once;

/// The exit status of a process ended by a forbidden system call:
/// 128 + SIGSYS, what a shell shows for a process killed by SIGSYS.
pub const EXIT_STATUS: i32 = 128 + libc::SIGSYS;

/// What every report line starts with (tests and operators grep for it).
pub const REPORT_PREFIX: &str = "ember: seccomp: forbidden system call";

/// Where the line goes; stderr until the shim names its log fifo.
static REPORT_FD: AtomicI32 = AtomicI32::new(libc::STDERR_FILENO);

/// The pod label of the line (a leaked `&'static [u8]`), set once.
static LABEL_PTR: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());
static LABEL_LEN: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// The role this thread was confined as (see `Role::name`).
    static ROLE: Cell<&'static str> = const { Cell::new("control-plane") };
}

static INSTALL: Once = Once::new();

/// Sends the report line to `fd` from now on. The fd must stay open for
/// the life of the process.
pub fn set_report_fd(fd: RawFd) {
    REPORT_FD.store(fd, Ordering::SeqCst);
}

/// Where the report line goes.
pub fn report_fd() -> RawFd {
    REPORT_FD.load(Ordering::SeqCst)
}

/// Names the pod in the report line (first call wins).
pub fn set_label(label: &str) {
    if !LABEL_PTR.load(Ordering::SeqCst).is_null() {
        return;
    }
    let bytes: &'static [u8] = Box::leak(label.as_bytes().to_vec().into_boxed_slice());
    LABEL_LEN.store(bytes.len(), Ordering::SeqCst);
    LABEL_PTR.store(bytes.as_ptr() as *mut u8, Ordering::SeqCst);
}

/// Records the calling thread's role for the report line.
pub(super) fn set_thread_role(role: &'static str) {
    ROLE.with(|r| r.set(role));
}

/// Installs the process-wide SIGSYS handler (once).
pub fn install_handler() -> io::Result<()> {
    let mut result = Ok(());
    INSTALL.call_once(|| {
        // SAFETY: sigaction with a zeroed, then filled, struct; the handler
        // is an `extern "C"` function of the right signature for
        // SA_SIGINFO and only makes async-signal-safe system calls.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_sigsys as *const () as libc::sighandler_t;
            act.sa_flags = libc::SA_SIGINFO;
            libc::sigfillset(&mut act.sa_mask);
            if libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) != 0 {
                result = Err(io::Error::last_os_error());
            }
        }
    });
    result
}

/// A fixed-size line built without allocating.
struct Line {
    buf: [u8; 512],
    len: usize,
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        let room = self.buf.len() - self.len;
        let n = bytes.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn push_num(&mut self, n: i64) {
        let mut digits = [0u8; 24];
        let mut i = digits.len();
        let neg = n < 0;
        let mut v = n.unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        if neg {
            i -= 1;
            digits[i] = b'-';
        }
        self.push(&digits[i..]);
    }
}

/// The system call number of a seccomp SIGSYS: `si_syscall`, at offset 24
/// of x86_64's `siginfo_t` (after signo, errno, code, padding and the
/// 8-byte `si_call_addr`).
const SI_SYSCALL_OFFSET: usize = 24;

/// Builds the report line (also used by the unit test).
fn report_line(role: &str, tid: i64, nr: i64, label: &[u8]) -> Line {
    let mut line = Line {
        buf: [0; 512],
        len: 0,
    };
    line.push(REPORT_PREFIX.as_bytes());
    line.push(b" ");
    line.push_num(nr);
    line.push(b" by the ");
    line.push(role.as_bytes());
    line.push(b" thread (tid ");
    line.push_num(tid);
    line.push(b") of pod ");
    line.push(label);
    line.push(b": ending this VM (exit status ");
    line.push_num(i64::from(EXIT_STATUS));
    line.push(b")\n");
    line
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for SA_SIGINFO handlers;
    // for SIGSYS from seccomp (si_code SYS_SECCOMP) the union holds the
    // `_sigsys` view, whose `_syscall` int sits at SI_SYSCALL_OFFSET.
    let nr = unsafe {
        (info as *const u8)
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read_unaligned()
    };
    // SAFETY: gettid has no arguments and cannot fail.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) };
    let role = ROLE.with(|r| r.get());
    let ptr = LABEL_PTR.load(Ordering::SeqCst);
    let label: &[u8] = if ptr.is_null() {
        b"?"
    } else {
        // SAFETY: set_label stored a leaked slice's pointer after its
        // length; it is never freed.
        unsafe { std::slice::from_raw_parts(ptr, LABEL_LEN.load(Ordering::SeqCst)) }
    };
    let line = report_line(role, tid, i64::from(nr), label);
    // SAFETY: write(2) of our own stack buffer, then exit_group: both
    // async-signal-safe, both allowed by every filter.
    unsafe {
        libc::write(
            REPORT_FD.load(Ordering::SeqCst),
            line.buf.as_ptr().cast(),
            line.len,
        );
        libc::syscall(libc::SYS_exit_group, EXIT_STATUS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_names_role_tid_call_and_pod() {
        let line = report_line("vcpu", 4242, 41, b"pod-a");
        let text = std::str::from_utf8(&line.buf[..line.len]).unwrap();
        assert_eq!(
            text,
            "ember: seccomp: forbidden system call 41 by the vcpu thread (tid 4242) of pod pod-a: \
             ending this VM (exit status 159)\n"
        );
    }

    #[test]
    fn a_long_label_is_cut_not_overflowed() {
        let label = vec![b'x'; 2000];
        let line = report_line("fs", -1, 0, &label);
        assert_eq!(line.len, line.buf.len());
    }
}
