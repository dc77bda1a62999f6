//! Local OCI images for the containerd tests, built without a registry or
//! docker: an OCI image layout tar (`oci-layout`, `index.json`,
//! `blobs/sha256/...`) holding one uncompressed layer made of Debian's
//! static busybox plus a minimal root filesystem. `ctr images import`
//! takes it as is; the image name comes from the `io.containerd.image.name`
//! annotation in `index.json`.
//!
//! Everything is deterministic (fixed mtimes, owners and entry order), so
//! the same busybox yields byte-identical tars and the same digests, and an
//! existing tar with the right content is left alone.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// The general-purpose test image: busybox, `Cmd ["sh"]`.
pub const BUSYBOX_IMAGE: &str = "localhost/busybox:test";
/// The CRI sandbox ("pause") image: same layer, entrypoint `sleep infinity`.
pub const PAUSE_IMAGE: &str = "localhost/pause:test";

/// The PATH the image config sets.
pub const IMAGE_PATH_ENV: &str =
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// mtime of every entry (2000-01-01T00:00:00Z) and the config's `created`.
const FIXED_MTIME: u64 = 946_684_800;
const FIXED_CREATED: &str = "2000-01-01T00:00:00Z";

const MT_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MT_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MT_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MT_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";

/// What to put in an image's config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    /// Full reference, e.g. `localhost/busybox:test`.
    pub name: String,
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
}

impl ImageSpec {
    /// `localhost/busybox:test`: `Cmd ["sh"]`.
    pub fn busybox() -> Self {
        Self {
            name: BUSYBOX_IMAGE.to_string(),
            entrypoint: None,
            cmd: Some(vec!["sh".to_string()]),
        }
    }

    /// `localhost/pause:test`: `Entrypoint ["/bin/sleep", "infinity"]`.
    pub fn pause() -> Self {
        Self {
            name: PAUSE_IMAGE.to_string(),
            entrypoint: Some(vec!["/bin/sleep".to_string(), "infinity".to_string()]),
            cmd: None,
        }
    }
}

/// What [`write_image`] produced.
#[derive(Debug, Clone)]
pub struct ImageInfo {
    pub name: String,
    pub path: PathBuf,
    /// `sha256:...` of the manifest (what containerd reports as the image digest).
    pub manifest_digest: String,
    pub config_digest: String,
    /// `sha256:...` of the uncompressed layer (also its diff_id).
    pub layer_digest: String,
    /// Size of the whole archive in bytes.
    pub size: u64,
    /// Whether the file was (re)written; false when it already had this content.
    pub written: bool,
}

/// The static busybox to put in images: `EMBER_BUSYBOX`, else Debian's
/// busybox-static at /bin/busybox.
pub fn busybox_path() -> PathBuf {
    std::env::var_os("EMBER_BUSYBOX")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/bin/busybox"))
}

/// Applet names the busybox at `busybox` provides (`busybox --list`),
/// sorted, without `busybox` itself.
pub fn busybox_applets(busybox: &Path) -> Result<Vec<String>> {
    let out = Command::new(busybox)
        .arg("--list")
        .output()
        .with_context(|| format!("running {} --list", busybox.display()))?;
    ensure!(
        out.status.success(),
        "{} --list failed: {}",
        busybox.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut applets: Vec<String> = String::from_utf8(out.stdout)
        .context("busybox --list output is not UTF-8")?
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "busybox" && !a.contains('/'))
        .map(str::to_string)
        .collect();
    applets.sort();
    applets.dedup();
    ensure!(
        applets.iter().any(|a| a == "sh"),
        "{} has no sh applet (is it busybox-static?)",
        busybox.display()
    );
    Ok(applets)
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(FIXED_MTIME);
    h.set_size(size);
    // ustar wants user/group names; fixed ones keep the bytes stable.
    let _ = h.set_username("root");
    let _ = h.set_groupname("root");
    h
}

