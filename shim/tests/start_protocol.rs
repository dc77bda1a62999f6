//! `containerd-shim-ember-v2 start` and `-info` as containerd 2.3+ calls
//! them, the proof that Ember works there (containerd 2.3 cannot be
//! installed on this host; README "containerd versions").
//!
//! The stdin is built with `protoc --encode` from `tests/data/bootstrap.proto`
//! (containerd's field numbers), not with the shim's own encoder. containerd
//! is faked: its ttrpc socket is a listening Unix socket nobody answers
//! (the serving shim only connects to it to publish events). The reply is
//! decoded with `protoc --decode`, and the shim is then reached at the
//! address it printed with the task API it answered (v3 `Connect` where it
//! answered version 3; v2 `Connect`, `Shutdown`).

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use containerd_shim_protos::api::{ConnectRequest, ConnectResponse, ShutdownRequest};
use containerd_shim_protos::protobuf::Message;
use containerd_shim_protos::shim_sync::{Client, TaskClient};

const SHIM: &str = env!("CARGO_BIN_EXE_containerd-shim-ember-v2");

fn proto_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

/// `protoc --encode=<message>` of text-format `text`.
fn encode(message: &str, text: &str) -> Vec<u8> {
    let mut child = Command::new("protoc")
        .arg(format!("--proto_path={}", proto_dir().display()))
        .arg(format!(
            "--encode=containerd.runtime.bootstrap.v1.{message}"
        ))
        .arg("bootstrap.proto")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("protoc (apt-get install protobuf-compiler)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "protoc --encode {message} failed");
    out.stdout
}

/// `protoc --decode=<message>` to text format.
fn decode(message: &str, bytes: &[u8]) -> String {
    let mut child = Command::new("protoc")
        .arg(format!("--proto_path={}", proto_dir().display()))
        .arg(format!(
            "--decode=containerd.runtime.bootstrap.v1.{message}"
        ))
        .arg("bootstrap.proto")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "reply is not a {message}: {:?} ({})",
        String::from_utf8_lossy(bytes),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Text-format escape of bytes.
fn escape(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("\\{b:03o}")).collect()
}

/// The value of `field: "..."` in protoc's text output.
fn text_field(text: &str, field: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let rest = l.trim().strip_prefix(&format!("{field}: "))?;
        Some(rest.trim_matches('"').to_string())
    })
}

struct FakeContainerd {
    dir: tempfile::TempDir,
    _ttrpc: UnixListener,
}

impl FakeContainerd {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ttrpc = UnixListener::bind(dir.path().join("containerd.sock.ttrpc")).unwrap();
        std::fs::create_dir(dir.path().join("bundle")).unwrap();
        std::fs::write(
            dir.path().join("ember.toml"),
            format!(
                "state_dir = {:?}\n",
                dir.path().join("state").display().to_string()
            ),
        )
        .unwrap();
        FakeContainerd { dir, _ttrpc: ttrpc }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// Runs `start` as containerd 2.3 does (legacy flags and environment
    /// too) with `stdin`; returns (exit ok, stdout, stderr).
    fn start(&self, id: &str, stdin: &[u8]) -> (bool, Vec<u8>, String) {
        self.start_saying(id, stdin, "2")
    }

