//! Guest output against the host, end to end (real containerd, `ctr`, a
//! real guest): root in a privileged container floods the guest's serial
//! console, whose log lives on the host. The pod's console files must stay
//! under the configured cap (`console_log_max_bytes`, rotated once to
//! `console.log.1`), the pod must keep working, and everything of the pod
//! the shim writes (state dir, console logs, socket directory) must be
//! private (0700 dirs, 0600 files) although containerd and the shim run
//! under umask 000. (Templates: `ember-vmm`'s unit test
//! `template_files_are_private_whatever_the_umask`.)
//!
//! One cold boot, templates off: on a loaded host without VT-x a boot can
//! take over ten minutes. Skipped, loudly, when /dev/kvm or the guest
//! kernel/initrd are missing.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use ember_e2e::containerd::{Containerd, Options, EMBER_RUNTIME};
use ember_e2e::image::BUSYBOX_IMAGE;
use ember_e2e::vm_prerequisites_missing as missing_prerequisites;

const POD: &str = "attack-console";
/// The console cap for this test: small, so that a flood through the slow
/// emulated UART overruns it several times in a reasonable time.
const CAP: u64 = 4 * 1024;
/// Bytes the attacker writes to /dev/ttyS0: on a loaded host without VT-x
/// the guest's UART moves ~20 bytes a second, so the flood is modest; the
/// boot's own output (~10 KiB) fills the log beyond the cap already.
const FLOOD: u64 = 4 * CAP;
/// A cold boot (also the shim's `boot_timeout_secs` here).
const COLD_TIMEOUT: Duration = Duration::from_secs(1800);
/// The flood goes through an emulated UART, one byte per exit.
const FLOOD_TIMEOUT: Duration = Duration::from_secs(1800);
/// Task calls (and the shim's agent deadline is FLOOD_TIMEOUT): on a
/// loaded host a guest may take minutes to create a container.
const TASK_TIMEOUT: Duration = Duration::from_secs(900);

/// Sets the process umask; the old one comes back on drop. containerd and
/// the shims it starts inherit it.
struct Umask(libc::mode_t);

impl Umask {
    fn set(mask: libc::mode_t) -> Self {
        // SAFETY: umask only swaps the process' file mode mask.
        Umask(unsafe { libc::umask(mask) })
    }
}

impl Drop for Umask {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::umask(self.0) };
    }
}

fn len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

fn mode(p: &Path) -> Result<u32> {
    Ok(std::fs::symlink_metadata(p)
        .with_context(|| format!("stat {}", p.display()))?
        .mode()
        & 0o777)
}

/// Every directory under `root` is 0700 and every regular file 0600
/// (sockets are reachable only through their 0700 directory). The
/// directories in `skip` (the pod's mount tree and the guest's view of it,
/// whose content is the containers' own) must be 0700 but are not entered.
fn check_private(root: &Path, skip: &[PathBuf]) -> Result<usize> {
    let mut checked = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        ensure!(
            mode(&dir)? == 0o700,
            "{} is {:o}, not 0700",
            dir.display(),
            mode(&dir)?
        );
        checked += 1;
        for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = e?.path();
            if skip.contains(&path) {
                let m = mode(&path)?;
                ensure!(m == 0o700, "{} is {m:o}, not 0700", path.display());
                checked += 1;
                continue;
            }
            let ft = std::fs::symlink_metadata(&path)?.file_type();
            if ft.is_dir() {
                stack.push(path);
            } else if ft.is_file() {
                let m = mode(&path)?;
                ensure!(m == 0o600, "{} is {m:o}, not 0600", path.display());
                checked += 1;
            } else if ft.is_socket() {
                checked += 1;
            } else {
                anyhow::bail!("unexpected {} ({ft:?})", path.display());
            }
        }
    }
    Ok(checked)
}

