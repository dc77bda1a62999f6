//! ttrpc round trips between the agent's own server code (bound to a Unix
//! socket instead of vsock) and the host-side client of ember-proto.

use std::path::PathBuf;
use std::time::Duration;

use ember_agent::reaper::Reaper;
use ember_agent::server;
use ember_agent::service::{AgentService, Config};
use ember_proto::agent::*;
use ember_proto::client::{context, AgentClient};
use ttrpc::Code;

fn temp_socket(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ember-agent-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("agent.sock")
}

fn ctx() -> ttrpc::context::Context {
    context(Duration::from_secs(5))
}

fn code_of(e: ttrpc::Error) -> (Code, String) {
    match e {
        ttrpc::Error::RpcStatus(s) => (s.code(), s.message().to_string()),
        other => panic!("expected an rpc status, got {other:?}"),
    }
}

#[tokio::test(flavor = "current_thread")]
async fn health_version_settime_unimplemented_shutdown() {
    let path = temp_socket("rt");
    let (service, mut shutdown) = AgentService::new(Config::test(), Reaper::new());
    let _server = server::start(service, server::bind_unix(&path).unwrap())
        .await
        .unwrap();

    let stream = tokio::net::UnixStream::connect(&path).await.unwrap();
    let agent = AgentClient::from_stream(stream);

    let h = agent.health(ctx(), &HealthRequest::new()).await.unwrap();
    assert_eq!(h.status.enum_value(), Ok(health_response::Status::SERVING));

    let v = agent.version(ctx(), &VersionRequest::new()).await.unwrap();
    assert_eq!(v.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(v.protocol_version, ember_proto::PROTOCOL_VERSION);
    assert_eq!(v.kernel_release, ember_agent::service::kernel_release());
    assert!(!v.kernel_release.is_empty());

    // SetTime in test mode validates but never touches the host clock.
    let mut req = SetTimeRequest::new();
    req.time = Some(ember_proto::time::now()).into();
    agent.set_time(ctx(), &req).await.unwrap();
    let (code, _) = code_of(
        agent
            .set_time(ctx(), &SetTimeRequest::new())
            .await
            .unwrap_err(),
    );
    assert_eq!(code, Code::INVALID_ARGUMENT);

    // SeedEntropy accepts 1..=4096 bytes (test mode does not touch the
    // host's pool).
    let mut seed = SeedEntropyRequest::new();
    seed.data = vec![7u8; 64];
    agent.seed_entropy(ctx(), &seed).await.unwrap();
    seed.data = vec![7u8; 4097];
    let (code, msg) = code_of(agent.seed_entropy(ctx(), &seed).await.unwrap_err());
    assert_eq!(code, Code::INVALID_ARGUMENT);
    assert!(msg.contains("4097"), "{msg}");

    // Container methods validate their input.
    let (code, msg) = code_of(
        agent
            .create_container(ctx(), &CreateContainerRequest::new())
            .await
            .unwrap_err(),
    );
    assert_eq!(code, Code::INVALID_ARGUMENT);
    assert!(msg.contains("container id"), "{msg}");
    let (code, _) = code_of(
        agent
            .wait_process(ctx(), &WaitProcessRequest::new())
            .await
            .unwrap_err(),
    );
    assert_eq!(code, Code::NOT_FOUND);
    // Network changes are dry runs in test mode (never the host's).
    agent
        .update_routes(ctx(), &UpdateRoutesRequest::new())
        .await
        .expect("UpdateRoutes in test mode");

    // Shutdown answers first, then fires the signal; Health turns NOT_SERVING.
    agent
        .shutdown(ctx(), &ShutdownRequest::new())
        .await
        .unwrap();
    let h = agent.health(ctx(), &HealthRequest::new()).await.unwrap();
    assert_eq!(
        h.status.enum_value(),
        Ok(health_response::Status::NOT_SERVING)
    );
    tokio::time::timeout(Duration::from_secs(5), shutdown.requested())
        .await
        .expect("shutdown signal did not fire");
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[tokio::test(flavor = "current_thread")]
async fn concurrent_clients_share_a_server() {
    let path = temp_socket("multi");
    let (service, _shutdown) = AgentService::new(Config::test(), Reaper::new());
    let _server = server::start(service, server::bind_unix(&path).unwrap())
        .await
        .unwrap();
    let a = AgentClient::from_stream(tokio::net::UnixStream::connect(&path).await.unwrap());
    let b = AgentClient::from_stream(tokio::net::UnixStream::connect(&path).await.unwrap());
    let a2 = a.clone();
    let (health, version) = (HealthRequest::new(), VersionRequest::new());
    let (x, y, z) = tokio::join!(
        a.health(ctx(), &health),
        a2.version(ctx(), &version),
        b.health(ctx(), &health),
    );
    x.unwrap();
    y.unwrap();
    z.unwrap();
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}
