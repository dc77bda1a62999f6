//! The VMM's confinement end to end, through a real containerd and `ctr`,
//! with two pods in two VMs (two serving shims):
//!
//! 1. every thread of each shim runs under seccomp (`Seccomp: 2` in
//!    `/proc/<shim>/task/<tid>/status`), guest-driven threads (vCPUs and
//!    device workers) under one filter more than the control plane, and
//!    each thread holds exactly the capabilities of its role
//!    (`ember_vmm::confine`'s table: none for vCPU, vsock and net threads,
//!    the passthrough set for virtio-fs, the control plane's set for the
//!    rest) in its effective, permitted and bounding sets;
//! 2. a compromised vCPU thread of pod A makes a system call outside its
//!    filter. ptrace plays the compromised thread: the test seizes one vCPU
//!    thread of pod A's shim, stops it at a system-call entry, rewrites the
//!    call's number to `socket(2)` (seccomp checks the call after the
//!    tracer's change, Linux >= 4.8), lets the SIGSYS through and detaches.
//!    No hook in the product. Then pod A's shim has ended with the report
//!    line in containerd's log, pod A's task is reported exited, and pod B
//!    still answers `ctr task exec`.
//!
//! Skipped, loudly, when /dev/kvm or the guest kernel/initrd are missing.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use ember_e2e::containerd::{Containerd, CtrOutput, Options, EMBER_RUNTIME};
use ember_e2e::image::BUSYBOX_IMAGE;
use ember_e2e::vm_prerequisites_missing as missing_prerequisites;
use ember_vmm::confine::{sigsys, Role};

/// A pod start that may boot cold (generous: CI machines without VT-x
/// emulate guest ring 0, and may be busy).
const COLD_TIMEOUT: Duration = Duration::from_secs(900);
const TASK_TIMEOUT: Duration = Duration::from_secs(120);
const POD_A: &str = "confine-a";
const POD_B: &str = "confine-b";

/// The role of a shim thread, from its name.
fn role_of(comm: &str) -> Role {
    if comm.starts_with("ember-vcpu") {
        Role::Vcpu
    } else if comm == "ember-vsock" {
        Role::VsockWorker
    } else if comm == "ember-net" {
        Role::NetWorker
    } else if comm == "ember-virtiofs" {
        Role::FsWorker
    } else {
        Role::ControlPlane
    }
}

/// One thread of a shim, as /proc shows it.
#[derive(Debug)]
struct ThreadStatus {
    tid: i32,
    comm: String,
    fields: BTreeMap<String, String>,
}

impl ThreadStatus {
    fn get(&self, key: &str) -> &str {
        self.fields.get(key).map(String::as_str).unwrap_or("")
    }

    fn caps(&self, key: &str) -> Result<u64> {
        u64::from_str_radix(self.get(key), 16)
            .with_context(|| format!("{key} of thread {} ({})", self.tid, self.comm))
    }
}

fn threads_of(pid: i32) -> Result<Vec<ThreadStatus>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let entry = entry?;
        let Ok(tid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // A thread may end between the listing and the read.
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let fields: BTreeMap<String, String> = status
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.to_string(), v.trim().to_string()))
            .collect();
        let comm = fields.get("Name").cloned().unwrap_or_default();
        out.push(ThreadStatus { tid, comm, fields });
    }
    Ok(out)
}

