//! Reproducer for issue 11: guest processes that die of SIGSEGV right after
//! `execve` under the `emulated` CPU template (hosts without VT-x).
//!
//! It runs the way a pod does: a real containerd and `ctr`, one Ember pod
//! VM kept up by an anchor container, and in a second container of that
//! pod a busybox shell that runs `PARALLEL` loops of
//! fork + execve of `/bin/true` (static glibc busybox: TLS set up with
//! `arch_prctl(ARCH_SET_FS)`, rseq registered) while a writer loop in the
//! same container streams lines to stdout, so the agent serves I/O at the
//! same time. Every exec that does not exit 0 prints its status; at the end
//! the guest console is read for the kernel's own account of each crash
//! (`segfault at` lines of a user page fault, and with
//! `print-fatal-signals=1` on the kernel command line the registers of
//! every fatal signal, including the FS base).
//!
//! It prints execs, crashes, the crash rate and the exec rate, and fails if
//! any exec did not exit 0. Knobs (environment):
//! * `EMBER_STORM_EXECS` (default 600): execs in all;
//! * `EMBER_STORM_SECONDS` (default: none): stop the storm after this long
//!   and report what it did (a fork + execve costs seconds of emulated
//!   guest time here);
//! * `EMBER_STORM_PARALLEL` (default 2): concurrent exec loops;
//! * `EMBER_STORM_VCPUS` (default 2): vCPUs of the pod VM;
//! * `EMBER_STORM_TEMPLATES` (default 1): 1 = the pod's VM is restored from
//!   a template (as in every other e2e test), 0 = cold boot;
//! * `EMBER_STORM_TEMPLATE_DIR` (default: this run's own): a template store
//!   kept across runs, so that a second run with the same kernel, initrd
//!   and VM shape restores its VM instead of booting it;
//! * `EMBER_STORM_KERNEL_PARAMS` (default `print-fatal-signals=1`): extra
//!   guest kernel parameters;
//! * `EMBER_STORM_ENV` (default empty): `KEY=VALUE` given to the execs
//!   (e.g. `GLIBC_TUNABLES=glibc.pthread.rseq=0`).
//!
//! Skipped, loudly, when /dev/kvm or the guest kernel/initrd are missing.
//! Not run by default (see the test's doc): `cargo test -p ember-e2e --test
//! exec_storm -- --ignored --nocapture`.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use ember_e2e::containerd::{Containerd, Options, EMBER_RUNTIME, EMBER_STATE_DIR};
use ember_e2e::image::BUSYBOX_IMAGE;

/// Containers with this annotation share the pod VM `storm`.
const GROUP: &str = "io.ember.group=storm";
const POD: &str = "storm";
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The storm, as a busybox ash script: builtins only, except the execs
/// (and one `mkfifo`). Each loop reports its count after every exec (an
/// `echo` costs milliseconds, an exec seconds), so a run stopped at its
/// time limit still says how far it got; every exec that fails prints a
/// line at once. The writer sends a line every 50 ms
/// (a `read -t` on a FIFO nobody writes paces it without an exec).
fn storm_script(execs: u64, parallel: u64) -> String {
    let per_loop = execs.div_ceil(parallel);
    let filler = "x".repeat(200);
    format!(
        r#"n={per_loop}; p={parallel}
run() {{ i=0; c=0; while [ $i -lt $n ]; do /bin/true; s=$?; if [ $s -ne 0 ]; then echo "CRASH loop=$1 i=$i status=$s"; c=$((c+1)); fi; i=$((i+1)); echo "PROGRESS loop=$1 execs=$i failed=$c"; done; echo "DONE loop=$1 execs=$i failed=$c"; }}
write() {{ w=0; while [ ! -e /tmp/storm.stop ]; do echo "W $w {filler}"; w=$((w+1)); read -t 0.05 _ <> /tmp/storm.fifo; done; echo "WRITER lines=$w"; }}
rm -f /tmp/storm.stop; mkfifo /tmp/storm.fifo
write & wp=$!
j=0; pids=""; while [ $j -lt $p ]; do run $j & pids="$pids $!"; j=$((j+1)); done
wait $pids
: > /tmp/storm.stop
wait $wp
"#
    )
}

