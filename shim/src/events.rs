//! Task events to containerd.
//!
//! Events go through containerd-shim's `RemotePublisher` (ttrpc to
//! `TTRPC_ADDRESS`), whose single queue keeps them in the order they were
//! published. Topics are the ones containerd's runc shim uses
//! (`/tasks/create`, `/tasks/exit`, ...), given by
//! `containerd_shim::event::Event`.

use std::sync::Arc;

use containerd_shim::event::Event;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim_protos::events::task::{TaskExit, TaskOOM};
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::MessageField;

/// Tests: events as (topic, text format), in publish order.
#[cfg(test)]
pub(crate) type Recorded = Arc<std::sync::Mutex<Vec<(String, String)>>>;

/// Publishes events in the shim's namespace. Cheap to clone. A sink
/// without a publisher (tests, the `ember` CLI) only logs.
#[derive(Clone)]
pub struct EventSink {
    publisher: Option<Arc<RemotePublisher>>,
    namespace: String,
    /// Tests: every event as (topic, text format), in publish order.
    #[cfg(test)]
    pub(crate) recorded: Option<Recorded>,
}

impl EventSink {
    pub fn new(publisher: RemotePublisher, namespace: impl Into<String>) -> Self {
        EventSink {
            publisher: Some(Arc::new(publisher)),
            namespace: namespace.into(),
            #[cfg(test)]
            recorded: None,
        }
    }

    /// A sink that drops events (after logging them at debug level).
    pub fn disabled() -> Self {
        EventSink {
            publisher: None,
            namespace: String::new(),
            #[cfg(test)]
            recorded: None,
        }
    }

    /// Tests: a sink that records what is published.
    #[cfg(test)]
    pub(crate) fn recording() -> (Self, Recorded) {
        let rec = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut sink = Self::disabled();
        sink.recorded = Some(rec.clone());
        (sink, rec)
    }

    /// Queues `event` for containerd. A failure is logged, never returned:
    /// the operation that caused the event has happened either way.
    pub async fn publish<E: Event + 'static>(&self, event: E) {
        let topic = event.topic();
        tracing::debug!(%topic, event = ?EventDebug(&event), "event");
        #[cfg(test)]
        if let Some(rec) = &self.recorded {
            let text = format!("{:?}", EventDebug(&event));
            rec.lock().unwrap().push((topic.clone(), text));
        }
        let Some(publisher) = &self.publisher else {
            return;
        };
        let ctx = containerd_shim::Context::default();
        if let Err(e) = publisher
            .publish(ctx, &topic, &self.namespace, Box::new(event))
            .await
        {
            tracing::warn!(%topic, "publishing event failed: {e}");
        }
    }
}

/// `Debug` of a protobuf message through its text format.
struct EventDebug<'a, E: Event>(&'a E);

impl<E: Event> std::fmt::Debug for EventDebug<'_, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = protobuf::text_format::print_to_string(self.0);
        f.write_str(text.trim())
    }
}

/// A protobuf timestamp of a system time.
pub fn timestamp(t: std::time::SystemTime) -> Timestamp {
    let ts = ember_proto::time::to_timestamp(t);
    Timestamp {
        seconds: ts.seconds,
        nanos: ts.nanos,
        ..Default::default()
    }
}

pub fn task_exit(
    container_id: &str,
    id: &str,
    pid: u32,
    exit_status: u32,
    at: std::time::SystemTime,
) -> TaskExit {
    TaskExit {
        container_id: container_id.to_string(),
        id: id.to_string(),
        pid,
        exit_status,
        exited_at: MessageField::some(timestamp(at)),
        ..Default::default()
    }
}

pub fn task_oom(container_id: &str) -> TaskOOM {
    TaskOOM {
        container_id: container_id.to_string(),
        ..Default::default()
    }
}
