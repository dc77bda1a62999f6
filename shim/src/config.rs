//! The Ember configuration: a TOML file, `/etc/ember/config.toml` unless the
//! environment variable `EMBER_CONFIG` names another one. Every key is
//! optional; a missing default file means all defaults.
//! `deploy/config.toml` documents every key with its default.
//!
//! The shim reads it on every start (containerd passes its environment to
//! shims, so `EMBER_CONFIG` set for containerd reaches the shim), and the
//! `ember` CLI reads the same file the same way.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use ember_vmm::CpuTemplate;
use ember_vmm::MAX_VCPUS;
use ember_vmm::MIN_CONSOLE_LOG_MAX_BYTES;
use ember_vmm::MIN_MEM_MIB;
use serde::{Deserialize, Serialize};

use crate::annotations;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/ember/config.toml";
/// Environment variable naming the config file.
pub const CONFIG_ENV: &str = "EMBER_CONFIG";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Uncompressed ELF guest kernel (`vmlinux`).
    pub kernel: PathBuf,
    /// Uncompressed newc initrd holding the agent as `/init`.
    pub initrd: PathBuf,
    /// Extra guest kernel parameters, appended to what the VMM and the CPU
    /// template set.
    pub kernel_params: String,
    /// `auto`, `host` or `emulated` (see the README).
    pub cpu_template: CpuTemplate,
    /// Shim log level (a tracing filter: `info`, `debug`,
    /// `info,ember_vmm=debug`, ...). `RUST_LOG` overrides it; containerd in
    /// debug mode makes it `debug`.
    pub log_level: String,
    /// vCPUs of a pod whose workload states no CPU limit.
    pub default_vcpus: u8,
    /// Guest memory (MiB) of a pod whose workload states no memory limit.
    pub default_memory_mib: u32,
    /// Added to a workload's memory limit to size its VM: the guest kernel,
    /// the agent and page cache live there too.
    pub memory_overhead_mib: u32,
    /// Upper bound for the vCPUs of one VM.
    pub max_vcpus: u8,
    /// Upper bound for the guest memory of one VM (MiB).
    pub max_memory_mib: u32,
    /// Per-pod state lives in `<state_dir>/<namespace>/<pod>/`.
    pub state_dir: PathBuf,
    /// How long a VM may take from start to its agent answering.
    pub boot_timeout_secs: u64,
    /// Deadline of one ordinary agent request (create, start, signal,
    /// stats, ...). Long polls (process exits, OOM events) have none.
    pub agent_timeout_secs: u64,
    /// Which `io.ember.*` annotations may override per-pod settings:
    /// any of `io.ember.vcpus`, `io.ember.memory_mib`,
    /// `io.ember.kernel_params`. An annotation not listed here is refused.
    pub enable_annotations: Vec<String>,
    /// Start pods from VM templates: the first pod of a (kernel, initrd,
    /// VM shape) boots cold and is snapshotted, later ones restore from
    /// that snapshot in well under a second. `false`: every pod boots cold.
    pub templates: bool,
    /// Where templates live, one directory per identity (`ember templates`).
    pub template_dir: PathBuf,
    /// How long a VM restored from a template may take until its agent
    /// answers; after that the template is discarded and the pod boots
    /// cold.
    pub template_restore_timeout_secs: u64,
    /// Host cgroup (absolute, from each hierarchy's root) under which a
    /// pod without a cgroup of its own from the CRI (`ctr run`, a sandbox
    /// without a cgroup parent) gets `<namespace>-<pod>`; the pod's VM is
    /// charged there.
    pub cgroup_parent: String,
    /// Cap (bytes) of a pod's guest console log
    /// (`<state_dir>/<namespace>/<pod>/console.log`): past it the log is
    /// rotated to `console.log.1`, so a pod's console never takes more
    /// than twice this on the host. At least 4096.
    pub console_log_max_bytes: u64,
    /// RLIMIT_NOFILE (soft and hard) of a serving shim, or the limit it
    /// inherits from containerd if that is lower: bounds the open files one
    /// pod can pin on the host (virtio-fs inodes and handles, vsock
    /// streams, ...).
    pub max_open_files: u64,
    /// Inodes a pod's guest may hold in its virtio-fs share (each keeps a
    /// descriptor on the host); past it lookups fail with ENFILE.
    pub fs_max_inodes: u64,
    /// Files and directories a pod's guest may hold open in its share
    /// (a descriptor each); past it opens fail with EMFILE.
    pub fs_max_handles: u64,
    /// Host inodes the share remembers for the guest, forgotten ones
    /// included (a small record each, until the guest unmounts); past it
    /// new inodes fail with ENFILE.
    pub fs_max_known_inodes: u64,
    /// TCP ports `kubectl port-forward` reaches in every pod, besides those
    /// a pod declares (`io.ember.port_forward`, kubelet's container ports).
    pub port_forward_ports: Vec<u16>,
    /// Connections a pod forwards at once (`kubectl port-forward`); more
    /// are reset. At least 1.
    pub port_forward_max_connections: u32,
}

