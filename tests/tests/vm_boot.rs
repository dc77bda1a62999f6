//! Boots the real guest kernel with the real agent under real KVM, talks to
//! the agent over virtio-vsock through the hybrid Unix socket, shuts the VM
//! down and checks that nothing leaked. One VM for all of it: a boot costs
//! about a minute on hosts whose KVM emulates ring 0.

use std::time::{Duration, Instant};

use ember_e2e::{
    init_tracing, print_phases, vm_config, wait_for_agent, ProcessResources, AGENT_PORT,
};
use ember_proto::agent::{ShutdownRequest, VersionRequest};
use ember_proto::client;
use ember_vmm::connect_hybrid_timeout;
use ember_vmm::{ExitReason, Vm};

const BOOT_DEADLINE: Duration = Duration::from_secs(600);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_boots_and_agent_answers_over_vsock() {
    init_tracing();
    // The VM's threads confine themselves as in the shim (SIGSYS ends this
    // test process with status 159 and a line naming the call).
    ember_vmm::confine::enable().expect("enabling confinement");
    let dir = tempfile::tempdir().unwrap();
    let before = ProcessResources::snapshot();

    let t0 = Instant::now();
    let vm = Vm::start(vm_config(dir.path(), 3))
        .await
        .expect("VM starts");
    let agent = match wait_for_agent(&vm, BOOT_DEADLINE).await {
        Ok(a) => a,
        Err(e) => {
            let console =
                std::fs::read_to_string(dir.path().join("console.log")).unwrap_or_default();
            panic!("{e}\n--- guest console ---\n{console}");
        }
    };
    let agent_ready = t0.elapsed();
    print_phases("vm_boot", &vm, Some(agent_ready));
    let during = ProcessResources::snapshot();
    assert!(
        during
            .vmm_threads
            .iter()
            .filter(|t| t.starts_with("ember-vcpu"))
            .count()
            == 2,
        "two vCPU threads while running: {:?}",
        during.vmm_threads
    );
    assert!(during.guest_mappings >= 1);

    // Version: the agent we built, on the kernel we built.
    let version = agent
        .version(
            client::context(Duration::from_secs(30)),
            &VersionRequest::new(),
        )
        .await
        .expect("Version answers");
    assert_eq!(version.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(version.protocol_version, 1);
    assert!(
        version.kernel_release.ends_with("-ember"),
        "guest kernel is ours: {}",
        version.kernel_release
    );

    // A second connection works alongside the first.
    let uds = dir.path().join("vsock.sock");
    let second = connect_hybrid_timeout(&uds, AGENT_PORT, Duration::from_secs(30))
        .await
        .expect("second connection to the agent port");
    drop(second);

    // A guest port nobody listens on is a clear error, not a hang.
    let err = connect_hybrid_timeout(&uds, 4999, Duration::from_secs(60))
        .await
        .expect_err("nobody listens on guest port 4999");
    println!("connect to an unused guest port: {err}");

    // Shutdown: the agent answers, then the guest resets and the VM ends.
    let t_shutdown = Instant::now();
    agent
        .shutdown(
            client::context(Duration::from_secs(30)),
            &ShutdownRequest::new(),
        )
        .await
        .expect("Shutdown answers");
    drop(agent);
    let reason = tokio::time::timeout(Duration::from_secs(120), vm.wait())
        .await
        .expect("guest ends after Shutdown");
    assert_eq!(reason, ExitReason::GuestReset);
    let reason = vm.shutdown().await;
    assert_eq!(reason, ExitReason::GuestReset);
    println!(
        "[vm_boot] shutdown={:.3}s",
        t_shutdown.elapsed().as_secs_f64()
    );

    // Nothing left: no VMM thread, no fd, no guest memory mapping, no socket.
    let after = ProcessResources::snapshot();
    assert_eq!(after.vmm_threads, before.vmm_threads, "VMM threads left");
    assert_eq!(after.guest_mappings, 0, "guest memory still mapped");
    assert_eq!(after.open_fds, before.open_fds, "file descriptors leaked");
    assert!(!uds.exists(), "vsock socket file left behind");
}
