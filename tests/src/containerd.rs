//! A real containerd for end-to-end tests.
//!
//! [`Containerd::start`] runs `/usr/bin/containerd` with a private config in
//! a temporary directory: its own root, state, gRPC and ttrpc sockets, debug
//! log to `containerd.log`, the CRI plugin with `restrict_oom_score_adj`
//! (runc cannot lower oom_score_adj here) and `sandbox_image =
//! localhost/pause:test`, and a CRI runtime `ember` whose `runtime_type` is
//! the absolute path of the built `containerd-shim-ember-v2`. That binary's
//! directory is put first on containerd's PATH, so `ctr run --runtime
//! io.containerd.ember.v2` resolves to it as well. Once containerd answers,
//! the test images (see [`crate::image`]) are imported into the `default`
//! and `k8s.io` namespaces. With [`Options::cni`], the CRI plugin's `[cni]`
//! section points at a conf dir in the temp dir holding the given conflists
//! (see [`crate::cri::CniNetwork`]); without it, the CRI defaults apply.
//!
//! `ctr` helpers run with the right `--address` and a timeout (a hung `ctr`
//! is killed and reported). [`Containerd::shutdown`] (or Drop) stops
//! containerd (SIGTERM, wait, SIGKILL), kills shim processes still serving
//! this containerd (a leak: reported), unmounts whatever is left under the
//! temp dir and removes it (kept when `EMBER_E2E_KEEP` is set or the test
//! panicked).
//!
//! containerd 1.6 still puts shim sockets and fifos under
//! `/run/containerd/{s,fifo}`; their names are hashed from the address, so
//! several harnesses do not collide.
//!
//! Another containerd: `EMBER_CONTAINERD=/path/to/containerd` (and
//! `EMBER_CTR`, else the `ctr` next to it). Its version is asked once
//! ([`ContainerdVersion`]) and picks the config format: version 2 for 1.x,
//! version 3 for 2.x (`deploy/containerd2.sh` fetches 2.1.9).

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context, Result};

use crate::image;

/// containerd and ctr, from `EMBER_CONTAINERD` / `EMBER_CTR` or Debian's.
pub fn containerd_bin() -> PathBuf {
    std::env::var_os("EMBER_CONTAINERD")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/usr/bin/containerd".into())
}

/// `EMBER_CTR`, else the `ctr` next to `EMBER_CONTAINERD`, else Debian's.
pub fn ctr_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("EMBER_CTR") {
        return p.into();
    }
    if std::env::var_os("EMBER_CONTAINERD").is_some() {
        if let Some(sibling) = containerd_bin().parent().map(|d| d.join("ctr")) {
            if sibling.is_file() {
                return sibling;
            }
        }
    }
    "/usr/bin/ctr".into()
}

/// The version of the containerd under test, which picks its config format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ContainerdVersion {
    pub major: u32,
    pub minor: u32,
}

impl ContainerdVersion {
    /// From `containerd --version` output
    /// (`containerd github.com/containerd/containerd/v2 2.1.9+unknown`,
    /// `containerd github.com/containerd/containerd 1.6.20~ds1 ...`).
    pub fn parse(version_output: &str) -> Option<Self> {
        version_output.split_whitespace().find_map(|word| {
            let word = word.trim_start_matches('v');
            let mut parts = word.split(['.', '-', '+', '~']);
            let major = parts.next()?.parse().ok()?;
            let minor = parts.next()?.parse().ok()?;
            Some(ContainerdVersion { major, minor })
        })
    }

    /// Of [`containerd_bin`], asked once per process.
    pub fn of_containerd_bin() -> Result<Self> {
        static CACHE: std::sync::OnceLock<std::result::Result<ContainerdVersion, String>> =
            std::sync::OnceLock::new();
        CACHE
            .get_or_init(|| {
                let bin = containerd_bin();
                let out = Command::new(&bin)
                    .arg("--version")
                    .output()
                    .map_err(|e| format!("running {} --version: {e}", bin.display()))?;
                let text = String::from_utf8_lossy(&out.stdout);
                ContainerdVersion::parse(&text)
                    .ok_or_else(|| format!("no version in `{} --version`: {text:?}", bin.display()))
            })
            .clone()
            .map_err(anyhow::Error::msg)
    }

    /// The config `version` this containerd is given: 3 for 2.x, 2 for 1.x.
    pub fn config_version(self) -> u32 {
        if self.major >= 2 {
            3
        } else {
            2
        }
    }
}

/// Why a VM test of something only containerd 2.x has (`feature`, e.g.
/// "task API v3") cannot run here: a VM prerequisite is missing, or the
/// containerd under test is 1.x. Panics if the version cannot be read.
pub fn containerd2_vm_test_missing(feature: &str) -> Option<String> {
    if let Some(why) = crate::vm_prerequisites_missing() {
        return Some(why);
    }
    match ContainerdVersion::of_containerd_bin() {
        Ok(v) if v.major >= 2 => None,
        Ok(v) => Some(format!(
            "containerd {v} has no {feature}; set EMBER_CONTAINERD to a 2.x binary (deploy/containerd2.sh)"
        )),
        Err(e) => panic!("containerd version: {e:#}"),
    }
}

