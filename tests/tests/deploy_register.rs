//! `deploy/containerd/register.sh` is how Ember gets into a containerd
//! config, for `deploy/install.sh` and the Kubernetes node installer alike.
//! A config containerd silently misreads is the worst failure an installer
//! can have (a version-2 section in a version-3 file drops the runtime
//! without a word), so every case here ends by asking the real containerd
//! (1.6 from Debian 12, and 2.1.9 from `deploy/containerd2.sh`) what it
//! read: `containerd --config <file> config dump`.

use std::path::{Path, PathBuf};
use std::process::Command;

const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../deploy/containerd/register.sh"
);

/// containerd 1.6: the system's.
fn containerd1() -> PathBuf {
    PathBuf::from("/usr/bin/containerd")
}

/// containerd 2.1.9, fetched (once, cached) by `deploy/containerd2.sh`
/// as `deploy/test.sh` does before the workspace's tests.
fn containerd2() -> Option<PathBuf> {
    if std::env::var("EMBER_SKIP_CONTAINERD2").as_deref() == Ok("1") {
        eprintln!("SKIP the containerd 2.1.9 cases: EMBER_SKIP_CONTAINERD2=1");
        return None;
    }
    let out = Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/containerd2.sh"
    ))
    .output()
    .expect("deploy/containerd2.sh runs");
    assert!(
        out.status.success(),
        "deploy/containerd2.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()))
}

struct Run {
    changed: bool,
    ok: bool,
    log: String,
}

