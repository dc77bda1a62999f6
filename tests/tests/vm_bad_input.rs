//! Bad VM configurations fail before the guest runs, with an error that
//! names the cause, and leave nothing running. No guest boots here.

use std::io::Write;

use ember_e2e::{vm_config, ProcessResources};
use ember_vmm::{Vm, VsockConfig};

async fn start_err(config: ember_vmm::VmConfig) -> String {
    match Vm::start(config).await {
        Ok(vm) => {
            vm.shutdown().await;
            panic!("VM started with a bad config");
        }
        Err(e) => e.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configs_are_clear_errors_and_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let before = ProcessResources::snapshot();

    let mut c = vm_config(dir.path(), 3);
    c.kernel = dir.path().join("no-such-vmlinux");
    let e = start_err(c).await;
    assert!(e.contains("no-such-vmlinux"), "{e}");

    let mut c = vm_config(dir.path(), 3);
    let bogus = dir.path().join("bzImage");
    std::fs::File::create(&bogus)
        .unwrap()
        .write_all(&[0x4d, 0x5a, 0, 0, 1, 2, 3])
        .unwrap();
    c.kernel = bogus;
    let e = start_err(c).await;
    assert!(e.contains("not a loadable x86_64 ELF"), "{e}");

    let mut c = vm_config(dir.path(), 3);
    c.initrd = Some(dir.path().join("no-such-initrd"));
    let e = start_err(c).await;
    assert!(e.contains("no-such-initrd"), "{e}");

    let mut c = vm_config(dir.path(), 3);
    c.mem_mib = 16;
    let e = start_err(c).await;
    assert!(e.contains("too small"), "{e}");

    // Memory large enough for the config check but not for kernel+initrd.
    let mut c = vm_config(dir.path(), 3);
    c.mem_mib = 64;
    let big = dir.path().join("big-initrd");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(60 << 20)
        .unwrap();
    c.initrd = Some(big);
    let e = start_err(c).await;
    assert!(e.contains("memory too small"), "{e}");

    // A vsock socket path a live listener holds.
    let held = dir.path().join("held.sock");
    let listener = std::os::unix::net::UnixListener::bind(&held).unwrap();
    let mut c = vm_config(dir.path(), 3);
    c.vsock = Some(VsockConfig {
        guest_cid: 3,
        uds_path: held.clone(),
    });
    let e = start_err(c).await;
    assert!(e.contains("in use"), "{e}");
    assert!(held.exists(), "the other listener's socket is untouched");
    drop(listener);

    let mut c = vm_config(dir.path(), 2);
    c.vcpus = 1;
    let e = start_err(c).await;
    assert!(e.contains("CID 2"), "{e}");

    let after = ProcessResources::snapshot();
    assert_eq!(after.vmm_threads, before.vmm_threads);
    assert_eq!(after.guest_mappings, 0);
    assert_eq!(
        after.open_fds, before.open_fds,
        "fds leaked by failed builds"
    );
}