/// Deterministic tar writer over a byte vector.
struct TarWriter {
    builder: tar::Builder<Vec<u8>>,
}

impl TarWriter {
    fn new() -> Self {
        let mut builder = tar::Builder::new(Vec::new());
        builder.mode(tar::HeaderMode::Deterministic);
        Self { builder }
    }

    fn dir(&mut self, path: &str, mode: u32) -> Result<()> {
        let mut h = header(tar::EntryType::Directory, mode, 0);
        let path = format!("{}/", path.trim_end_matches('/'));
        self.builder
            .append_data(&mut h, &path, std::io::empty())
            .with_context(|| format!("tar dir {path}"))
    }

    fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> Result<()> {
        let mut h = header(tar::EntryType::Regular, mode, data.len() as u64);
        self.builder
            .append_data(&mut h, path, data)
            .with_context(|| format!("tar file {path}"))
    }

    fn symlink(&mut self, path: &str, target: &str) -> Result<()> {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        self.builder
            .append_link(&mut h, path, target)
            .with_context(|| format!("tar symlink {path} -> {target}"))
    }

    fn finish(self) -> Result<Vec<u8>> {
        self.builder.into_inner().context("finishing tar")
    }
}

/// The root filesystem layer (an uncompressed tar): /bin/busybox plus a
/// symlink in /bin for every applet, /etc/passwd and /etc/group (root and
/// nobody, 65534), empty /etc/hosts and /etc/resolv.conf, /tmp (1777),
/// /root, and empty /proc, /sys, /dev mount points.
pub fn busybox_layer(busybox: &Path) -> Result<Vec<u8>> {
    let binary =
        std::fs::read(busybox).with_context(|| format!("reading {}", busybox.display()))?;
    let applets = busybox_applets(busybox)?;
    let mut t = TarWriter::new();
    t.dir("bin", 0o755)?;
    t.file("bin/busybox", 0o755, &binary)?;
    for applet in &applets {
        t.symlink(&format!("bin/{applet}"), "busybox")?;
    }
    t.dir("dev", 0o755)?;
    t.dir("etc", 0o755)?;
    t.file("etc/group", 0o644, b"root:x:0:\nnobody:x:65534:\n")?;
    t.file("etc/hosts", 0o644, b"")?;
    t.file(
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )?;
    t.file("etc/resolv.conf", 0o644, b"")?;
    t.dir("proc", 0o555)?;
    t.dir("root", 0o700)?;
    t.dir("sys", 0o555)?;
    t.dir("tmp", 0o1777)?;
    t.finish()
}

fn sha256_hex(data: &[u8]) -> String {
    format!("{:x}", Sha256::digest(data))
}

/// `sha256:<hex>` of `data`.
pub fn digest(data: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(data))
}

/// Canonical JSON bytes (serde_json keeps object keys sorted by default).
fn json_bytes(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).expect("serializing JSON")
}