/// The least `max_open_files` a shim can run with.
pub const MIN_OPEN_FILES: u64 = 1024;

impl Default for Config {
    fn default() -> Self {
        Config {
            kernel: "/var/lib/ember/vmlinux".into(),
            initrd: "/var/lib/ember/initrd.img".into(),
            kernel_params: String::new(),
            cpu_template: CpuTemplate::Auto,
            log_level: "info".into(),
            default_vcpus: 1,
            default_memory_mib: 256,
            memory_overhead_mib: 128,
            max_vcpus: 8,
            max_memory_mib: 16384,
            state_dir: "/run/ember".into(),
            boot_timeout_secs: 600,
            agent_timeout_secs: 120,
            enable_annotations: Vec::new(),
            templates: true,
            template_dir: "/var/lib/ember/templates".into(),
            template_restore_timeout_secs: 30,
            cgroup_parent: "/ember".into(),
            console_log_max_bytes: ember_vmm::DEFAULT_CONSOLE_LOG_MAX_BYTES,
            max_open_files: 65536,
            fs_max_inodes: ember_vmm::FsLimits::default().max_inodes,
            fs_max_handles: ember_vmm::FsLimits::default().max_handles,
            fs_max_known_inodes: ember_vmm::FsLimits::default().max_known_inodes,
            port_forward_ports: Vec::new(),
            port_forward_max_connections: 64,
        }
    }
}

/// Where a config came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    File(PathBuf),
    /// The default path does not exist: all defaults.
    Defaults(PathBuf),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File(p) => write!(f, "{}", p.display()),
            Source::Defaults(p) => write!(f, "defaults ({} does not exist)", p.display()),
        }
    }
}

impl Config {
    /// Loads the config from `$EMBER_CONFIG` or the default path. A missing
    /// default file gives the defaults; a missing file named by
    /// `EMBER_CONFIG` is an error (it is surely a mistake).
    pub fn load() -> anyhow::Result<(Config, Source)> {
        match std::env::var_os(CONFIG_ENV) {
            Some(p) if !p.is_empty() => {
                let path = PathBuf::from(p);
                Ok((Self::load_file(&path)?, Source::File(path)))
            }
            _ => {
                let path = PathBuf::from(DEFAULT_CONFIG_PATH);
                if path.exists() {
                    Ok((Self::load_file(&path)?, Source::File(path)))
                } else {
                    Ok((Config::default(), Source::Defaults(path)))
                }
            }
        }
    }

