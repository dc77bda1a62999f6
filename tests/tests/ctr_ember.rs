//! Ember end to end through a real containerd and `ctr`: every case runs
//! containers with `--runtime io.containerd.ember.v2` in ONE pod VM (all
//! containers carry the annotation `io.ember.group=e2e`; an "anchor"
//! container started first boots the VM and keeps it up until the end).
//!
//! One #[test] runs the cases in sequence (a VM boot costs 1-2 minutes
//! here), prints each case's result and duration, then fails if any case
//! failed. Skipped, loudly, only when /dev/kvm or the guest kernel/initrd
//! are missing.
//!
//! `EMBER_E2E_RUNTIME=io.containerd.runc.v2` runs the same cases under runc
//! (a reference for the test's own expectations; the Ember-only checks are
//! left out then).

use std::collections::BTreeSet;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use ember_e2e::containerd::{
    mounts_under, processes_named, Containerd, CtrOutput, EventWatch, Options, EMBER_RUNTIME,
    EMBER_SHIM_NAME, EMBER_STATE_DIR,
};
use ember_e2e::image::BUSYBOX_IMAGE;
use sha2::{Digest, Sha256};

/// Group annotation: containers with the same value share one pod VM.
const GROUP: &str = "io.ember.group=e2e";
/// The pod (VM) id the shim derives from [`GROUP`].
const POD: &str = "e2e";
/// The first container start boots the VM.
const FIRST_TIMEOUT: Duration = Duration::from_secs(600);
/// Later container starts (VM already up; generous in case it is not shared).
const RUN_TIMEOUT: Duration = Duration::from_secs(300);
/// Task calls on running containers.
const TASK_TIMEOUT: Duration = Duration::from_secs(120);

/// Why the Ember cases cannot run on this machine, if so.
fn missing_prerequisites() -> Option<String> {
    let mut missing = Vec::new();
    if !Path::new("/dev/kvm").exists() {
        missing.push("/dev/kvm is absent".to_string());
    }
    let kernel = std::env::var_os("EMBER_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/lib/ember/vmlinux".into());
    let initrd = std::env::var_os("EMBER_INITRD")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/lib/ember/initrd.img".into());
    for (what, p, script) in [
        ("guest kernel", kernel, "deploy/build-kernel.sh"),
        ("initrd", initrd, "deploy/build-initrd.sh"),
    ] {
        if !p.exists() {
            missing.push(format!("{what} {} is missing (run {script})", p.display()));
        }
    }
    (!missing.is_empty()).then(|| missing.join("; "))
}

#[derive(Debug)]
enum Outcome {
    Passed,
    Failed(String),
    Skipped(String),
}

struct Suite<'a> {
    ctrd: &'a Containerd,
    events: EventWatch,
    runtime: String,
    ember: bool,
    results: Vec<(String, Duration, Outcome)>,
    /// Set when the pod VM could not be brought up in time: later cases skip.
    vm_dead: Option<String>,
}

impl<'a> Suite<'a> {
    fn case(&mut self, name: &str, f: impl FnOnce(&mut Self) -> Result<()>) -> bool {
        self.case_inner(name, true, f)
    }

    /// A case that runs even when the pod VM is gone (cleanup checks).
    fn always(&mut self, name: &str, f: impl FnOnce(&mut Self) -> Result<()>) -> bool {
        self.case_inner(name, false, f)
    }

