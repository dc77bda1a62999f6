//! vCPU threads: one OS thread per vCPU running KVM_RUN and dispatching
//! port I/O and MMIO exits to the buses.
//!
//! Stopping: the host sets the exit signal and kicks each thread with a
//! real-time signal whose handler sets `immediate_exit` in that thread's
//! `kvm_run`, so a vCPU about to enter (or inside) KVM_RUN returns at once.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::bus::Bus;
use crate::confine::{self, Role};
use crate::exit::{ExitReason, ExitSignal};
use crate::snapshot::{SnapshotError, VcpuState};
use crate::timing::BootClock;

const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;
const KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES: u64 = 1;
const INT3_OPCODE: u8 = 0xcc;
const BP_VECTOR: u8 = 3;

/// The signal used to kick vCPU threads out of KVM_RUN.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

thread_local! {
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let ptr = KVM_RUN.with(|c| c.get());
    if !ptr.is_null() {
        // SAFETY: the pointer is this thread's own kvm_run mapping, set by
        // the vCPU loop before its first KVM_RUN and cleared before the
        // VcpuFd (and the mapping) is dropped; a byte store is
        // async-signal-safe.
        unsafe { (*ptr).immediate_exit = 1 };
    }
}

static REGISTER_KICK: Once = Once::new();

/// Installs the kick handler once per process.
pub fn register_kick_handler() -> Result<(), std::io::Error> {
    let mut result = Ok(());
    REGISTER_KICK.call_once(|| {
        result = register_signal_handler(kick_signal(), kick_handler)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()));
    });
    result
}

pub struct Vcpu {
    pub fd: VcpuFd,
    pub id: u8,
    pub pio: Bus,
    pub mmio: Bus,
    pub exit: ExitSignal,
    pub clock: BootClock,
    pub inject_breakpoints: bool,
    /// Set by the host to park every vCPU (for a snapshot).
    pub pause: Arc<AtomicBool>,
    /// MSRs to save in a snapshot (KVM's index list).
    pub msr_indices: Arc<Vec<u32>>,
}

/// What the host asks of a parked vCPU thread.
enum Request {
    SaveState,
    Stop,
}

/// What a vCPU thread reports back.
enum Response {
    Paused,
    State(Box<Result<VcpuState, SnapshotError>>),
}

/// A running vCPU thread.
pub struct VcpuHandle {
    pub id: u8,
    thread: Option<JoinHandle<()>>,
    requests: Sender<Request>,
    // In a Mutex so that a `Vm` (which holds these handles) is `Sync` and
    // can be awaited from any task; only the snapshot path receives.
    responses: Mutex<Receiver<Response>>,
}

impl Vcpu {
    pub fn spawn(self) -> std::io::Result<VcpuHandle> {
        let id = self.id;
        let (req_tx, req_rx) = channel();
        let (resp_tx, resp_rx) = channel();
        let thread = std::thread::Builder::new()
            .name(format!("ember-vcpu{id}"))
            .spawn(move || self.run(req_rx, resp_tx))?;
        Ok(VcpuHandle {
            id,
            thread: Some(thread),
            requests: req_tx,
            responses: Mutex::new(resp_rx),
        })
    }

    fn run(mut self, requests: Receiver<Request>, responses: Sender<Response>) {
        let run_ptr: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN.with(|c| c.set(run_ptr));
        // Set-up is done (the vCPU fd is configured, its kvm_run mapped):
        // from here on the guest drives this thread.
        if let Err(e) = confine::thread(Role::Vcpu) {
            let msg = format!("vCPU {}: cannot confine the thread: {e}", self.id);
            tracing::error!("{msg}");
            self.exit.exit(ExitReason::VcpuFailure(msg));
            KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
            return;
        }
        tracing::debug!(vcpu = self.id, "vCPU thread started");
        while !self.exit.should_stop() {
            if self.pause.load(Ordering::SeqCst) {
                if !self.parked(&requests, &responses) {
                    break;
                }
                continue;
            }
            if self.id == 0 {
                self.clock.mark_first_instruction();
            }
            if let Some(reason) = self.run_once() {
                self.exit.exit(reason);
                break;
            }
        }
        KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
        tracing::debug!(vcpu = self.id, "vCPU thread stopped");
    }

    /// Serves host requests while paused; false when the thread must end.
    fn parked(&mut self, requests: &Receiver<Request>, responses: &Sender<Response>) -> bool {
        // An I/O or MMIO exit is only complete once KVM_RUN is entered
        // again; do that with immediate_exit so the saved state is
        // consistent (KVM returns EINTR at once).
        self.fd.set_kvm_immediate_exit(1);
        let _ = self.fd.run();
        self.fd.set_kvm_immediate_exit(0);
        if responses.send(Response::Paused).is_err() {
            return false;
        }
        loop {
            match requests.recv() {
                Ok(Request::SaveState) => {
                    let state = VcpuState::save(&self.fd, self.id, &self.msr_indices);
                    if responses.send(Response::State(Box::new(state))).is_err() {
                        return false;
                    }
                }
                Ok(Request::Stop) | Err(_) => return false,
            }
        }
    }

