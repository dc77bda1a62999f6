//! The pod this shim serves: its sandbox is booted by the first create and
//! torn down after the last delete.
//!
//! Boot and teardown are serialized by one lock, so a create that arrives
//! while the previous VM is being torn down waits and boots a fresh one.
//! Ids being created are reserved first, so a concurrent delete of the last
//! other container does not tear the VM down under a create.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::events::EventSink;
use crate::sandbox::container::Container;
use crate::sandbox::{NewContainer, Sandbox, SandboxSetup};

pub struct Pod {
    pub namespace: String,
    pub id: String,
    config: Arc<Config>,
    events: EventSink,
    slot: Mutex<Slot>,
    lifecycle: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct Slot {
    sandbox: Option<Arc<Sandbox>>,
    reserved: HashSet<String>,
}

/// Releases a reserved id when the create ends, however it ends.
struct Reservation<'a> {
    pod: &'a Pod,
    id: String,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.pod.slot().reserved.remove(&self.id);
    }
}

impl Pod {
    pub fn new(namespace: &str, id: &str, config: Arc<Config>, events: EventSink) -> Self {
        Pod {
            namespace: namespace.to_string(),
            id: id.to_string(),
            config,
            events,
            slot: Mutex::new(Slot::default()),
            lifecycle: tokio::sync::Mutex::new(()),
        }
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    pub fn sandbox(&self) -> Option<Arc<Sandbox>> {
        self.slot().sandbox.clone()
    }

    /// The sandbox holding container `id`.
    pub fn find(&self, id: &str) -> Result<Arc<Sandbox>> {
        match self.sandbox() {
            Some(sb) if sb.has_container(id) => Ok(sb),
            _ => Err(Error::not_found(format!("container {id} does not exist"))),
        }
    }

    /// The sandbox and container `id`.
    pub fn container(&self, id: &str) -> Result<(Arc<Sandbox>, Arc<Container>)> {
        let sb = self.find(id)?;
        let c = sb.container(id)?;
        Ok((sb, c))
    }

    fn reserve(&self, id: &str) -> Result<Reservation<'_>> {
        let mut slot = self.slot();
        let exists = slot.reserved.contains(id)
            || slot.sandbox.as_ref().is_some_and(|s| s.has_container(id));
        if exists {
            return Err(Error::AlreadyExists(format!(
                "container {id} already exists"
            )));
        }
        slot.reserved.insert(id.to_string());
        Ok(Reservation {
            pod: self,
            id: id.to_string(),
        })
    }

    /// Creates a container, booting the pod's VM first if needed (sized
    /// by `setup`). If the create fails and the pod has nothing else, the
    /// VM goes again.
    pub async fn create(
        &self,
        new: NewContainer,
        setup: SandboxSetup,
    ) -> Result<(Arc<Sandbox>, Arc<Container>)> {
        let reservation = self.reserve(&new.id)?;
        let result = async {
            let sb = self.ensure_sandbox(setup).await?;
            let c = sb.create_container(new).await?;
            Ok((sb, c))
        }
        .await;
        drop(reservation);
        if result.is_err() {
            self.teardown_if_unused().await;
        }
        result
    }

    async fn ensure_sandbox(&self, setup: SandboxSetup) -> Result<Arc<Sandbox>> {
        let _lifecycle = self.lifecycle.lock().await;
        if let Some(sb) = self.sandbox() {
            return Ok(sb);
        }
        let sb = Sandbox::launch(self.config.clone(), self.events.clone(), setup).await?;
        self.slot().sandbox = Some(sb.clone());
        Ok(sb)
    }

    /// Tears the VM down if no container is in it or being created.
    /// Returns whether the pod is now empty (no VM left).
    pub async fn teardown_if_unused(&self) -> bool {
        let _lifecycle = self.lifecycle.lock().await;
        let sb = {
            let mut slot = self.slot();
            if !slot.reserved.is_empty() {
                return false;
            }
            match &slot.sandbox {
                Some(sb) if sb.container_count() > 0 => return false,
                _ => slot.sandbox.take(),
            }
        };
        if let Some(sb) = sb {
            sb.shutdown().await;
        }
        true
    }
}