impl std::fmt::Display for ContainerdVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// The runtime name `ctr run --runtime` takes for the Ember shim.
pub const EMBER_RUNTIME: &str = "io.containerd.ember.v2";
/// The name of the shim binary containerd looks up for [`EMBER_RUNTIME`].
pub const EMBER_SHIM_NAME: &str = "containerd-shim-ember-v2";
/// The runc shim, for proving the harness.
pub const RUNC_RUNTIME: &str = "io.containerd.runc.v2";
/// The Ember shim's state directory.
pub const EMBER_STATE_DIR: &str = "/run/ember";

/// Default timeout of a `ctr` call: generous, a pod VM boot takes 1-2 min here.
pub const CTR_TIMEOUT: Duration = Duration::from_secs(600);

// ---------------------------------------------------------------------------
// Locating (and building) the shim
// ---------------------------------------------------------------------------

/// The workspace root (this crate's parent directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// `target/<profile>` of the running test executable
/// (`target/<profile>/deps/<test>-<hash>`).
pub fn profile_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("current_exe")?;
    let deps = exe.parent().context("test executable has no parent dir")?;
    let dir = if deps.file_name().is_some_and(|n| n == "deps") {
        deps.parent().context("deps has no parent")?
    } else {
        deps
    };
    Ok(dir.to_path_buf())
}

fn newest_mtime(path: &Path, newest: &mut SystemTime) {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return;
    };
    if meta.is_dir() {
        if path
            .file_name()
            .is_some_and(|n| n == "target" || n == ".git")
        {
            return;
        }
        if let Ok(entries) = std::fs::read_dir(path) {
            for e in entries.flatten() {
                newest_mtime(&e.path(), newest);
            }
        }
    } else if let Ok(m) = meta.modified() {
        if m > *newest {
            *newest = m;
        }
    }
}

struct FileLock(std::fs::File);

impl FileLock {
    fn acquire(path: &Path) -> Result<Self> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("opening lock file {}", path.display()))?;
        // SAFETY: flock on an fd we own.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        ensure!(
            rc == 0,
            "flock {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        Ok(Self(f))
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// The `containerd-shim-ember-v2` binary to test: `EMBER_SHIM` if set, else
/// `target/<profile>/containerd-shim-ember-v2`, built first (with cargo, same
/// profile and target dir, under a lock) when missing or older than the
/// sources of the shim, the VMM or the protocol crates.
pub fn ember_shim_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("EMBER_SHIM") {
        let p = PathBuf::from(p);
        ensure!(p.is_file(), "EMBER_SHIM={} is not a file", p.display());
        return Ok(std::fs::canonicalize(&p)?);
    }
    let profile_dir = profile_dir()?;
    let bin = profile_dir.join(EMBER_SHIM_NAME);
    let root = workspace_root();
    let sources_newest = || {
        let mut newest = SystemTime::UNIX_EPOCH;
        for p in ["shim", "vmm", "proto", "Cargo.toml", "Cargo.lock"] {
            newest_mtime(&root.join(p), &mut newest);
        }
        newest
    };
    let fresh = |bin: &Path| {
        std::fs::metadata(bin)
            .and_then(|m| m.modified())
            .is_ok_and(|m| m >= sources_newest())
    };
    if fresh(&bin) {
        return Ok(bin);
    }
    let _lock = FileLock::acquire(&profile_dir.join(".ember-shim-build.lock"))?;
    if fresh(&bin) {
        return Ok(bin);
    }
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .context("profile dir name")?
        .to_string();
    let target_dir = profile_dir.parent().context("target dir")?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root)
        .args(["build", "-p", EMBER_SHIM_NAME, "--bins", "--target-dir"])
        .arg(target_dir);
    match profile.as_str() {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    eprintln!(
        "[containerd harness] building {EMBER_SHIM_NAME} ({profile}): {:?}",
        cmd
    );
    let t0 = Instant::now();
    let status = cmd.status().context("running cargo build")?;
    ensure!(
        status.success(),
        "cargo build -p {EMBER_SHIM_NAME} failed: {status}"
    );
    eprintln!(
        "[containerd harness] built {EMBER_SHIM_NAME} in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    ensure!(bin.is_file(), "{} missing after cargo build", bin.display());
    // cargo may decide nothing changed (e.g. only a test file was touched):
    // mark the binary as checked so the next run does not ask again.
    let now = std::fs::File::options().append(true).open(&bin)?;
    now.set_modified(SystemTime::now())?;
    Ok(bin)
}

/// Where the test image tars are cached: `target/<profile>/ember-e2e-images`.
pub fn image_cache_dir() -> Result<PathBuf> {
    Ok(profile_dir()?.join("ember-e2e-images"))
}

// ---------------------------------------------------------------------------
// ctr output
// ---------------------------------------------------------------------------

/// What a `ctr` call did.
#[derive(Debug, Clone)]
pub struct CtrOutput {
    pub args: Vec<String>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Exit code; None if ctr was killed by a signal (or by the timeout).
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub duration: Duration,
}

impl CtrOutput {
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    pub fn success(&self) -> bool {
        self.code == Some(0) && !self.timed_out
    }

    /// One-paragraph description for failure messages (output truncated).
    pub fn describe(&self) -> String {
        fn clip(b: &[u8]) -> String {
            let s = String::from_utf8_lossy(b);
            if s.len() > 2000 {
                let mut end = 2000;
                while !s.is_char_boundary(end) {
                    end -= 1;
                }
                format!("{}... ({} bytes)", &s[..end], b.len())
            } else {
                s.into_owned()
            }
        }
        format!(
            "`ctr {}` -> code={:?} signal={:?}{} after {:.2}s\n  stderr: {}\n  stdout: {}",
            self.args.join(" "),
            self.code,
            self.signal,
            if self.timed_out {
                " TIMED OUT (killed)"
            } else {
                ""
            },
            self.duration.as_secs_f64(),
            clip(&self.stderr).trim_end(),
            clip(&self.stdout).trim_end()
        )
    }

    /// Fails unless ctr exited 0.
    pub fn ok(&self) -> Result<&Self> {
        ensure!(self.success(), "ctr failed: {}", self.describe());
        Ok(self)
    }
}

fn spawn_reader<R: Read + Send + 'static>(mut r: R) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v);
        v
    })
}