fn cases(ctrd: &Containerd, state_root: &Path) -> Result<()> {
    let t = Instant::now();
    ctrd.ctr_timeout(
        &[
            "run",
            "-d",
            "--privileged",
            "--runtime",
            EMBER_RUNTIME,
            BUSYBOX_IMAGE,
            POD,
            "sleep",
            "100000",
        ],
        COLD_TIMEOUT,
    )
    .ok()
    .with_context(|| format!("starting {POD}\n{}", ctrd.log_tail(40)))?;
    println!(
        "[attack_console] pod up in {:.1}s",
        t.elapsed().as_secs_f64()
    );

    let pod_dir = state_root.join("default").join(POD);
    let console = pod_dir.join("console.log");
    let rotated = pod_dir.join("console.log.1");
    ensure!(console.exists(), "no {}", console.display());

    // Guest root floods the serial console.
    let script = format!(
        "[ -c /dev/ttyS0 ] || mknod /dev/ttyS0 c 4 64; \
         yes ATTACK-CONSOLE-FLOOD | head -c {FLOOD} > /dev/ttyS0; echo flooded"
    );
    let t = Instant::now();
    let out = ctrd.ctr_timeout(
        &[
            "task",
            "exec",
            "--exec-id",
            "flood",
            POD,
            "sh",
            "-c",
            &script,
        ],
        FLOOD_TIMEOUT,
    );
    out.ok().context("the flood")?;
    let took = t.elapsed().as_secs_f64();
    ensure!(out.stdout_str().contains("flooded"), "{}", out.describe());
    let (cur, old) = (len(&console), len(&rotated));
    println!(
        "[attack_console] {FLOOD} bytes to /dev/ttyS0 in {took:.1}s ({:.0} B/s); \
         console.log {cur} B, console.log.1 {old} B (cap {CAP})",
        FLOOD as f64 / took
    );
    ensure!(cur <= CAP, "console.log is {cur} bytes, over the cap {CAP}");
    ensure!(
        old <= CAP,
        "console.log.1 is {old} bytes, over the cap {CAP}"
    );
    ensure!(
        old > 0,
        "the flood did not rotate the log (is the cap applied?)"
    );
    let logs: Vec<PathBuf> = std::fs::read_dir(&pod_dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("console"))
        })
        .collect();
    ensure!(logs.len() == 2, "console files: {logs:?}");
    let newest = std::fs::read(&console)?;
    let tail = String::from_utf8_lossy(&newest);
    ensure!(
        tail.contains("ATTACK-CONSOLE-FLOOD"),
        "the newest output is kept: {:?}",
        &tail[tail.len().saturating_sub(200)..]
    );

    // The pod still works.
    let out = ctrd.ctr_timeout(
        &["task", "exec", "--exec-id", "alive", POD, "echo", "alive"],
        TASK_TIMEOUT,
    );
    out.ok().context("exec after the flood")?;
    ensure!(out.stdout_str().trim() == "alive", "{}", out.describe());

    // Private, whatever the umask: the pod's state.
    let n = check_private(&pod_dir, &[pod_dir.join("shared"), pod_dir.join("mounts")])?;
    println!(
        "[attack_console] {} private: {n} entries",
        pod_dir.display()
    );
    Ok(())
}

#[test]
fn a_console_flood_stays_under_the_cap_and_pod_files_are_private() {
    if let Some(why) = missing_prerequisites() {
        let msg = format!("\n!!! SKIPPING the console flood end-to-end test: {why}\n");
        println!("{msg}");
        eprintln!("{msg}");
        return;
    }
    let t_all = Instant::now();
    let umask = Umask::set(0);
    // The pod's state on a tmpfs, as /run/ember is, but this test's own.
    let state = tempfile::Builder::new()
        .prefix("ember-attack-")
        .tempdir_in("/run")
        .expect("temp dir in /run");
    let mut opts = Options::with_ember().expect("containerd-shim-ember-v2 is built");
    let (kernel, initrd) = ember_e2e::artifacts();
    opts.ember_config = Some(format!(
        "kernel = {:?}\ninitrd = {:?}\nstate_dir = {:?}\nconsole_log_max_bytes = {CAP}\n\
         templates = false\nboot_timeout_secs = {}\nagent_timeout_secs = {}\n",
        kernel.display().to_string(),
        initrd.display().to_string(),
        state.path().display().to_string(),
        COLD_TIMEOUT.as_secs(),
        FLOOD_TIMEOUT.as_secs(),
    ));
    let ctrd = Containerd::start(opts).expect("containerd starts");
    let result = cases(&ctrd, state.path());
    let _ = ctrd.ctr_timeout(&["task", "kill", "-s", "KILL", POD], TASK_TIMEOUT);
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let out = ctrd.ctr_timeout(&["task", "delete", POD], TASK_TIMEOUT);
        if out.success() || out.stderr_str().contains("not found") {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let _ = ctrd.ctr_timeout(&["containers", "delete", POD], TASK_TIMEOUT);
    if result.is_err() {
        println!(
            "[attack_console] containerd log tail:\n{}",
            ctrd.log_tail(80)
        );
    }
    let report = ctrd.shutdown();
    drop(umask);
    // The state dir is outside the harness' temp dir: its own check for
    // mounts left behind.
    let left: Vec<String> = std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|m| Path::new(m).starts_with(state.path()))
        .map(String::from)
        .collect();
    for m in &left {
        if let Ok(c) = std::ffi::CString::new(m.as_str()) {
            // SAFETY: umount2 of a path string we own; errors ignored (the
            // test fails below anyway).
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
    println!(
        "[attack_console] done in {:.1}s",
        t_all.elapsed().as_secs_f64()
    );
    if let Err(e) = result {
        panic!("{e:#}");
    }
    assert!(report.is_clean(), "containerd shutdown left: {report:?}");
    assert!(left.is_empty(), "mounts left under the state dir: {left:?}");
}