/// What one storm run counted.
#[derive(Debug, Default)]
struct Tally {
    execs: u64,
    failed: u64,
    failed_lines: u64,
    loops_done: u64,
    sigsegv: u64,
    other: Vec<String>,
    writer_lines: u64,
}

fn tally(stdout: &str) -> Tally {
    let mut t = Tally::default();
    let field = |l: &str, k: &str| -> Option<u64> {
        l.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .and_then(|v| v.parse().ok())
    };
    // Per loop: the last count it reported.
    let mut loops = std::collections::BTreeMap::new();
    for l in stdout.lines() {
        if l.starts_with("DONE ") || l.starts_with("PROGRESS ") {
            let done = l.starts_with("DONE ");
            let entry = loops
                .entry(field(l, "loop=").unwrap_or(0))
                .or_insert((0, 0, false));
            *entry = (
                field(l, "execs=").unwrap_or(0),
                field(l, "failed=").unwrap_or(0),
                done,
            );
        } else if l.starts_with("CRASH ") {
            t.failed_lines += 1;
            if field(l, "status=") == Some(139) {
                t.sigsegv += 1;
            } else {
                t.other.push(l.to_string());
            }
        } else if l.starts_with("W ") {
            t.writer_lines += 1;
        }
    }
    for (execs, failed, done) in loops.values() {
        t.execs += execs;
        t.failed += failed;
        t.loops_done += u64::from(*done);
    }
    // Crashes after a loop's last report are counted from their own lines.
    t.failed = t.failed.max(t.failed_lines);
    t
}

/// The guest console of the pod, found under the shim's state directory.
fn console_log() -> Option<(std::path::PathBuf, String)> {
    let mut stack = vec![Path::new(EMBER_STATE_DIR).join("default").join(POD)];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).ok()?.flatten() {
            let p = e.path();
            let ft = e.file_type().ok()?;
            if ft.is_dir() && !ft.is_symlink() && p.file_name().is_some_and(|n| n != "shared") {
                stack.push(p);
            } else if p.file_name().is_some_and(|n| n == "console.log") {
                let text = String::from_utf8_lossy(&std::fs::read(&p).ok()?).into_owned();
                return Some((p, text));
            }
        }
    }
    None
}