    /// [`Self::start`] with `MAX_SHIM_VERSION=max` (2.3 still says 2).
    fn start_saying(&self, id: &str, stdin: &[u8], max: &str) -> (bool, Vec<u8>, String) {
        let mut child = Command::new(SHIM)
            .args([
                "-namespace",
                "k8s.io",
                "-address",
                self.path("containerd.sock").to_str().unwrap(),
                "-publish-binary",
                "/usr/bin/containerd",
                "-id",
                id,
                "start",
            ])
            .current_dir(self.path("bundle"))
            .env("TTRPC_ADDRESS", self.path("containerd.sock.ttrpc"))
            .env("EMBER_CONFIG", self.path("ember.toml"))
            .env("MAX_SHIM_VERSION", max)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            out.stdout,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn params(&self, id: &str, extensions: &str, socket_dir: Option<&Path>) -> Vec<u8> {
        let socket_dir = socket_dir
            .map(|d| format!("socket_dir: {:?}\n", d.display().to_string()))
            .unwrap_or_default();
        encode(
            "BootstrapParams",
            &format!(
                "instance_id: {id:?}\nnamespace: \"k8s.io\"\nlog_level: -4\n\
                 containerd_version: \"2.3.0\"\n\
                 containerd_ttrpc_address: {:?}\ncontainerd_grpc_address: {:?}\n\
                 containerd_binary: \"/usr/bin/containerd\"\n{extensions}{socket_dir}",
                self.path("containerd.sock.ttrpc").display().to_string(),
                self.path("containerd.sock").display().to_string(),
            ),
        )
    }
}

/// Calls `Connect` on task API v3 (`containerd.task.v3.Task`, the v2
/// messages in another package): the request containerd 2.x's v3 client
/// sends.
fn connect_v3(client: &Client, id: &str) -> ConnectResponse {
    let mut req = ttrpc::Request::new();
    req.set_service("containerd.task.v3.Task".into());
    req.set_method("Connect".into());
    req.set_timeout_nano(Duration::from_secs(10).as_nanos() as i64);
    req.payload = ConnectRequest {
        id: id.into(),
        ..Default::default()
    }
    .write_to_bytes()
    .unwrap();
    let res = client.request(req).expect("Connect over task API v3");
    ConnectResponse::parse_from_bytes(&res.payload).expect("a v3 ConnectResponse")
}

/// Reaches the shim at `address` with the task API v2, and v3 when it
/// answered version 3, then shuts it down.
fn connect_and_shutdown(address: &str, id: &str) {
    connect_and_shutdown_as(address, id, 2)
}

fn connect_and_shutdown_as(address: &str, id: &str, version: u32) {
    let client = Client::connect(address).expect("the shim serves at the address it printed");
    if version == 3 {
        let resp = connect_v3(&client, id);
        assert!(resp.shim_pid > 0, "v3 shim pid {}", resp.shim_pid);
    }
    let task = TaskClient::new(client);
    let ctx = || ttrpc::context::with_timeout(Duration::from_secs(10).as_nanos() as i64);
    let resp = task
        .connect(
            ctx(),
            &ConnectRequest {
                id: id.into(),
                ..Default::default()
            },
        )
        .expect("Connect over task API v2");
    assert!(resp.shim_pid > 0, "shim pid {}", resp.shim_pid);
    task.shutdown(
        ctx(),
        &ShutdownRequest {
            id: id.into(),
            ..Default::default()
        },
    )
    .expect("Shutdown");
    // It exits: the socket stops answering.
    let path = address.strip_prefix("unix://").unwrap();
    for _ in 0..100 {
        if std::os::unix::net::UnixStream::connect(path).is_err() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the shim at {address} did not exit after Shutdown");
}

#[test]
fn start_with_bootstrap_params_and_socket_dir_answers_a_bootstrap_result() {
    let fake = FakeContainerd::new();
    let socket_dir = fake.path("s");
    let stdin = fake.params("pod-a", "", Some(&socket_dir));
    let (ok, stdout, stderr) = fake.start("pod-a", &stdin);
    assert!(ok, "start failed: {stderr}");
    let reply = decode("BootstrapResult", &stdout);
    assert_eq!(
        text_field(&reply, "version").as_deref(),
        Some("3"),
        "{reply}"
    );
    assert_eq!(
        text_field(&reply, "protocol").as_deref(),
        Some("ttrpc"),
        "{reply}"
    );
    let address = text_field(&reply, "address").expect("address");
    assert!(
        address.starts_with(&format!("unix://{}/", socket_dir.display())),
        "{address} is not under socket_dir"
    );
    connect_and_shutdown_as(&address, "pod-a", 3);
}

#[test]
fn start_with_bootstrap_params_and_runtime_options_uses_config_path() {
    let fake = FakeContainerd::new();
    let handler_config = fake.path("ember-2cpu.toml");
    std::fs::write(
        &handler_config,
        format!(
            "state_dir = {:?}\ndefault_vcpus = 2\n",
            fake.path("state").display().to_string()
        ),
    )
    .unwrap();
    let options = encode(
        "RuntimeOptions",
        &format!("config_path: {:?}\n", handler_config.display().to_string()),
    );
    let ext = format!(
        "extensions {{ value {{ type_url: \"runtimeoptions.v1.Options\" value: \"{}\" }} }}\n",
        escape(&options)
    );
    let stdin = fake.params("pod-b", &ext, None);
    let (ok, stdout, stderr) = fake.start("pod-b", &stdin);
    assert!(ok, "start failed: {stderr}");
    let reply = decode("BootstrapResult", &stdout);
    let address = text_field(&reply, "address").expect("address");
    assert!(
        address.starts_with("unix:///run/containerd/s/"),
        "{address}"
    );
    connect_and_shutdown(&address, "pod-b");
}

#[test]
fn start_with_a_bad_handler_config_fails_with_its_name() {
    let fake = FakeContainerd::new();
    let options = encode(
        "RuntimeOptions",
        "config_path: \"/nonexistent/ember-x.toml\"\n",
    );
    let ext = format!(
        "extensions {{ value {{ type_url: \"runtimeoptions.v1.Options\" value: \"{}\" }} }}\n",
        escape(&options)
    );
    let (ok, stdout, stderr) = fake.start("pod-c", &fake.params("pod-c", &ext, None));
    assert!(!ok, "start succeeded with a missing ConfigPath");
    assert!(stdout.is_empty(), "no address on failure");
    assert!(stderr.contains("/nonexistent/ember-x.toml"), "{stderr}");
}

#[test]
fn start_with_stdin_it_does_not_understand_answers_the_plain_address() {
    let fake = FakeContainerd::new();
    let (ok, stdout, stderr) = fake.start("pod-d", b"{\"not\": \"protobuf\"}");
    assert!(ok, "start failed: {stderr}");
    let address = String::from_utf8(stdout).unwrap();
    assert!(
        address.starts_with("unix:///run/containerd/s/"),
        "{address}"
    );
    connect_and_shutdown(&address, "pod-d");
}

/// A containerd 2.x that says `MAX_SHIM_VERSION=3` (2.0-2.2 say 2, and get
/// the plain address, as `start_with_stdin_it_does_not_understand...`
/// shows) gets JSON with version 3, and the shim answers task API v3.
#[test]
fn start_told_max_shim_version_3_answers_json_and_serves_task_api_v3() {
    let fake = FakeContainerd::new();
    let (ok, stdout, stderr) = fake.start_saying("pod-e", b"", "3");
    assert!(ok, "start failed: {stderr}");
    let reply: serde_json::Value = serde_json::from_slice(&stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&stdout)));
    assert_eq!(reply["version"], 3, "{reply}");
    assert_eq!(reply["protocol"], "ttrpc", "{reply}");
    let address = reply["address"].as_str().expect("address").to_string();
    connect_and_shutdown_as(&address, "pod-e", 3);
}

