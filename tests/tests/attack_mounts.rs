//! Guest root attacks the host through the shim's mount work in the pod's
//! virtio-fs share (issue 9, finding 1: the bug class of Kata's
//! CVE-2020-2026), end to end with a real containerd, `ctr` and a real
//! guest.
//!
//! The attacker is a privileged container (`--privileged`) that joins the
//! guest's root pid namespace (`--with-ns pid:/proc/1/ns/pid`) and enters
//! the agent's mount namespace (`nsenter -t 1 -m`): guest root one step
//! down, with the pod's share at `/run/ember/shared`. The bait is a tmpfs
//! the test mounts on the host, in a temporary directory, holding a marker
//! file; the attacker names its host path in the symlinks it plants.
//!
//! 1. A sibling container (`victim`, with a volume) runs; the attacker
//!    swaps the victim's `mounts/` and its whole directory (so `rootfs`
//!    too) for symlinks to the bait; the victim is deleted. The bait must
//!    stay mounted and unchanged.
//! 2. The attacker plants a symlink where the next container's directory
//!    will be (`next`, an id it guesses); `next` is created with a
//!    read-only volume. Nothing may be created, truncated or mounted
//!    outside the share; `next` must work; and guest root must not be able
//!    to write the read-only volume through the share (host side: the
//!    mount is `ro` in /proc/self/mountinfo).
//!
//! Every write attempt into the share's structure must fail, and
//! everything is cleaned up after. What the attacker saw is printed.
//! Skipped, loudly, only when /dev/kvm or the guest kernel/initrd are
//! missing. `EMBER_SHIM=<binary>` runs it against another shim build
//! (that is how it was shown to fail before the fix);
//! `EMBER_E2E_TEMPLATE_DIR` keeps the pod VM's template between runs.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use ember_e2e::containerd::{
    mounts_under, Containerd, CtrOutput, Options, EMBER_RUNTIME, EMBER_STATE_DIR,
};
use ember_e2e::image::BUSYBOX_IMAGE;
use ember_e2e::vm_prerequisites_missing as missing_prerequisites;

/// All containers of this test share one pod VM.
const GROUP: &str = "io.ember.group=attack";
const POD: &str = "attack";
/// The first container boots the pod's VM: slow on a loaded machine
/// without VT-x (guest ring 0 emulated).
const FIRST_TIMEOUT: Duration = Duration::from_secs(1500);
const RUN_TIMEOUT: Duration = Duration::from_secs(300);
const TASK_TIMEOUT: Duration = Duration::from_secs(120);
const MARKER: &str = "the host's own data";

/// A tmpfs on the host, outside every share, with a marker file.
struct Bait {
    dir: tempfile::TempDir,
}

impl Bait {
    fn new() -> Result<Bait> {
        let dir = tempfile::Builder::new()
            .prefix("ember-bait-")
            .tempdir_in("/tmp")?;
        let bait = Bait { dir };
        std::fs::create_dir(bait.tmpfs())?;
        nix::mount::mount::<str, Path, str, str>(
            Some("tmpfs"),
            &bait.tmpfs(),
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=1m"),
        )
        .context("mounting the bait tmpfs")?;
        std::fs::write(bait.tmpfs().join("marker"), MARKER)?;
        std::fs::create_dir(bait.vol())?;
        std::fs::create_dir(bait.vol_rw())?;
        std::fs::write(bait.vol().join("hello"), "hello from the host\n")?;
        Ok(bait)
    }

    fn tmpfs(&self) -> PathBuf {
        self.dir.path().join("tmpfs")
    }

    /// A volume for the containers (not bait: theirs to use), mounted
    /// read-only.
    fn vol(&self) -> PathBuf {
        self.dir.path().join("vol")
    }

    /// The victim's read-write volume.
    fn vol_rw(&self) -> PathBuf {
        self.dir.path().join("vol-rw")
    }

    /// Everything in the tmpfs, and whether it is (still) mounted once.
    fn state(&self) -> (Vec<String>, Vec<String>) {
        let mut entries = Vec::new();
        let mut todo = vec![self.tmpfs()];
        while let Some(d) = todo.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                let meta = std::fs::symlink_metadata(&p);
                let kind = match &meta {
                    Ok(m) if m.is_dir() => {
                        todo.push(p.clone());
                        "dir".to_string()
                    }
                    Ok(m) if m.is_file() => {
                        format!("file {:?}", std::fs::read_to_string(&p).unwrap_or_default())
                    }
                    Ok(_) => format!("other {:?}", std::fs::read_link(&p).ok()),
                    Err(e) => format!("error {e}"),
                };
                entries.push(format!("{} {kind}", p.display()));
            }
        }
        entries.sort();
        (entries, mounts_under(self.dir.path()))
    }
}