fn storm(ctrd: &Containerd) -> Result<()> {
    let execs: u64 = env_or("EMBER_STORM_EXECS", 600);
    let parallel: u64 = env_or::<u64>("EMBER_STORM_PARALLEL", 2).max(1);
    let extra_env = std::env::var("EMBER_STORM_ENV").unwrap_or_default();

    let t0 = Instant::now();
    let out = ctrd.ctr_timeout(
        &[
            "run",
            "-d",
            "--runtime",
            EMBER_RUNTIME,
            "--annotation",
            GROUP,
            BUSYBOX_IMAGE,
            "anchor",
            "sleep",
            "100000",
        ],
        BOOT_TIMEOUT,
    );
    out.ok()?;
    let boot = t0.elapsed();
    println!(
        "[exec_storm] pod VM up + anchor started in {:.1}s",
        boot.as_secs_f64()
    );

    let script = storm_script(execs, parallel);
    // A second container of the pod (the anchor keeps the VM, and so its
    // console, up after the storm ends).
    let mut args = vec![
        "run",
        "--rm",
        "--runtime",
        EMBER_RUNTIME,
        "--annotation",
        GROUP,
    ];
    if !extra_env.is_empty() {
        args.extend(["--env", extra_env.as_str()]);
    }
    args.extend([BUSYBOX_IMAGE, "storm", "sh", "-c", script.as_str()]);
    // Without a time limit: 60 s per exec is generous (a fork + execve of
    // busybox costs ~8 s of guest time here, far more on a loaded host).
    let limit: u64 = env_or("EMBER_STORM_SECONDS", 0);
    let budget = Duration::from_secs(if limit > 0 { limit } else { 300 + 60 * execs });
    let t1 = Instant::now();
    let run = ctrd.ctr_timeout(&args, budget);
    let took = t1.elapsed();
    let stdout = run.stdout_str();
    let t = tally(&stdout);

    let console = console_log();
    // The kernel's account: `segfault at` (a user page fault), Ember's
    // diagnostics (`ember:` lines: rseq's SIGSEGV, FS base checks), and with
    // print-fatal-signals=1 each fatal signal with the register lines
    // (RIP, FS base) that follow it.
    let (segfault_lines, fatal_lines): (Vec<String>, Vec<String>) = console
        .as_ref()
        .map(|(_, text)| {
            let lines: Vec<&str> = text.lines().collect();
            let seg = lines
                .iter()
                .filter(|l| l.contains("segfault at") || l.contains("] ember: "))
                .map(|l| l.to_string())
                .collect();
            let mut fatal = Vec::new();
            for (i, l) in lines.iter().enumerate() {
                if l.contains("potentially unexpected fatal signal") {
                    fatal.push(l.to_string());
                    fatal.extend(
                        lines[i + 1..]
                            .iter()
                            .take(20)
                            .filter(|l| l.contains("RIP:") || l.contains(" FS: "))
                            .map(|l| l.to_string()),
                    );
                }
            }
            (seg, fatal)
        })
        .unwrap_or_default();
    let fatal_signals = fatal_lines
        .iter()
        .filter(|l| l.contains("potentially unexpected fatal signal"))
        .count();

    let crashes = t.sigsegv;
    println!(
        "[exec_storm] execs={} failed={} sigsegv={} crash_rate={:.4}% other={} \
         writer_lines={} time={:.1}s exec_rate={:.2}/s (parallel={parallel}, env={extra_env:?})",
        t.execs,
        t.failed,
        crashes,
        if t.execs > 0 {
            100.0 * crashes as f64 / t.execs as f64
        } else {
            0.0
        },
        t.other.len(),
        t.writer_lines,
        took.as_secs_f64(),
        t.execs as f64 / took.as_secs_f64().max(0.001),
    );
    println!(
        "[exec_storm] console: {} 'segfault at'/'ember:' lines, {} fatal signals ({})",
        segfault_lines.len(),
        fatal_signals,
        console
            .as_ref()
            .map(|(p, _)| p.display().to_string())
            .unwrap_or_else(|| "console.log not found".into())
    );
    for l in stdout.lines().filter(|l| l.starts_with("CRASH ")).take(50) {
        println!("[exec_storm]   {l}");
    }
    for l in segfault_lines.iter().chain(&fatal_lines).take(200) {
        println!("[exec_storm]   console: {l}");
    }
    if let Some((_, text)) = &console {
        if crashes > 0 || !run.success() {
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(60);
            println!(
                "[exec_storm] --- console tail ---\n{}",
                lines[from..].join("\n")
            );
        }
    }

    if limit > 0 && run.timed_out {
        println!("[exec_storm] stopped at the time limit ({limit} s), as asked");
        ensure!(
            t.execs > 0,
            "no exec finished in {limit} s: {}",
            run.describe()
        );
    } else {
        ensure!(
            !run.timed_out,
            "the storm did not finish within {budget:?}: {}",
            run.describe()
        );
        ensure!(
            t.execs >= execs.div_ceil(parallel) * parallel,
            "the storm ran {} execs, not {execs}: {}",
            t.execs,
            run.describe()
        );
    }
    ensure!(
        t.failed == 0,
        "{} of {} execs failed ({} of them SIGSEGV): {:?}",
        t.failed,
        t.execs,
        crashes,
        t.other
    );
    Ok(())
}

