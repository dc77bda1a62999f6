//! `start` and `-info`, handled by Ember itself before
//! `containerd_shim::asynchronous::run` sees the command line.
//!
//! Why not the crate's: `containerd-shim` 0.11 parses whatever `start` gets
//! on stdin as runc options and fails on what containerd 2.x sends there
//! (runtime options of a CRI handler, 2.3's `BootstrapParams`), and its
//! `-info` needs `TTRPC_ADDRESS` and describes runc. Version 0.12 handles
//! 2.3 but always answers task API v3 in a form containerd 1.6/1.7 reject.
//! So Ember stays on 0.11 for the serving shim and does `start` here:
//!
//! 1. read stdin whatever it holds ([`stdin::StartInput`]), never failing on
//!    bytes it does not understand (they are logged);
//! 2. take the runtime handler's options (`ConfigPath`/`ConfigBody`) to pick
//!    the Ember config of this pod ([`handler_config`]);
//! 3. find the pod's shim (one per pod, grouped like before) at its socket,
//!    under `socket_dir` when containerd 2.3 gives one, or spawn it;
//! 4. answer in the form this containerd reads ([`Reply`]): a
//!    `BootstrapResult` (protobuf, task API v3) to 2.3+, JSON with version
//!    3 to a containerd that says `MAX_SHIM_VERSION` >= 3, the plain
//!    address (task API v2) to the rest: 1.6, and 1.7-2.2, which say 2.

pub mod info;
pub mod proto;
pub mod spawn;
pub mod stdin;

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::Context;
use containerd_shim::Flags;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::annotations;
use crate::config::{Config, CONFIG_ENV};
use crate::logging;
use proto::{BootstrapResult, RuntimeOptions};
use stdin::StartInput;

/// Default directory of shim sockets (containerd's, for every version).
pub const DEFAULT_SOCKET_DIR: &str = "/run/containerd/s";
/// containerd's ttrpc address, in the environment of every shim.
pub const TTRPC_ADDRESS_ENV: &str = "TTRPC_ADDRESS";
/// File in the bundle that records the address `start` answered.
pub const ADDRESS_FILE: &str = "address";
/// File in the bundle holding a handler's `ConfigBody`.
pub const CONFIG_BODY_FILE: &str = "ember-config.toml";
/// At most this much of stdin is read: containerd's messages are small.
const MAX_STDIN: u64 = 4 << 20;

/// Handles `-info` and `start`; returns the exit code, or `None` when the
/// command line is for containerd-shim's `run` (`delete`, the serving shim,
/// or flags it reports itself).
pub async fn intercept() -> Option<i32> {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let flags = containerd_shim::parse(&args).ok()?;
    if flags.info {
        return Some(info::run());
    }
    if flags.action == "start" {
        return Some(start(flags).await);
    }
    None
}

/// The task API version a containerd says it speaks at most
/// (`MAX_SHIM_VERSION`; containerd 1.7-2.2 set 2, 1.6 nothing).
pub const MAX_SHIM_VERSION_ENV: &str = "MAX_SHIM_VERSION";

/// Task API v3: the v2 service under the package `containerd.task.v3`.
/// The serving shim serves both ([`crate::serve`]).
pub const TASK_API_V3: i32 = 3;

/// What `start` prints, in the form its containerd reads.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// The plain address: task API v2, the only form containerd 1.6 reads
    /// and what 1.7-2.2 read when they say `MAX_SHIM_VERSION=2` (2.1.9
    /// does, although it could use v3).
    Plain(String),
    /// JSON `{"version":3,"address":..,"protocol":"ttrpc"}`: a containerd
    /// 2.x that says `MAX_SHIM_VERSION` 3 or more.
    Json(BootstrapResult),
    /// Protobuf `BootstrapResult` with version 3: containerd 2.3+, which
    /// sent `BootstrapParams`.
    Bootstrap(BootstrapResult),
}

