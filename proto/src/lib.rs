//! Ember agent protocol: the ttrpc service `ember.agent.v1.Agent` spoken
//! between the host (shim / VMM) and the in-guest agent over virtio-vsock.
//!
//! The protocol itself, including how stdio streams work, is documented in
//! `proto/agent.proto`. This crate exports:
//! - [`agent`]: the generated protobuf messages (`HealthRequest`, ...);
//! - [`agent_ttrpc`]: the generated async ttrpc client
//!   ([`agent_ttrpc::AgentClient`]), server trait ([`agent_ttrpc::Agent`],
//!   implement it with `#[ember_proto::async_trait]`) and the service
//!   constructor ([`agent_ttrpc::create_agent`]);
//! - [`client`]: host-side helpers to wrap an already-connected stream into
//!   a client.

/// A module of generated code in `$OUT_DIR`, exempt from the lints the
/// generator does not follow.
macro_rules! generated {
    ($(#[$doc:meta])* $name:ident, $file:literal) => {
        $(#[$doc])*
        #[allow(
            unknown_lints,
            clippy::all,
            clippy::pedantic,
            unused_attributes,
            dead_code,
            missing_docs,
            non_camel_case_types,
            non_snake_case,
            non_upper_case_globals,
            trivial_casts,
            unused_results,
            unused_mut,
            unused_imports
        )]
        pub mod $name {
            include!(concat!(env!("OUT_DIR"), "/", $file));
        }
    };
}

generated!(
    /// Generated protobuf messages of `agent.proto`.
    agent,
    "agent.rs"
);
generated!(
    /// Generated async ttrpc client and server glue of `agent.proto`.
    agent_ttrpc,
    "agent_ttrpc.rs"
);
generated!(
    /// The part of the CRI `runtime.v1.PodSandboxConfig` Ember reads, as
    /// containerd 2.x's CreateSandbox carries it (`cri_pod.proto`).
    cri_pod,
    "cri_pod.rs"
);

pub mod client;
pub mod port_forward;

/// The `#[async_trait]` attribute the generated [`agent_ttrpc::Agent`]
/// trait is declared with; implementations must use the same one.
pub use async_trait::async_trait;
pub use ttrpc;

/// vsock port the agent's ttrpc server listens on (any CID).
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// First vsock port the agent hands out for stdio streams.
pub const STDIO_PORT_BASE: u32 = 2000;

/// Version of the wire protocol in `agent.proto`; reported by `Version`.
/// Bump on any incompatible change.
pub const PROTOCOL_VERSION: u32 = 1;

/// Fully qualified ttrpc service name.
pub const SERVICE_NAME: &str = "ember.agent.v1.Agent";

/// Conversions between [`agent::Timestamp`] and [`std::time::SystemTime`].
pub mod time {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use crate::agent::Timestamp;