/// An OCI image layout tar for `spec` with the single `layer`, plus the
/// digests of its manifest and config.
pub fn oci_archive(spec: &ImageSpec, layer: &[u8]) -> Result<(Vec<u8>, String, String)> {
    ensure!(!spec.name.is_empty(), "image name is empty");
    let layer_digest = digest(layer);
    let mut config_section = serde_json::Map::new();
    config_section.insert("Env".into(), json!([IMAGE_PATH_ENV]));
    if let Some(ep) = &spec.entrypoint {
        config_section.insert("Entrypoint".into(), json!(ep));
    }
    if let Some(cmd) = &spec.cmd {
        config_section.insert("Cmd".into(), json!(cmd));
    }
    config_section.insert("WorkingDir".into(), json!("/"));
    let config = json!({
        "created": FIXED_CREATED,
        "architecture": "amd64",
        "os": "linux",
        "config": Value::Object(config_section),
        "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
        "history": [{ "created": FIXED_CREATED, "created_by": "ember-e2e image.rs (busybox-static)" }],
    });
    let config = json_bytes(&config);
    let config_digest = digest(&config);
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": { "mediaType": MT_CONFIG, "digest": config_digest, "size": config.len() },
        "layers": [{ "mediaType": MT_LAYER, "digest": layer_digest, "size": layer.len() }],
    });
    let manifest = json_bytes(&manifest);
    let manifest_digest = digest(&manifest);
    let mut annotations = BTreeMap::new();
    annotations.insert("io.containerd.image.name", spec.name.clone());
    annotations.insert("org.opencontainers.image.ref.name", spec.name.clone());
    let index = json!({
        "schemaVersion": 2,
        "mediaType": MT_INDEX,
        "manifests": [{
            "mediaType": MT_MANIFEST,
            "digest": manifest_digest,
            "size": manifest.len(),
            "platform": { "architecture": "amd64", "os": "linux" },
            "annotations": annotations,
        }],
    });
    let index = json_bytes(&index);

    let mut blobs: Vec<(&str, &[u8])> = vec![
        (&layer_digest, layer),
        (&config_digest, &config),
        (&manifest_digest, &manifest),
    ];
    blobs.sort_by(|a, b| a.0.cmp(b.0));
    let mut t = TarWriter::new();
    t.file("oci-layout", 0o644, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    t.file("index.json", 0o644, &index)?;
    t.dir("blobs", 0o755)?;
    t.dir("blobs/sha256", 0o755)?;
    for (d, data) in blobs {
        let hex = d.strip_prefix("sha256:").expect("sha256 digest");
        t.file(&format!("blobs/sha256/{hex}"), 0o644, data)?;
    }
    Ok((t.finish()?, manifest_digest, config_digest))
}

/// Builds the image for `spec` (busybox layer) and writes it to `path`,
/// unless `path` already holds exactly these bytes. Written atomically.
pub fn write_image(spec: &ImageSpec, path: &Path) -> Result<ImageInfo> {
    let layer = busybox_layer(&busybox_path())?;
    let layer_digest = digest(&layer);
    let (archive, manifest_digest, config_digest) = oci_archive(spec, &layer)?;
    let written = match std::fs::read(path) {
        Ok(existing) if existing == archive => false,
        _ => {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("creating {}", parent.display()))?;
            }
            let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
            std::fs::write(&tmp, &archive).with_context(|| format!("writing {}", tmp.display()))?;
            std::fs::rename(&tmp, path)
                .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
            true
        }
    };
    Ok(ImageInfo {
        name: spec.name.clone(),
        path: path.to_path_buf(),
        manifest_digest,
        config_digest,
        layer_digest,
        size: archive.len() as u64,
        written,
    })
}

/// [`write_image`] for [`ImageSpec::busybox`].
pub fn write_busybox_image(path: &Path) -> Result<ImageInfo> {
    write_image(&ImageSpec::busybox(), path)
}

/// [`write_image`] for [`ImageSpec::pause`].
pub fn write_pause_image(path: &Path) -> Result<ImageInfo> {
    write_image(&ImageSpec::pause(), path)
}

/// One tar entry as [`tar_entries`] returns it: (type, mode, data or link target).
pub type TarEntry = (tar::EntryType, u32, Vec<u8>);