impl Reply {
    /// The reply for the containerd that sent `input` and said
    /// `max_shim_version` (`None`: not said, or not a number).
    pub fn for_input(input: &StartInput, address: String, max_shim_version: Option<i32>) -> Reply {
        let v3 = || BootstrapResult {
            version: TASK_API_V3,
            address: address.clone(),
            protocol: "ttrpc".into(),
        };
        match input {
            StartInput::Bootstrap(_) => Reply::Bootstrap(v3()),
            _ if max_shim_version.is_some_and(|v| v >= TASK_API_V3) => Reply::Json(v3()),
            _ => Reply::Plain(address),
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            Reply::Plain(a) => a.clone().into_bytes(),
            Reply::Json(r) => serde_json::json!({
                "version": r.version,
                "address": r.address,
                "protocol": r.protocol,
            })
            .to_string()
            .into_bytes(),
            Reply::Bootstrap(r) => r.encode(),
        }
    }
}

/// `MAX_SHIM_VERSION` as containerd set it; anything else is logged and
/// read as not said.
fn max_shim_version() -> Option<i32> {
    let value = std::env::var(MAX_SHIM_VERSION_ENV).ok()?;
    match value.trim().parse() {
        Ok(v) => Some(v),
        Err(_) => {
            tracing::warn!("{MAX_SHIM_VERSION_ENV}={value:?} is not a number: ignored");
            None
        }
    }
}

/// `start`: never writes anything but the reply to stdout; on failure the
/// message goes to stderr, which containerd shows.
async fn start(flags: Flags) -> i32 {
    let mut data = Vec::new();
    if let Err(e) = tokio::io::stdin()
        .take(MAX_STDIN)
        .read_to_end(&mut data)
        .await
    {
        // Not fatal: containerd 1.6 may give no stdin at all.
        data.clear();
        tracing::debug!("reading stdin: {e}");
    }
    let input = StartInput::classify(&data, &flags.id, &flags.namespace);
    let debug = flags.debug || matches!(&input, StartInput::Bootstrap(p) if p.debug());
    let selected = handler_config(&input, Path::new("."));
    let level = match &selected {
        Ok(s) => s.config.log_level.clone(),
        Err(_) => "info".into(),
    };
    logging::init_shim("start", debug, &level);
    let max_version = max_shim_version();
    tracing::info!(
        container = %flags.id,
        max_shim_version = ?max_version,
        "start: stdin held {}",
        input.describe()
    );
    let result = match selected {
        Ok(selected) => run_start(&flags, &input, &selected, debug)
            .await
            .map(|address| Reply::for_input(&input, address, max_version)),
        Err(e) => Err(e),
    };
    match result {
        Ok(reply) => {
            let mut out = tokio::io::stdout();
            match out
                .write_all(&reply.to_bytes())
                .await
                .and(out.flush().await)
            {
                Ok(()) => 0,
                Err(e) => {
                    tracing::error!("writing the start reply: {e}");
                    1
                }
            }
        }
        Err(e) => {
            tracing::error!("start: {e:#}");
            eprintln!("{}: {e:#}", crate::RUNTIME_ID);
            1
        }
    }
}

/// The Ember config of the pod and how the serving shim finds it again.
#[derive(Debug)]
pub struct HandlerConfig {
    pub config: Config,
    /// `EMBER_CONFIG` for the serving shim, when the handler chose a file.
    pub config_env: Option<PathBuf>,
}

