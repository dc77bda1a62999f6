//! The `ember-agent` binary on the host: refuses to run when not PID 1, and
//! with EMBER_AGENT_TEST_LISTEN serves on a Unix socket until Shutdown.
//!
//! Set `EMBER_AGENT_TEST_BIN=<path>` to run these against another build of
//! the agent, e.g. the static `/init` of the initrd.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use ember_proto::agent::*;
use ember_proto::client::{context, AgentClient};

fn bin() -> String {
    std::env::var("EMBER_AGENT_TEST_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_ember-agent").into())
}

#[test]
fn refuses_when_not_pid1() {
    let out = Command::new(bin())
        .env_remove("EMBER_AGENT_TEST_LISTEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(ember_agent::init::EXIT_REFUSED));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not PID 1"), "{err}");
    assert!(err.contains("EMBER_AGENT_TEST_LISTEN"), "{err}");
    assert!(out.stdout.is_empty());
}

#[test]
fn test_mode_serves_until_shutdown() {
    let dir = std::env::temp_dir().join(format!("ember-agent-bin-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("agent.sock");
    let mut child = Command::new(bin())
        .env("EMBER_AGENT_TEST_LISTEN", &sock)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(
        line.trim_end(),
        format!("ember-agent: listening on unix socket {}", sock.display())
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let stream = tokio::net::UnixStream::connect(&sock).await.unwrap();
        let agent = AgentClient::from_stream(stream);
        let ctx = || context(Duration::from_secs(5));
        let h = agent.health(ctx(), &HealthRequest::new()).await.unwrap();
        assert_eq!(h.status.enum_value(), Ok(health_response::Status::SERVING));
        let v = agent.version(ctx(), &VersionRequest::new()).await.unwrap();
        assert_eq!(v.protocol_version, ember_proto::PROTOCOL_VERSION);
        agent
            .shutdown(ctx(), &ShutdownRequest::new())
            .await
            .unwrap();
    });

    // The process exits 0 shortly after answering Shutdown.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("agent did not exit after Shutdown");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}