/// Checks every thread of shim `pid` against the table; returns the tids
/// of its vCPU threads.
fn check_shim_threads(pod: &str, pid: i32) -> Result<Vec<i32>> {
    let threads = threads_of(pid)?;
    let mut seen = BTreeMap::<&'static str, usize>::new();
    let mut control_filters = None;
    let mut vcpus = Vec::new();
    for t in &threads {
        let role = role_of(&t.comm);
        ensure!(
            t.get("Seccomp") == "2",
            "pod {pod}: thread {} ({}) has Seccomp: {:?}",
            t.tid,
            t.comm,
            t.get("Seccomp")
        );
        if t.comm.starts_with("kvm-") {
            // KVM's own workers in the VMM's thread group (the NX huge page
            // recovery task): they never run user code, and carry the
            // confinement of the thread they were forked from, a vCPU
            // (newer kernels start them at the first KVM_RUN) or the
            // control plane (at KVM_CREATE_VM).
            let eff = t.caps("CapEff")?;
            ensure!(
                eff == Role::Vcpu.capability_mask() || eff == Role::ControlPlane.capability_mask(),
                "pod {pod}: KVM worker {} ({}) has CapEff {eff:016x}",
                t.tid,
                t.comm
            );
            *seen.entry("kvm-worker").or_default() += 1;
            continue;
        }
        *seen.entry(role.name()).or_default() += 1;
        let want = role.capability_mask();
        for set in ["CapEff", "CapPrm", "CapBnd"] {
            let got = t.caps(set)?;
            ensure!(
                got == want,
                "pod {pod}: thread {} ({}, role {}) has {set} {got:016x}, the table says {want:016x}",
                t.tid,
                t.comm,
                role.name()
            );
        }
        for set in ["CapInh", "CapAmb"] {
            ensure!(
                t.caps(set)? == 0,
                "pod {pod}: thread {} ({}) has {set} {}",
                t.tid,
                t.comm,
                t.get(set)
            );
        }
        let filters: u32 = t.get("Seccomp_filters").parse().unwrap_or(0);
        if role == Role::ControlPlane {
            control_filters = Some(filters);
        } else {
            ensure!(
                filters >= 2,
                "pod {pod}: guest-driven thread {} ({}) has {filters} filter(s): its own allow-list is missing",
                t.tid,
                t.comm
            );
        }
        if role == Role::Vcpu {
            vcpus.push(t.tid);
        }
    }
    println!(
        "[vmm_confinement] pod {pod}: shim {pid}, {} threads by role {seen:?}, control-plane filters {control_filters:?}, all Seccomp: 2 with their table's capabilities",
        threads.len()
    );
    for role in [
        Role::Vcpu,
        Role::VsockWorker,
        Role::FsWorker,
        Role::ControlPlane,
    ] {
        ensure!(
            seen.contains_key(role.name()),
            "pod {pod}: no {} thread among {:?}",
            role.name(),
            threads.iter().map(|t| &t.comm).collect::<Vec<_>>()
        );
    }
    Ok(vcpus)
}