/// The config a runtime handler selects: `ConfigBody` (TOML) overrides
/// `ConfigPath`, which overrides `$EMBER_CONFIG`/the default file. A body is
/// written to the bundle (`bundle`, the working directory of `start`) so the
/// serving shim reads the same one. Every error names where the config came
/// from.
pub fn handler_config(input: &StartInput, bundle: &Path) -> anyhow::Result<HandlerConfig> {
    let options = match input.runtime_options() {
        None => None,
        Some(r) => Some(r.context("runtime options (runtimeoptions.v1.Options) on stdin")?),
    };
    match options {
        Some(RuntimeOptions { config_body, .. }) if !config_body.is_empty() => {
            let text = String::from_utf8(config_body)
                .context("ConfigBody of the runtime handler's options is not UTF-8")?;
            let config = Config::parse(&text)
                .context("ConfigBody of the runtime handler's options (containerd config)")?;
            let path = bundle.join(CONFIG_BODY_FILE);
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            let path = std::path::absolute(&path).unwrap_or(path);
            Ok(HandlerConfig {
                config,
                config_env: Some(path),
            })
        }
        Some(RuntimeOptions { config_path, .. }) if !config_path.is_empty() => {
            let path = PathBuf::from(&config_path);
            let config = Config::load_file(&path)
                .context("ConfigPath of the runtime handler's options (containerd config)")?;
            Ok(HandlerConfig {
                config,
                config_env: Some(path),
            })
        }
        _ => {
            let (config, _) = Config::load()?;
            Ok(HandlerConfig {
                config,
                config_env: None,
            })
        }
    }
}

/// The socket of the shim serving `pod`: `<dir>/<sha256 of
/// address/namespace/pod>`, the name containerd's own shims use, so that a
/// restarted containerd and `delete` find it.
pub fn socket_address(
    socket_dir: Option<&str>,
    address: &str,
    namespace: &str,
    pod: &str,
) -> String {
    use sha2::{Digest, Sha256};
    let key = PathBuf::from(address).join(namespace).join(pod);
    let hash = Sha256::digest(key.display().to_string().as_bytes());
    let dir = socket_dir
        .filter(|d| !d.is_empty())
        .unwrap_or(DEFAULT_SOCKET_DIR);
    format!("unix://{}/{:x}", dir.trim_end_matches('/'), hash)
}