#[test]
fn info_describes_ember_without_containerd_environment() {
    let out = Command::new(SHIM)
        .arg("-info")
        .env_remove("TTRPC_ADDRESS")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    use containerd_shim_protos::protobuf::Message;
    let info =
        containerd_shim_protos::types::introspection::RuntimeInfo::parse_from_bytes(&out.stdout)
            .expect("RuntimeInfo");
    assert_eq!(info.name, "io.containerd.ember.v2");
    assert!(!info.version.version.is_empty());
    let features: serde_json::Value = serde_json::from_slice(&info.features.value).unwrap();
    assert_eq!(features["linux"]["cgroup"]["v2"], true);
}

#[test]
fn info_with_runtime_options_on_stdin_echoes_them() {
    let options = encode("RuntimeOptions", "config_path: \"/etc/ember/x.toml\"\n");
    let any = encode(
        "Any",
        &format!(
            "type_url: \"runtimeoptions.v1.Options\" value: \"{}\"",
            escape(&options)
        ),
    );
    let mut child = Command::new(SHIM)
        .arg("-info")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&any).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    use containerd_shim_protos::protobuf::Message;
    let info =
        containerd_shim_protos::types::introspection::RuntimeInfo::parse_from_bytes(&out.stdout)
            .unwrap();
    assert_eq!(info.options.type_url, "runtimeoptions.v1.Options");
    assert_eq!(info.options.value, options);
}