    pub fn load_file(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading Ember config {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("Ember config {}", path.display()))
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> anyhow::Result<Config> {
        let config: Config = toml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if self.max_vcpus == 0 || self.max_vcpus > MAX_VCPUS {
            bail!(
                "max_vcpus must be between 1 and {MAX_VCPUS}, not {}",
                self.max_vcpus
            );
        }
        if self.default_vcpus == 0 || self.default_vcpus > self.max_vcpus {
            bail!(
                "default_vcpus must be between 1 and max_vcpus ({}), not {}",
                self.max_vcpus,
                self.default_vcpus
            );
        }
        if self.max_memory_mib < MIN_MEM_MIB {
            bail!(
                "max_memory_mib must be at least {MIN_MEM_MIB}, not {}",
                self.max_memory_mib
            );
        }
        if self.default_memory_mib < MIN_MEM_MIB || self.default_memory_mib > self.max_memory_mib {
            bail!(
                "default_memory_mib must be between {MIN_MEM_MIB} and max_memory_mib ({}), not {}",
                self.max_memory_mib,
                self.default_memory_mib
            );
        }
        if self.boot_timeout_secs == 0 {
            bail!("boot_timeout_secs must be more than 0");
        }
        if self.agent_timeout_secs == 0 {
            bail!("agent_timeout_secs must be more than 0");
        }
        if self.max_open_files < MIN_OPEN_FILES {
            bail!(
                "max_open_files must be at least {MIN_OPEN_FILES}, not {}",
                self.max_open_files
            );
        }
        if self.port_forward_max_connections == 0 {
            bail!("port_forward_max_connections must be more than 0");
        }
        if self.port_forward_ports.contains(&0) {
            bail!("port_forward_ports: 0 is not a TCP port");
        }
        if self.template_restore_timeout_secs == 0 {
            bail!("template_restore_timeout_secs must be more than 0");
        }
        if self.console_log_max_bytes < MIN_CONSOLE_LOG_MAX_BYTES {
            bail!(
                "console_log_max_bytes must be at least {MIN_CONSOLE_LOG_MAX_BYTES}, not {}",
                self.console_log_max_bytes
            );
        }
        if self.fs_max_inodes == 0 || self.fs_max_handles == 0 {
            bail!("fs_max_inodes and fs_max_handles must be more than 0");
        }
        if self.fs_max_known_inodes < self.fs_max_inodes {
            bail!(
                "fs_max_known_inodes ({}) must be at least fs_max_inodes ({})",
                self.fs_max_known_inodes,
                self.fs_max_inodes
            );
        }
        if !self.template_dir.is_absolute() {
            bail!(
                "template_dir must be an absolute path, not {}",
                self.template_dir.display()
            );
        }
        if !self.state_dir.is_absolute() {
            bail!(
                "state_dir must be an absolute path, not {}",
                self.state_dir.display()
            );
        }
        crate::resources::cgroup::CgroupPath::parse_absolute(&self.cgroup_parent, "cgroup_parent")?;
        for name in &self.enable_annotations {
            if !annotations::OVERRIDABLE.contains(&name.as_str()) {
                bail!(
                    "enable_annotations: {name:?} is not an annotation Ember accepts (known: {})",
                    annotations::OVERRIDABLE.join(", ")
                );
            }
        }
        tracing_subscriber::EnvFilter::try_new(&self.log_level)
            .map_err(|e| anyhow::anyhow!("log_level {:?}: {e}", self.log_level))?;
        Ok(())
    }

    pub fn boot_timeout(&self) -> Duration {
        Duration::from_secs(self.boot_timeout_secs)
    }

    pub fn agent_timeout(&self) -> Duration {
        Duration::from_secs(self.agent_timeout_secs)
    }

    pub fn template_restore_timeout(&self) -> Duration {
        Duration::from_secs(self.template_restore_timeout_secs)
    }

    /// The caps of a pod's virtio-fs share.
    pub fn fs_limits(&self) -> ember_vmm::FsLimits {
        ember_vmm::FsLimits {
            max_inodes: self.fs_max_inodes,
            max_handles: self.fs_max_handles,
            max_known_inodes: self.fs_max_known_inodes,
        }
    }

    /// Whether annotation `name` may override a per-pod setting.
    pub fn annotation_enabled(&self, name: &str) -> bool {
        self.enable_annotations.iter().any(|a| a == name)
    }

    /// The effective config as TOML (for `ember config`).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_defaults() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
        Config::default().validate().unwrap();
    }

    #[test]
    fn the_documented_example_is_exactly_the_defaults() {
        let example = include_str!("../../deploy/config.toml");
        assert_eq!(Config::parse(example).unwrap(), Config::default());
        // Every key is documented there.
        let rendered = Config::default().to_toml();
        for line in rendered.lines() {
            let key = line.split(" = ").next().unwrap();
            assert!(
                example.lines().any(|l| l.starts_with(&format!("{key} = "))),
                "deploy/config.toml does not document {key}"
            );
        }
    }

