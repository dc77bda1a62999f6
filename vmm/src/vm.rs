//! A running microVM: builds it from a [`VmConfig`], runs its vCPUs, waits
//! for its end and tears it down leaving nothing behind.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::x86_64::cpuid::{self, CpuTemplate};
use crate::arch::x86_64::layout::{
    I8042_PORT_BASE, I8042_PORT_LEN, IRQ_MAX, KVM_TSS_ADDRESS, SERIAL_IRQ, SERIAL_PORT_BASE,
    SERIAL_PORT_LEN, VIRTIO_IRQ_BASE, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START,
};
use crate::arch::x86_64::{boot, mptable, regs};
use crate::bus::Bus;
use crate::config::{ConfigError, VmConfig};
use crate::devices::legacy::console_log::CappedLog;
use crate::devices::legacy::i8042::I8042;
use crate::devices::legacy::serial::{ConsoleLog, SerialConsole};
use crate::devices::legacy::IrqfdTrigger;
use crate::devices::virtio::fs::{FsError, FsOptions, VirtioFs};
use crate::devices::virtio::mmio::{
    cmdline_device, MmioInterrupt, MmioTransport, NOTIFY_REG_OFFSET,
};
use crate::devices::virtio::net::{Net, NetError};
use crate::devices::virtio::vsock::{Vsock, VsockError};
use crate::devices::virtio::VirtioDevice;
use crate::exit::{ExitReason, ExitSignal};
use crate::memory::{GuestRam, MemoryError, RamBacking};
use crate::snapshot::{write_memory_file, SnapshotError, SnapshotFiles, SnapshotState, VmState};
use crate::timing::{BootClock, BootTimings};
use crate::vcpu::{register_kick_handler, Vcpu, VcpuHandle};