    fn case_inner(
        &mut self,
        name: &str,
        needs_vm: bool,
        f: impl FnOnce(&mut Self) -> Result<()>,
    ) -> bool {
        if needs_vm {
            if let Some(why) = &self.vm_dead {
                let why = format!("pod VM unavailable: {why}");
                println!("[ctr_ember] case {name:<28} SKIPPED ({why})");
                self.results
                    .push((name.to_string(), Duration::ZERO, Outcome::Skipped(why)));
                return false;
            }
        }
        let t0 = Instant::now();
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| f(self)));
        let d = t0.elapsed();
        let outcome = match r {
            Ok(Ok(())) => Outcome::Passed,
            Ok(Err(e)) => Outcome::Failed(format!("{e:#}")),
            Err(p) => Outcome::Failed(format!("panicked: {}", ember_e2e::panic_message(&*p))),
        };
        match &outcome {
            Outcome::Passed => println!(
                "[ctr_ember] case {name:<28} ok      {:>8.2}s",
                d.as_secs_f64()
            ),
            Outcome::Failed(msg) => println!(
                "[ctr_ember] case {name:<28} FAILED  {:>8.2}s: {msg}",
                d.as_secs_f64()
            ),
            Outcome::Skipped(_) => {}
        }
        let passed = matches!(outcome, Outcome::Passed);
        self.results.push((name.to_string(), d, outcome));
        passed
    }

    /// `ctr run --runtime R --annotation io.ember.group=e2e <flags> IMAGE id cmd...`
    fn run(&self, flags: &[&str], id: &str, cmd: &[&str], timeout: Duration) -> CtrOutput {
        let mut args = vec!["run", "--runtime", &self.runtime, "--annotation", GROUP];
        args.extend_from_slice(flags);
        args.push(BUSYBOX_IMAGE);
        args.push(id);
        args.extend_from_slice(cmd);
        self.ctrd.ctr_timeout(&args, timeout)
    }

    fn ctr(&self, args: &[&str]) -> CtrOutput {
        self.ctrd.ctr_timeout(args, TASK_TIMEOUT)
    }

    /// The STATUS column of `ctr task ls` for `id`, if listed.
    fn task_status(&self, id: &str) -> Result<Option<String>> {
        let out = self.ctr(&["task", "ls"]);
        out.ok()?;
        Ok(out.stdout_str().lines().skip(1).find_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.first() == Some(&id)).then(|| cols.last().unwrap_or(&"").to_string())
        }))
    }

    fn wait_status(&self, id: &str, want: &str, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            let st = self.task_status(id)?;
            if st.as_deref() == Some(want) {
                return Ok(());
            }
            if start.elapsed() > timeout {
                bail!("task {id} is {st:?}, not {want}, after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Removes container `id` (and its task) if it exists; says whether it did.
    fn force_remove(&self, id: &str) -> bool {
        let listed = self.ctr(&["containers", "ls", "-q"]);
        if !listed.stdout_str().lines().any(|l| l.trim() == id) {
            return false;
        }
        let _ = self.ctr(&["task", "kill", "-s", "KILL", id]);
        std::thread::sleep(Duration::from_millis(300));
        let _ = self.ctr(&["task", "delete", "--force", id]);
        let _ = self.ctr(&["containers", "delete", id]);
        true
    }

    /// After a case: containers it may have left (a failure path) are removed.
    fn sweep(&self, ids: &[&str]) {
        for id in ids {
            if self.force_remove(id) {
                println!("[ctr_ember]   (removed container {id} left by the case)");
            }
        }
    }

    /// The exit status containerd published (TaskExit) for process `exec_id`
    /// of container `id` (the init process has `exec_id == id`).
    fn exit_status(&self, id: &str, exec_id: &str, timeout: Duration) -> Result<i64> {
        let ev = self
            .events
            .wait_for(timeout, |e| {
                e.topic == "/tasks/exit"
                    && json_field(&e.body, "container_id").as_deref() == Some(id)
                    && json_field(&e.body, "id").as_deref() == Some(exec_id)
            })
            .with_context(|| format!("no /tasks/exit event for {id}/{exec_id}"))?;
        Ok(serde_json::from_str::<serde_json::Value>(&ev.body)
            .ok()
            .and_then(|v| v["exit_status"].as_i64())
            .unwrap_or(0))
    }
}

fn json_field(body: &str, key: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    v.get(key)?.as_str().map(str::to_string)
}

fn expect_stdout(out: &CtrOutput, want: &str) -> Result<()> {
    ensure!(out.success(), "{}", out.describe());
    ensure!(
        out.stdout_str() == want,
        "stdout {:?} != {want:?}; {}",
        out.stdout_str(),
        out.describe()
    );
    Ok(())
}

fn sha256_hex(b: &[u8]) -> String {
    format!("{:x}", Sha256::digest(b))
}

fn dir_entries(p: &Path) -> BTreeSet<String> {
    std::fs::read_dir(p)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The shim's state dir for our namespace (`default`).
fn ns_state_dir() -> PathBuf {
    Path::new(EMBER_STATE_DIR).join("default")
}

/// Pod dirs in the shim's state dir for our namespace.
fn state_entries() -> BTreeSet<String> {
    dir_entries(&ns_state_dir())
}

/// Prints the tail of every `*.log` in the pod's state dir (the guest
/// console, ...), which teardown removes.
fn print_pod_logs() {
    let pod_dir = Path::new(EMBER_STATE_DIR).join("default").join(POD);
    let mut stack = vec![pod_dir.clone()];
    let mut found = false;
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() && !mounts_under(&p).contains(&p.to_string_lossy().into_owned()) {
                stack.push(p);
            } else if ft.is_file() && p.extension().is_some_and(|x| x == "log") {
                found = true;
                let text = std::fs::read(&p)
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let from = lines.len().saturating_sub(40);
                println!(
                    "[ctr_ember] --- {} (last {} lines) ---\n{}\n[ctr_ember] --- end ---",
                    p.display(),
                    lines.len() - from,
                    lines[from..].join("\n")
                );
            }
        }
    }
    if !found {
        println!("[ctr_ember] (no *.log in {})", pod_dir.display());
    }
}

/// The shim's boot timing lines in containerd's log ("pod VM ready:
/// template=... vmm-setup=... kernel-to-init=... init-to-agent=...
/// agent-ready=...") and its pod boot/shutdown lines.
fn boot_lines(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| {
            l.contains("pod VM ready")
                || l.contains("kernel-to-init")
                || l.contains("pod VM shut down")
                || l.contains("booting the pod's VM")
        })
        .map(|l| l.chars().take(400).collect())
        .collect()
}

