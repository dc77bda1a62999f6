//! Proves the containerd harness with the stock runc shim: a real
//! containerd with a private config, the locally built busybox image
//! imported, and `ctr run --rm ... echo hello` under runc.

use std::time::{Duration, Instant};

use ember_e2e::containerd::{Containerd, Options, RUNC_RUNTIME};
use ember_e2e::image::{BUSYBOX_IMAGE, PAUSE_IMAGE};

/// Why runc cannot run containers on this host, if it cannot (outside our
/// control): then the test is skipped with that message.
fn runc_unusable() -> Option<String> {
    if !std::path::Path::new("/usr/sbin/runc").exists() && which("runc").is_none() {
        return Some("runc is not installed (apt-get install runc)".into());
    }
    if std::process::Command::new("containerd-shim-runc-v2")
        .arg("-v")
        .output()
        .is_err()
    {
        return Some("containerd-shim-runc-v2 is not on PATH".into());
    }
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root: containerd needs root here".into());
    }
    None
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

#[test]
fn runc_echo_hello_through_the_harness() {
    if let Some(why) = runc_unusable() {
        println!("SKIP ctr_harness_runc: {why}");
        eprintln!("SKIP ctr_harness_runc: {why}");
        return;
    }
    let t0 = Instant::now();
    let ctrd = Containerd::start(Options::default()).expect("containerd starts with our config");
    println!(
        "[ctr_harness_runc] containerd up and images imported in {:.2}s",
        t0.elapsed().as_secs_f64()
    );

    // Both images are in both namespaces.
    for ns in ["default", "k8s.io"] {
        let ls = ctrd.ctr_ns(ns, &["images", "ls", "-q"]);
        let ls = ls.stdout_str();
        assert!(
            ls.contains(BUSYBOX_IMAGE) && ls.contains(PAUSE_IMAGE),
            "{ns}: {ls}"
        );
    }

    let t = Instant::now();
    let out = ctrd.ctr_timeout(
        &[
            "run",
            "--rm",
            "--runtime",
            RUNC_RUNTIME,
            BUSYBOX_IMAGE,
            "demo",
            "echo",
            "hello",
        ],
        Duration::from_secs(120),
    );
    println!(
        "[ctr_harness_runc] ctr run --rm echo hello: {:.2}s",
        t.elapsed().as_secs_f64()
    );
    if !out.success() {
        let stderr = out.stderr_str();
        // Host conditions outside our control: say so, skip.
        for (needle, why) in [
            ("cgroup", "runc cannot set up cgroups on this host"),
            (
                "operation not permitted",
                "runc lacks a privilege on this host",
            ),
        ] {
            if stderr.to_lowercase().contains(needle) && !out.timed_out {
                println!(
                    "SKIP ctr_harness_runc: {why}: {}\n{}",
                    out.describe(),
                    ctrd.log_tail(30)
                );
                return;
            }
        }
        panic!("{}\n{}", out.describe(), ctrd.log_tail(60));
    }
    assert_eq!(out.stdout_str(), "hello\n", "{}", out.describe());

    // --rm left nothing: no container, no task, no shim.
    let c = ctrd.ctr(&["containers", "ls", "-q"]);
    assert_eq!(c.stdout_str().trim(), "", "{}", c.describe());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ctrd.shim_processes().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        ctrd.shim_processes().is_empty(),
        "{:?}",
        ctrd.shim_processes()
    );

    let report = ctrd.shutdown();
    assert!(report.is_clean(), "{report:?}");
    assert!(!report.containerd_killed, "containerd ignored SIGTERM");
}