/// Opt-in (`--ignored`): under the `emulated` template a fork + execve of
/// busybox costs ~8 s of emulated guest time (~24 s of wall time on a
/// loaded 2-core host), so a run long enough to say anything about a crash
/// seen once in hundreds of execs takes hours, more than CI can give.
#[test]
#[ignore = "long reproducer for issue 11 (hours under the emulated template): run with --ignored"]
fn busybox_execs_never_crash_in_a_pod() {
    let kernel =
        std::env::var_os("EMBER_KERNEL").unwrap_or_else(|| "/var/lib/ember/vmlinux".into());
    let initrd =
        std::env::var_os("EMBER_INITRD").unwrap_or_else(|| "/var/lib/ember/initrd.img".into());
    let missing: Vec<String> = [
        ("/dev/kvm".into(), "KVM"),
        (kernel, "kernel"),
        (initrd, "initrd"),
    ]
    .into_iter()
    .filter(|(p, _): &(std::ffi::OsString, &str)| !Path::new(p).exists())
    .map(|(p, what)| format!("{what} {}", Path::new(&p).display()))
    .collect();
    if !missing.is_empty() {
        let msg = format!("!!! SKIPPING exec_storm: missing {}", missing.join(", "));
        println!("{msg}");
        eprintln!("{msg}");
        return;
    }
    let vcpus: u8 = env_or("EMBER_STORM_VCPUS", 2);
    let templates = env_or::<u8>("EMBER_STORM_TEMPLATES", 1) != 0;
    let params = std::env::var("EMBER_STORM_KERNEL_PARAMS")
        .unwrap_or_else(|_| "print-fatal-signals=1".to_string());

    let mut opts = Options::with_ember().expect("ember shim");
    let mut config = opts.ember_config.take().unwrap_or_default();
    config.push_str(&format!(
        "default_vcpus = {vcpus}\ntemplates = {templates}\nkernel_params = {params:?}\n"
    ));
    if let Ok(dir) = std::env::var("EMBER_STORM_TEMPLATE_DIR") {
        config.push_str(&format!("template_dir = {dir:?}\n"));
    }
    opts.ember_config = Some(config);
    println!("[exec_storm] vcpus={vcpus} templates={templates} kernel_params={params:?}");
    let ctrd = Containerd::start(opts).expect("containerd starts");
    let result = storm(&ctrd).context("exec storm");
    for id in ["storm", "anchor"] {
        let _ = ctrd.ctr_timeout(&["task", "kill", "-s", "KILL", id], CALL_TIMEOUT);
    }
    std::thread::sleep(Duration::from_secs(1));
    for id in ["storm", "anchor"] {
        let _ = ctrd.ctr_timeout(&["task", "delete", "--force", id], CALL_TIMEOUT);
        let _ = ctrd.ctr_timeout(&["containers", "delete", id], CALL_TIMEOUT);
    }
    let report = ctrd.shutdown();
    if let Err(e) = result {
        panic!("{e:#}");
    }
    assert!(report.is_clean(), "containerd shutdown: {report:?}");
}

/// The counting the figures rest on: the last report of each loop, crash
/// lines by status, writer lines.
#[test]
fn tally_counts_each_loops_last_report_and_every_crash() {
    let out = "W 0 xx\nPROGRESS loop=0 execs=10 failed=0\nCRASH loop=1 i=3 status=139\n\
               PROGRESS loop=1 execs=10 failed=1\nW 1 xx\nPROGRESS loop=0 execs=20 failed=0\n\
               CRASH loop=0 i=21 status=1\nDONE loop=1 execs=12 failed=1\n";
    let t = tally(out);
    assert_eq!(t.execs, 32);
    assert_eq!(t.sigsegv, 1);
    assert_eq!(
        t.failed, 2,
        "the crash after loop 0's last report counts too"
    );
    assert_eq!(t.other, vec!["CRASH loop=0 i=21 status=1".to_string()]);
    assert_eq!(t.loops_done, 1);
    assert_eq!(t.writer_lines, 2);
}
