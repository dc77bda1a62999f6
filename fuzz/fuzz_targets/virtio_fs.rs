//! virtio-fs: a hostile guest's FUSE requests through the device's
//! screening and the FUSE server over the passthrough file system, on a
//! fresh share per input (see `ember_fuzz::jail` for where that share is
//! and why the fuzzer cannot touch the host outside it).
//!
//! Input: `flags: u8` (bit 0: read-only device), then records
//! `ctl: u8, len: u16, request[len]`: one FUSE request each (header and
//! arguments, as the guest writes them), put in a chain of 1 to 3
//! device-readable descriptors (`ctl & 3`) and one device-writable reply
//! buffer of 8 KiB, none, 15 bytes or 70000 bytes (`ctl >> 5 & 3`). The
//! header's `len` is set to the request's length unless `ctl & 0x10`.
//! A FUSE_INIT is sent first, as the guest kernel does at mount.
#![no_main]

use std::sync::OnceLock;

use ember_fuzz::jail::{Jail, SHARE};
use ember_fuzz::queue::GuestQueue;
use ember_fuzz::Input;
use ember_vmm::fuzzing::fs::{FsHarness, FsOptions};
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;

const FUSE_INIT: u32 = 26;
const MAX_REQUESTS: usize = 48;

fn jail() -> &'static Jail {
    static JAIL: OnceLock<Jail> = OnceLock::new();
    JAIL.get_or_init(Jail::start)
}

/// A fresh share: a directory, a file with data, a symlink pointing out of
/// the share, a FIFO.
fn reset_share() {
    let _ = std::fs::remove_dir_all(SHARE);
    std::fs::create_dir(SHARE).expect("mkdir share");
    std::fs::create_dir(format!("{SHARE}/d")).expect("mkdir d");
    std::fs::write(format!("{SHARE}/f"), b"hello from the host\n").expect("write f");
    std::fs::write(format!("{SHARE}/d/g"), vec![7u8; 5000]).expect("write d/g");
    std::os::unix::fs::symlink("/etc/passwd", format!("{SHARE}/l")).expect("symlink l");
    std::os::unix::fs::symlink("..", format!("{SHARE}/d/up")).expect("symlink up");
    let fifo = std::ffi::CString::new(format!("{SHARE}/p")).expect("path");
    // SAFETY: a valid C string; creates a FIFO in the jail's tmpfs.
    unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) };
}

fn init_request() -> Vec<u8> {
    let mut r = Vec::new();
    r.extend_from_slice(&56u32.to_le_bytes()); // len
    r.extend_from_slice(&FUSE_INIT.to_le_bytes());
    r.extend_from_slice(&1u64.to_le_bytes()); // unique
    r.extend_from_slice(&0u64.to_le_bytes()); // nodeid
    r.extend_from_slice(&[0u8; 16]); // uid, gid, pid, padding
    r.extend_from_slice(&7u32.to_le_bytes()); // major
    r.extend_from_slice(&31u32.to_le_bytes()); // minor
    r.extend_from_slice(&0x2_0000u32.to_le_bytes()); // max_readahead
    r.extend_from_slice(&0u32.to_le_bytes()); // flags
    r
}

/// Puts one request in a chain, serves it, checks the used length.
fn serve(fs: &mut FsHarness, gq: &mut GuestQueue, ctl: u8, mut request: Vec<u8>) {
    if ctl & 0x10 == 0 && request.len() >= 4 {
        let len = request.len() as u32;
        request[..4].copy_from_slice(&len.to_le_bytes());
    }
    let pieces = 1 + usize::from(ctl & 3) % 3;
    let step = request.len().div_ceil(pieces).max(1);
    let mut parts = Vec::new();
    for piece in request.chunks(step) {
        let addr = gq.alloc(piece);
        parts.push((addr, piece.len() as u32, false));
    }
    if parts.is_empty() {
        parts.push((gq.alloc(&[]), 0, false));
    }
    let out_len = [8192usize, 0, 15, 70_000][usize::from(ctl >> 5) & 3];
    if out_len > 0 {
        parts.push((gq.alloc_zeroed(out_len), out_len as u32, true));
    }
    gq.push_chain(&parts);
    let mut q = gq.queue();
    // Skip the chains served before this one.
    q.set_next_avail(gq.published() - 1);
    let mem = gq.mem.clone();
    let chain = q
        .pop_descriptor_chain(&mem)
        .expect("the chain just published");
    let used = fs.handle(&mem, chain);
    assert!(
        used as usize <= out_len,
        "used length {used} larger than the {out_len}-byte reply buffer"
    );
}

fuzz_target!(|data: &[u8]| {
    let data = data.to_vec();
    jail().run(move || {
        let mut input = Input::new(&data);
        let flags = input.u8();
        reset_share();
        let opts = FsOptions {
            read_only: flags & 1 != 0,
            ..FsOptions::default()
        };
        let mut fs = FsHarness::new("fuzz", SHARE.into(), opts).expect("virtio-fs harness");
        let mut gq = GuestQueue::new();
        serve(&mut fs, &mut gq, 0, init_request());
        for _ in 0..MAX_REQUESTS {
            if input.is_empty() {
                break;
            }
            let ctl = input.u8();
            let len = usize::from(input.u16());
            let request = input.bytes(len).to_vec();
            serve(&mut fs, &mut gq, ctl, request);
        }
    });
});