/// Waits for `child` up to `timeout`; kills it (SIGKILL) on timeout.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> (Option<ExitStatus>, bool) {
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return (Some(st), false),
            Ok(None) => {}
            Err(_) => return (None, false),
        }
        if start.elapsed() >= timeout {
            let _ = child.kill();
            return (child.wait().ok(), true);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `cmd` (stdin null), capturing output, killing it after `timeout`.
pub fn run_captured(mut cmd: Command, args: Vec<String>, timeout: Duration) -> CtrOutput {
    let start = Instant::now();
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return CtrOutput {
                args,
                stdout: Vec::new(),
                stderr: format!("spawn failed: {e}").into_bytes(),
                code: None,
                signal: None,
                timed_out: false,
                duration: start.elapsed(),
            }
        }
    };
    let out = spawn_reader(child.stdout.take().expect("piped stdout"));
    let err = spawn_reader(child.stderr.take().expect("piped stderr"));
    let (status, timed_out) = wait_timeout(&mut child, timeout);
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    CtrOutput {
        args,
        stdout,
        stderr,
        code: status.and_then(|s| s.code()),
        signal: status.and_then(|s| s.signal()),
        timed_out,
        duration: start.elapsed(),
    }
}

// ---------------------------------------------------------------------------
// The harness
// ---------------------------------------------------------------------------

/// How to start containerd.
#[derive(Debug, Clone)]
pub struct Options {
    /// Path of the Ember shim; None: no `ember` CRI runtime, shim dir not on PATH.
    pub ember_shim: Option<PathBuf>,
    /// Namespaces to import the test images into.
    pub import_into: Vec<String>,
    /// How long to wait for containerd to answer.
    pub ready_timeout: Duration,
    /// Ember config (TOML) to write to `<dir>/ember.toml` and hand to the
    /// shim through `EMBER_CONFIG` in containerd's environment (containerd
    /// passes its environment on to shims). Without a `template_dir` key,
    /// VM templates go to `<dir>/templates` (this run's own).
    pub ember_config: Option<String>,
    /// Extra environment for containerd (and so for its shims).
    pub env: Vec<(String, String)>,
    /// CNI for CRI pod networking; None: the CRI plugin's defaults
    /// (/etc/cni/net.d, /opt/cni/bin).
    pub cni: Option<CniOptions>,
}

/// CNI for CRI pods: the harness writes `conflists` into `<dir>/cni/net.d`
/// before containerd starts and points the CRI plugin's `[cni]` section at
/// that directory and at `bin_dir`.
#[derive(Debug, Clone)]
pub struct CniOptions {
    /// Where the CNI plugin binaries are (Debian: /usr/lib/cni).
    pub bin_dir: PathBuf,
    /// (file name, content), e.g. ("10-e2e.conflist", "{...}"). containerd
    /// uses the first file in lexical order.
    pub conflists: Vec<(String, String)>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            ember_shim: None,
            import_into: vec!["default".into(), "k8s.io".into()],
            ready_timeout: Duration::from_secs(60),
            ember_config: None,
            env: Vec::new(),
            cni: None,
        }
    }
}

impl Options {
    /// With the Ember shim (built if needed, see [`ember_shim_binary`]) and
    /// a private Ember config naming the guest kernel and initrd the e2e
    /// tests use (`EMBER_KERNEL` / `EMBER_INITRD` or /var/lib/ember/).
    pub fn with_ember() -> Result<Self> {
        let (kernel, initrd) = crate::artifacts();
        Ok(Self {
            ember_shim: Some(ember_shim_binary()?),
            ember_config: Some(format!(
                "kernel = {:?}\ninitrd = {:?}\n",
                kernel.display().to_string(),
                initrd.display().to_string()
            )),
            ..Self::default()
        })
    }
}

