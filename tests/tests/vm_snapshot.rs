//! Snapshot and restore: boot one VM to a ready agent, snapshot it, restore
//! two VMs from that snapshot and talk to both agents; a corrupted or
//! foreign snapshot is refused before anything is created.

use std::time::{Duration, Instant};

use ember_e2e::{
    init_tracing, print_phases, process_rss, vm_config, wait_for_agent, ProcessResources,
};
use ember_proto::agent::{ShutdownRequest, VersionRequest};
use ember_proto::client;
use ember_vmm::{SnapshotFiles, Vm};

const IDENTITY: &str = "e2e-snapshot-test";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restored_vms_answer_independently_and_bad_snapshots_are_refused() {
    init_tracing();
    // The VM's threads confine themselves as in the shim (SIGSYS ends this
    // test process with status 159 and a line naming the call).
    ember_vmm::confine::enable().expect("enabling confinement");
    let dir = tempfile::tempdir().unwrap();
    let before = ProcessResources::snapshot();

    // Boot the template VM.
    let tdir = dir.path().join("template");
    std::fs::create_dir_all(&tdir).unwrap();
    let t0 = Instant::now();
    let vm = Vm::start(vm_config(&tdir, 3))
        .await
        .expect("template VM starts");
    let agent = wait_for_agent(&vm, Duration::from_secs(600))
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{e}\n{}",
                std::fs::read_to_string(tdir.join("console.log")).unwrap_or_default()
            )
        });
    let cold = t0.elapsed();
    print_phases("snapshot/cold-boot", &vm, Some(cold));
    drop(agent);

    let files = SnapshotFiles::new(dir.path().join("snap"));
    let t_snap = Instant::now();
    vm.snapshot(files.clone(), IDENTITY.to_string())
        .await
        .expect("snapshot");
    println!("[snapshot] write={:.3}s", t_snap.elapsed().as_secs_f64());

    // Two VMs restored from it, each with its own sockets.
    let mut vms = Vec::new();
    for i in 0..2 {
        let rdir = dir.path().join(format!("restored{i}"));
        std::fs::create_dir_all(&rdir).unwrap();
        let t = Instant::now();
        let vm = Vm::restore(vm_config(&rdir, 3), files.clone(), IDENTITY.to_string())
            .await
            .expect("restore");
        let agent = wait_for_agent(&vm, Duration::from_secs(120))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "restored VM {i}: {e}\n{}",
                    std::fs::read_to_string(rdir.join("console.log")).unwrap_or_default()
                )
            });
        let ready = t.elapsed();
        println!(
            "[snapshot] restored VM {i}: agent ready {:.3}s after restore (cold boot {:.3}s)",
            ready.as_secs_f64(),
            cold.as_secs_f64()
        );
        vms.push((vm, agent, rdir));
    }
    for (i, (vm, agent, _)) in vms.iter().enumerate() {
        let v = agent
            .version(
                client::context(Duration::from_secs(30)),
                &VersionRequest::new(),
            )
            .await
            .unwrap_or_else(|e| panic!("restored VM {i} Version: {e}"));
        assert_eq!(v.agent_version, env!("CARGO_PKG_VERSION"));
        let (size, touched) = vm.guest_memory_usage().unwrap();
        println!(
            "[snapshot] restored VM {i}: guest memory {} MiB, privately written {} KiB",
            size >> 20,
            touched >> 10
        );
    }
    let (vmm_rss, shmem) = process_rss();
    println!(
        "[snapshot] process RSS without guest memory {} MiB, shared {} MiB",
        vmm_rss >> 20,
        shmem >> 20
    );

    // A restore with another identity is refused.
    let rdir = dir.path().join("foreign");
    std::fs::create_dir_all(&rdir).unwrap();
    let err = Vm::restore(vm_config(&rdir, 3), files.clone(), "other-kernel".into())
        .await
        .err()
        .expect("foreign identity refused");
    assert!(err.to_string().contains("taken for"), "{err}");

    // A corrupted state file is refused.
    let mut bytes = std::fs::read(files.state()).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x5a;
    std::fs::write(files.state(), &bytes).unwrap();
    let err = Vm::restore(vm_config(&rdir, 3), files.clone(), IDENTITY.to_string())
        .await
        .err()
        .expect("corrupted snapshot refused");
    assert!(err.to_string().contains("checksum"), "{err}");

    for (vm, agent, _) in vms {
        let _ = agent
            .shutdown(
                client::context(Duration::from_secs(30)),
                &ShutdownRequest::new(),
            )
            .await;
        drop(agent);
        let _ = tokio::time::timeout(Duration::from_secs(60), vm.wait()).await;
        vm.shutdown().await;
    }
    let after = ProcessResources::snapshot();
    assert_eq!(after.vmm_threads, before.vmm_threads, "VMM threads left");
    assert_eq!(after.guest_mappings, 0);
}
