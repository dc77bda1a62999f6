//! The virtio-fs request path (screening, then the FUSE server over the
//! passthrough file system) without the worker thread, for the fuzz
//! targets (feature `fuzzing`): one call serves one descriptor chain the
//! way the worker does, in the caller's thread.
//!
//! The caller confines that thread: the passthrough acts on the host with
//! the caller's privileges (see the fuzz crate's jail).

use std::path::PathBuf;

use virtio_queue::DescriptorChain;

use super::bounded_fs::BoundedFs;
use super::device::{build_backend_at, FsOptions, VirtioFs};
use super::worker::RequestHandler;
use crate::devices::virtio::GuestMemoryMmap;

/// A request handler over a fresh passthrough file system rooted at
/// `shared_dir`, configured exactly as an activated device's.
pub struct FsHarness {
    handler: RequestHandler,
}

impl FsHarness {
    pub fn new(tag: &str, shared_dir: PathBuf, opts: FsOptions) -> Result<Self, String> {
        let read_only = opts.read_only;
        let limits = opts.limits;
        // The same checks of the options as a device gets.
        VirtioFs::new(tag, shared_dir.clone(), opts.clone()).map_err(|e| e.to_string())?;
        let fs = build_backend_at(&opts, &shared_dir.to_string_lossy())
            .map_err(|e| format!("passthrough file system: {e}"))?;
        let backend = BoundedFs::new(fs, tag.to_string(), limits, false);
        Ok(Self {
            handler: RequestHandler::new(tag.to_string(), backend, read_only),
        })
    }

    /// Serves one chain; returns the used length the worker would report.
    pub fn handle(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> u32 {
        self.handler.handle(mem, chain)
    }
}