    /// The timestamp of a system time. Times before the epoch are encoded
    /// with negative seconds and non-negative nanos, like
    /// google.protobuf.Timestamp.
    pub fn to_timestamp(t: SystemTime) -> Timestamp {
        let mut ts = Timestamp::new();
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => {
                ts.seconds = d.as_secs() as i64;
                ts.nanos = d.subsec_nanos() as i32;
            }
            Err(e) => {
                let d = e.duration();
                // A SystemTime reaches back to i64::MIN seconds, whose
                // magnitude does not fit an i64: subtract, never negate.
                let mut secs = 0i64.saturating_sub_unsigned(d.as_secs());
                let mut nanos = d.subsec_nanos() as i32;
                if nanos > 0 {
                    secs = secs.saturating_sub(1);
                    nanos = 1_000_000_000 - nanos;
                }
                ts.seconds = secs;
                ts.nanos = nanos;
            }
        }
        ts
    }

    /// The system time of a timestamp, or `None` if `nanos` is out of
    /// `0..1_000_000_000` or the value does not fit a `SystemTime`.
    pub fn from_timestamp(ts: &Timestamp) -> Option<SystemTime> {
        if !(0..1_000_000_000).contains(&ts.nanos) {
            return None;
        }
        let nanos = Duration::from_nanos(ts.nanos as u64);
        if ts.seconds >= 0 {
            UNIX_EPOCH
                .checked_add(Duration::from_secs(ts.seconds as u64))?
                .checked_add(nanos)
        } else {
            UNIX_EPOCH
                .checked_sub(Duration::from_secs(ts.seconds.unsigned_abs()))?
                .checked_add(nanos)
        }
    }

    /// Current wall-clock time as a timestamp.
    pub fn now() -> Timestamp {
        to_timestamp(SystemTime::now())
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use protobuf::Message;

    use super::agent::*;
    use super::time::*;

    #[test]
    fn timestamp_round_trip() {
        for t in [
            UNIX_EPOCH,
            UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789),
            UNIX_EPOCH - Duration::new(5, 250_000_000),
        ] {
            let ts = to_timestamp(t);
            assert!((0..1_000_000_000).contains(&ts.nanos));
            assert_eq!(from_timestamp(&ts), Some(t));
        }
        let ts = to_timestamp(UNIX_EPOCH - Duration::new(5, 250_000_000));
        assert_eq!((ts.seconds, ts.nanos), (-6, 750_000_000));
    }

    /// Fuzzing finding (agent_replies target): a hostile agent's
    /// `exited_at` of `i64::MIN` seconds is a valid `SystemTime`, and
    /// turning it back into a timestamp for the TaskExit event negated
    /// `i64::MIN` (a panic with overflow checks on).
    #[test]
    fn timestamp_of_the_earliest_system_time() {
        for nanos in [0, 1, 999_999_999] {
            let mut ts = Timestamp::new();
            ts.seconds = i64::MIN;
            ts.nanos = nanos;
            let t = from_timestamp(&ts).expect("i64::MIN seconds is a SystemTime on Linux");
            let back = to_timestamp(t);
            assert_eq!((back.seconds, back.nanos), (i64::MIN, nanos));
        }
    }

    #[test]
    fn timestamp_rejects_bad_nanos() {
        let mut ts = Timestamp::new();
        ts.nanos = 1_000_000_000;
        assert_eq!(from_timestamp(&ts), None);
        ts.nanos = -1;
        assert_eq!(from_timestamp(&ts), None);
    }

    #[test]
    fn messages_encode_and_decode() {
        let mut req = CreateContainerRequest::new();
        req.container_id = "c1".into();
        req.oci_spec = br#"{"ociVersion":"1.1.0"}"#.to_vec();
        let mut m = Mount::new();
        m.fstype = "virtiofs".into();
        m.source = "ember-shared".into();
        m.options = vec!["ro".into()];
        req.rootfs.push(m);
        let mut stdio = Stdio::new();
        stdio.stdout = true;
        stdio.terminal = true;
        req.stdio = Some(stdio).into();

        let bytes = req.write_to_bytes().unwrap();
        let back = CreateContainerRequest::parse_from_bytes(&bytes).unwrap();
        assert_eq!(back, req);
        assert!(back.stdio.terminal);

        let mut h = HealthResponse::new();
        h.status = health_response::Status::SERVING.into();
        let back = HealthResponse::parse_from_bytes(&h.write_to_bytes().unwrap()).unwrap();
        assert_eq!(
            back.status.enum_value(),
            Ok(health_response::Status::SERVING)
        );
    }

    #[test]
    fn garbage_does_not_panic() {
        // Truncated / random input must give an error, never a panic.
        for input in [
            &[0xffu8, 0xff, 0xff][..],
            &[0x0a, 0x10, 0x41][..],
            &[0x12][..],
        ] {
            let _ = CreateContainerRequest::parse_from_bytes(input);
        }
    }
}
