//! Confinement of the VMM's threads (`ember_vmm::confine`), in a binary of
//! its own: seccomp filters and dropped capabilities cannot be undone, so
//! every case runs in a child process (this same test binary, re-run with
//! `EMBER_CONFINE_CASE` naming the case) and the parent checks how the
//! child ended: a thread confined as a role makes the system calls its work
//! needs, then (in the violating cases) one its filter forbids, which must
//! end the whole process with the report line and status 159.
//!
//! Root only (dropping the bounding set needs CAP_SETPCAP); skipped when
//! not root.

use std::process::Command;
use std::sync::mpsc::channel;

use ember_vmm::confine::{self, sigsys, ProcessLimits, Role};
use vmm_sys_util::eventfd::EventFd;

const CASE_ENV: &str = "EMBER_CONFINE_CASE";

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Runs `test` of this binary in a child with `case`; returns its exit
/// code and stderr.
fn run_child(test: &str, case: &str) -> (Option<i32>, String) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CASE_ENV, case)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The status line `key` of thread `tid` of this process.
fn status_of(tid: i64, key: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .map(|v| v.trim().to_string())
        .unwrap_or_default()
}

fn gettid() -> i64 {
    // SAFETY: gettid cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) }
}

/// What every guest-driven thread does that its filter must allow:
/// allocate, lock, signal an eventfd it was handed, sleep, log.
fn allowed_work(evt: &EventFd) {
    let big = vec![7u8; 8 << 20];
    assert_eq!(big[big.len() - 1], 7);
    drop(big);
    evt.write(1).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1));
    eprintln!("allowed work done");
}

/// One forbidden call per role, and its number.
fn forbidden_call(role: Role) -> i64 {
    match role {
        // Every arm: a plain system call whose result is ignored; the
        // filter traps it before the kernel runs it.
        // SAFETY: socket(2) with constant arguments.
        Role::Vcpu => unsafe {
            libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            libc::SYS_socket
        },
        // An Internet socket: only AF_UNIX passes the argument check.
        // SAFETY: socket(2) with constant arguments.
        Role::VsockWorker => unsafe {
            libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            libc::SYS_socket
        },
        // SAFETY: openat(2) of a static C string.
        Role::NetWorker => unsafe {
            libc::openat(libc::AT_FDCWD, c"/etc/hostname".as_ptr(), libc::O_RDONLY);
            libc::SYS_openat
        },
        // SAFETY: mount(2) with null arguments (fails or traps).
        Role::FsWorker => unsafe {
            libc::syscall(libc::SYS_mount, 0, 0, 0, 0, 0);
            libc::SYS_mount
        },
        // SAFETY: ptrace(PTRACE_TRACEME) takes no pointers.
        Role::ControlPlane => unsafe {
            libc::syscall(libc::SYS_ptrace, libc::PTRACE_TRACEME, 0, 0, 0);
            libc::SYS_ptrace
        },
    }
}

fn role_named(name: &str) -> Role {
    Role::ALL
        .into_iter()
        .find(|r| r.name() == name)
        .unwrap_or_else(|| panic!("no role {name}"))
}

/// Child side of `a_thread_confined_as_each_role`: `<role>:<clean|violate>`.
fn child_thread_case(case: &str) {
    let (role, violate) = case.split_once(':').unwrap();
    let violate = violate == "violate";
    let role = role_named(role);
    confine::enable().unwrap();
    let (tid_tx, tid_rx) = channel();
    let (go_tx, go_rx) = channel::<()>();
    let evt = EventFd::new(0).unwrap();
    let worker_evt = evt.try_clone().unwrap();
    let worker = std::thread::spawn(move || {
        confine::thread(role).unwrap();
        allowed_work(&worker_evt);
        tid_tx.send(gettid()).unwrap();
        go_rx.recv().unwrap();
        if violate {
            let nr = forbidden_call(role);
            eprintln!("UNREACHED: system call {nr} returned");
        }
    });
    let tid = tid_rx.recv().unwrap();
    // Read by the (unconfined) main thread.
    eprintln!("Seccomp={}", status_of(tid, "Seccomp"));
    eprintln!("CapEff={}", status_of(tid, "CapEff"));
    eprintln!("CapPrm={}", status_of(tid, "CapPrm"));
    eprintln!("CapBnd={}", status_of(tid, "CapBnd"));
    assert_eq!(evt.read().unwrap(), 1);
    go_tx.send(()).unwrap();
    worker.join().unwrap();
    std::process::exit(0);
}

#[test]
fn a_thread_confined_as_each_role() {
    if let Ok(case) = std::env::var(CASE_ENV) {
        child_thread_case(&case);
    }
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    for role in [
        Role::Vcpu,
        Role::VsockWorker,
        Role::NetWorker,
        Role::FsWorker,
    ] {
        let name = role.name();
        let mask = format!("{:016x}", role.capability_mask());

        let (code, err) = run_child("a_thread_confined_as_each_role", &format!("{name}:clean"));
        assert_eq!(code, Some(0), "{name}: allowed work must pass:\n{err}");
        assert!(err.contains("allowed work done"), "{name}:\n{err}");
        assert!(err.contains("Seccomp=2"), "{name}:\n{err}");
        for set in ["CapEff", "CapPrm", "CapBnd"] {
            assert!(
                err.contains(&format!("{set}={mask}")),
                "{name}: {set} must be {mask}:\n{err}"
            );
        }

        let (code, err) = run_child("a_thread_confined_as_each_role", &format!("{name}:violate"));
        assert_eq!(
            code,
            Some(sigsys::EXIT_STATUS),
            "{name}: a forbidden call ends the process:\n{err}"
        );
        let nr = forbidden_call_number(role);
        let expected = format!("{} {nr} by the {name} thread (tid ", sigsys::REPORT_PREFIX);
        assert!(
            err.contains(&expected),
            "{name}: want {expected:?} in:\n{err}"
        );
        assert!(!err.contains("UNREACHED"), "{name}:\n{err}");
    }
}