/// ptrace(2) with integer arguments; errors with context.
fn ptrace(req: libc::c_uint, tid: i32, addr: usize, data: usize, what: &str) -> Result<i64> {
    // SAFETY: ptrace requests on a thread we attached to, with integer
    // arguments or pointers to live structs of the right type.
    let rc = unsafe { libc::ptrace(req, tid, addr, data) };
    if rc < 0 {
        bail!(
            "ptrace {what} on {tid}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(rc)
}

/// Waits for the next stop of tracee `tid`; returns the wait status.
fn wait_stop(tid: i32) -> Result<i32> {
    let mut status = 0;
    // SAFETY: waitpid fills the int we pass.
    let rc = unsafe { libc::waitpid(tid, &mut status, libc::__WALL) };
    if rc < 0 {
        bail!("waitpid {tid}: {}", std::io::Error::last_os_error());
    }
    if !libc::WIFSTOPPED(status) {
        bail!("tracee {tid} did not stop (wait status {status:#x})");
    }
    Ok(status)
}

/// Plays a compromised vCPU thread: makes thread `tid` execute
/// `socket(2)` instead of the next system call it enters, and lets the
/// resulting SIGSYS through.
fn make_thread_call_socket(tid: i32) -> Result<()> {
    ptrace(
        libc::PTRACE_SEIZE,
        tid,
        0,
        libc::PTRACE_O_TRACESYSGOOD as usize,
        "SEIZE",
    )?;
    ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0, "INTERRUPT")?;
    wait_stop(tid)?;
    // To the next system-call entry (a SIGTRAP|0x80 stop); other stops
    // (the vCPU kick signal, say) are passed on.
    let mut deliver = 0usize;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        ensure!(Instant::now() < deadline, "no system-call stop of {tid}");
        ptrace(libc::PTRACE_SYSCALL, tid, 0, deliver, "SYSCALL")?;
        let status = wait_stop(tid)?;
        let sig = libc::WSTOPSIG(status);
        if sig == libc::SIGTRAP | 0x80 {
            break;
        }
        deliver = if sig == libc::SIGTRAP || status >> 16 != 0 {
            0
        } else {
            sig as usize
        };
    }
    // SAFETY: user_regs_struct is plain data; PTRACE_GETREGS fills it.
    let mut regs: libc::user_regs_struct = unsafe { std::mem::zeroed() };
    ptrace(
        libc::PTRACE_GETREGS,
        tid,
        0,
        &mut regs as *mut _ as usize,
        "GETREGS",
    )?;
    println!(
        "[vmm_confinement] vCPU thread {tid} stopped entering system call {}; rewriting it to socket ({})",
        regs.orig_rax,
        libc::SYS_socket
    );
    regs.orig_rax = libc::SYS_socket as u64;
    regs.rdi = libc::AF_INET as u64;
    regs.rsi = libc::SOCK_STREAM as u64;
    regs.rdx = 0;
    ptrace(
        libc::PTRACE_SETREGS,
        tid,
        0,
        &regs as *const _ as usize,
        "SETREGS",
    )?;
    // Continue: seccomp now sees socket(2) and traps it; the next stop is
    // the SIGSYS delivery, which we pass on as we detach.
    ptrace(libc::PTRACE_CONT, tid, 0, 0, "CONT")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        ensure!(Instant::now() < deadline, "no SIGSYS stop of {tid}");
        let status = wait_stop(tid)?;
        let sig = libc::WSTOPSIG(status);
        if sig == libc::SIGSYS {
            ptrace(libc::PTRACE_DETACH, tid, 0, libc::SIGSYS as usize, "DETACH")?;
            return Ok(());
        }
        let pass = if status >> 16 != 0 || sig == libc::SIGTRAP {
            0
        } else {
            sig as usize
        };
        ptrace(libc::PTRACE_CONT, tid, 0, pass, "CONT")?;
    }
}

struct Pods<'a> {
    ctrd: &'a Containerd,
}

impl Pods<'_> {
    fn ctr(&self, args: &[&str], timeout: Duration) -> CtrOutput {
        self.ctrd.ctr_timeout(args, timeout)
    }

    fn start(&self, id: &str) -> Result<()> {
        let out = self.ctr(
            &[
                "run",
                "-d",
                "--runtime",
                EMBER_RUNTIME,
                BUSYBOX_IMAGE,
                id,
                "sleep",
                "100000",
            ],
            COLD_TIMEOUT,
        );
        out.ok()
            .with_context(|| format!("starting pod {id}\n{}", self.ctrd.log_tail(40)))?;
        Ok(())
    }

    fn exec(&self, id: &str, exec_id: &str, script: &str) -> CtrOutput {
        self.ctr(
            &["task", "exec", "--exec-id", exec_id, id, "sh", "-c", script],
            TASK_TIMEOUT,
        )
    }

    /// The serving shim of pod `id` (one container per pod: its `-id`).
    fn shim_pid(&self, id: &str) -> Result<i32> {
        let needle = format!("-id {id} ");
        let found: Vec<i32> = self
            .ctrd
            .shim_processes()
            .into_iter()
            .filter(|(_, cmd)| cmd.contains(&needle) && cmd.contains("-socket"))
            .map(|(pid, _)| pid)
            .collect();
        match found.as_slice() {
            [pid] => Ok(*pid),
            other => bail!("pod {id}: expected one serving shim, found {other:?}"),
        }
    }

    fn remove(&self, id: &str) {
        let _ = self.ctr(&["task", "kill", "-s", "KILL", id], TASK_TIMEOUT);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let out = self.ctr(&["task", "delete", id], TASK_TIMEOUT);
            if out.success() || out.stderr_str().contains("not found") {
                break;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        let _ = self.ctr(&["containers", "delete", id], TASK_TIMEOUT);
    }
}

fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.contains(") Z "))
            .unwrap_or(true)
}

