//! `ember check`'s look at containerd's config: is Ember registered where
//! this config version reads it? containerd ignores sections of another
//! config version without a word (a version-2
//! `plugins."io.containerd.grpc.v1.cri".containerd.runtimes.ember` in a
//! version-3 file registers nothing), and a drop-in with a higher version
//! than the root config stops containerd 2.x from starting.
//!
//! Reads the root config and the files its `imports` name (globs of `*`
//! in the file name only, as containerd's `conf.d/*.toml`).

use std::path::{Path, PathBuf};

use anyhow::Context;

/// The CRI runtimes table of config version 2 (containerd 1.x).
const V2_RUNTIMES: [&str; 4] = [
    "plugins",
    "io.containerd.grpc.v1.cri",
    "containerd",
    "runtimes",
];
/// The CRI runtimes table of config versions 3 and 4 (containerd 2.x).
const V3_RUNTIMES: [&str; 4] = [
    "plugins",
    "io.containerd.cri.v1.runtime",
    "containerd",
    "runtimes",
];

/// What was found: Ember runtime handlers that containerd reads, and
/// problems, each naming its fix.
#[derive(Debug, Default)]
pub struct Findings {
    pub handlers: Vec<String>,
    pub problems: Vec<String>,
}

fn table<'a>(value: &'a toml::Value, path: &[&str]) -> Option<&'a toml::Table> {
    let mut v = value;
    for key in path {
        v = v.get(key)?;
    }
    v.as_table()
}

fn is_ember(runtime: &toml::Value) -> bool {
    runtime
        .get("runtime_type")
        .and_then(|t| t.as_str())
        .is_some_and(|t| t == crate::RUNTIME_ID || t.ends_with("containerd-shim-ember-v2"))
}

fn version_of(value: &toml::Value) -> i64 {
    value
        .get("version")
        .and_then(|v| v.as_integer())
        .unwrap_or(1)
}

/// Checks one parsed file of `version` (the file's own) named `name`.
pub fn check_file(name: &str, value: &toml::Value, root_version: i64, out: &mut Findings) {
    let version = version_of(value);
    if version > root_version {
        out.problems.push(format!(
            "{name} has version {version}, higher than the root config's {root_version}: containerd 2.x refuses to start; give it `version = {root_version}`"
        ));
    }
    let (reads, ignored, ignored_name) = if version >= 3 {
        (V3_RUNTIMES, V2_RUNTIMES, "version 2")
    } else {
        (V2_RUNTIMES, V3_RUNTIMES, "version 3")
    };
    if let Some(runtimes) = table(value, &reads) {
        for (handler, runtime) in runtimes {
            if is_ember(runtime) {
                out.handlers
                    .push(format!("{handler} ({name}, version {version})"));
            }
        }
    }
    if let Some(runtimes) = table(value, &ignored) {
        for (handler, runtime) in runtimes {
            if is_ember(runtime) {
                out.problems.push(format!(
                    "{name} (version {version}) registers `{handler}` under the {ignored_name} section [{}.{handler}], which containerd ignores at version {version}: move it to [{}.{handler}] (see deploy/containerd/ember-v{}.toml)",
                    dotted(&ignored),
                    dotted(&reads),
                    version.clamp(2, 4)
                ));
            }
        }
    }
}

fn dotted(path: &[&str]) -> String {
    path.iter()
        .map(|k| {
            if k.contains('.') {
                format!("\"{k}\"")
            } else {
                k.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// The files an `imports` entry names (`*` in the file name only).
fn expand_import(pattern: &str, base: &Path) -> Vec<PathBuf> {
    let path = base.join(pattern);
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string();
    let Some((prefix, suffix)) = name.split_once('*') else {
        return vec![path];
    };
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix) && n.ends_with(suffix))
        })
        .collect();
    files.sort();
    files
}

/// Checks containerd's config at `root` and its imports.
pub fn check(root: &Path) -> anyhow::Result<Findings> {
    let read = |p: &Path| -> anyhow::Result<toml::Value> {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing {}", p.display()))
    };
    let value = read(root)?;
    let root_version = version_of(&value);
    let mut out = Findings::default();
    check_file(&root.display().to_string(), &value, root_version, &mut out);
    let base = root.parent().unwrap_or(Path::new("/"));
    let imports = value
        .get("imports")
        .and_then(|i| i.as_array())
        .cloned()
        .unwrap_or_default();
    for pattern in imports.iter().filter_map(|p| p.as_str()) {
        for file in expand_import(pattern, base) {
            if file == root {
                continue;
            }
            match read(&file) {
                Ok(v) => check_file(&file.display().to_string(), &v, root_version, &mut out),
                Err(e) => out.problems.push(format!("{e:#}")),
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn findings(text: &str) -> Findings {
        let mut out = Findings::default();
        let v: toml::Value = toml::from_str(text).unwrap();
        check_file("config.toml", &v, version_of(&v), &mut out);
        out
    }

    #[test]
    fn v2_section_in_a_v3_file_is_named_with_its_fix() {
        let f = findings(
            "version = 3\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.ember]\nruntime_type = \"io.containerd.ember.v2\"\n",
        );
        assert!(f.handlers.is_empty());
        assert_eq!(f.problems.len(), 1, "{:?}", f.problems);
        assert!(
            f.problems[0].contains("io.containerd.cri.v1.runtime"),
            "{}",
            f.problems[0]
        );
        assert!(f.problems[0].contains("ember-v3.toml"));
    }

    #[test]
    fn the_right_section_is_a_handler() {
        let f = findings(
            "version = 3\n[plugins.\"io.containerd.cri.v1.runtime\".containerd.runtimes.ember-2cpu]\nruntime_type = \"io.containerd.ember.v2\"\n",
        );
        assert!(f.problems.is_empty(), "{:?}", f.problems);
        assert_eq!(f.handlers.len(), 1);
        let f = findings(
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.ember]\nruntime_type = \"/usr/local/bin/containerd-shim-ember-v2\"\n",
        );
        assert!(f.problems.is_empty() && f.handlers.len() == 1);
    }

    #[test]
    fn drop_in_newer_than_root_is_a_problem() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("conf.d")).unwrap();
        std::fs::write(
            dir.path().join("config.toml"),
            "version = 2\nimports = [\"conf.d/*.toml\"]\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("conf.d/ember.toml"),
            "version = 3\n[plugins.\"io.containerd.cri.v1.runtime\".containerd.runtimes.ember]\nruntime_type = \"io.containerd.ember.v2\"\n",
        )
        .unwrap();
        let f = check(&dir.path().join("config.toml")).unwrap();
        assert!(
            f.problems
                .iter()
                .any(|p| p.contains("higher than the root")),
            "{:?}",
            f.problems
        );
        assert_eq!(f.handlers.len(), 1);
    }
}