    /// Runs the guest until the next exit; returns a reason to end the VM.
    fn run_once(&mut self) -> Option<ExitReason> {
        match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                self.pio.read(u64::from(port), data);
                None
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                self.pio.write(u64::from(port), data);
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !self.mmio.read(addr, data) {
                    tracing::debug!(vcpu = self.id, "MMIO read of {addr:#x}: no device");
                }
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if !self.mmio.write(addr, data) {
                    tracing::debug!(vcpu = self.id, "MMIO write of {addr:#x}: no device");
                }
                None
            }
            Ok(VcpuExit::Shutdown) => {
                tracing::info!(vcpu = self.id, "KVM_EXIT_SHUTDOWN (triple fault or reset)");
                Some(ExitReason::TripleFault)
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                tracing::info!(vcpu = self.id, "system event {kind}");
                Some(ExitReason::GuestReset)
            }
            Ok(VcpuExit::Hlt) => Some(ExitReason::VcpuFailure(format!(
                "vCPU {} halted with no in-kernel LAPIC to wake it",
                self.id
            ))),
            Ok(VcpuExit::InternalError) => self.handle_internal_error(),
            Ok(other) => {
                let msg = format!("vCPU {}: unexpected KVM exit {other:?}", self.id);
                tracing::error!("{msg}");
                Some(ExitReason::VcpuFailure(msg))
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // A kick, or an AP still waiting for its startup IPI.
                self.fd.set_kvm_immediate_exit(0);
                None
            }
            Err(e) => {
                let msg = format!("vCPU {}: KVM_RUN failed: {e}", self.id);
                tracing::error!("{msg}");
                Some(ExitReason::VcpuFailure(msg))
            }
        }
    }

    /// Reads the emulation failure's instruction bytes from kvm_run.
    fn emulation_failure(&mut self) -> (u32, Vec<u8>) {
        let run = self.fd.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so KVM filled
        // the `emulation_failure` view of the union (a plain-data struct
        // whose every bit pattern is valid).
        let ef = unsafe { run.__bindgen_anon_1.emulation_failure };
        let mut bytes = Vec::new();
        if ef.suberror == KVM_INTERNAL_ERROR_EMULATION
            && ef.flags & KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES != 0
        {
            // SAFETY: as above; the flag says the bytes are present.
            let insn = unsafe { ef.__bindgen_anon_1.__bindgen_anon_1 };
            let len = usize::from(insn.insn_size).min(insn.insn_bytes.len());
            bytes.extend_from_slice(&insn.insn_bytes[..len]);
        }
        (ef.suberror, bytes)
    }

    fn handle_internal_error(&mut self) -> Option<ExitReason> {
        let (suberror, bytes) = self.emulation_failure();
        if self.inject_breakpoints && bytes.first() == Some(&INT3_OPCODE) {
            match self.inject_breakpoint() {
                Ok(()) => return None,
                Err(e) => tracing::error!(vcpu = self.id, "injecting #BP for int3: {e}"),
            }
        }
        let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
        let msg = format!(
            "vCPU {}: KVM internal error, suberror {suberror}, rip {rip:#x}, instruction {bytes:02x?}",
            self.id
        );
        tracing::error!("{msg}");
        Some(ExitReason::VcpuFailure(msg))
    }

    /// The `emulated` CPU template's int3 remedy: the emulator cannot run a
    /// ring-0 software interrupt, so do what the CPU would: step over the
    /// `int3` and deliver #BP (a trap, so the saved RIP is after it).
    fn inject_breakpoint(&mut self) -> Result<(), kvm_ioctls::Error> {
        let mut regs = self.fd.get_regs()?;
        regs.rip += 1;
        self.fd.set_regs(&regs)?;
        let mut events = self.fd.get_vcpu_events()?;
        events.exception.injected = 1;
        events.exception.nr = BP_VECTOR;
        events.exception.has_error_code = 0;
        events.exception.pending = 0;
        events.exception.error_code = 0;
        self.fd.set_vcpu_events(&events)?;
        tracing::trace!(
            vcpu = self.id,
            "int3 at {:#x} delivered as #BP",
            regs.rip - 1
        );
        Ok(())
    }
}

impl VcpuHandle {
    /// Waits for the thread to park after the shared pause flag was set,
    /// kicking it out of KVM_RUN meanwhile.
    pub fn wait_paused(&self, timeout: Duration) -> Result<(), SnapshotError> {
        let deadline = Instant::now() + timeout;
        let Some(thread) = self.thread.as_ref() else {
            return Err(SnapshotError::Pause(self.id));
        };
        let responses = self.responses.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let _ = thread.kill(kick_signal());
            match responses.recv_timeout(Duration::from_millis(5)) {
                Ok(Response::Paused) => return Ok(()),
                Ok(_) => continue,
                Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => continue,
                Err(_) => return Err(SnapshotError::Pause(self.id)),
            }
        }
    }

    /// Saves the state of a parked vCPU.
    pub fn save_state(&self) -> Result<VcpuState, SnapshotError> {
        self.requests
            .send(Request::SaveState)
            .map_err(|_| SnapshotError::Pause(self.id))?;
        let responses = self.responses.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            match responses.recv_timeout(Duration::from_secs(10)) {
                Ok(Response::State(state)) => return *state,
                Ok(_) => continue,
                Err(_) => return Err(SnapshotError::Pause(self.id)),
            }
        }
    }

    /// Kicks the thread until it has left KVM_RUN (or its parking spot),
    /// then joins it. The exit signal must already be set.
    pub fn stop_and_join(&mut self) {
        let _ = self.requests.send(Request::Stop);
        let Some(thread) = self.thread.take() else {
            return;
        };
        while !thread.is_finished() {
            if let Err(e) = thread.kill(kick_signal()) {
                tracing::warn!(vcpu = self.id, "kicking vCPU thread: {e}");
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        if thread.join().is_err() {
            tracing::error!(vcpu = self.id, "vCPU thread panicked");
        }
    }
}