fn forbidden_call_number(role: Role) -> i64 {
    match role {
        Role::Vcpu | Role::VsockWorker => libc::SYS_socket,
        Role::NetWorker => libc::SYS_openat,
        Role::FsWorker => libc::SYS_mount,
        Role::ControlPlane => libc::SYS_ptrace,
    }
}

/// Child side of `code_cannot_be_made_executable`.
fn child_exec_mapping() {
    confine::enable().unwrap();
    let t = std::thread::spawn(|| {
        confine::thread(Role::Vcpu).unwrap();
        // SAFETY: an anonymous mapping nobody uses; the filter traps it.
        unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
        }
        eprintln!("UNREACHED");
    });
    let _ = t.join();
    std::process::exit(0);
}

#[test]
fn code_cannot_be_made_executable() {
    if std::env::var(CASE_ENV).as_deref() == Ok("exec-mapping") {
        child_exec_mapping();
    }
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let (code, err) = run_child("code_cannot_be_made_executable", "exec-mapping");
    assert_eq!(code, Some(sigsys::EXIT_STATUS), "{err}");
    assert!(
        err.contains(&format!(
            "{} {} by the vcpu thread",
            sigsys::REPORT_PREFIX,
            libc::SYS_mmap
        )),
        "{err}"
    );
}

/// Child side of `workers_started_from_a_vcpu_thread_get_their_own_filter`.
fn child_worker_from_vcpu() {
    confine::enable().unwrap();
    let t = std::thread::spawn(|| {
        confine::thread(Role::Vcpu).unwrap();
        // As `activate` does on the vCPU that wrote DRIVER_OK.
        let worker = confine::spawn("ember-vsock", || {
            confine::thread(Role::VsockWorker).unwrap();
            // SAFETY: socket(2) with constant arguments; the fd is closed.
            let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
            assert!(
                fd >= 0,
                "AF_UNIX socket: {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: closing the fd we just got.
            unsafe { libc::close(fd) };
            eprintln!("worker socket ok");
        })
        .unwrap();
        worker.join().unwrap();
    });
    t.join().unwrap();
    std::process::exit(0);
}

#[test]
fn workers_started_from_a_vcpu_thread_get_their_own_filter() {
    if std::env::var(CASE_ENV).as_deref() == Ok("worker-from-vcpu") {
        child_worker_from_vcpu();
    }
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let (code, err) = run_child(
        "workers_started_from_a_vcpu_thread_get_their_own_filter",
        "worker-from-vcpu",
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("worker socket ok"), "{err}");
}

/// Child side of `the_process_part`.
fn child_process(violate: bool) {
    confine::process(ProcessLimits {
        max_open_files: 2048,
    })
    .unwrap();
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct we pass.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) };
    eprintln!("nofile={}/{}", rl.rlim_cur, rl.rlim_max);
    // A thread created after: it inherits the deny-list and the caps.
    let (tx, rx) = channel();
    let t = std::thread::spawn(move || {
        tx.send(gettid()).unwrap();
        std::thread::park();
        if violate {
            forbidden_call(Role::ControlPlane);
            eprintln!("UNREACHED");
        }
    });
    let tid = rx.recv().unwrap();
    eprintln!("Seccomp={}", status_of(tid, "Seccomp"));
    eprintln!("CapEff={}", status_of(tid, "CapEff"));
    eprintln!("CapBnd={}", status_of(tid, "CapBnd"));
    eprintln!("MainSeccomp={}", status_of(gettid(), "Seccomp"));
    t.thread().unpark();
    t.join().unwrap();
    std::process::exit(0);
}

#[test]
fn the_process_part() {
    match std::env::var(CASE_ENV).as_deref() {
        Ok("process-clean") => child_process(false),
        Ok("process-violate") => child_process(true),
        _ => {}
    }
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let mask = format!("{:016x}", Role::ControlPlane.capability_mask());
    let (code, err) = run_child("the_process_part", "process-clean");
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("nofile=2048/2048"), "{err}");
    assert!(err.contains("Seccomp=2"), "{err}");
    assert!(err.contains("MainSeccomp=2"), "{err}");
    assert!(err.contains(&format!("CapEff={mask}")), "{err}");
    assert!(err.contains(&format!("CapBnd={mask}")), "{err}");

    let (code, err) = run_child("the_process_part", "process-violate");
    assert_eq!(code, Some(sigsys::EXIT_STATUS), "{err}");
    assert!(
        err.contains(&format!(
            "{} {} by the control-plane thread",
            sigsys::REPORT_PREFIX,
            libc::SYS_ptrace
        )),
        "{err}"
    );
}