fn register(cfg: &Path, containerd: &Path, args: &[&str], host_root: Option<&Path>) -> Run {
    let mut cmd = Command::new(SCRIPT);
    cmd.args(args)
        .env("CONTAINERD_CONFIG", cfg)
        .env("CONTAINERD_BIN", containerd);
    if let Some(root) = host_root {
        cmd.env("HOST_ROOT", root);
    }
    let out = cmd.output().expect("register.sh runs");
    Run {
        changed: String::from_utf8_lossy(&out.stdout).trim() == "changed",
        ok: out.status.success(),
        log: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// What containerd read from `cfg` (imports included).
fn dump(containerd: &Path, cfg: &Path) -> String {
    let out = Command::new(containerd)
        .args(["--config"])
        .arg(cfg)
        .args(["config", "dump"])
        .output()
        .expect("containerd config dump");
    assert!(
        out.status.success(),
        "{} config dump: {}",
        containerd.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).replace('\'', "\"")
}

/// The ember runtime's table as containerd read it, if it is there.
fn ember_runtime(dump: &str, plugin: &str) -> Option<String> {
    let header = format!("[plugins.\"{plugin}\".containerd.runtimes.ember]");
    let start = dump.find(&header)?;
    let table: Vec<&str> = dump[start + header.len()..]
        .lines()
        .skip(1)
        .take_while(|l| !l.trim_start().starts_with('['))
        .collect();
    Some(table.join("\n"))
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

#[test]
fn containerd_1_6_reads_ember_from_the_root_config_and_unregister_restores_it() {
    let c1 = containerd1();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    // A user's config: containerd's defaults plus a setting of their own.
    let user = format!(
        "{}\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.gvisor]\n  runtime_type = \"io.containerd.runsc.v1\"\n",
        String::from_utf8(Command::new(&c1).args(["config", "default"]).output().unwrap().stdout).unwrap()
    );
    std::fs::write(&cfg, &user).unwrap();

    let r = register(&cfg, &c1, &["--node"], None);
    assert!(r.ok && r.changed, "{}", r.log);
    let read_back = dump(&c1, &cfg);
    let ember = ember_runtime(&read_back, "io.containerd.grpc.v1.cri")
        .unwrap_or_else(|| panic!("containerd 1.6 does not see runtimes.ember:\n{read_back}"));
    assert!(
        ember.contains("runtime_type = \"io.containerd.ember.v2\""),
        "{ember}"
    );
    assert!(ember.contains("io.ember.*"), "{ember}");
    assert!(
        read_back.contains("runtimes.gvisor]"),
        "the user's runtime was lost"
    );
    assert!(
        !dir.path().join("conf.d").exists(),
        "containerd 1.x imports replace whole plugin sections: no drop-in"
    );

    // Idempotent: nothing to restart the second time.
    let again = register(&cfg, &c1, &["--node"], None);
    assert!(again.ok && !again.changed, "{}", again.log);

    let un = register(&cfg, &c1, &["--unregister"], None);
    assert!(un.ok && un.changed, "{}", un.log);
    assert_eq!(
        read(&cfg),
        user,
        "unregister left the user's config changed"
    );
    assert!(!register(&cfg, &c1, &["--unregister"], None).changed);
}

#[test]
fn an_absent_config_on_a_node_becomes_a_bare_config_with_ember() {
    let c1 = containerd1();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("etc/containerd/config.toml");
    let r = register(&cfg, &c1, &["--node"], None);
    assert!(r.ok && r.changed, "{}", r.log);
    let text = read(&cfg);
    assert!(text.starts_with("version = 2\n"), "{text}");
    // A node keeps containerd's own sandbox image.
    assert!(!text.contains("sandbox_image"), "{text}");
    assert!(ember_runtime(&dump(&c1, &cfg), "io.containerd.grpc.v1.cri").is_some());
    // An older installer's block (install-node.sh's own markers) is
    // replaced, not doubled.
    let legacy = "version = 2\n# BEGIN ember runtime (managed by ember-deploy; do not edit)\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.ember]\n  runtime_type = \"io.containerd.ember.v2\"\n# END ember runtime\n";
    std::fs::write(&cfg, legacy).unwrap();
    assert!(register(&cfg, &c1, &["--node"], None).changed);
    let text = read(&cfg);
    assert_eq!(text.matches("runtimes.ember]").count(), 1, "{text}");
    assert!(!text.contains("managed by ember-deploy"), "{text}");
    assert!(register(&cfg, &c1, &["--unregister"], None).changed);
    assert_eq!(read(&cfg), "version = 2\n");
}

#[test]
fn containerd_2_reads_ember_from_a_drop_in_of_the_root_configs_version() {
    let Some(c2) = containerd2() else { return };
    for version in [2, 3] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("config.toml");
        let other = dir.path().join("other.toml");
        std::fs::write(&other, format!("version = {version}\n")).unwrap();
        let user = format!("version = {version}\nimports = [\"{}\"]\n", other.display());
        std::fs::write(&cfg, &user).unwrap();

        let r = register(&cfg, &c2, &["--node"], None);
        assert!(r.ok && r.changed, "v{version}: {}", r.log);
        let dropin = dir.path().join("conf.d/ember.toml");
        assert!(
            read(&dropin).contains(&format!("version = {version}\n")),
            "v{version}: the drop-in must have the root config's version"
        );
        let text = read(&cfg);
        assert!(
            text.contains(&dropin.display().to_string())
                && text.contains(&other.display().to_string()),
            "v{version}: imports must keep the user's entry and add the drop-in:\n{text}"
        );
        // containerd 2.x migrates version 2 to 3 as it reads: either way
        // the runtime must be where CRI looks for it.
        let read_back = dump(&c2, &cfg);
        let ember =
            ember_runtime(&read_back, "io.containerd.cri.v1.runtime").unwrap_or_else(|| {
                panic!("v{version}: containerd 2.1 does not see runtimes.ember:\n{read_back}")
            });
        assert!(
            ember.contains("runtime_type = \"io.containerd.ember.v2\""),
            "{ember}"
        );

        if version == 3 {
            // The Sandbox API handler, next to the default one.
            let header = "runtimes.ember-sandbox-api]";
            let at = read_back
                .find(header)
                .unwrap_or_else(|| panic!("containerd 2.1 does not see {header}:\n{read_back}"));
            let table: Vec<&str> = read_back[at..]
                .lines()
                .skip(1)
                .take_while(|l| !l.trim_start().starts_with('['))
                .collect();
            assert!(
                table.iter().any(|l| l.trim() == "sandboxer = \"shim\""),
                "{table:?}"
            );
        }

        assert!(
            !register(&cfg, &c2, &["--node"], None).changed,
            "v{version}: not idempotent"
        );
        let un = register(&cfg, &c2, &["--unregister"], None);
        assert!(un.ok && un.changed, "{}", un.log);
        assert_eq!(
            read(&cfg),
            user,
            "v{version}: unregister must restore the root config"
        );
        assert!(!dropin.exists());
        assert!(ember_runtime(&dump(&c2, &cfg), "io.containerd.cri.v1.runtime").is_none());
    }
}

#[test]
fn a_config_version_containerd_cannot_read_is_refused_and_left_alone() {
    let Some(c2) = containerd2() else { return };
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    // Version 4 is containerd 2.3's; 2.1 reads up to 3.
    std::fs::write(&cfg, "version = 4\n").unwrap();
    let r = register(&cfg, &c2, &["--node"], None);
    assert!(!r.ok, "accepted a version-4 config for containerd 2.1");
    assert!(
        r.log.contains("version 4") && r.log.contains("nothing changed"),
        "{}",
        r.log
    );
    assert_eq!(read(&cfg), "version = 4\n");
    assert!(!dir.path().join("conf.d").exists());
    // Version 1 needs a migration, which only the admin may do.
    std::fs::write(&cfg, "root = \"/var/lib/containerd\"\n").unwrap();
    let r = register(&cfg, &containerd1(), &["--node"], None);
    assert!(
        !r.ok && r.log.contains("containerd config migrate"),
        "{}",
        r.log
    );
    assert_eq!(read(&cfg), "root = \"/var/lib/containerd\"\n");
}

/// The Kubernetes installer runs in a container with the node's root
/// under `/host`: files are written there, but the paths in the config
/// are the node's own.
#[test]
fn under_a_host_root_the_config_names_the_nodes_paths() {
    let Some(c2) = containerd2() else { return };
    let root = tempfile::tempdir().unwrap();
    let cfg_in_root = root.path().join("etc/containerd/config.toml");
    std::fs::create_dir_all(cfg_in_root.parent().unwrap()).unwrap();
    std::fs::write(&cfg_in_root, "version = 3\n").unwrap();
    let r = register(
        Path::new("/etc/containerd/config.toml"),
        &c2,
        &["--node"],
        Some(root.path()),
    );
    assert!(r.ok && r.changed, "{}", r.log);
    let text = read(&cfg_in_root);
    assert!(
        text.contains("imports = [\"/etc/containerd/conf.d/ember.toml\"]"),
        "{text}"
    );
    assert!(root
        .path()
        .join("etc/containerd/conf.d/ember.toml")
        .is_file());
    let un = register(
        Path::new("/etc/containerd/config.toml"),
        &c2,
        &["--unregister"],
        Some(root.path()),
    );
    assert!(un.ok && un.changed, "{}", un.log);
    assert_eq!(read(&cfg_in_root), "version = 3\n");
}
