//! The hooks of one phase of one container: read from the container's
//! bundle (`config.json`, as containerd wrote it), given the OCI state
//! JSON on stdin, run in the spec's order.
//!
//! The request names only the bundle, the phase, the container id, its
//! status and the pid; what runs (paths, args, env, timeouts) and the rest
//! of the state (`ociVersion`, `annotations`) come from the bundle itself.
//! The hook runner process ([`super::runner`]) also checks that the bundle
//! is one of containerd's for this shim, so whoever can send it a request
//! can only run hooks a client put in a container's spec.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::exec::Hook;

/// The largest `config.json` read.
const MAX_SPEC_BYTES: u64 = 16 << 20;

/// The hook kinds of the OCI runtime spec (config.md, "POSIX-platform
/// Hooks"), by their key in `hooks`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    #[serde(rename = "prestart")]
    Prestart,
    #[serde(rename = "createRuntime")]
    CreateRuntime,
    #[serde(rename = "createContainer")]
    CreateContainer,
    #[serde(rename = "startContainer")]
    StartContainer,
    #[serde(rename = "poststart")]
    Poststart,
    #[serde(rename = "poststop")]
    Poststop,
}

impl Phase {
    pub const ALL: [Phase; 6] = [
        Phase::Prestart,
        Phase::CreateRuntime,
        Phase::CreateContainer,
        Phase::StartContainer,
        Phase::Poststart,
        Phase::Poststop,
    ];

    /// Its key in the spec's `hooks`.
    pub fn key(self) -> &'static str {
        match self {
            Phase::Prestart => "prestart",
            Phase::CreateRuntime => "createRuntime",
            Phase::CreateContainer => "createContainer",
            Phase::StartContainer => "startContainer",
            Phase::Poststart => "poststart",
            Phase::Poststop => "poststop",
        }
    }

    /// Whether a failure ends the phase and fails the operation; else
    /// (poststart, poststop) it is logged and the remaining hooks run.
    pub fn is_fatal(self) -> bool {
        !matches!(self, Phase::Poststart | Phase::Poststop)
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.key())
    }
}

/// The container's `status` in the state JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Creating,
    Created,
    Running,
    Stopped,
}

/// Run the hooks of `phase` of the container whose bundle is `bundle`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRequest {
    pub bundle: PathBuf,
    pub phase: Phase,
    pub id: String,
    pub status: Status,
    /// The pod's network-namespace holder (see [`super::netns`]).
    pub pid: u32,
}

/// The OCI state (runtime.md, "State") a hook gets on stdin.
#[derive(Debug, Serialize)]
struct State<'a> {
    #[serde(rename = "ociVersion")]
    oci_version: &'a str,
    id: &'a str,
    status: Status,
    pid: u32,
    bundle: &'a str,
    annotations: BTreeMap<&'a str, &'a str>,
}

/// The hooks of `phase` in `spec`, checked: every entry an object with an
/// absolute `path`, string `args`/`env`, and a positive `timeout`.
pub fn hooks_of(spec: &Value, phase: Phase) -> Result<Vec<Hook>, String> {
    let Some(list) = spec.get("hooks").and_then(|h| h.get(phase.key())) else {
        return Ok(Vec::new());
    };
    if list.is_null() {
        return Ok(Vec::new());
    }
    let hooks: Vec<Hook> = serde_json::from_value(list.clone())
        .map_err(|e| format!("hooks.{phase} is not a list of hooks: {e}"))?;
    for (i, h) in hooks.iter().enumerate() {
        if !Path::new(&h.path).is_absolute() {
            return Err(format!(
                "{phase} hook #{i}: path {:?} is not absolute",
                h.path
            ));
        }
        if matches!(h.timeout, Some(t) if t <= 0) {
            return Err(format!(
                "{phase} hook #{i} ({}): timeout must be positive",
                h.path
            ));
        }
    }
    Ok(hooks)
}

