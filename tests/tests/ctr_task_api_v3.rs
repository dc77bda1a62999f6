//! Task API v3 with a real containerd 2.x: the shim answers `start` with
//! version 3 when containerd says it speaks it, and containerd then drives
//! the whole container through `containerd.task.v3.Task`.
//!
//! containerd 2.0-2.2 say `MAX_SHIM_VERSION=2` (2.1.9 does, measured), so
//! they get task API v2; 2.3 sends `BootstrapParams` and gets v3, but it
//! cannot be installed here. To make a real 2.x talk v3 to Ember, the
//! runtime is a two-line wrapper script that starts the real shim with
//! `MAX_SHIM_VERSION=3` (containerd's own value comes first and would win
//! otherwise): the one part that is not as a user would run it. containerd
//! records the version it uses in the bundle's `bootstrap.json`, which the
//! test reads while the container runs.
//!
//! Needs containerd 2.x (`EMBER_CONTAINERD`, `deploy/test.sh` uses 2.1.9);
//! skipped, loudly, with 1.x. One VM boot.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use ember_e2e::containerd::{containerd2_vm_test_missing, Containerd, Options};
use ember_e2e::image::BUSYBOX_IMAGE;

const ID: &str = "v3";
const RUN_TIMEOUT: Duration = Duration::from_secs(600);
const TASK_TIMEOUT: Duration = Duration::from_secs(120);

fn skip(why: &str) {
    let msg = format!("\n!!! SKIPPING ctr_task_api_v3: {why}\n");
    println!("{msg}");
    eprintln!("{msg}");
}

/// `<dir>/containerd-shim-ember-v2`: the real shim with `MAX_SHIM_VERSION=3`.
fn v3_wrapper(dir: &Path, shim: &Path) -> std::path::PathBuf {
    let path = dir.join("v3-runtime").join("containerd-shim-ember-v2");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\nMAX_SHIM_VERSION=3 exec {:?} \"$@\"\n",
            shim.display().to_string()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[test]
fn containerd_2_drives_a_container_over_task_api_v3() {
    if let Some(why) = containerd2_vm_test_missing("task API v3") {
        return skip(&why);
    }
    let mut opts = Options::with_ember().expect("containerd-shim-ember-v2 is built");
    opts.import_into = vec!["default".into()];
    let ctrd = Containerd::start(opts).expect("containerd 2.x starts");
    let runtime = v3_wrapper(ctrd.dir(), ctrd.ember_shim().expect("the Ember shim"));
    let runtime = runtime.to_str().unwrap();

    let run = ctrd.ctr_timeout(
        &[
            "run",
            "-d",
            "--runtime",
            runtime,
            BUSYBOX_IMAGE,
            ID,
            "sleep",
            "600",
        ],
        RUN_TIMEOUT,
    );
    let bootstrap = ctrd
        .state()
        .join("io.containerd.runtime.v2.task/default")
        .join(ID)
        .join("bootstrap.json");
    let recorded = std::fs::read_to_string(&bootstrap);
    let exec = ctrd.ctr_timeout(
        &[
            "task",
            "exec",
            "--exec-id",
            "e1",
            ID,
            "sh",
            "-c",
            "echo over-v3; exit 7",
        ],
        TASK_TIMEOUT,
    );
    let ps = ctrd.ctr_timeout(&["task", "ls"], TASK_TIMEOUT);
    // Kill, Wait and Delete, over v3.
    let delete = ctrd.ctr_timeout(&["task", "delete", "--force", ID], TASK_TIMEOUT);
    let rm = ctrd.ctr_timeout(&["container", "rm", ID], TASK_TIMEOUT);
    let log = ctrd.log_tail(60);
    let report = ctrd.shutdown();

    run.ok()
        .unwrap_or_else(|e| panic!("ctr run over v3: {e:#}\n{log}"));
    let recorded = recorded.unwrap_or_else(|e| panic!("{}: {e}\n{log}", bootstrap.display()));
    let recorded: serde_json::Value = serde_json::from_str(&recorded).unwrap();
    assert_eq!(
        recorded["version"], 3,
        "containerd did not take task API v3: {recorded}"
    );
    assert_eq!(
        exec.stdout_str(),
        "over-v3\n",
        "exec over v3: {}",
        exec.describe()
    );
    assert!(
        !exec.success(),
        "exit status 7 must reach ctr: {}",
        exec.describe()
    );
    assert!(
        ps.stdout_str()
            .lines()
            .any(|l| l.starts_with(ID) && l.contains("RUNNING")),
        "task ls over v3: {}",
        ps.describe()
    );
    delete
        .ok()
        .unwrap_or_else(|e| panic!("kill and delete over v3: {e:#}\n{log}"));
    rm.ok().unwrap_or_else(|e| panic!("container rm: {e:#}"));
    assert!(report.is_clean(), "containerd shutdown: {report:?}");
}