/// What [`Containerd::shutdown`] found.
#[derive(Debug, Default, Clone)]
pub struct ShutdownReport {
    /// Whether containerd ignored SIGTERM and had to be killed.
    pub containerd_killed: bool,
    /// Shim processes (pid: cmdline) still serving our containerd, killed.
    pub leftover_shims: Vec<String>,
    /// Mount points left under the temp dir, unmounted.
    pub leftover_mounts: Vec<String>,
    /// Lines of containerd's log where a shim reported its own death: a
    /// seccomp violation (SIGSYS) or a panic. A shim that ends that way at
    /// teardown leaves nothing a test would otherwise see.
    pub shim_deaths: Vec<String>,
}

impl ShutdownReport {
    /// Nothing leaked and no shim died of a seccomp violation or a panic.
    pub fn is_clean(&self) -> bool {
        self.leftover_shims.is_empty()
            && self.leftover_mounts.is_empty()
            && self.shim_deaths.is_empty()
    }
}

/// A running containerd with a private config.
pub struct Containerd {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    child: Option<Child>,
    address: PathBuf,
    log_path: PathBuf,
    ember_shim: Option<PathBuf>,
    default_namespace: String,
    report: Option<ShutdownReport>,
}

impl Containerd {
    /// Starts containerd, waits until it answers, imports the test images.
    pub fn start(opts: Options) -> Result<Self> {
        let containerd = containerd_bin();
        ensure!(
            containerd.exists(),
            "{} not found (apt-get install containerd)",
            containerd.display()
        );
        let dir = tempfile::Builder::new()
            .prefix("ember-ctrd-")
            .tempdir_in("/tmp")
            .context("creating temp dir")?;
        let path = dir.path().to_path_buf();
        let address = path.join("containerd.sock");
        let log_path = path.join("containerd.log");
        let config = path.join("config.toml");
        let cni_dirs = match &opts.cni {
            Some(cni) => {
                let conf_dir = path.join("cni").join("net.d");
                std::fs::create_dir_all(&conf_dir)?;
                for (name, content) in &cni.conflists {
                    std::fs::write(conf_dir.join(name), content)?;
                }
                Some((conf_dir, cni.bin_dir.clone()))
            }
            None => None,
        };
        let version = ContainerdVersion::of_containerd_bin()?;
        eprintln!(
            "[containerd harness] {} is containerd {version} (config version {})",
            containerd.display(),
            version.config_version()
        );
        std::fs::write(
            &config,
            config_toml(
                version,
                &path,
                opts.ember_shim.as_deref(),
                cni_dirs.as_ref().map(|(c, b)| (c.as_path(), b.as_path())),
            ),
        )?;

        let mut env_path =
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
        // The ember shim's dir first, then that of containerd (another
        // containerd's own containerd-shim-runc-v2), then the rest.
        let mut dirs: Vec<PathBuf> = Vec::new();
        if let Some(shim_dir) = opts.ember_shim.as_deref().and_then(Path::parent) {
            dirs.push(shim_dir.to_path_buf());
        }
        if std::env::var_os("EMBER_CONTAINERD").is_some() {
            if let Some(d) = containerd.parent() {
                dirs.push(d.to_path_buf());
            }
        }
        if !dirs.is_empty() {
            dirs.extend(std::env::split_paths(&env_path));
            env_path = std::env::join_paths(dirs)?;
        }
        let log = std::fs::File::create(&log_path)?;
        let mut cmd = Command::new(&containerd);
        if let Some(text) = &opts.ember_config {
            let p = path.join("ember.toml");
            let mut text = text.clone();
            if !text
                .lines()
                .any(|l| l.trim_start().starts_with("template_dir"))
            {
                // VM templates of this run only (a test that wants them
                // elsewhere, or off, says so in its config).
                text.push_str(&format!(
                    "template_dir = {:?}\n",
                    path.join("templates").display().to_string()
                ));
            }
            std::fs::write(&p, text)?;
            cmd.env("EMBER_CONFIG", &p);
        }
        cmd.envs(opts.env.iter().map(|(k, v)| (k, v)));
        cmd.arg("--config")
            .arg(&config)
            .env("PATH", env_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Own process group: a ^C in the terminal goes to the test only.
            .process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", containerd.display()))?;
        let mut me = Self {
            dir: Some(dir),
            path,
            child: Some(child),
            address,
            log_path,
            ember_shim: opts.ember_shim.clone(),
            default_namespace: "default".into(),
            report: None,
        };
        let t0 = Instant::now();
        me.wait_ready(opts.ready_timeout)?;
        eprintln!(
            "[containerd harness] containerd ready at {} in {:.2}s (log {})",
            me.address.display(),
            t0.elapsed().as_secs_f64(),
            me.log_path.display()
        );
        if !opts.import_into.is_empty() {
            let cache = image_cache_dir()?;
            let images = [
                image::write_busybox_image(&cache.join("busybox.oci.tar"))?,
                image::write_pause_image(&cache.join("pause.oci.tar"))?,
            ];
            for ns in &opts.import_into {
                for img in &images {
                    let out = me.ctr_ns(
                        ns,
                        &["images", "import", img.path.to_str().context("image path")?],
                    );
                    if !out.success() {
                        bail!(
                            "importing {} into {ns}: {}\n{}",
                            img.name,
                            out.describe(),
                            me.log_tail(40)
                        );
                    }
                }
                let out = me.ctr_ns(ns, &["images", "ls", "-q"]);
                for img in &images {
                    ensure!(
                        out.stdout_str().lines().any(|l| l.trim() == img.name),
                        "{} not listed in namespace {ns} after import: {}",
                        img.name,
                        out.describe()
                    );
                }
            }
        }
        Ok(me)
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(st)) = child.try_wait() {
                    self.child = None;
                    bail!(
                        "containerd exited during startup: {st}\n{}",
                        self.log_tail(60)
                    );
                }
            }
            let out = self.ctr_timeout(&["version"], Duration::from_secs(10));
            if out.success() && out.stdout_str().contains("Server:") {
                return Ok(());
            }
            if start.elapsed() > timeout {
                bail!(
                    "containerd did not answer within {timeout:?}: {}\n{}",
                    out.describe(),
                    self.log_tail(60)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The gRPC socket.
    pub fn address(&self) -> &Path {
        &self.address
    }

    /// The temp dir holding config, root, state, sockets and the log.
    pub fn dir(&self) -> &Path {
        &self.path
    }

    pub fn root(&self) -> PathBuf {
        self.path.join("root")
    }

    pub fn state(&self) -> PathBuf {
        self.path.join("state")
    }

    /// The CNI conf dir the CRI plugin reads when [`Options::cni`] was set.
    pub fn cni_conf_dir(&self) -> PathBuf {
        self.path.join("cni").join("net.d")
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The Ember shim binary configured, if any.
    pub fn ember_shim(&self) -> Option<&Path> {
        self.ember_shim.as_deref()
    }

    /// containerd's whole log so far.
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The last `n` lines of containerd's log, framed for a failure message.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let from = lines.len().saturating_sub(n);
        format!(
            "--- containerd log ({}), last {} lines ---\n{}\n--- end of containerd log ---",
            self.log_path.display(),
            lines.len() - from,
            lines[from..].join("\n")
        )
    }

    /// Namespace `ctr`/`ctr_timeout` use (default `default`).
    pub fn set_namespace(&mut self, ns: &str) {
        self.default_namespace = ns.to_string();
    }

    /// A `ctr` command with `--address` and `--namespace` set.
    pub fn ctr_command(&self, ns: &str) -> Command {
        let mut cmd = Command::new(ctr_bin());
        cmd.arg("--address")
            .arg(&self.address)
            .arg("--namespace")
            .arg(ns)
            .env_remove("CONTAINERD_NAMESPACE")
            .env_remove("CONTAINERD_ADDRESS");
        cmd
    }

    /// `ctr <args>` in the default namespace, [`CTR_TIMEOUT`].
    pub fn ctr(&self, args: &[&str]) -> CtrOutput {
        self.ctr_full(&self.default_namespace, args, CTR_TIMEOUT)
    }

    /// `ctr <args>` with a timeout.
    pub fn ctr_timeout(&self, args: &[&str], timeout: Duration) -> CtrOutput {
        self.ctr_full(&self.default_namespace, args, timeout)
    }

    /// `ctr -n ns <args>`, [`CTR_TIMEOUT`].
    pub fn ctr_ns(&self, ns: &str, args: &[&str]) -> CtrOutput {
        self.ctr_full(ns, args, CTR_TIMEOUT)
    }

    pub fn ctr_full(&self, ns: &str, args: &[&str], timeout: Duration) -> CtrOutput {
        let mut cmd = self.ctr_command(ns);
        cmd.args(args);
        run_captured(cmd, args.iter().map(|s| s.to_string()).collect(), timeout)
    }

    /// Starts `ctr events` in the background, appending to `events.log`.
    pub fn events(&self) -> Result<EventWatch> {
        let path = self.path.join("events.log");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        let mut cmd = self.ctr_command(&self.default_namespace);
        cmd.arg("events")
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f);
        let child = cmd.spawn().context("spawning ctr events")?;
        // Give it a moment to subscribe before anything happens.
        std::thread::sleep(Duration::from_millis(500));
        Ok(EventWatch { child, path })
    }

    /// Runs `ctr <args>` on a new pseudo-terminal of `rows`x`cols` (its
    /// controlling terminal, so a resize sends it SIGWINCH).
    pub fn ctr_pty(&self, args: &[&str], rows: u16, cols: u16) -> Result<PtySession> {
        let mut cmd = self.ctr_command(&self.default_namespace);
        cmd.args(args);
        PtySession::spawn(cmd, rows, cols)
    }

    /// Shim processes (pid, cmdline) whose command line names our address.
    pub fn shim_processes(&self) -> Vec<(i32, String)> {
        processes_mentioning(&self.address.to_string_lossy())
            .into_iter()
            .filter(|(pid, cmdline)| {
                !cmdline.starts_with(&*ctr_bin().to_string_lossy())
                    && !cmdline.contains(" --config ")
                    && Some(*pid) != self.child.as_ref().map(|c| c.id() as i32)
            })
            .collect()
    }

    /// The containerd process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Stops containerd and cleans up; returns what was left behind.
    pub fn shutdown(mut self) -> ShutdownReport {
        self.shutdown_inner()
    }

    fn shutdown_inner(&mut self) -> ShutdownReport {
        if let Some(r) = &self.report {
            return r.clone();
        }
        let mut report = ShutdownReport {
            shim_deaths: self
                .log()
                .lines()
                .filter(|l| {
                    l.starts_with("ember: seccomp: forbidden system call")
                        || l.starts_with("ember: panic in thread")
                })
                .map(str::to_string)
                .collect(),
            ..ShutdownReport::default()
        };
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let (_, timed_out) = wait_timeout(&mut child, Duration::from_secs(20));
            report.containerd_killed = timed_out;
        }
        for (pid, cmdline) in self.shim_processes() {
            let tree = descendants(pid);
            eprintln!(
                "[containerd harness] LEAK: shim process left after containerd stopped: {pid} {cmdline} (killing it and {} descendants)",
                tree.len()
            );
            for p in std::iter::once(pid).chain(tree) {
                // SAFETY: plain kill of a pid found in /proc.
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
            report.leftover_shims.push(format!("{pid} {cmdline}"));
        }
        if !report.leftover_shims.is_empty() {
            std::thread::sleep(Duration::from_millis(500));
        }
        let mut mounts = mounts_under(&self.path);
        mounts.reverse();
        for m in mounts {
            eprintln!("[containerd harness] LEAK: mount left under the temp dir: {m} (unmounting)");
            if let Ok(c) = std::ffi::CString::new(m.clone()) {
                // SAFETY: umount2 with a valid C string.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
            report.leftover_mounts.push(m);
        }
        let keep = std::env::var_os("EMBER_E2E_KEEP").is_some() || std::thread::panicking();
        if let Some(dir) = self.dir.take() {
            if keep {
                let p = dir.keep();
                eprintln!("[containerd harness] keeping {}", p.display());
            } else if let Err(e) = dir.close() {
                eprintln!("[containerd harness] removing {}: {e}", self.path.display());
            }
        }
        self.report = Some(report.clone());
        report
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if self.report.is_none() {
            if std::thread::panicking() {
                eprintln!("{}", self.log_tail(80));
            }
            let report = self.shutdown_inner();
            if !report.is_clean() {
                eprintln!("[containerd harness] unclean shutdown: {report:?}");
            }
        }
    }
}

/// The CRI runtime handler (containerd 2.x only) registered with
/// `sandboxer = "shim"`: Ember's shim serves containerd's Sandbox API.
pub const EMBER_SANDBOX_API_HANDLER: &str = "ember-sandbox-api";

/// The containerd config for a harness rooted at `dir`, in the format of
/// containerd `version` (config version 2 for 1.x, 3 for 2.x), with Ember's
/// runtime when `ember_shim` is given and the CRI plugin's CNI directories
/// `(conf_dir, bin_dir)` when `cni_dirs` is. The server sections are the
/// same for both; version 3 split the CRI plugin into
/// `io.containerd.cri.v1.images` (snapshotter, the pinned sandbox image),
/// `io.containerd.cri.v1.runtime` (runtimes, CNI, `restrict_oom_score_adj`)
/// and `io.containerd.grpc.v1.cri` (the streaming server).
pub fn config_toml(
    version: ContainerdVersion,
    dir: &Path,
    ember_shim: Option<&Path>,
    cni_dirs: Option<(&Path, &Path)>,
) -> String {
    let d = dir.display();
    let pause = image::PAUSE_IMAGE;
    let config_version = version.config_version();
    let mut s = format!(
        r#"version = {config_version}
root = "{d}/root"
state = "{d}/state"
oom_score = 0

[grpc]
  address = "{d}/containerd.sock"

[ttrpc]
  address = "{d}/containerd.sock.ttrpc"

[debug]
  level = "debug"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
"#
    );
    // Where CRI's runtimes live, and its CNI key for the plugin directory.
    let (runtime_plugin, cni_bin_key) = if config_version >= 3 {
        s.push_str(&format!(
            r#"
[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"

[plugins."io.containerd.cri.v1.images".pinned_images]
  sandbox = "{pause}"

[plugins."io.containerd.cri.v1.runtime"]
  restrict_oom_score_adj = true

[plugins."io.containerd.cri.v1.runtime".containerd]
  default_runtime_name = "runc"
"#
        ));
        ("io.containerd.cri.v1.runtime", "bin_dirs")
    } else {
        s.push_str(&format!(
            r#"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  restrict_oom_score_adj = true
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
"#
        ));
        ("io.containerd.grpc.v1.cri", "bin_dir")
    };
    s.push_str(&format!(
        r#"
[plugins."{runtime_plugin}".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
"#
    ));
    if let Some(shim) = ember_shim {
        s.push_str(&format!(
            r#"
[plugins."{runtime_plugin}".containerd.runtimes.ember]
  runtime_type = "{}"
  pod_annotations = ["io.ember.*"]
  container_annotations = ["io.ember.*", "io.kubernetes.container.ports"]
"#,
            shim.display()
        ));
        // containerd 2.x: a second handler whose pods are Sandbox API
        // sandboxes (the shim is the sandbox controller; no pause container).
        if config_version >= 3 {
            s.push_str(&format!(
                r#"
[plugins."{runtime_plugin}".containerd.runtimes.{EMBER_SANDBOX_API_HANDLER}]
  runtime_type = "{}"
  sandboxer = "shim"
  pod_annotations = ["io.ember.*"]
  container_annotations = ["io.ember.*", "io.kubernetes.container.ports"]
"#,
                shim.display()
            ));
        }
    }
    if let Some((conf_dir, bin_dir)) = cni_dirs {
        // 2.x takes a list of plugin directories.
        let bin = if config_version >= 3 {
            format!("[\"{}\"]", bin_dir.display())
        } else {
            format!("\"{}\"", bin_dir.display())
        };
        s.push_str(&format!(
            r#"
[plugins."{runtime_plugin}".cni]
  {cni_bin_key} = {bin}
  conf_dir = "{}"
  max_conf_num = 1
"#,
            conf_dir.display()
        ));
    }
    s
}

// ---------------------------------------------------------------------------
// /proc helpers
// ---------------------------------------------------------------------------

fn cmdline(pid: i32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    if raw.is_empty() {
        return None;
    }
    let parts: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|p| !p.is_empty())
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    Some(parts.join(" "))
}

fn all_pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
                .collect()
        })
        .unwrap_or_default()
}

