//! Running one OCI hook as a host process, as the runtime spec defines it:
//! `path` executed with `args` as its argv (argv[0] included) and exactly
//! `env` as its environment, the state JSON on its stdin, killed (with
//! everything in its process group) when `timeout` seconds pass. Its
//! stdout and stderr are captured for the error message, bounded: a hook
//! may write anything, in any amount.

use std::io::{Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// How much of each of a hook's stdout and stderr is kept.
pub const OUTPUT_LIMIT: usize = 2048;
/// The timeout of a hook whose spec gives none: a hook that never ends
/// must not hang a create forever.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the output of a finished hook is still read (a child it left
/// behind may keep the pipes open).
const OUTPUT_GRACE: Duration = Duration::from_secs(1);

/// A hook as the OCI spec writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hook {
    pub path: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    /// Seconds; must be positive when given.
    #[serde(default)]
    pub timeout: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("cannot be run: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("waiting for it failed: {0}")]
    Wait(#[source] std::io::Error),
    #[error("{status}{output}")]
    Failed { status: String, output: Output },
    #[error("did not finish within {secs} s and was killed{output}")]
    TimedOut { secs: u64, output: Output },
}

/// What a hook wrote, bounded to [`OUTPUT_LIMIT`] bytes per stream.
#[derive(Debug, Default, Clone)]
pub struct Output {
    pub stdout: Captured,
    pub stderr: Captured,
}

#[derive(Debug, Default, Clone)]
pub struct Captured {
    pub head: Vec<u8>,
    /// Bytes written beyond the head.
    pub dropped: u64,
}

impl std::fmt::Display for Captured {
    /// Printable whatever the hook wrote: invalid UTF-8 and control
    /// characters are escaped.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = String::from_utf8_lossy(&self.head);
        write!(f, "{}", text.trim_end().escape_debug())?;
        if self.dropped > 0 {
            write!(f, "... ({} more bytes)", self.dropped)?;
        }
        Ok(())
    }
}

impl std::fmt::Display for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (name, c) in [("stderr", &self.stderr), ("stdout", &self.stdout)] {
            if !c.head.is_empty() {
                write!(f, "; {name}: {c}")?;
            }
        }
        Ok(())
    }
}

impl Hook {
    /// The hook's timeout: its own, else [`DEFAULT_TIMEOUT`].
    pub fn timeout(&self) -> Duration {
        match self.timeout {
            Some(s) if s > 0 => Duration::from_secs(s as u64),
            _ => DEFAULT_TIMEOUT,
        }
    }