/// Kernel parameters every Ember guest gets. `reboot=k` makes a reboot or
/// power-off go through the i8042 reset, which ends the VM; `panic=1`
/// turns a kernel panic into that reset after one second.
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off nomodule \
i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("invalid VM config: {0}")]
    Config(#[from] ConfigError),
    #[error("cannot open /dev/kvm (is KVM available and are you allowed to use it?): {0}")]
    Kvm(#[source] kvm_ioctls::Error),
    #[error("KVM {op}: {source}")]
    KvmOp {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    #[error("vCPU setup: {0}")]
    Regs(#[from] regs::RegsError),
    #[error("console log {path}: {source}")]
    ConsoleLog {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Vsock(#[from] VsockError),
    #[error("virtio-net {tap}: {source}")]
    Net {
        tap: String,
        #[source]
        source: NetError,
    },
    #[error("virtio-fs share {tag}: {source}")]
    Fs {
        tag: String,
        #[source]
        source: FsError,
    },
    #[error("virtio-mmio transport: {0}")]
    Mmio(String),
    #[error("too many devices: no IRQ left above {IRQ_MAX}")]
    OutOfIrqs,
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("the VMM build task failed: {0}")]
    Join(String),
}

fn kvm_op(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::KvmOp { op, source }
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> VmError {
    move |source| VmError::Io { what, source }
}

/// A running microVM.
pub struct Vm {
    config: VmConfig,
    template: CpuTemplate,
    cmdline: String,
    exit: ExitSignal,
    clock: BootClock,
    pause: Arc<AtomicBool>,
    vcpus: Vec<VcpuHandle>,
    serial: Option<Arc<Mutex<SerialConsole>>>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    devices: Vec<Arc<Mutex<dyn VirtioDevice>>>,
    // Dropped last, in this order: the VM fd (its irqfds and ioeventfds go
    // with it), then guest memory.
    vm_fd: Option<VmFd>,
    ram: Option<GuestRam>,
    torn_down: bool,
}

/// How a VM comes to life: a fresh boot, or a snapshot.
enum Origin<'a> {
    Boot,
    Restore(&'a SnapshotState, &'a SnapshotFiles),
}

impl Vm {
    /// Builds the VM and starts its vCPUs. Setup is blocking work (KVM
    /// ioctls, reading the kernel), so it runs on tokio's blocking pool.
    pub async fn start(config: VmConfig) -> Result<Vm, VmError> {
        tokio::task::spawn_blocking(move || Vm::build(config))
            .await
            .map_err(|e| VmError::Join(e.to_string()))?
    }

    /// The blocking builder behind [`Vm::start`]. On error, everything
    /// created so far is released before returning.
    pub(crate) fn build(config: VmConfig) -> Result<Vm, VmError> {
        let mut vm = Vm::empty(config)?;
        // If anything below fails, `vm` is dropped and tears down what exists.
        vm.setup(Origin::Boot)?;
        Ok(vm)
    }

    /// Creates a VM from a snapshot taken with [`Vm::snapshot`]. `config`
    /// gives the new VM's own host resources (vsock socket path, shares,
    /// console log); its shape must match the snapshot, and `identity` must
    /// equal the one the snapshot was taken with. Nothing is created if the
    /// snapshot is refused.
    pub async fn restore(
        config: VmConfig,
        files: SnapshotFiles,
        identity: String,
    ) -> Result<Vm, VmError> {
        tokio::task::spawn_blocking(move || Vm::restore_blocking(config, &files, &identity))
            .await
            .map_err(|e| VmError::Join(e.to_string()))?
    }

    pub(crate) fn restore_blocking(
        config: VmConfig,
        files: &SnapshotFiles,
        identity: &str,
    ) -> Result<Vm, VmError> {
        let state = SnapshotState::read(&files.state())?;
        if state.identity != identity {
            return Err(SnapshotError::Identity {
                expected: identity.to_string(),
                found: state.identity,
            }
            .into());
        }
        let mem_size = u64::from(config.mem_mib) << 20;
        let mem_path = files.memory();
        let found = std::fs::metadata(&mem_path)
            .map_err(|source| SnapshotError::Io {
                path: mem_path.clone(),
                source,
            })?
            .len();
        if state.mem_size != mem_size || found != mem_size {
            return Err(SnapshotError::MemorySize {
                path: mem_path,
                found,
                expected: state.mem_size,
            }
            .into());
        }
        if state.vcpus.len() != usize::from(config.vcpus) {
            return Err(SnapshotError::Format(format!(
                "snapshot has {} vCPUs, the config asks for {}",
                state.vcpus.len(),
                config.vcpus
            ))
            .into());
        }
        let mut vm = Vm::empty(config)?;
        vm.setup(Origin::Restore(&state, files))?;
        Ok(vm)
    }

    fn empty(config: VmConfig) -> Result<Vm, VmError> {
        let setup_started = Instant::now();
        config.validate()?;
        let template = config.cpu_template.resolve();
        Ok(Vm {
            config,
            template,
            cmdline: String::new(),
            exit: ExitSignal::new(),
            clock: BootClock::new(setup_started),
            pause: Arc::new(AtomicBool::new(false)),
            vcpus: Vec::new(),
            serial: None,
            transports: Vec::new(),
            devices: Vec::new(),
            vm_fd: None,
            ram: None,
            torn_down: false,
        })
    }

    fn setup(&mut self, origin: Origin<'_>) -> Result<(), VmError> {
        let setup_started = Instant::now();
        let config = self.config.clone();
        tracing::info!(
            cpu_template = %self.template,
            vcpus = config.vcpus,
            mem_mib = config.mem_mib,
            kernel = %config.kernel.display(),
            restore = matches!(origin, Origin::Restore(..)),
            "building microVM"
        );
        register_kick_handler().map_err(io("installing the vCPU kick signal handler"))?;

        let kvm = Kvm::new().map_err(VmError::Kvm)?;
        let vm_fd = kvm.create_vm().map_err(kvm_op("CREATE_VM"))?;
        vm_fd
            .set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(kvm_op("SET_TSS_ADDR"))?;
        vm_fd.create_irq_chip().map_err(kvm_op("CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm_fd.create_pit2(pit).map_err(kvm_op("CREATE_PIT2"))?;

        let ram = match origin {
            Origin::Boot => GuestRam::new(config.mem_mib)?,
            Origin::Restore(state, files) => {
                GuestRam::from_snapshot(&files.memory(), state.mem_size)?
            }
        };
        ram.register(&vm_fd)?;
        let mem = ram.mem.clone();
        self.ram = Some(ram);

        let mut kernel = None;
        if let Origin::Boot = origin {
            let (entry, kernel_end) = boot::load_kernel(&mem, &config.kernel)?;
            let initrd = match &config.initrd {
                Some(path) => Some(boot::load_initrd(&mem, path, kernel_end)?),
                None => None,
            };
            kernel = Some((entry, initrd));
        }

        // Legacy devices on port I/O.
        let mut pio = Bus::new();
        let mut mmio = Bus::new();
        let console_file = match &config.console_log {
            Some(path) => Some(CappedLog::open(path, config.console_log_max_bytes).map_err(
                |source| VmError::ConsoleLog {
                    path: path.clone(),
                    source,
                },
            )?),
            None => None,
        };
        let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(io("serial irqfd"))?;
        vm_fd
            .register_irqfd(&serial_irq, SERIAL_IRQ)
            .map_err(kvm_op("IRQFD (serial)"))?;
        let console = ConsoleLog::new(console_file, self.clock.clone(), self.exit.clone());
        let serial = match origin {
            Origin::Boot => SerialConsole::new(IrqfdTrigger(serial_irq), console),
            Origin::Restore(state, _) => SerialConsole::from_state(
                &(&state.serial).into(),
                IrqfdTrigger(serial_irq),
                console,
            )
            .map_err(SnapshotError::Format)?,
        };
        let serial = Arc::new(Mutex::new(serial));
        self.serial = Some(serial.clone());
        pio.insert(serial, SERIAL_PORT_BASE, SERIAL_PORT_LEN)
            .map_err(|e| VmError::Mmio(e.to_string()))?;
        pio.insert(
            Arc::new(Mutex::new(I8042::new(self.exit.clone()))),
            I8042_PORT_BASE,
            I8042_PORT_LEN,
        )
        .map_err(|e| VmError::Mmio(e.to_string()))?;

        // virtio-mmio devices, announced on the command line.
        let mut cmdline_devices = Vec::new();
        let mut vsock_dev: Option<Arc<Mutex<Vsock>>> = None;
        let mut virtio: Vec<Arc<Mutex<dyn VirtioDevice>>> = Vec::new();
        if let Some(vs) = &config.vsock {
            let dev = Arc::new(Mutex::new(Vsock::new(
                u64::from(vs.guest_cid),
                vs.uds_path.clone(),
            )?));
            vsock_dev = Some(dev.clone());
            virtio.push(dev);
        }
        for share in &config.fs_shares {
            let opts = FsOptions {
                limits: share.limits,
                ..FsOptions::default()
            };
            let mut dev =
                VirtioFs::new(&share.tag, share.shared_dir.clone(), opts).map_err(|source| {
                    VmError::Fs {
                        tag: share.tag.clone(),
                        source,
                    }
                })?;
            if let Origin::Restore(..) = origin {
                dev.mark_restored();
            }
            virtio.push(Arc::new(Mutex::new(dev)));
        }
        for nic in &config.net {
            let net_err = |source| VmError::Net {
                tap: nic.tap.clone(),
                source,
            };
            let mut dev = match &nic.netns {
                Some(ns) => Net::open_tap_in_netns(ns, &nic.tap, nic.mac),
                None => Net::open_tap(&nic.tap, nic.mac),
            }
            .map_err(net_err)?;
            if let Some(mtu) = nic.mtu {
                dev = dev.with_mtu(mtu).map_err(net_err)?;
            }
            virtio.push(Arc::new(Mutex::new(dev)));
        }
        if let Origin::Restore(state, _) = origin {
            if state.devices.len() != virtio.len() {
                return Err(SnapshotError::Format(format!(
                    "snapshot has {} virtio devices, the config places {}",
                    state.devices.len(),
                    virtio.len()
                ))
                .into());
            }
        }
        for (i, device) in virtio.into_iter().enumerate() {
            let base = VIRTIO_MMIO_START + (i as u64) * VIRTIO_MMIO_SIZE;
            let irq = VIRTIO_IRQ_BASE + i as u32;
            if irq > IRQ_MAX {
                return Err(VmError::OutOfIrqs);
            }
            self.devices.push(device.clone());
            let interrupt = MmioInterrupt::new().map_err(io("virtio irqfd"))?;
            vm_fd
                .register_irqfd(interrupt.irqfd(), irq)
                .map_err(kvm_op("IRQFD (virtio)"))?;
            let transport = match origin {
                Origin::Boot => MmioTransport::new(mem.clone(), device, interrupt),
                Origin::Restore(state, _) => {
                    MmioTransport::restore(mem.clone(), device, interrupt, &state.devices[i])
                }
            }
            .map_err(|e| VmError::Mmio(e.to_string()))?;
            for (q, evt) in transport.queue_evts().iter().enumerate() {
                vm_fd
                    .register_ioevent(
                        evt,
                        &IoEventAddress::Mmio(base + NOTIFY_REG_OFFSET),
                        q as u32,
                    )
                    .map_err(kvm_op("IOEVENTFD"))?;
            }
            let transport = Arc::new(Mutex::new(transport));
            self.transports.push(transport.clone());
            mmio.insert(transport, base, VIRTIO_MMIO_SIZE)
                .map_err(|e| VmError::Mmio(e.to_string()))?;
            cmdline_devices.push(cmdline_device(base, VIRTIO_MMIO_SIZE, irq));
        }

        match origin {
            Origin::Boot => {
                let mut cmdline = BASE_CMDLINE.to_string();
                for part in [self.template.kernel_params(), cmdline_devices.join(" ")]
                    .iter()
                    .chain(std::iter::once(&config.cmdline_extra))
                {
                    if !part.trim().is_empty() {
                        cmdline.push(' ');
                        cmdline.push_str(part.trim());
                    }
                }
                let (_, initrd) = kernel.unwrap_or((0, None));
                boot::configure_system(&mem, &cmdline, initrd)?;
                mptable::setup_mptable(&mem, config.vcpus)?;
                regs::setup_boot_tables(&mem)?;
                tracing::debug!(%cmdline, "kernel command line");
                self.cmdline = cmdline;
            }
            Origin::Restore(state, _) => {
                state.vm.restore(&vm_fd)?;
                self.cmdline = state.cmdline.clone();
                // The guest's vsock connections belonged to the VM the
                // snapshot was taken from: tell the guest to drop them.
                if let Some(v) = &vsock_dev {
                    v.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .send_transport_reset()?;
                }
            }
        }

        // vCPUs: create and configure all before starting any.
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_op("GET_SUPPORTED_CPUID"))?;
        let msr_indices = Arc::new(
            kvm.get_msr_index_list()
                .map(|l| l.as_slice().to_vec())
                .unwrap_or_default(),
        );
        let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
        for id in 0..config.vcpus {
            let fd = vm_fd
                .create_vcpu(u64::from(id))
                .map_err(kvm_op("CREATE_VCPU"))?;
            match origin {
                Origin::Boot => {
                    let mut cpuid = supported.clone();
                    cpuid::apply(&mut cpuid, self.template, id, config.vcpus);
                    fd.set_cpuid2(&cpuid).map_err(kvm_op("SET_CPUID2"))?;
                    regs::setup_vcpu(&fd, (id == 0).then(|| kernel.map(|k| k.0).unwrap_or(0)))?;
                }
                Origin::Restore(state, _) => {
                    state.vcpus[usize::from(id)].restore(&fd)?;
                }
            }
            vcpus.push(Vcpu {
                fd,
                id,
                pio: pio.clone(),
                mmio: mmio.clone(),
                exit: self.exit.clone(),
                clock: self.clock.clone(),
                inject_breakpoints: self.template.injects_breakpoints(),
                pause: self.pause.clone(),
                msr_indices: msr_indices.clone(),
            });
        }
        self.vm_fd = Some(vm_fd);
        for vcpu in vcpus {
            let handle = vcpu.spawn().map_err(io("spawning a vCPU thread"))?;
            self.vcpus.push(handle);
        }
        tracing::info!(
            setup_ms = setup_started.elapsed().as_millis() as u64,
            "microVM started"
        );
        Ok(())
    }

    /// Pauses the VM, writes a snapshot (memory file and state file) into
    /// `files.dir`, and ends the VM. `identity` is what a later restore
    /// must present (e.g. a hash of kernel, initrd, agent and config).
    pub async fn snapshot(self, files: SnapshotFiles, identity: String) -> Result<(), VmError> {
        tokio::task::spawn_blocking(move || {
            let mut vm = self;
            let res = vm.snapshot_blocking(&files, &identity);
            vm.teardown();
            res
        })
        .await
        .map_err(|e| VmError::Join(e.to_string()))?
    }

    fn snapshot_blocking(&mut self, files: &SnapshotFiles, identity: &str) -> Result<(), VmError> {
        let started = Instant::now();
        if let Some(reason) = self.exit.reason() {
            return Err(
                SnapshotError::Format(format!("the VM has already ended: {reason}")).into(),
            );
        }
        std::fs::create_dir_all(&files.dir).map_err(|source| SnapshotError::Io {
            path: files.dir.clone(),
            source,
        })?;
        self.pause.store(true, Ordering::SeqCst);
        for vcpu in &self.vcpus {
            vcpu.wait_paused(Duration::from_secs(10))?;
        }
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for vcpu in &self.vcpus {
            vcpus.push(vcpu.save_state()?);
        }
        let vm_fd = self
            .vm_fd
            .as_ref()
            .ok_or_else(|| SnapshotError::Format("VM fd gone".into()))?;
        let vm_state = VmState::save(vm_fd)?;
        let serial = self
            .serial
            .as_ref()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).state())
            .unwrap_or_default();
        let devices = self
            .transports
            .iter()
            .map(|t| t.lock().unwrap_or_else(|p| p.into_inner()).save_state())
            .collect();
        let ram = self
            .ram
            .as_ref()
            .ok_or_else(|| SnapshotError::Format("guest memory gone".into()))?;
        write_memory_file(&ram.file, ram.size, &files.memory())?;
        let state = SnapshotState {
            identity: identity.to_string(),
            mem_size: ram.size,
            cmdline: self.cmdline.clone(),
            vcpus,
            vm: vm_state,
            serial: serial.into(),
            devices,
        };
        state.write(&files.state())?;
        tracing::info!(
            dir = %files.dir.display(),
            ms = started.elapsed().as_millis() as u64,
            "snapshot written"
        );
        Ok(())
    }

    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// The CPU template in use (`auto` resolved).
    pub fn cpu_template(&self) -> CpuTemplate {
        self.template
    }

    /// The full kernel command line the guest got.
    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    pub fn timings(&self) -> BootTimings {
        self.clock.marks().timings()
    }

    pub fn clock(&self) -> &BootClock {
        &self.clock
    }

    /// Why the VM ended, if it has.
    pub fn exit_reason(&self) -> Option<ExitReason> {
        self.exit.reason()
    }

    /// Waits for the guest to end (reset, panic, failure) or for
    /// [`Vm::stop`].
    pub async fn wait(&self) -> ExitReason {
        self.exit.wait().await
    }

    /// Tells the VM to stop; [`Vm::shutdown`] still has to be called.
    pub fn stop(&self) {
        self.exit.exit(ExitReason::Stopped);
    }

    /// Guest memory size and how much host memory the guest uses: pages
    /// allocated in the memfd of a booted VM, or pages a restored VM wrote
    /// (its private copies; unwritten pages are shared with the snapshot).
    pub fn guest_memory_usage(&self) -> Option<(u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        let ram = self.ram.as_ref()?;
        match &ram.backing {
            RamBacking::Memfd => {
                let blocks = ram.file.metadata().ok()?.blocks();
                Some((ram.size, blocks * 512))
            }
            RamBacking::SnapshotFile(path) => {
                Some((ram.size, crate::process_memory::private_dirty_of(path)))
            }
        }
    }

    /// Stops the vCPUs and devices and releases everything: threads, fds,
    /// sockets and the guest memory mapping. Returns why the VM ended.
    pub async fn shutdown(mut self) -> ExitReason {
        let reason = tokio::task::spawn_blocking(move || {
            self.teardown();
            self.exit.reason().unwrap_or(ExitReason::Stopped)
        })
        .await;
        reason.unwrap_or(ExitReason::Stopped)
    }

    fn teardown(&mut self) {
        if self.torn_down {
            return;
        }
        self.torn_down = true;
        self.exit.exit(ExitReason::Stopped);
        for vcpu in &mut self.vcpus {
            vcpu.stop_and_join();
        }
        self.vcpus.clear();
        for device in self.devices.drain(..) {
            let mut dev = device.lock().unwrap_or_else(|p| p.into_inner());
            dev.shutdown();
        }
        self.transports.clear();
        self.serial = None;
        self.vm_fd = None;
        self.ram = None;
        tracing::info!(reason = ?self.exit.reason(), "microVM torn down");
    }
}

// The shim awaits `Vm::wait` from tasks of a multi-threaded runtime.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Vm>();
};

impl Drop for Vm {
    fn drop(&mut self) {
        self.teardown();
    }
}