/// Reads and parses a bundle's `config.json`, bounded.
pub fn read_spec(bundle: &Path) -> Result<Value, String> {
    let path = bundle.join("config.json");
    let file =
        std::fs::File::open(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let mut data = Vec::new();
    file.take(MAX_SPEC_BYTES + 1)
        .read_to_end(&mut data)
        .map_err(|e| format!("reading {}: {e}", path.display()))?;
    if data.len() as u64 > MAX_SPEC_BYTES {
        return Err(format!(
            "{} is larger than {MAX_SPEC_BYTES} bytes",
            path.display()
        ));
    }
    serde_json::from_slice(&data).map_err(|e| format!("parsing {}: {e}", path.display()))
}

/// The state JSON of `req`, with `spec`'s `ociVersion` and annotations.
pub fn state_json(req: &RunRequest, spec: &Value) -> Vec<u8> {
    let annotations = spec
        .get("annotations")
        .and_then(Value::as_object)
        .map(|a| {
            a.iter()
                .filter_map(|(k, v)| Some((k.as_str(), v.as_str()?)))
                .collect()
        })
        .unwrap_or_default();
    let bundle = req.bundle.to_string_lossy();
    let state = State {
        oci_version: spec
            .get("ociVersion")
            .and_then(Value::as_str)
            .unwrap_or("1.0.2"),
        id: &req.id,
        status: req.status,
        pid: req.pid,
        bundle: &bundle,
        annotations,
    };
    // Serializing strings and numbers cannot fail.
    serde_json::to_vec(&state).unwrap_or_default()
}

/// Runs the hooks of `req.phase` from the bundle's spec, blocking.
/// Returns the failures, each naming its hook: for a fatal phase at most
/// one (the first failure ends it), else one per failed hook.
pub fn run(req: &RunRequest) -> Vec<String> {
    let spec = match read_spec(&req.bundle) {
        Ok(s) => s,
        Err(e) => return vec![format!("{} hooks of {}: {e}", req.phase, req.id)],
    };
    let hooks = match hooks_of(&spec, req.phase) {
        Ok(h) => h,
        Err(e) => return vec![e],
    };
    let state = state_json(req, &spec);
    let mut failures = Vec::new();
    for (i, hook) in hooks.iter().enumerate() {
        let started = std::time::Instant::now();
        match hook.run(&state, &req.bundle) {
            Ok(()) => tracing::info!(
                container = %req.id, phase = %req.phase, hook = %hook.path,
                took = ?started.elapsed(), "hook ran"
            ),
            Err(e) => {
                failures.push(format!("{} hook #{i} ({}) {e}", req.phase, hook.path));
                if req.phase.is_fatal() {
                    break;
                }
            }
        }
    }
    failures
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::os::unix::fs::PermissionsExt;

    fn bundle_with(hooks: Value) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let spec = json!({
            "ociVersion": "1.1.0",
            "annotations": {"nerdctl/name": "web", "n": "1", "not-a-string": 2},
            "hooks": hooks,
        });
        std::fs::write(dir.path().join("config.json"), spec.to_string()).unwrap();
        dir
    }

    fn script(dir: &Path, name: &str, body: &str) -> String {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p.display().to_string()
    }

    fn request(bundle: &Path, phase: Phase) -> RunRequest {
        RunRequest {
            bundle: bundle.to_path_buf(),
            phase,
            id: "c1".into(),
            status: Status::Creating,
            pid: 4242,
        }
    }

    #[test]
    fn the_state_on_stdin_has_every_field() {
        let tools = tempfile::tempdir().unwrap();
        let out = tools.path().join("state");
        let h = script(tools.path(), "h", &format!("cat > {}", out.display()));
        let b = bundle_with(json!({"createRuntime": [{"path": h}]}));
        let failures = run(&request(b.path(), Phase::CreateRuntime));
        assert!(failures.is_empty(), "{failures:?}");
        let state: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
        assert_eq!(state["ociVersion"], "1.1.0");
        assert_eq!(state["id"], "c1");
        assert_eq!(state["status"], "creating");
        assert_eq!(state["pid"], 4242);
        assert_eq!(state["bundle"], b.path().to_str().unwrap());
        // Annotations are strings in OCI; anything else is left out.
        assert_eq!(
            state["annotations"],
            json!({"nerdctl/name": "web", "n": "1"})
        );
        assert_eq!(state.as_object().unwrap().len(), 6, "{state}");
    }

    #[test]
    fn a_failure_names_the_phase_index_and_path_and_stops_a_fatal_phase() {
        let tools = tempfile::tempdir().unwrap();
        let marker = tools.path().join("second-ran");
        let bad = script(tools.path(), "bad", "echo 'no IP left' >&2; exit 1");
        let second = script(
            tools.path(),
            "second",
            &format!("touch {}", marker.display()),
        );
        let hooks = json!([{"path": second}, {"path": bad}, {"path": second}]);
        let b = bundle_with(json!({"createRuntime": hooks, "poststop": hooks}));
        let f = run(&request(b.path(), Phase::CreateRuntime));
        assert_eq!(
            f,
            vec![format!(
                "createRuntime hook #1 ({bad}) exited with status 1; stderr: no IP left"
            )]
        );
        std::fs::remove_file(&marker).unwrap();
        // A poststop failure is reported and the next hook still runs.
        let f = run(&request(b.path(), Phase::Poststop));
        assert_eq!(f.len(), 1, "{f:?}");
        assert!(f[0].starts_with("poststop hook #1"), "{f:?}");
        assert!(marker.exists());
    }

    #[test]
    fn malformed_hooks_are_refused() {
        for hooks in [
            json!({"prestart": [{"path": "relative/hook"}]}),
            json!({"prestart": [{"path": "/bin/true", "timeout": 0}]}),
            json!({"prestart": [{"args": ["x"]}]}),
            json!({"prestart": {"path": "/bin/true"}}),
        ] {
            let b = bundle_with(hooks.clone());
            let f = run(&request(b.path(), Phase::Prestart));
            assert_eq!(f.len(), 1, "{hooks}: {f:?}");
            assert!(f[0].contains("prestart"), "{f:?}");
        }
        // No hooks of that phase: nothing to do.
        let b = bundle_with(json!({"poststop": null}));
        assert!(run(&request(b.path(), Phase::Poststop)).is_empty());
        assert!(run(&request(b.path(), Phase::Prestart)).is_empty());
    }

    #[test]
    fn a_missing_bundle_is_an_error() {
        let f = run(&request(Path::new("/nonexistent/bundle"), Phase::Poststart));
        assert_eq!(f.len(), 1);
        assert!(f[0].contains("/nonexistent/bundle/config.json"), "{f:?}");
    }
}