    #[test]
    fn keys_parse() {
        let c = Config::parse(
            r#"
            kernel = "/k"
            initrd = "/i"
            cpu_template = "emulated"
            log_level = "debug"
            default_vcpus = 2
            default_memory_mib = 512
            memory_overhead_mib = 64
            max_vcpus = 4
            max_memory_mib = 2048
            state_dir = "/tmp/ember"
            boot_timeout_secs = 30
            agent_timeout_secs = 10
            kernel_params = "quiet"
            enable_annotations = ["io.ember.vcpus", "io.ember.memory_mib"]
            templates = false
            template_dir = "/tmp/templates"
            template_restore_timeout_secs = 5
            cgroup_parent = "/pods/ember"
            console_log_max_bytes = 65536
            fs_max_inodes = 1000
            fs_max_handles = 100
            fs_max_known_inodes = 5000
            "#,
        )
        .unwrap();
        assert_eq!(c.kernel, PathBuf::from("/k"));
        assert_eq!(c.cpu_template, CpuTemplate::Emulated);
        assert_eq!(c.default_vcpus, 2);
        assert_eq!(c.boot_timeout(), Duration::from_secs(30));
        assert!(c.annotation_enabled("io.ember.vcpus"));
        assert!(!c.annotation_enabled("io.ember.kernel_params"));
        assert!(!c.templates);
        assert_eq!(c.template_dir, PathBuf::from("/tmp/templates"));
        assert_eq!(c.template_restore_timeout(), Duration::from_secs(5));
        assert_eq!(c.cgroup_parent, "/pods/ember");
        assert_eq!(c.console_log_max_bytes, 65536);
        assert_eq!(
            c.fs_limits(),
            ember_vmm::FsLimits {
                max_inodes: 1000,
                max_handles: 100,
                max_known_inodes: 5000,
            }
        );
    }

    #[test]
    fn the_rendered_config_parses_back() {
        let c = Config {
            enable_annotations: vec!["io.ember.kernel_params".into()],
            ..Config::default()
        };
        assert_eq!(Config::parse(&c.to_toml()).unwrap(), c);
    }

    #[test]
    fn mistakes_are_named() {
        let err = |t: &str| format!("{:#}", Config::parse(t).unwrap_err());
        assert!(err("kernal = \"/k\"").contains("unknown field `kernal`"));
        assert!(err("cpu_template = \"fast\"").contains("unknown variant"));
        assert!(err("default_vcpus = 0").contains("default_vcpus"));
        assert!(err("max_vcpus = 64").contains("max_vcpus"));
        assert!(err("default_vcpus = 4\nmax_vcpus = 2").contains("default_vcpus"));
        assert!(err("default_memory_mib = 16").contains("default_memory_mib"));
        assert!(err("boot_timeout_secs = 0").contains("boot_timeout_secs"));
        assert!(err("state_dir = \"run/ember\"").contains("absolute"));
        assert!(err("template_dir = \"templates\"").contains("template_dir"));
        assert!(err("template_restore_timeout_secs = 0").contains("template_restore"));
        assert!(err("enable_annotations = [\"io.ember.group\"]").contains("io.ember.group"));
        assert!(err("log_level = \"info,=[\"").contains("log_level"));
        assert!(err("cgroup_parent = \"ember\"").contains("cgroup_parent"));
        assert!(err("cgroup_parent = \"/a/../b\"").contains("cgroup_parent"));
        assert!(err("cgroup_parent = \"/\"").contains("cgroup_parent"));
        assert!(err("console_log_max_bytes = 100").contains("console_log_max_bytes"));
        assert!(err("fs_max_handles = 0").contains("fs_max_handles"));
        assert!(err("fs_max_inodes = 10\nfs_max_known_inodes = 5").contains("fs_max_known_inodes"));
    }

    #[test]
    fn load_honours_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "default_vcpus = 2\n").unwrap();
        // Only this test touches EMBER_CONFIG.
        std::env::set_var(CONFIG_ENV, &path);
        let (c, src) = Config::load().unwrap();
        assert_eq!(c.default_vcpus, 2);
        assert_eq!(src, Source::File(path.clone()));
        std::env::set_var(CONFIG_ENV, dir.path().join("missing.toml"));
        assert!(Config::load().is_err());
        std::env::remove_var(CONFIG_ENV);
    }
}