impl Drop for Bait {
    fn drop(&mut self) {
        for m in mounts_under(self.dir.path()).iter().rev() {
            let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

fn run(ctrd: &Containerd, flags: &[&str], id: &str, cmd: &[&str], timeout: Duration) -> CtrOutput {
    let mut args = vec!["run", "--runtime", EMBER_RUNTIME, "--annotation", GROUP];
    args.extend_from_slice(flags);
    args.push(BUSYBOX_IMAGE);
    args.push(id);
    args.extend_from_slice(cmd);
    ctrd.ctr_timeout(&args, timeout)
}

fn remove(ctrd: &Containerd, id: &str) -> Result<()> {
    let _ = ctrd.ctr_timeout(&["task", "kill", "-s", "KILL", id], TASK_TIMEOUT);
    let start = Instant::now();
    loop {
        let out = ctrd.ctr_timeout(&["task", "delete", id], TASK_TIMEOUT);
        if out.success() || out.stderr_str().contains("not found") {
            break;
        }
        ensure!(
            start.elapsed() < TASK_TIMEOUT,
            "task delete {id}: {}",
            out.describe()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    ctrd.ctr_timeout(&["containers", "delete", id], TASK_TIMEOUT)
        .ok()?;
    Ok(())
}

/// Runs `script` as guest root in the agent's mount namespace; returns
/// what it printed.
fn attack(ctrd: &Containerd, id: &str, script: &str) -> Result<String> {
    let out = run(
        ctrd,
        &["--privileged", "--with-ns", "pid:/proc/1/ns/pid"],
        id,
        &["nsenter", "-t", "1", "-m", "--", "sh", "-c", script],
        RUN_TIMEOUT,
    );
    let _ = ctrd.ctr_timeout(&["containers", "delete", id], TASK_TIMEOUT);
    out.ok()?;
    let text = out.stdout_str();
    println!(
        "[attack_mounts] --- what the attacker ({id}) saw ---\n{text}[attack_mounts] --- end ---"
    );
    Ok(text)
}

/// A shell helper the attacker scripts start with: runs a command and
/// prints `TRY <cmd> -> rc=<rc> <output>`.
const TRY: &str = r#"try() { out=$("$@" 2>&1); rc=$?; echo "TRY $* -> rc=$rc $out"; }
export S=/run/ember/shared
"#;

/// The `TRY` lines of an attacker's output that succeeded. (Writes below
/// a rootfs or a read-write volume mount are the container's own and
/// allowed; the scripts only try to change the share's structure, and
/// `ln -T` never creates a link inside an existing directory.)
fn landed(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|l| l.starts_with("TRY ") && l.contains("-> rc=0"))
        .collect()
}

fn state_dir() -> PathBuf {
    Path::new(EMBER_STATE_DIR).join("default").join(POD)
}

/// The mountinfo options of the mount at `point`.
fn mount_options(point: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines()
        .rfind(|l| l.split(' ').nth(4) == Some(&*point.to_string_lossy()))
        .and_then(|l| l.split(' ').nth(5).map(String::from))
}

#[test]
fn guest_root_cannot_redirect_host_mounts() {
    if let Some(why) = missing_prerequisites() {
        let msg = format!("\n!!! SKIPPING the mount attack end-to-end test: {why}\n");
        println!("{msg}");
        eprintln!("{msg}");
        return;
    }
    let bait = Bait::new().expect("bait tmpfs");
    let t = bait.tmpfs().display().to_string();
    let before = bait.state();
    println!("[attack_mounts] bait: {t}: {before:?}");
    let mut opts = Options::with_ember().expect("shim built");
    // Runs against two shim builds can share VM templates (a cold boot
    // costs minutes here).
    if let Some(dir) = std::env::var_os("EMBER_E2E_TEMPLATE_DIR") {
        let config = opts.ember_config.get_or_insert_with(String::new);
        config.push_str(&format!(
            "template_dir = {:?}\n",
            Path::new(&dir).display().to_string()
        ));
    }
    let ctrd = Containerd::start(opts).expect("containerd");
    let mut violations = Vec::new();
    let result = scenario(&ctrd, &bait, &t, &before, &mut violations);
    for id in ["next", "victim", "anchor"] {
        let _ = remove(&ctrd, id);
    }
    if result.is_err() || !violations.is_empty() {
        println!(
            "[attack_mounts] containerd log tail:\n{}",
            ctrd.log_tail(60)
        );
    }
    if let Err(e) = &result {
        panic!("{e:#}");
    }
    assert!(
        violations.is_empty(),
        "the host was reachable: {violations:#?}"
    );
    // The pod is gone: nothing of it is left mounted on the host.
    let start = Instant::now();
    while state_dir().exists() && start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(
        mounts_under(&state_dir()).is_empty(),
        "left mounted: {:?}",
        mounts_under(&state_dir())
    );
    assert!(!state_dir().exists(), "the pod's state dir is removed");
    assert_eq!(bait.state(), before, "the bait is untouched at the end");
    let report = ctrd.shutdown();
    assert!(report.is_clean(), "{report:?}");
}

/// Runs the attacks. Broken promises are collected in `violations` (so a
/// vulnerable shim shows every one of them); `Err` is for a step that
/// could not run at all.
fn scenario(
    ctrd: &Containerd,
    bait: &Bait,
    t: &str,
    before: &(Vec<String>, Vec<String>),
    violations: &mut Vec<String>,
) -> Result<()> {
    let mut check = |ok: bool, what: String| {
        println!(
            "[attack_mounts] {} {what}",
            if ok { "ok  " } else { "FAIL" }
        );
        if !ok {
            violations.push(what);
        }
    };
    let vol = bait.vol().display().to_string();
    let t0 = Instant::now();
    run(ctrd, &["-d"], "anchor", &["sleep", "100000"], FIRST_TIMEOUT).ok()?;
    println!(
        "[attack_mounts] pod VM up in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    let rw_vol = format!(
        "type=bind,src={},dst=/vol,options=rbind:rw",
        bait.vol_rw().display()
    );
    run(
        ctrd,
        &["-d", "--mount", &rw_vol],
        "victim",
        &["sleep", "100000"],
        RUN_TIMEOUT,
    )
    .ok()?;

    // -- 1. swap the sibling's mounts/ and rootfs for symlinks, delete it --
    let script = format!(
        r#"{TRY}
ls -la $S $S/victim $S/victim/mounts
cd $S/victim
try mv mounts mounts.away
try rmdir mounts/0
try ln -sT {t} mounts/0
try ln -s {t} mounts/1
try mv $S/victim $S/victim.away
try rmdir rootfs
try ln -sT {t} rootfs
try mkdir $S/victim/m2
try ln -s {t}/next $S/next
try touch $S/planted
ls -la $S $S/victim
"#
    );
    let seen = attack(ctrd, "attacker1", &script)?;
    ensure!(
        seen.contains("TRY mv mounts mounts.away"),
        "the attack did not run: {seen}"
    );
    remove(ctrd, "victim")?;
    let after = bait.state();
    check(
        after == *before,
        format!("deleting the victim leaves the bait mounted and unchanged: {after:?}"),
    );
    let ok = landed(&seen);
    check(
        ok.is_empty(),
        format!("guest root cannot change the share's structure: {ok:?}"),
    );
    check(
        seen.contains("Read-only file system"),
        "the share's structure refuses writes with EROFS".into(),
    );

    // -- 2. the next container, with symlinks planted for it -------------
    let ro_vol = format!("type=bind,src={vol},dst=/vol,options=rbind:ro");
    let next = run(
        ctrd,
        &["-d", "--mount", &ro_vol],
        "next",
        &["sh", "-c", "cat /vol/hello > /read-from-vol; sleep 100000"],
        RUN_TIMEOUT,
    );
    let after = bait.state();
    check(
        after == *before,
        format!("creating next creates and mounts nothing outside the share: {after:?}"),
    );
    check(next.success(), format!("next runs: {}", next.describe()));
    if !next.success() {
        return Ok(());
    }

    // The read-only volume, host side and from guest root through the share.
    let point = state_dir().join("shared/next/mounts/0");
    let opts = mount_options(&point).unwrap_or_default();
    check(
        opts.split(',').any(|o| o == "ro"),
        format!(
            "the read-only volume {} is mounted ro on the host: {opts:?}",
            point.display()
        ),
    );
    let script = format!(
        r#"{TRY}
echo "next read from its volume: $(cat $S/next/rootfs/read-from-vol)"
try sh -c 'echo x > $S/next/mounts/0/written'
try rm $S/next/mounts/0/hello
try mv $S/next/mounts $S/next/m2
try timeout 60 sh -c 'echo x > $S/next/rootfs/rw-rootfs-ok'
"#
    );
    let seen = attack(ctrd, "attacker2", &script)?;
    check(
        seen.contains("next read from its volume: hello from the host"),
        "next works and reads its read-only volume".into(),
    );
    let ok = landed(&seen);
    check(
        ok.len() == 1 && ok[0].contains("rw-rootfs-ok"),
        format!("of the share, only the container's own rootfs is writable: {ok:?}"),
    );
    let names: BTreeSet<String> = std::fs::read_dir(bait.vol())?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    check(
        names == BTreeSet::from(["hello".to_string()]),
        format!("the read-only volume is unchanged: {names:?}"),
    );
    remove(ctrd, "next")?;
    remove(ctrd, "anchor")?;
    let after = bait.state();
    check(
        after == *before,
        format!("the bait is unchanged after the deletes: {after:?}"),
    );
    Ok(())
}