/// Processes (pid, cmdline) whose command line contains `needle`, except us.
pub fn processes_mentioning(needle: &str) -> Vec<(i32, String)> {
    let me = std::process::id() as i32;
    all_pids()
        .into_iter()
        .filter(|p| *p != me)
        .filter_map(|p| cmdline(p).map(|c| (p, c)))
        .filter(|(_, c)| c.contains(needle))
        .collect()
}

/// Processes whose executable or argv[0] is named `name` (e.g. the shim).
pub fn processes_named(name: &str) -> Vec<(i32, String)> {
    all_pids()
        .into_iter()
        .filter_map(|p| cmdline(p).map(|c| (p, c)))
        .filter(|(p, c)| {
            let argv0 = c.split(' ').next().unwrap_or("");
            Path::new(argv0).file_name().is_some_and(|n| n == name)
                || std::fs::read_link(format!("/proc/{p}/exe"))
                    .ok()
                    .and_then(|e| e.file_name().map(|n| n.to_string_lossy().into_owned()))
                    .is_some_and(|n| n == name || n == format!("{name} (deleted)"))
        })
        .collect()
}

fn ppid(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // pid (comm) state ppid ...; comm may contain spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// All descendants of `pid` (by parent pid), children first.
pub fn descendants(pid: i32) -> Vec<i32> {
    let pids: Vec<(i32, i32)> = all_pids()
        .into_iter()
        .filter_map(|p| ppid(p).map(|pp| (p, pp)))
        .collect();
    let mut out = Vec::new();
    let mut frontier = vec![pid];
    while let Some(parent) = frontier.pop() {
        for (p, pp) in &pids {
            if *pp == parent && !out.contains(p) {
                out.push(*p);
                frontier.push(*p);
            }
        }
    }
    out
}

/// Mount points at or under `dir` (from /proc/self/mountinfo), in mount order.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let prefix = dir.to_string_lossy().trim_end_matches('/').to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mount)
        .filter(|m| *m == prefix || m.starts_with(&format!("{prefix}/")))
        .collect()
}