    fn command(&self, cwd: &Path) -> Command {
        let mut cmd = Command::new(&self.path);
        if let Some((arg0, rest)) = self.args.split_first() {
            cmd.arg0(arg0).args(rest);
        }
        cmd.env_clear();
        for e in &self.env {
            match e.split_once('=') {
                Some((k, v)) if !k.is_empty() => {
                    cmd.env(k, v);
                }
                _ => {
                    tracing::debug!(hook = %self.path, "env entry {e:?} is not KEY=VALUE; left out")
                }
            }
        }
        cmd.current_dir(cwd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: a timeout kills what it started too.
            .process_group(0);
        cmd
    }

    /// Runs the hook with `state` on its stdin and `cwd` as its working
    /// directory; blocking. Success is exit status 0, whatever it wrote.
    pub fn run(&self, state: &[u8], cwd: &Path) -> Result<(), ExecError> {
        let mut child = self.command(cwd).spawn().map_err(ExecError::Spawn)?;
        if let Some(mut stdin) = child.stdin.take() {
            let state = state.to_vec();
            // A hook need not read its stdin: a write it never reads must
            // not block us (EPIPE is fine too).
            std::thread::spawn(move || {
                let _ = stdin.write_all(&state);
            });
        }
        let (tx, rx) = mpsc::channel();
        let mut readers = 0;
        for (n, pipe) in [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .enumerate()
        {
            if let Some(pipe) = pipe {
                readers += 1;
                let tx = tx.clone();
                std::thread::spawn(move || {
                    let _ = tx.send((n, capture(pipe)));
                });
            }
        }
        drop(tx);
        let timeout = self.timeout();
        let waited = wait_until(&mut child, Instant::now() + timeout);
        let output = collect(&rx, readers);
        match waited {
            Ok(Some(status)) if status.success() => Ok(()),
            Ok(Some(status)) => Err(ExecError::Failed {
                status: describe(status),
                output,
            }),
            Ok(None) => Err(ExecError::TimedOut {
                secs: timeout.as_secs(),
                output,
            }),
            Err(e) => Err(ExecError::Wait(e)),
        }
    }
}

/// Waits for `child` until `deadline`; past it, kills its process group
/// and reaps it (`Ok(None)`).
fn wait_until(child: &mut Child, deadline: Instant) -> std::io::Result<Option<ExitStatus>> {
    let mut pause = Duration::from_millis(2);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        let now = Instant::now();
        if now >= deadline {
            let pgid = child.id() as libc::pid_t;
            // SAFETY: kill(2) of the process group we made the hook lead
            // (process_group(0)); it is not reaped yet, so the id is ours.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            child.wait()?;
            return Ok(None);
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

fn collect(rx: &mpsc::Receiver<(usize, Captured)>, readers: usize) -> Output {
    let mut output = Output::default();
    let deadline = Instant::now() + OUTPUT_GRACE;
    for _ in 0..readers {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((0, c)) => output.stdout = c,
            Ok((_, c)) => output.stderr = c,
            Err(_) => break,
        }
    }
    output
}

/// Reads `r` to its end, keeping the first [`OUTPUT_LIMIT`] bytes.
fn capture(mut r: impl Read) -> Captured {
    let mut c = Captured::default();
    let mut buf = [0u8; 4096];
    loop {
        match r.read(&mut buf) {
            Ok(0) | Err(_) => return c,
            Ok(n) => {
                let room = OUTPUT_LIMIT.saturating_sub(c.head.len()).min(n);
                c.head.extend_from_slice(&buf[..room]);
                c.dropped += (n - room) as u64;
            }
        }
    }
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => format!("was killed by signal {sig}"),
        _ => format!("ended with {status}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn script(dir: &Path, name: &str, body: &str) -> String {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p.display().to_string()
    }

    fn hook(path: String) -> Hook {
        Hook {
            path,
            args: vec![],
            env: vec![],
            timeout: None,
        }
    }

    #[test]
    fn args_env_stdin_and_cwd_are_the_hooks() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let path = script(
            dir.path(),
            "h",
            &format!(
                "{{ echo \"argv0=$0\"; echo \"args=$*\"; env | sort; pwd; cat; }} > {}",
                out.display()
            ),
        );
        let mut h = hook(path.clone());
        h.args = vec![path.clone(), "one".into(), "two words".into()];
        h.env = vec!["A=1".into(), "B=x=y".into(), "broken".into()];
        h.run(b"{\"state\":1}", dir.path()).unwrap();
        let got = std::fs::read_to_string(&out).unwrap();
        let lines: Vec<&str> = got.lines().collect();
        assert_eq!(lines[0], format!("argv0={path}"));
        assert_eq!(lines[1], "args=one two words");
        // Exactly the hook's environment (sh adds PWD, SHLVL, _ itself).
        assert!(lines.contains(&"A=1"), "{got}");
        assert!(lines.contains(&"B=x=y"), "{got}");
        assert!(
            !got.contains("PATH="),
            "the shim's environment leaked: {got}"
        );
        assert!(!got.contains("broken"), "{got}");
        assert!(lines.contains(&dir.path().to_str().unwrap()), "{got}");
        assert!(got.ends_with("{\"state\":1}"), "{got}");
    }

    #[test]
    fn a_timeout_kills_the_hook_and_its_children() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("child.pid");
        let path = script(
            dir.path(),
            "slow",
            &format!(
                "sleep 1000 & echo $! > {}; echo started; wait",
                pidfile.display()
            ),
        );
        let mut h = hook(path);
        h.timeout = Some(1);
        let t0 = Instant::now();
        let e = h.run(b"", dir.path()).unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        assert!(matches!(e, ExecError::TimedOut { secs: 1, .. }), "{e}");
        assert!(e.to_string().contains("within 1 s and was killed"), "{e}");
        assert!(e.to_string().contains("stdout: started"), "{e}");
        let child: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The sleep was in the hook's process group: killed too (a zombie
        // at most until its reaper, init, collects it).
        std::thread::sleep(Duration::from_millis(200));
        let alive = std::fs::read_to_string(format!("/proc/{child}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false);
        assert!(!alive, "the hook's child {child} survived the timeout");
    }

    #[test]
    fn a_missing_binary_is_a_clear_error() {
        let e = hook("/nonexistent/hook".into())
            .run(b"", Path::new("/"))
            .unwrap_err();
        assert!(matches!(e, ExecError::Spawn(_)), "{e}");
        assert!(e.to_string().contains("cannot be run"), "{e}");
    }

    #[test]
    fn garbage_output_is_bounded_and_printable() {
        let dir = tempfile::tempdir().unwrap();
        let path = script(
            dir.path(),
            "garbage",
            "head -c 1000000 /dev/urandom; printf 'bad\\033[31m\\377' >&2; exit 3",
        );
        let e = hook(path).run(b"", dir.path()).unwrap_err();
        let ExecError::Failed { status, output } = &e else {
            panic!("{e}")
        };
        assert_eq!(status, "exited with status 3");
        assert_eq!(output.stdout.head.len(), OUTPUT_LIMIT);
        assert_eq!(output.stdout.dropped, 1_000_000 - OUTPUT_LIMIT as u64);
        let msg = e.to_string();
        assert!(msg.contains("stderr: bad\\u{1b}[31m\u{fffd}"), "{msg}");
        assert!(msg.len() < 4 * OUTPUT_LIMIT * 4, "{}", msg.len());
        assert!(!msg.contains('\u{1b}'), "control characters reach the log");
        // Output does not matter when the hook succeeds.
        let ok = script(dir.path(), "ok", "head -c 100000 /dev/urandom");
        hook(ok).run(b"", dir.path()).unwrap();
    }

    #[test]
    fn a_hook_that_never_reads_its_stdin_still_runs() {
        let dir = tempfile::tempdir().unwrap();
        let path = script(dir.path(), "noread", "exit 0");
        hook(path).run(&vec![b'x'; 1 << 20], dir.path()).unwrap();
    }
}
