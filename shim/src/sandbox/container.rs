//! One container of a pod: its init process, its execs, and the host
//! mounts made for it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::process::{Process, Status};
use crate::error::{Error, Result};
use crate::resources::mount::MountRequest;
use crate::resources::rootfs::PreparedContainer;

pub struct Container {
    pub id: String,
    pub bundle: PathBuf,
    /// containerd's rootfs mounts (as in the TaskCreate event).
    pub rootfs: Vec<MountRequest>,
    pub init: Arc<Process>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
    /// What the host mounted for the container; taken at delete.
    prepared: Mutex<Option<PreparedContainer>>,
}

impl Container {
    pub fn new(
        id: &str,
        bundle: PathBuf,
        rootfs: Vec<MountRequest>,
        init: Arc<Process>,
        prepared: PreparedContainer,
    ) -> Self {
        Container {
            id: id.to_string(),
            bundle,
            rootfs,
            init,
            execs: Mutex::new(HashMap::new()),
            prepared: Mutex::new(Some(prepared)),
        }
    }

    fn execs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Process>>> {
        self.execs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The init process (`exec_id` empty) or an exec.
    pub fn process(&self, exec_id: &str) -> Result<Arc<Process>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        self.execs().get(exec_id).cloned().ok_or_else(|| {
            Error::not_found(format!(
                "exec {exec_id} of container {} does not exist",
                self.id
            ))
        })
    }

    pub fn all_execs(&self) -> Vec<Arc<Process>> {
        self.execs().values().cloned().collect()
    }

    /// Registers a new exec (not started).
    pub fn add_exec(&self, process: Arc<Process>) -> Result<()> {
        if self.init.status() == Status::Stopped {
            return Err(Error::precondition(format!(
                "cannot exec in stopped container {}",
                self.id
            )));
        }
        let mut execs = self.execs();
        if execs.contains_key(&process.exec_id) {
            return Err(Error::AlreadyExists(format!(
                "exec {} already exists in container {}",
                process.exec_id, self.id
            )));
        }
        execs.insert(process.exec_id.clone(), process);
        Ok(())
    }

    pub fn remove_exec(&self, exec_id: &str) -> Option<Arc<Process>> {
        self.execs().remove(exec_id)
    }

    pub fn take_prepared(&self) -> Option<PreparedContainer> {
        self.prepared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::StdioPaths;
    use crate::sandbox::process::Exit;

    fn container() -> Container {
        let init = Arc::new(Process::new("c", "", StdioPaths::default(), None));
        Container::new(
            "c",
            "/b".into(),
            Vec::new(),
            init,
            PreparedContainer::default(),
        )
    }

    #[test]
    fn execs_are_unique_and_need_a_live_init() {
        let c = container();
        let x = Arc::new(Process::new("c", "x", StdioPaths::default(), None));
        c.add_exec(x.clone()).unwrap();
        assert_eq!(
            c.add_exec(x).err().map(|e| e.code()),
            Some(ttrpc::Code::ALREADY_EXISTS)
        );
        assert!(c.process("x").is_ok());
        assert_eq!(
            c.process("y").err().map(|e| e.code()),
            Some(ttrpc::Code::NOT_FOUND)
        );
        assert!(Arc::ptr_eq(&c.process("").unwrap(), &c.init));

        c.init.record_exit(Exit {
            status: 0,
            at: std::time::SystemTime::now(),
        });
        let z = Arc::new(Process::new("c", "z", StdioPaths::default(), None));
        assert_eq!(
            c.add_exec(z).err().map(|e| e.code()),
            Some(ttrpc::Code::FAILED_PRECONDITION)
        );
        assert!(c.remove_exec("x").is_some());
        assert!(c.take_prepared().is_some());
        assert!(c.take_prepared().is_none());
    }
}