/// The address `start` recorded in `bundle`, if any.
pub fn recorded_address(bundle: &Path) -> Option<String> {
    std::fs::read_to_string(bundle.join(ADDRESS_FILE))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// Finds the pod's serving shim or spawns it; returns its address.
async fn run_start(
    flags: &Flags,
    input: &StartInput,
    selected: &HandlerConfig,
    debug: bool,
) -> anyhow::Result<String> {
    let bootstrap = match input {
        StartInput::Bootstrap(p) => Some(p.as_ref()),
        _ => None,
    };
    let namespace = pick(&flags.namespace, bootstrap.map(|b| b.namespace.as_str()));
    let id = pick(&flags.id, bootstrap.map(|b| b.instance_id.as_str()));
    let address = pick(
        &flags.address,
        bootstrap.map(|b| b.containerd_grpc_address.as_str()),
    );
    if id.is_empty() || namespace.is_empty() {
        anyhow::bail!("start needs -id and -namespace (or BootstrapParams carrying them)");
    }
    let ttrpc_address = std::env::var(TTRPC_ADDRESS_ENV)
        .ok()
        .filter(|a| !a.is_empty())
        .or_else(|| {
            bootstrap
                .map(|b| b.containerd_ttrpc_address.clone())
                .filter(|a| !a.is_empty())
        })
        .unwrap_or_else(|| format!("{address}.ttrpc"));

    let bundle = std::env::current_dir().context("the bundle (working directory)")?;
    let ann = crate::shim::bundle_annotations(&bundle);
    let pod = annotations::grouping_id(&ann, &id);
    let socket_dir = bootstrap.and_then(|b| b.socket_dir.as_deref());
    let socket = socket_address(socket_dir, &address, &namespace, &pod);

    if crate::shim::shim_alive(&socket) {
        tracing::info!(container = %id, %pod, "joining the pod's running shim");
    } else {
        tracing::info!(container = %id, %pod, %socket, "starting the pod's shim");
        let mut env = vec![
            (crate::shim::POD_ID_ENV.to_string(), pod.clone()),
            (TTRPC_ADDRESS_ENV.to_string(), ttrpc_address),
        ];
        if let Some(path) = &selected.config_env {
            env.push((CONFIG_ENV.to_string(), path.display().to_string()));
        }
        let cgroup = match input {
            StartInput::RuncOptions(o) if !o.shim_cgroup.is_empty() => Some(o.shim_cgroup.clone()),
            _ => None,
        };
        spawn::spawn_server(&spawn::ServerArgs {
            namespace: &namespace,
            id: &id,
            address: &address,
            socket: &socket,
            debug,
            env,
            shim_cgroup: cgroup,
        })
        .await?;
        if !crate::shim::shim_alive(&socket) {
            anyhow::bail!("the pod's shim did not come up at {socket} (see containerd's log)");
        }
    }
    // containerd finds the shim again after a restart through this file;
    // `delete` reads it to find the pod's socket.
    tokio::fs::write(ADDRESS_FILE, &socket)
        .await
        .context("writing the address file")?;
    Ok(socket)
}

/// The command-line value, else the bootstrap one.
fn pick(cli: &str, bootstrap: Option<&str>) -> String {
    if cli.is_empty() {
        bootstrap.unwrap_or_default().to_string()
    } else {
        cli.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_address_matches_containerd_shim() {
        let ours = socket_address(None, "/run/containerd/containerd.sock", "k8s.io", "pod1");
        let crate_s =
            containerd_shim::socket_address("/run/containerd/containerd.sock", "k8s.io", "pod1");
        assert_eq!(ours, crate_s);
    }

    #[test]
    fn each_containerd_gets_the_task_api_it_says_it_speaks() {
        let addr = || "unix:///run/containerd/s/x".to_string();
        // 1.6 (no MAX_SHIM_VERSION) and 1.7-2.2 (2): the plain address.
        for max in [None, Some(2)] {
            let reply = Reply::for_input(&StartInput::Empty, addr(), max);
            assert_eq!(reply.to_bytes(), addr().into_bytes(), "{max:?}");
        }
        // A 2.x that says 3: JSON, which containerd 1.6 could not read.
        let json = Reply::for_input(&StartInput::Empty, addr(), Some(3)).to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(json["version"], 3);
        assert_eq!(json["address"], addr());
        assert_eq!(json["protocol"], "ttrpc");
        // 2.3+ (BootstrapParams on stdin): protobuf, version 3, whatever
        // MAX_SHIM_VERSION says.
        let params = StartInput::Bootstrap(Box::default());
        match Reply::for_input(&params, addr(), Some(2)) {
            Reply::Bootstrap(r) => assert_eq!((r.version, r.address), (3, addr())),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn socket_dir_moves_the_socket() {
        let a = socket_address(Some("/run/c2/s/"), "/x.sock", "default", "p");
        assert!(a.starts_with("unix:///run/c2/s/"), "{a}");
        assert_eq!(a.len(), "unix:///run/c2/s/".len() + 64);
    }

    #[test]
    fn bad_config_body_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let input = StartInput::RuntimeOptions(RuntimeOptions {
            config_body: b"default_vcpus = \"many\"\n".to_vec(),
            ..Default::default()
        });
        let e = format!("{:#}", handler_config(&input, dir.path()).unwrap_err());
        assert!(e.contains("ConfigBody"), "{e}");
        assert!(
            !dir.path().join(CONFIG_BODY_FILE).exists(),
            "nothing written for a bad body"
        );
    }

    #[test]
    fn missing_config_path_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let input = StartInput::RuntimeOptions(RuntimeOptions {
            config_path: "/nonexistent/ember-2cpu.toml".into(),
            ..Default::default()
        });
        let e = format!("{:#}", handler_config(&input, dir.path()).unwrap_err());
        assert!(
            e.contains("ConfigPath") && e.contains("/nonexistent/ember-2cpu.toml"),
            "{e}"
        );
    }

    #[test]
    fn config_body_is_kept_for_the_serving_shim() {
        let dir = tempfile::tempdir().unwrap();
        let input = StartInput::RuntimeOptions(RuntimeOptions {
            config_body: b"log_level = \"debug\"\n".to_vec(),
            ..Default::default()
        });
        let h = handler_config(&input, dir.path()).unwrap();
        assert_eq!(h.config.log_level, "debug");
        let path = h.config_env.unwrap();
        assert_eq!(Config::load_file(&path).unwrap().log_level, "debug");
    }
}