#[test]
fn ember_containers_through_ctr() {
    let runtime = std::env::var("EMBER_E2E_RUNTIME").unwrap_or_else(|_| EMBER_RUNTIME.to_string());
    let ember = runtime == EMBER_RUNTIME;
    if ember {
        if let Some(why) = missing_prerequisites() {
            let msg = format!(
                "\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
                 !!! SKIPPING the Ember ctr end-to-end test: {why}\n\
                 !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
            );
            println!("{msg}");
            eprintln!("{msg}");
            return;
        }
    }
    let t_all = Instant::now();
    let opts = if ember {
        Options::with_ember().expect("containerd-shim-ember-v2 is built")
    } else {
        Options::default()
    };
    if let Some(shim) = &opts.ember_shim {
        println!("[ctr_ember] shim: {}", shim.display());
    }
    println!("[ctr_ember] runtime under test: {runtime}");
    let state_before = state_entries();
    let mounts_before: BTreeSet<String> = mounts_under(&ns_state_dir()).into_iter().collect();
    let ctrd = Containerd::start(opts).expect("containerd starts");
    let events = ctrd.events().expect("ctr events runs");
    let mut s = Suite {
        ctrd: &ctrd,
        events,
        runtime,
        ember,
        results: Vec::new(),
        vm_dead: None,
    };

    // -- the pod VM: the anchor container boots it and keeps it up ---------
    let anchor_ok = s.case("boot pod VM (anchor -d)", |s| {
        let out = s.run(&["-d"], "anchor", &["sleep", "100000"], FIRST_TIMEOUT);
        if out.timed_out {
            s.vm_dead = Some(format!(
                "first container start timed out after {FIRST_TIMEOUT:?}"
            ));
        }
        out.ok()?;
        s.wait_status("anchor", "RUNNING", TASK_TIMEOUT)?;
        println!(
            "[ctr_ember]   pod VM boot + first container start: {:.2}s",
            out.duration.as_secs_f64()
        );
        Ok(())
    });
    let boot = boot_lines(&ctrd.log());
    if boot.is_empty() {
        println!(
            "[ctr_ember]   (no boot timing line found in containerd's log; the shim logs there)"
        );
    }
    for l in boot.iter().take(20) {
        println!("[ctr_ember]   boot: {l}");
    }
    if !anchor_ok {
        if ember {
            print_pod_logs();
        }
        s.sweep(&["anchor"]);
    }

    // -- one-shot containers -----------------------------------------------
    s.case("run --rm echo hello", |s| {
        let out = s.run(&["--rm"], "echo1", &["echo", "hello"], RUN_TIMEOUT);
        expect_stdout(&out, "hello\n")
    });
    s.sweep(&["echo1"]);

    s.case("exit code 3 propagates", |s| {
        let out = s.run(&["--rm"], "exit3", &["sh", "-c", "exit 3"], RUN_TIMEOUT);
        ensure!(
            !out.timed_out && out.code == Some(3),
            "want exit 3: {}",
            out.describe()
        );
        Ok(())
    });
    s.sweep(&["exit3"]);

    s.case("stderr is separate", |s| {
        let out = s.run(
            &["--rm"],
            "stderr1",
            &["sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 0"],
            RUN_TIMEOUT,
        );
        ensure!(out.success(), "{}", out.describe());
        ensure!(
            out.stdout_str() == "to-stdout\n",
            "stdout: {}",
            out.describe()
        );
        ensure!(
            out.stderr_str().contains("to-stderr"),
            "stderr: {}",
            out.describe()
        );
        ensure!(
            !out.stdout_str().contains("to-stderr"),
            "stderr leaked into stdout"
        );
        Ok(())
    });
    s.sweep(&["stderr1"]);

    s.case("big output (seq 1 600000)", |s| {
        let expected: String = (1..=600_000).map(|i| format!("{i}\n")).collect();
        let out = s.run(&["--rm"], "big1", &["seq", "1", "600000"], RUN_TIMEOUT);
        ensure!(out.success(), "{}", out.describe());
        println!(
            "[ctr_ember]   {} bytes in {:.2}s, sha256 {}",
            out.stdout.len(),
            out.duration.as_secs_f64(),
            sha256_hex(&out.stdout)
        );
        ensure!(
            out.stdout.len() == expected.len(),
            "length {} != {}",
            out.stdout.len(),
            expected.len()
        );
        ensure!(
            sha256_hex(&out.stdout) == sha256_hex(expected.as_bytes()),
            "content differs (first difference at byte {:?})",
            out.stdout
                .iter()
                .zip(expected.as_bytes())
                .position(|(a, b)| a != b)
        );
        Ok(())
    });
    s.sweep(&["big1"]);

    // -- a detached service ------------------------------------------------
    // The service's PID 1 is a shell that exits 143 on TERM: a plain
    // `sleep` as PID 1 of its PID namespace has no handler and so ignores
    // TERM (runc does exactly that). Death *by* a signal (128+n) is checked
    // on an exec'd sleep below, which is not PID 1, and by the OOM case.
    let svc_up = s.case("svc: run -d (sh: trap TERM; sleep)", |s| {
        let out = s.run(
            &["-d"],
            "svc",
            &["sh", "-c", "trap 'exit 143' TERM; sleep 1000 & wait"],
            RUN_TIMEOUT,
        );
        out.ok()?;
        s.wait_status("svc", "RUNNING", TASK_TIMEOUT)
    });
    if svc_up {
        s.case("svc: task exec echo hi", |s| {
            let out = s.ctr(&["task", "exec", "--exec-id", "x1", "svc", "echo", "hi"]);
            expect_stdout(&out, "hi\n")
        });
        s.case("svc: task ps lists pids", |s| {
            let out = s.ctr(&["task", "ps", "svc"]);
            out.ok()?;
            let pids: Vec<u64> = out
                .stdout_str()
                .lines()
                .skip(1)
                .filter_map(|l| l.split_whitespace().next()?.parse().ok())
                .collect();
            ensure!(!pids.is_empty(), "no pid listed: {}", out.describe());
            println!("[ctr_ember]   pids: {pids:?}");
            Ok(())
        });
        s.case("svc: task metrics", |s| {
            let out = s.ctr(&["task", "metrics", "svc"]);
            out.ok()?;
            let text = out.stdout_str();
            let numbers = text
                .lines()
                .filter(|l| {
                    l.split_whitespace()
                        .last()
                        .is_some_and(|w| w.parse::<u64>().is_ok())
                })
                .count();
            ensure!(numbers > 0, "no numeric metric: {}", out.describe());
            println!(
                "[ctr_ember]   {numbers} numeric metrics, e.g. {:?}",
                text.lines()
                    .filter(|l| l
                        .split_whitespace()
                        .last()
                        .is_some_and(|w| w.parse::<u64>().is_ok()))
                    .take(3)
                    .collect::<Vec<_>>()
            );
            Ok(())
        });
        s.case("svc: pause / resume", |s| {
            s.ctr(&["task", "pause", "svc"]).ok()?;
            s.wait_status("svc", "PAUSED", Duration::from_secs(30))?;
            s.ctr(&["task", "resume", "svc"]).ok()?;
            s.wait_status("svc", "RUNNING", Duration::from_secs(30))?;
            // Still serving after resume.
            let out = s.ctr(&["task", "exec", "--exec-id", "x2", "svc", "echo", "back"]);
            expect_stdout(&out, "back\n")
        });
        s.case("svc: delete running refused", |s| {
            let out = s.ctr(&["task", "delete", "svc"]);
            ensure!(
                !out.success() && !out.timed_out,
                "delete of a running task succeeded: {}",
                out.describe()
            );
            ensure!(
                out.stderr_str().to_lowercase().contains("running"),
                "error does not say \"running\": {}",
                out.describe()
            );
            ensure!(
                s.task_status("svc")?.as_deref() == Some("RUNNING"),
                "svc not running any more"
            );
            Ok(())
        });
        s.case("svc: exec -d sleep, TERM -> 143", |s| {
            s.ctr(&[
                "task",
                "exec",
                "-d",
                "--exec-id",
                "sl1",
                "svc",
                "sleep",
                "1000",
            ])
            .ok()?;
            let ps = s.ctr(&["task", "ps", "svc"]);
            ps.ok()?;
            let n = ps
                .stdout_str()
                .lines()
                .skip(1)
                .filter(|l| !l.trim().is_empty())
                .count();
            ensure!(
                n >= 3,
                "task ps lists {n} processes, want sh, sleep and the exec'd sleep: {}",
                ps.describe()
            );
            s.ctr(&["task", "kill", "--exec-id", "sl1", "-s", "TERM", "svc"])
                .ok()?;
            let status = s.exit_status("svc", "sl1", Duration::from_secs(30))?;
            ensure!(
                status == 143,
                "exec exit status {status}, want 143 (killed by SIGTERM)"
            );
            ensure!(
                s.task_status("svc")?.as_deref() == Some("RUNNING"),
                "svc not running any more"
            );
            Ok(())
        });
        s.case("svc: kill -s TERM -> 143", |s| {
            s.ctr(&["task", "kill", "-s", "TERM", "svc"]).ok()?;
            if let Err(e) = s.wait_status("svc", "STOPPED", Duration::from_secs(30)) {
                // Don't leave it running for the rest of the suite.
                let _ = s.ctr(&["task", "kill", "-s", "KILL", "svc"]);
                bail!("{e} (TERM not delivered, or ignored by the task's PID 1)");
            }
            let status = s.exit_status("svc", "svc", Duration::from_secs(10))?;
            ensure!(
                status == 143,
                "exit status {status}, want 143 (128+SIGTERM)"
            );
            Ok(())
        });
        s.case("svc: task delete + container delete", |s| {
            s.wait_status("svc", "STOPPED", Duration::from_secs(30))?;
            let out = s.ctr(&["task", "delete", "svc"]);
            // ctr exits with the task's exit code when it was not 0.
            ensure!(
                !out.timed_out && (out.code == Some(0) || out.code == Some(143)),
                "{}",
                out.describe()
            );
            ensure!(
                s.task_status("svc")?.is_none(),
                "svc still listed after delete"
            );
            s.ctr(&["containers", "delete", "svc"]).ok()?;
            Ok(())
        });
    }
    s.sweep(&["svc"]);

    // -- interactive tty -----------------------------------------------------
    s.case("tty: sh, arithmetic, resize", |s| {
        let args = [
            "run",
            "-t",
            "--rm",
            "--runtime",
            &s.runtime,
            "--annotation",
            GROUP,
            BUSYBOX_IMAGE,
            "tty1",
            "sh",
        ];
        let mut pty = s.ctrd.ctr_pty(&args, 24, 80)?;
        let at = pty.expect_from(0, "# ", RUN_TIMEOUT)?;
        pty.send("echo $((6*7))\r")?;
        let at = pty.expect_from(at, "42", Duration::from_secs(60))?;
        pty.send("stty size\r")?;
        let at = pty.expect_from(at, "24 80", Duration::from_secs(60))?;
        pty.resize(33, 101)?;
        std::thread::sleep(Duration::from_secs(1));
        pty.send("stty size\r")?;
        let _at = pty
            .expect_from(at, "33 101", Duration::from_secs(60))
            .context("after TIOCSWINSZ on the master (ctr forwards SIGWINCH)")?;
        pty.send("exit\r")?;
        let (status, timed_out) = pty.wait(Duration::from_secs(60));
        ensure!(
            !timed_out,
            "ctr -t did not exit after `exit`: {:?}",
            pty.output()
        );
        ensure!(
            status.is_some_and(|s| s.success()),
            "ctr -t exited {status:?}: {:?}",
            pty.output()
        );
        Ok(())
    });
    s.sweep(&["tty1"]);

    // -- OOM -----------------------------------------------------------------
    s.case("oom: 32 MiB limit, 64 MiB dd", |s| {
        // dd allocates its 64 MiB block and fills it from /dev/zero.
        let out = s.run(
            &["--rm", "--memory-limit", "33554432"],
            "oom1",
            &["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"],
            RUN_TIMEOUT,
        );
        ensure!(
            !out.timed_out && out.code == Some(137),
            "want exit 137 (OOM-killed): {}",
            out.describe()
        );
        let events = s.events.events();
        let is = |e: &ember_e2e::containerd::Event, topic: &str| {
            e.topic == topic && json_field(&e.body, "container_id").as_deref() == Some("oom1")
        };
        let oom = events.iter().position(|e| is(e, "/tasks/oom"));
        let exit = events.iter().position(|e| is(e, "/tasks/exit"));
        let exit_wait = s
            .events
            .wait_for(Duration::from_secs(10), |e| is(e, "/tasks/exit"));
        ensure!(exit_wait.is_some(), "no TaskExit event for oom1");
        let oom = oom.or_else(|| s.events.events().iter().position(|e| is(e, "/tasks/oom")));
        let exit = exit.or_else(|| s.events.events().iter().position(|e| is(e, "/tasks/exit")));
        match (oom, exit) {
            (Some(o), Some(x)) => ensure!(o < x, "TaskOOM (#{o}) came after TaskExit (#{x})"),
            (None, _) => bail!("no TaskOOM event for oom1; events:\n{}", s.events.text()),
            (_, None) => bail!("no TaskExit event for oom1"),
        }
        Ok(())
    });
    s.sweep(&["oom1"]);

    // -- bad input -----------------------------------------------------------
    s.case("bad: nonexistent command", |s| {
        let out = s.run(&["--rm"], "bad1", &["/no/such/command"], RUN_TIMEOUT);
        ensure!(!out.timed_out, "{}", out.describe());
        ensure!(
            out.code != Some(0),
            "a nonexistent command succeeded: {}",
            out.describe()
        );
        let err = out.stderr_str().to_lowercase();
        ensure!(
            err.contains("no such file")
                || err.contains("not found")
                || err.contains("/no/such/command"),
            "unclear error: {}",
            out.describe()
        );
        println!("[ctr_ember]   error: {}", out.stderr_str().trim());
        Ok(())
    });
    s.sweep(&["bad1"]);
    s.case("bad: pod still works after", |s| {
        let out = s.run(&["--rm"], "after-bad", &["echo", "still-ok"], RUN_TIMEOUT);
        expect_stdout(&out, "still-ok\n")
    });
    s.sweep(&["after-bad"]);

    s.case("bad: kill/exec on exited task", |s| {
        s.run(&["-d"], "done1", &["true"], RUN_TIMEOUT).ok()?;
        s.wait_status("done1", "STOPPED", Duration::from_secs(60))?;
        let kill = s.ctr(&["task", "kill", "done1"]);
        ensure!(
            !kill.success() && !kill.timed_out,
            "kill of an exited task succeeded: {}",
            kill.describe()
        );
        println!("[ctr_ember]   kill: {}", kill.stderr_str().trim());
        let exec = s.ctr(&["task", "exec", "--exec-id", "x3", "done1", "echo", "hi"]);
        ensure!(
            !exec.success() && !exec.timed_out,
            "exec into a stopped task succeeded: {}",
            exec.describe()
        );
        println!("[ctr_ember]   exec: {}", exec.stderr_str().trim());
        s.ctr(&["task", "delete", "done1"]).ok()?;
        s.ctr(&["containers", "delete", "done1"]).ok()?;
        Ok(())
    });
    s.sweep(&["done1"]);

    if ember
        && anchor_ok
        && s.results
            .iter()
            .any(|(_, _, o)| matches!(o, Outcome::Failed(_)))
    {
        print_pod_logs();
    }

    // -- teardown: the last container goes, the pod VM and shim go ----------
    s.always("teardown: anchor + shim gone", |s| {
        let listed = s.ctr(&["containers", "ls", "-q"]);
        if listed.stdout_str().lines().any(|l| l.trim() == "anchor") {
            let _ = s.ctr(&["task", "kill", "-s", "KILL", "anchor"]);
            s.wait_status("anchor", "STOPPED", Duration::from_secs(60))?;
            let _ = s.ctr(&["task", "delete", "anchor"]);
            s.ctr(&["containers", "delete", "anchor"]).ok()?;
        }
        let left = s.ctr(&["containers", "ls", "-q"]);
        ensure!(
            left.stdout_str().trim().is_empty(),
            "containers left: {}",
            left.stdout_str()
        );
        let start = Instant::now();
        while !s.ctrd.shim_processes().is_empty() && start.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(250));
        }
        let shims = s.ctrd.shim_processes();
        ensure!(
            shims.is_empty(),
            "shim processes left 60 s after the last delete: {shims:?}"
        );
        if s.ember {
            let ours: Vec<_> = processes_named(EMBER_SHIM_NAME)
                .into_iter()
                .filter(|(_, c)| c.contains(&*s.ctrd.address().to_string_lossy()))
                .collect();
            ensure!(ours.is_empty(), "ember shim processes left: {ours:?}");
        }
        Ok(())
    });
    if s.ember {
        s.always("teardown: /run/ember clean", |_s| {
            // The shim keeps a pod's state in <state_dir>/<namespace>/<pod>/;
            // other tests' pods (CRI's in k8s.io, other harnesses') may come
            // and go meanwhile, so only what appeared in our namespace
            // during this test counts.
            let mounts: BTreeSet<String> = mounts_under(&ns_state_dir()).into_iter().collect();
            let new_mounts: Vec<_> = mounts.difference(&mounts_before).collect();
            ensure!(
                new_mounts.is_empty(),
                "mounts left under {EMBER_STATE_DIR}: {new_mounts:?}"
            );
            let pod_dir = Path::new(EMBER_STATE_DIR).join("default").join(POD);
            ensure!(
                !pod_dir.exists(),
                "pod state dir {} left: {:?}",
                pod_dir.display(),
                dir_entries(&pod_dir)
            );
            let now = state_entries();
            let new: Vec<_> = now.difference(&state_before).collect();
            ensure!(
                new.is_empty(),
                "pod state left in {}: {new:?}",
                ns_state_dir().display()
            );
            Ok(())
        });
    }
    s.always("teardown: containerd task state empty", |s| {
        let dir = s
            .ctrd
            .state()
            .join("io.containerd.runtime.v2.task")
            .join("default");
        let left = dir_entries(&dir);
        ensure!(
            left.is_empty(),
            "bundles left in {}: {left:?}",
            dir.display()
        );
        Ok(())
    });

    // -- summary --------------------------------------------------------------
    let results = std::mem::take(&mut s.results);
    drop(s);
    let log_tail = ctrd.log_tail(80);
    for l in boot_lines(&ctrd.log()) {
        println!("[ctr_ember] shim: {l}");
    }
    let report = ctrd.shutdown();
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    println!(
        "\n[ctr_ember] ===== summary ({:.1}s) =====",
        t_all.elapsed().as_secs_f64()
    );
    for (name, d, o) in &results {
        let tag = match o {
            Outcome::Passed => {
                passed += 1;
                "ok".to_string()
            }
            Outcome::Failed(m) => {
                failed += 1;
                let one: String = m
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && *l != "stdout:")
                    .collect::<Vec<_>>()
                    .join(" | ");
                format!("FAILED: {}", one.chars().take(400).collect::<String>())
            }
            Outcome::Skipped(m) => {
                skipped += 1;
                format!("skipped: {m}")
            }
        };
        println!("[ctr_ember] {name:<36} {:>8.2}s  {tag}", d.as_secs_f64());
    }
    println!("[ctr_ember] cases: {passed} ok, {failed} failed, {skipped} skipped");
    if !report.is_clean() {
        println!("[ctr_ember] LEAKS at containerd shutdown: {report:?}");
    }
    if failed + skipped > 0 || !report.is_clean() {
        println!("{log_tail}");
        panic!(
            "{failed} of {} ctr cases failed, {skipped} skipped; leaks: {report:?}",
            results.len()
        );
    }
}