fn cases(pods: &Pods<'_>) -> Result<()> {
    let events = pods.ctrd.events()?;
    pods.start(POD_A)?;
    pods.start(POD_B)?;
    let (shim_a, shim_b) = (pods.shim_pid(POD_A)?, pods.shim_pid(POD_B)?);
    ensure!(shim_a != shim_b, "the two pods share one shim");
    // The pods are up: their vsock and virtio-fs workers run.
    for pod in [POD_A, POD_B] {
        pods.exec(pod, "warm", "echo up")
            .ok()
            .with_context(|| format!("exec in {pod}"))?;
    }

    let vcpus_a = check_shim_threads(POD_A, shim_a)?;
    check_shim_threads(POD_B, shim_b)?;

    // The attack.
    let victim = *vcpus_a.first().context("pod A has no vCPU thread")?;
    make_thread_call_socket(victim)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while alive(shim_a) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    ensure!(!alive(shim_a), "pod A's shim still runs after SIGSYS");
    ensure!(alive(shim_b), "pod B's shim ended too");

    let expected = format!(
        "{} {} by the vcpu thread (tid {victim}) of pod default/{POD_A}: ending this VM (exit status {})",
        sigsys::REPORT_PREFIX,
        libc::SYS_socket,
        sigsys::EXIT_STATUS
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pods.ctrd.log().contains(&expected) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    ensure!(
        pods.ctrd.log().contains(&expected),
        "containerd's log lacks {expected:?}:\n{}",
        pods.ctrd.log_tail(40)
    );
    println!("[vmm_confinement] containerd's log: {expected}");

    let exit = events.wait_for(Duration::from_secs(60), |e| {
        e.topic == "/tasks/exit" && e.body.contains(POD_A)
    });
    ensure!(
        exit.is_some(),
        "no /tasks/exit event for pod A:\n{}",
        events.text()
    );
    let out = pods.exec(POD_A, "after", "echo still-here");
    ensure!(
        !out.success(),
        "pod A still answers exec after its VM ended: {}",
        out.stdout_str()
    );

    let out = pods.exec(POD_B, "alive", "echo alive");
    out.ok().context("pod B after pod A's VM ended")?;
    ensure!(
        out.stdout_str().trim() == "alive",
        "pod B: {}",
        out.describe()
    );
    check_shim_threads(POD_B, shim_b)?;
    println!("[vmm_confinement] pod B still answers exec; its shim is intact");
    Ok(())
}

#[test]
fn a_forbidden_call_on_a_vcpu_thread_ends_only_that_vm() {
    if let Some(why) = missing_prerequisites() {
        let msg = format!("\n!!! SKIPPING the VMM confinement end-to-end test: {why}\n");
        println!("{msg}");
        eprintln!("{msg}");
        return;
    }
    let t_all = Instant::now();
    let mut opts = Options::with_ember().expect("containerd-shim-ember-v2 is built");
    if let Some(config) = opts.ember_config.as_mut() {
        config.push_str("boot_timeout_secs = 900\n");
    }
    let ctrd = Containerd::start(opts).expect("containerd starts");
    let pods = Pods { ctrd: &ctrd };
    let result = cases(&pods);
    for id in [POD_A, POD_B] {
        pods.remove(id);
    }
    if result.is_err() {
        println!(
            "[vmm_confinement] containerd log tail:\n{}",
            ctrd.log_tail(80)
        );
    }
    let report = ctrd.shutdown();
    println!(
        "[vmm_confinement] done in {:.1}s",
        t_all.elapsed().as_secs_f64()
    );
    if let Err(e) = result {
        panic!("{e:#}");
    }
    // Pod A's shim died of the forbidden call on purpose; nothing else may.
    assert!(
        report.leftover_shims.is_empty() && report.leftover_mounts.is_empty(),
        "containerd shutdown left: {report:?}"
    );
    assert!(
        report
            .shim_deaths
            .iter()
            .all(|l| l.contains(&format!("of pod default/{POD_A}:"))),
        "a shim other than pod A's died: {:?}",
        report.shim_deaths
    );
}