/// Reads the entries of a tar, by path.
pub fn tar_entries(data: &[u8]) -> Result<BTreeMap<String, TarEntry>> {
    use std::io::Read;
    let mut out = BTreeMap::new();
    let mut archive = tar::Archive::new(data);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry
            .path()?
            .to_string_lossy()
            .trim_end_matches('/')
            .to_string();
        let h = entry.header().clone();
        let kind = h.entry_type();
        let content = if kind == tar::EntryType::Symlink {
            entry
                .link_name()?
                .map(|l| l.to_string_lossy().into_owned().into_bytes())
                .unwrap_or_default()
        } else {
            let mut v = Vec::new();
            entry.read_to_end(&mut v)?;
            v
        };
        if out
            .insert(path.clone(), (kind, h.mode()?, content))
            .is_some()
        {
            bail!("duplicate tar entry {path}");
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_and_archive_are_deterministic_and_complete() {
        let bb = busybox_path();
        if !bb.exists() {
            eprintln!(
                "SKIP: {} not found (apt-get install busybox-static)",
                bb.display()
            );
            return;
        }
        let a = busybox_layer(&bb).unwrap();
        let b = busybox_layer(&bb).unwrap();
        assert_eq!(a, b, "layer is byte-identical across builds");

        let entries = tar_entries(&a).unwrap();
        let (kind, mode, data) = &entries["bin/busybox"];
        assert_eq!(*kind, tar::EntryType::Regular);
        assert_eq!(*mode, 0o755);
        assert_eq!(data, &std::fs::read(&bb).unwrap());
        for applet in busybox_applets(&bb).unwrap() {
            let (kind, _, target) = &entries[&format!("bin/{applet}")];
            assert_eq!(*kind, tar::EntryType::Symlink, "{applet}");
            assert_eq!(target, b"busybox");
        }
        assert_eq!(entries["tmp"].1, 0o1777);
        assert_eq!(entries["tmp"].0, tar::EntryType::Directory);
        for d in ["proc", "sys", "dev"] {
            assert_eq!(entries[d].0, tar::EntryType::Directory, "{d}");
        }
        let passwd = String::from_utf8(entries["etc/passwd"].2.clone()).unwrap();
        assert!(passwd.contains("root:x:0:0:"));
        assert!(passwd.contains("nobody:x:65534:65534:"));
        assert!(entries["etc/hosts"].2.is_empty());
        assert!(entries["etc/resolv.conf"].2.is_empty());

        let (arch1, m1, _) = oci_archive(&ImageSpec::busybox(), &a).unwrap();
        let (arch2, m2, _) = oci_archive(&ImageSpec::busybox(), &b).unwrap();
        assert_eq!(arch1, arch2);
        assert_eq!(m1, m2);
        let (_, pause_manifest, _) = oci_archive(&ImageSpec::pause(), &a).unwrap();
        assert_ne!(m1, pause_manifest);

        // index.json names the image; every blob matches its digest.
        let outer = tar_entries(&arch1).unwrap();
        let index: Value = serde_json::from_slice(&outer["index.json"].2).unwrap();
        let desc = &index["manifests"][0];
        assert_eq!(
            desc["annotations"]["io.containerd.image.name"],
            BUSYBOX_IMAGE
        );
        assert_eq!(desc["digest"], m1.as_str());
        for (path, (kind, _, data)) in &outer {
            if let Some(hex) = path.strip_prefix("blobs/sha256/") {
                assert_eq!(*kind, tar::EntryType::Regular);
                assert_eq!(sha256_hex(data), hex, "{path}");
            }
        }
        let manifest_hex = m1.strip_prefix("sha256:").unwrap();
        let manifest: Value =
            serde_json::from_slice(&outer[&format!("blobs/sha256/{manifest_hex}")].2).unwrap();
        let config_hex = manifest["config"]["digest"]
            .as_str()
            .unwrap()
            .strip_prefix("sha256:")
            .unwrap();
        let config: Value =
            serde_json::from_slice(&outer[&format!("blobs/sha256/{config_hex}")].2).unwrap();
        assert_eq!(config["config"]["Cmd"], json!(["sh"]));
        assert_eq!(config["rootfs"]["diff_ids"][0], digest(&a));
    }

    #[test]
    fn write_image_skips_identical_content() {
        if !busybox_path().exists() {
            eprintln!("SKIP: no busybox");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pause.tar");
        let first = write_pause_image(&path).unwrap();
        assert!(first.written);
        let second = write_pause_image(&path).unwrap();
        assert!(!second.written);
        assert_eq!(first.manifest_digest, second.manifest_digest);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), first.size);
    }
}
