//! Host-side helpers: turn an already-connected stream to the agent into
//! the generated async ttrpc client.
//!
//! The VMM owns the hybrid-vsock handshake (connect to its Unix socket,
//! write `CONNECT 1024\n`, read `OK <port>\n`); what it hands over is a
//! connected stream that from then on carries ttrpc to the agent:
//!
//! ```no_run
//! # async fn demo(stream: tokio::net::UnixStream) -> ttrpc::Result<()> {
//! use ember_proto::{agent::HealthRequest, client::{self, AgentClient}};
//! let agent = AgentClient::from_stream(stream);
//! let health = agent.health(client::context(client::DEFAULT_TIMEOUT), &HealthRequest::new()).await?;
//! # Ok(()) }
//! ```

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

pub use crate::agent_ttrpc::AgentClient;

/// A reasonable deadline for quick calls (Health, Version, SetTime, ...)
/// on the slow emulated-KVM hosts, where one guest syscall costs ~2.4 ms.
/// Long polls (WaitProcess, GetOOMEvent) should use [`no_timeout`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

impl AgentClient {
    /// Wrap an already-connected stream (e.g. the hybrid-vsock `UnixStream`
    /// after the `CONNECT`/`OK` handshake) into an agent client.
    ///
    /// Must be called inside a tokio runtime: the ttrpc client spawns its
    /// reader and writer tasks here. The client is cheap to clone; clones
    /// share the one connection (ttrpc multiplexes concurrent calls).
    pub fn from_stream<S>(stream: S) -> AgentClient
    where
        S: AsyncRead + AsyncWrite + Send + Sync + 'static,
    {
        let socket = ttrpc::r#async::transport::Socket::new(stream);
        AgentClient::new(ttrpc::r#async::Client::new(socket))
    }
}

/// A ttrpc call context with the given deadline.
pub fn context(timeout: Duration) -> ttrpc::context::Context {
    ttrpc::context::with_duration(timeout)
}

/// A ttrpc call context without a deadline (for long polls).
pub fn no_timeout() -> ttrpc::context::Context {
    ttrpc::context::Context::default()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::agent::{health_response::Status, HealthRequest, HealthResponse, VersionRequest};
    use crate::agent_ttrpc::{create_agent, Agent};

    struct OnlyHealth;

    #[crate::async_trait]
    impl Agent for OnlyHealth {
        async fn health(
            &self,
            _ctx: &ttrpc::r#async::TtrpcContext,
            _req: HealthRequest,
        ) -> ttrpc::Result<HealthResponse> {
            let mut r = HealthResponse::new();
            r.status = Status::SERVING.into();
            Ok(r)
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn from_stream_talks_to_a_server() {
        let dir = std::env::temp_dir().join(format!("ember-proto-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("agent.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let mut server = ttrpc::r#async::Server::new()
            .register_service(create_agent(Arc::new(OnlyHealth)))
            .add_listener(listener.into());
        server.start().await.unwrap();

        let stream = tokio::net::UnixStream::connect(&path).await.unwrap();
        let client = AgentClient::from_stream(stream);
        let r = client
            .health(context(Duration::from_secs(5)), &HealthRequest::new())
            .await
            .unwrap();
        assert_eq!(r.status.enum_value(), Ok(Status::SERVING));

        // Methods not overridden answer NOT_FOUND from the generated default.
        let err = client
            .version(context(Duration::from_secs(5)), &VersionRequest::new())
            .await
            .unwrap_err();
        match err {
            ttrpc::Error::RpcStatus(s) => assert_eq!(s.code(), ttrpc::Code::NOT_FOUND),
            other => panic!("unexpected error {other:?}"),
        }
        server.shutdown().await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