fn unescape_mount(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ---------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------

/// A background `ctr events`, its output in a file. Killed on drop.
pub struct EventWatch {
    child: Child,
    path: PathBuf,
}

/// One line of `ctr events`: `<time> <topic> <namespace> <event>`.
#[derive(Debug, Clone)]
pub struct Event {
    pub line: String,
    pub topic: String,
    pub body: String,
}

impl EventWatch {
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn text(&self) -> String {
        std::fs::read(&self.path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Parsed events so far, in order.
    pub fn events(&self) -> Vec<Event> {
        self.text()
            .lines()
            .filter_map(|l| {
                let topic = l.split_whitespace().find(|w| w.starts_with('/'))?;
                let body = l[l.find(topic)? + topic.len()..].trim().to_string();
                Some(Event {
                    line: l.to_string(),
                    topic: topic.to_string(),
                    body,
                })
            })
            .collect()
    }

    /// Waits until an event satisfies `pred`.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&Event) -> bool) -> Option<Event> {
        let start = Instant::now();
        loop {
            if let Some(e) = self.events().into_iter().find(&pred) {
                return Some(e);
            }
            if start.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether `ctr events` is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for EventWatch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// Pseudo-terminal sessions
// ---------------------------------------------------------------------------

/// A process on a pty we hold the master of; output collected in the background.
pub struct PtySession {
    child: Child,
    master: std::fs::File,
    output: Arc<Mutex<Vec<u8>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

fn set_winsize(fd: i32, rows: u16, cols: u16) -> std::io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ with a valid winsize.
    if unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl PtySession {
    /// Spawns `cmd` with a new pty as stdin/stdout/stderr and controlling tty.
    pub fn spawn(mut cmd: Command, rows: u16, cols: u16) -> Result<Self> {
        let ws = nix::pty::Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = nix::pty::openpty(Some(&ws), None).context("openpty")?;
        let master: OwnedFd = pty.master;
        let slave: OwnedFd = pty.slave;
        cmd.stdin(Stdio::from(slave.try_clone()?))
            .stdout(Stdio::from(slave.try_clone()?))
            .stderr(Stdio::from(slave.try_clone()?));
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().context("spawning on the pty")?;
        drop(slave);
        // SAFETY: we own the master fd; hand it to a File.
        let master =
            unsafe { std::fs::File::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(master)) };
        let output = Arc::new(Mutex::new(Vec::new()));
        let mut rd = master.try_clone()?;
        let out = output.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match rd.read(&mut buf) {
                    Ok(0) | Err(_) => break, // EIO once the slave side is closed
                    Ok(n) => out.lock().unwrap().extend_from_slice(&buf[..n]),
                }
            }
        });
        Ok(Self {
            child,
            master,
            output,
            reader: Some(reader),
        })
    }

    /// Types `s`.
    pub fn send(&mut self, s: &str) -> Result<()> {
        self.master.write_all(s.as_bytes())?;
        self.master.flush()?;
        Ok(())
    }

    /// Everything the pty printed so far.
    pub fn output(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap()).into_owned()
    }

    /// Waits until the output after byte `from` contains `needle`; returns
    /// the end offset of the match. Fails at `timeout`, or soon after the
    /// process exited without printing it.
    pub fn expect_from(&mut self, from: usize, needle: &str, timeout: Duration) -> Result<usize> {
        let start = Instant::now();
        let mut exited: Option<(ExitStatus, Instant)> = None;
        loop {
            {
                let out = self.output.lock().unwrap();
                if from <= out.len() {
                    let hay = &out[from..];
                    if let Some(i) = hay
                        .windows(needle.len().max(1))
                        .position(|w| w == needle.as_bytes())
                    {
                        return Ok(from + i + needle.len());
                    }
                }
            }
            if exited.is_none() {
                if let Ok(Some(st)) = self.child.try_wait() {
                    exited = Some((st, Instant::now()));
                }
            }
            if let Some((st, at)) = exited {
                // Let the reader drain what is left, then give up.
                if at.elapsed() > Duration::from_millis(500) {
                    bail!(
                        "the process exited ({st}) before {needle:?} appeared on the pty; output: {:?}",
                        self.output()
                    );
                }
            }
            if start.elapsed() > timeout {
                bail!(
                    "{needle:?} not seen on the pty within {timeout:?}; output so far: {:?}",
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Bytes of output so far.
    pub fn len(&self) -> usize {
        self.output.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sets the terminal size (the kernel sends SIGWINCH to the foreground group).
    pub fn resize(&self, rows: u16, cols: u16) -> Result<()> {
        set_winsize(self.master.as_raw_fd(), rows, cols).context("TIOCSWINSZ")
    }

    /// Waits for the process to exit (killed after `timeout`).
    pub fn wait(&mut self, timeout: Duration) -> (Option<ExitStatus>, bool) {
        wait_timeout(&mut self.child, timeout)
    }
}

impl Drop for PtySession {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The reader ends with EIO once no process holds the slave; don't
        // block on it if a container process still does.
        if let Some(r) = self.reader.take() {
            if r.is_finished() {
                let _ = r.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ContainerdVersion;

    #[test]
    fn containerd_versions_parse() {
        let v2 = ContainerdVersion::parse(
            "containerd github.com/containerd/containerd/v2 2.1.9+unknown \n",
        )
        .unwrap();
        assert_eq!((v2.major, v2.minor, v2.config_version()), (2, 1, 3));
        let v1 = ContainerdVersion::parse(
            "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+b1\n",
        )
        .unwrap();
        assert_eq!((v1.major, v1.minor, v1.config_version()), (1, 6, 2));
        let tagged = ContainerdVersion::parse("containerd containerd.io v1.7.24 abc\n").unwrap();
        assert_eq!((tagged.major, tagged.minor), (1, 7));
        assert!(ContainerdVersion::parse("nothing here").is_none());
    }
}
