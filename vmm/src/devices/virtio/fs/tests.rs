//! Device tests.
//!
//! [`Guest`] below FAKES THE PEER, i.e. the guest's virtio-fs driver: it lays
//! out the hiprio and request virtqueues in guest memory with
//! `virtio_queue::mock::MockSplitQueue`, writes FUSE requests into
//! descriptor chains (readable request, writable reply buffer), kicks the
//! queue eventfd and reads the used ring, while the device runs for real on
//! its worker thread over a tempdir share.
//!
//! The mock is used for the descriptor table and the available ring only:
//! in virtio-queue 0.17 `MockSplitQueue` places the used ring right after
//! `avail.end()`, which counts ring *elements* instead of bytes, so the used
//! ring overlaps the upper half of the available ring (the driver's avail
//! writes then clobber `used.idx`). The fake driver moves the used ring to
//! [`USED_OFFSET`] past the queue base and reads it itself.

use std::fs;
use std::mem::size_of;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuse_backend_rs::abi::fuse_abi::{
    AttrOut, CreateIn, Dirent, EntryOut, ForgetIn, GetattrIn, InHeader, InitIn, InitOut, MknodIn,
    Opcode, OpenIn, OpenOut, OutHeader, ReadIn, ReleaseIn, WriteIn, WriteOut, ROOT_ID,
};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{ByteValued, Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::config::FsLimits;
use crate::devices::virtio::{
    GuestMemoryMmap, VirtioDevice, VirtioInterrupt, TYPE_FS, VIRTIO_MMIO_INT_VRING,
};

mod isolation;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const QSIZE: u16 = 16;
const MEM_SIZE: usize = 4 << 20;
const QUEUE_ADDR: [u64; NUM_QUEUES] = [0x1000, 0x2000];
/// Used ring offset from the queue base, past the descriptor table (256
/// bytes) and the available ring (38 bytes) of a 16-entry queue.
const USED_OFFSET: u64 = 0x800;
const REQ_BUF: u64 = 0x10_0000;
const RESP_BUF: u64 = 0x20_0000;
const RESP_LEN: u32 = 8192;
const WAIT: Duration = Duration::from_secs(5);

#[derive(Default)]
struct CountingIrq {
    count: AtomicUsize,
    status: AtomicUsize,
}

impl VirtioInterrupt for CountingIrq {
    fn trigger(&self, status: u32) -> std::io::Result<()> {
        self.status.fetch_or(status as usize, Ordering::SeqCst);
        self.count.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// A reply as the driver sees it.
struct Reply {
    used_len: u32,
    bytes: Vec<u8>,
}

impl Reply {
    fn header(&self) -> OutHeader {
        read_obj(&self.bytes, 0)
    }

    /// 0 or a negated errno.
    fn error(&self) -> i32 {
        assert!(
            self.used_len as usize >= size_of::<OutHeader>(),
            "no reply header: used {}",
            self.used_len
        );
        self.header().error
    }

    fn ok(&self) -> &Self {
        assert_eq!(self.error(), 0, "unexpected error reply");
        assert_eq!(self.header().len, self.used_len);
        self
    }

    fn body<T: ByteValued + Default>(&self) -> T {
        read_obj(&self.bytes, size_of::<OutHeader>())
    }

    fn body_at<T: ByteValued + Default>(&self, off: usize) -> T {
        read_obj(&self.bytes, size_of::<OutHeader>() + off)
    }

    fn data(&self) -> &[u8] {
        &self.bytes[size_of::<OutHeader>()..]
    }
}

fn read_obj<T: ByteValued + Default>(bytes: &[u8], off: usize) -> T {
    let mut t = T::default();
    let n = size_of::<T>();
    t.as_mut_slice().copy_from_slice(&bytes[off..off + n]);
    t
}

/// The fake guest driver (see the module doc).
struct Guest {
    mem: &'static GuestMemoryMmap,
    queues: Vec<MockSplitQueue<'static, GuestMemoryMmap>>,
    evts: Vec<EventFd>,
    last_used: [u16; NUM_QUEUES],
    irq: Arc<CountingIrq>,
    dev: VirtioFs,
    unique: u64,
    uid: u32,
    gid: u32,
}

impl Guest {
    fn start(share: &Path, opts: FsOptions) -> Self {
        let mut g = Self::new(share, opts);
        g.activate();
        g
    }

    /// The fake driver and a device not yet activated.
    fn new(share: &Path, opts: FsOptions) -> Self {
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
        ));
        let meta = fs::metadata(share).unwrap();
        Guest {
            mem,
            queues: Vec::new(),
            evts: Vec::new(),
            last_used: [0; NUM_QUEUES],
            irq: Arc::new(CountingIrq::default()),
            dev: VirtioFs::new("ember-test", share.to_path_buf(), opts).unwrap(),
            unique: 0,
            uid: meta.uid(),
            gid: meta.gid(),
        }
    }

    /// Lays out fresh rings and activates the device, as the transport does
    /// at DRIVER_OK.
    fn activate(&mut self) {
        let zero = vec![0u8; 0x1000];
        for addr in QUEUE_ADDR {
            self.mem.write_slice(&zero, GuestAddress(addr)).unwrap();
        }
        self.queues = QUEUE_ADDR
            .iter()
            .map(|a| MockSplitQueue::create(self.mem, GuestAddress(*a), QSIZE))
            .collect();
        self.last_used = [0; NUM_QUEUES];
        let queues: Vec<Queue> = self
            .queues
            .iter()
            .zip(QUEUE_ADDR)
            .map(|(q, base)| {
                let mut q = q.create_queue::<Queue>().unwrap();
                let used = base + USED_OFFSET;
                q.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
                q
            })
            .collect();
        self.evts = (0..NUM_QUEUES)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let dev_evts = self.evts.iter().map(|e| e.try_clone().unwrap()).collect();
        self.dev
            .activate(self.mem.clone(), self.irq.clone(), queues, dev_evts)
            .unwrap();
    }

    /// Publishes one chain of (address, len, flags) descriptors on queue
    /// `q`, kicks, and waits for its used entry: (used len, writable bytes
    /// at RESP_BUF).
    fn submit_chain(&mut self, q: usize, parts: &[(u64, u32, u16)]) -> Option<u32> {
        let mq = &self.queues[q];
        for (i, (addr, len, flags)) in parts.iter().enumerate() {
            let last = i + 1 == parts.len();
            let (flags, next) = if last {
                (*flags, 0)
            } else {
                (*flags | F_NEXT, i as u16 + 1)
            };
            mq.desc_table()
                .store(
                    i as u16,
                    RawDescriptor::from(SplitDescriptor::new(*addr, *len, flags, next)),
                )
                .unwrap();
        }
        let avail = mq.avail();
        let idx = avail.idx().load();
        avail
            .ring()
            .ref_at(usize::from(idx % QSIZE))
            .unwrap()
            .store(0);
        fence(Ordering::SeqCst);
        avail.idx().store(idx.wrapping_add(1));
        fence(Ordering::SeqCst);
        self.evts[q].write(1).unwrap();
        self.wait_used(q, WAIT)
    }

    fn wait_used(&mut self, q: usize, wait: Duration) -> Option<u32> {
        let used = QUEUE_ADDR[q] + USED_OFFSET;
        let deadline = Instant::now() + wait;
        loop {
            fence(Ordering::SeqCst);
            let idx: u16 = self.mem.read_obj(GuestAddress(used + 2)).unwrap();
            if idx != self.last_used[q] {
                break;
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        fence(Ordering::SeqCst);
        let elem = used + 4 + 8 * u64::from(self.last_used[q] % QSIZE);
        let id: u32 = self.mem.read_obj(GuestAddress(elem)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(elem + 4)).unwrap();
        self.last_used[q] = self.last_used[q].wrapping_add(1);
        assert_eq!(id, 0, "used entry for an unknown head");
        Some(len)
    }

    /// Sends raw request bytes with a reply buffer of `resp_len` (0: no
    /// writable descriptor).
    fn raw(&mut self, q: usize, req: &[u8], resp_len: u32) -> Reply {
        self.mem.write_slice(req, GuestAddress(REQ_BUF)).unwrap();
        let zero = vec![0u8; RESP_LEN as usize];
        self.mem.write_slice(&zero, GuestAddress(RESP_BUF)).unwrap();
        let mut parts = vec![(REQ_BUF, req.len() as u32, 0)];
        if resp_len > 0 {
            parts.push((RESP_BUF, resp_len, F_WRITE));
        }
        let used_len = self
            .submit_chain(q, &parts)
            .expect("the device did not complete the chain");
        let mut bytes = vec![0u8; RESP_LEN as usize];
        self.mem
            .read_slice(&mut bytes, GuestAddress(RESP_BUF))
            .unwrap();
        bytes.truncate(used_len as usize);
        Reply { used_len, bytes }
    }

    fn header(&mut self, opcode: u32, nodeid: u64, body_len: usize) -> InHeader {
        self.unique += 1;
        InHeader {
            len: (size_of::<InHeader>() + body_len) as u32,
            opcode,
            unique: self.unique,
            nodeid,
            uid: self.uid,
            gid: self.gid,
            pid: 1,
            padding: 0,
        }
    }

    /// A well-formed request on the request queue.
    fn call(&mut self, opcode: Opcode, nodeid: u64, args: &[&[u8]]) -> Reply {
        let body: Vec<u8> = args.concat();
        let h = self.header(opcode as u32, nodeid, body.len());
        let req = [h.as_slice(), &body].concat();
        let r = self.raw(REQUEST_QUEUE, &req, RESP_LEN);
        if r.used_len as usize >= size_of::<OutHeader>() {
            assert_eq!(
                r.header().unique,
                h.unique,
                "reply to another request: op {} {:?} {}",
                h.opcode,
                r.header(),
                r.used_len
            );
        }
        r
    }

    fn init(&mut self) -> InitOut {
        let args = InitIn {
            major: 7,
            minor: 31,
            max_readahead: 0x2_0000,
            flags: 0,
        };
        let r = self.call(Opcode::Init, 0, &[args.as_slice()]);
        r.ok().body()
    }

    fn lookup(&mut self, parent: u64, name: &str) -> Result<EntryOut, i32> {
        let name = cstr(name);
        let r = self.call(Opcode::Lookup, parent, &[&name]);
        match r.error() {
            0 => Ok(r.ok().body()),
            e => Err(-e),
        }
    }

    fn getattr(&mut self, nodeid: u64) -> Result<AttrOut, i32> {
        let r = self.call(Opcode::Getattr, nodeid, &[GetattrIn::default().as_slice()]);
        match r.error() {
            0 => Ok(r.ok().body()),
            e => Err(-e),
        }
    }

    fn open(&mut self, opcode: Opcode, nodeid: u64, flags: i32) -> Result<u64, i32> {
        let args = OpenIn {
            flags: flags as u32,
            fuse_flags: 0,
        };
        let r = self.call(opcode, nodeid, &[args.as_slice()]);
        match r.error() {
            0 => Ok(r.ok().body::<OpenOut>().fh),
            e => Err(-e),
        }
    }

    fn read(&mut self, opcode: Opcode, nodeid: u64, fh: u64, size: u32) -> Reply {
        let args = ReadIn {
            fh,
            offset: 0,
            size,
            ..Default::default()
        };
        self.call(opcode, nodeid, &[args.as_slice()])
    }

    fn release(&mut self, opcode: Opcode, nodeid: u64, fh: u64) {
        let args = ReleaseIn {
            fh,
            ..Default::default()
        };
        self.call(opcode, nodeid, &[args.as_slice()]).ok();
    }
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// tempdir/{share/{hello.txt, sub/}, outside.txt}
fn share() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let share = tmp.path().join("share");
    fs::create_dir(&share).unwrap();
    fs::write(share.join("hello.txt"), b"hello from the host\n").unwrap();
    fs::create_dir(share.join("sub")).unwrap();
    fs::write(tmp.path().join("outside.txt"), b"host secret\n").unwrap();
    (tmp, share)
}

/// Parses FUSE_READDIR output into names.
fn dirent_names(mut data: &[u8]) -> Vec<String> {
    let mut names = Vec::new();
    while data.len() >= size_of::<Dirent>() {
        let d: Dirent = read_obj(data, 0);
        let start = size_of::<Dirent>();
        let end = start + d.namelen as usize;
        names.push(String::from_utf8_lossy(&data[start..end]).into_owned());
        let padded = (end + 7) & !7;
        data = &data[padded.min(data.len())..];
    }
    names.sort();
    names
}

fn process_umask() -> String {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find(|l| l.starts_with("Umask:"))
        .unwrap_or("Umask: unknown")
        .to_string()
}

#[test]
fn identity_and_config_space() {
    let (_tmp, share) = share();
    let dev = VirtioFs::new("myfs", share.clone(), FsOptions::default()).unwrap();
    assert_eq!(dev.device_type(), TYPE_FS);
    assert_eq!(dev.avail_features(), 1 << 32);
    assert_eq!(dev.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
    assert_eq!(dev.tag(), "myfs");
    assert_eq!(dev.shared_dir(), share.canonicalize().unwrap());

    let mut tag = [0xffu8; TAG_LEN];
    dev.read_config(0, &mut tag);
    assert_eq!(&tag[..4], b"myfs");
    assert!(tag[4..].iter().all(|b| *b == 0));
    let mut nrq = [0u8; 4];
    dev.read_config(TAG_LEN as u64, &mut nrq);
    assert_eq!(u32::from_le_bytes(nrq), 1);
    // Byte-wise reads as the driver does them.
    let mut b = [0u8; 1];
    dev.read_config(1, &mut b);
    assert_eq!(b[0], b'y');
    // Out-of-range reads are zeroed, never panic.
    let mut out = [0xffu8; 8];
    dev.read_config(CONFIG_SPACE_SIZE as u64 - 2, &mut out);
    assert_eq!(out, [0; 8]);
    dev.read_config(u64::MAX, &mut out);
    assert_eq!(out, [0; 8]);

    // The config space is read-only.
    let mut dev = dev;
    dev.write_config(0, b"evil");
    dev.read_config(0, &mut tag);
    assert_eq!(&tag[..4], b"myfs");

    // A 36-byte tag fills the field without a terminator.
    let long = "t".repeat(TAG_LEN);
    let dev = VirtioFs::new(&long, share, FsOptions::default()).unwrap();
    dev.read_config(0, &mut tag);
    assert_eq!(&tag[..], long.as_bytes());
}

#[test]
fn new_rejects_bad_tags_dirs_and_options() {
    let (tmp, share) = share();
    let o = FsOptions::default;
    assert!(matches!(
        VirtioFs::new("", share.clone(), o()),
        Err(FsError::InvalidTag { .. })
    ));
    assert!(matches!(
        VirtioFs::new(&"x".repeat(TAG_LEN + 1), share.clone(), o()),
        Err(FsError::InvalidTag { .. })
    ));
    assert!(matches!(
        VirtioFs::new("a\0b", share.clone(), o()),
        Err(FsError::InvalidTag { .. })
    ));
    assert!(matches!(
        VirtioFs::new("t", tmp.path().join("missing"), o()),
        Err(FsError::SharedDir { .. })
    ));
    assert!(matches!(
        VirtioFs::new("t", share.join("hello.txt"), o()),
        Err(FsError::NotADirectory(_))
    ));
    let bad = FsOptions {
        cache: CachePolicy::Never,
        writeback: true,
        ..o()
    };
    assert!(matches!(
        VirtioFs::new("t", share.clone(), bad),
        Err(FsError::InvalidOptions(_))
    ));
    let xattr = FsOptions { xattr: true, ..o() };
    assert!(matches!(
        VirtioFs::new("t", share.clone(), xattr),
        Err(FsError::InvalidOptions(_))
    ));
    for limits in [
        FsLimits {
            max_inodes: 0,
            ..FsLimits::default()
        },
        FsLimits {
            max_handles: 0,
            ..FsLimits::default()
        },
        FsLimits {
            max_inodes: 10,
            max_known_inodes: 9,
            ..FsLimits::default()
        },
    ] {
        let bad = FsOptions { limits, ..o() };
        assert!(
            matches!(
                VirtioFs::new("t", share.clone(), bad),
                Err(FsError::InvalidOptions(_))
            ),
            "{limits:?}"
        );
    }
}

#[test]
fn activate_checks_queue_count() {
    let (_tmp, share) = share();
    let mut dev = VirtioFs::new("t", share, FsOptions::default()).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let q = MockSplitQueue::create(&mem, GuestAddress(0x1000), QSIZE);
    let err = dev
        .activate(
            mem.clone(),
            Arc::new(CountingIrq::default()),
            vec![q.create_queue::<Queue>().unwrap()],
            vec![EventFd::new(EFD_NONBLOCK).unwrap()],
        )
        .unwrap_err();
    assert!(matches!(
        err,
        crate::devices::virtio::ActivateError::QueueCount { expected: 2, .. }
    ));
    assert!(!dev.is_active());
}

#[test]
fn init_lookup_getattr_open_read_readdir() {
    let (_tmp, share) = share();
    let umask_before = process_umask();
    let mut g = Guest::start(&share, FsOptions::default());

    let init = g.init();
    assert_eq!(init.major, 7);
    assert!(init.minor >= 31);
    // FUSE_INIT made the backend set umask(0) on the worker thread only.
    assert_eq!(process_umask(), umask_before);

    // LOOKUP + GETATTR.
    let e = g.lookup(ROOT_ID, "hello.txt").unwrap();
    let host = fs::metadata(share.join("hello.txt")).unwrap();
    assert_ne!(e.nodeid, ROOT_ID);
    assert_eq!(e.attr.ino, host.ino());
    assert_eq!(e.attr.size, 20);
    assert_eq!(e.attr.mode & libc::S_IFMT, libc::S_IFREG);
    assert_eq!(e.entry_valid, 1, "entry timeout of the default options");
    let a = g.getattr(e.nodeid).unwrap();
    assert_eq!(a.attr.size, 20);
    assert_eq!(a.attr.ino, host.ino());
    let root = g.getattr(ROOT_ID).unwrap();
    assert_eq!(root.attr.ino, fs::metadata(&share).unwrap().ino());

    // OPEN + READ.
    let fh = g.open(Opcode::Open, e.nodeid, libc::O_RDONLY).unwrap();
    let r = g.read(Opcode::Read, e.nodeid, fh, 4096);
    assert_eq!(r.ok().data(), b"hello from the host\n");
    g.release(Opcode::Release, e.nodeid, fh);

    // A host-side update is visible at the next open (cache=auto).
    fs::write(share.join("hello.txt"), b"updated").unwrap();
    let fh = g.open(Opcode::Open, e.nodeid, libc::O_RDONLY).unwrap();
    let r = g.read(Opcode::Read, e.nodeid, fh, 4096);
    assert_eq!(r.ok().data(), b"updated");
    g.release(Opcode::Release, e.nodeid, fh);

    // OPENDIR + READDIR of the root.
    let dh = g.open(Opcode::Opendir, ROOT_ID, libc::O_RDONLY).unwrap();
    let r = g.read(Opcode::Readdir, ROOT_ID, dh, 4096);
    // The passthrough leaves out "." and "..".
    assert_eq!(dirent_names(r.ok().data()), vec!["hello.txt", "sub"]);
    g.release(Opcode::Releasedir, ROOT_ID, dh);

    // FORGET on the hiprio queue has no reply.
    let h = g.header(Opcode::Forget as u32, e.nodeid, size_of::<ForgetIn>());
    let req = [h.as_slice(), ForgetIn { nlookup: 1 }.as_slice()].concat();
    assert_eq!(g.raw(HIPRIO_QUEUE, &req, 0).used_len, 0);
    // ... and the nodeid is gone afterwards.
    assert_eq!(g.getattr(e.nodeid).unwrap_err(), libc::EBADF);

    assert!(g.irq.count.load(Ordering::SeqCst) > 0);
    assert_eq!(
        g.irq.status.load(Ordering::SeqCst) as u32,
        VIRTIO_MMIO_INT_VRING
    );
    g.dev.shutdown();
}

#[test]
fn create_and_write_reach_the_host() {
    let (_tmp, share) = share();
    let mut g = Guest::start(&share, FsOptions::default());
    g.init();

    let args = CreateIn {
        flags: (libc::O_WRONLY | libc::O_CREAT) as u32,
        mode: libc::S_IFREG | 0o666,
        umask: 0o002,
        fuse_flags: 0,
    };
    let r = g.call(
        Opcode::Create,
        ROOT_ID,
        &[args.as_slice(), &cstr("new.txt")],
    );
    r.ok();
    let e: EntryOut = r.body();
    let o: OpenOut = r.body_at(size_of::<EntryOut>());

    let data = b"written by the guest";
    let w = WriteIn {
        fh: o.fh,
        offset: 0,
        size: data.len() as u32,
        ..Default::default()
    };
    let r = g.call(Opcode::Write, e.nodeid, &[w.as_slice(), data]);
    assert_eq!(r.ok().body::<WriteOut>().size, data.len() as u32);
    g.release(Opcode::Release, e.nodeid, o.fh);

    let host = share.join("new.txt");
    assert_eq!(fs::read(&host).unwrap(), data);
    // Only the guest's umask applies (not the VMM process's).
    assert_eq!(
        fs::metadata(&host).unwrap().permissions().mode() & 0o777,
        0o664
    );

    // A FIFO is fine; device nodes are refused.
    let fifo = MknodIn {
        mode: libc::S_IFIFO | 0o600,
        rdev: 0,
        umask: 0,
        padding: 0,
    };
    let r = g.call(Opcode::Mknod, ROOT_ID, &[fifo.as_slice(), &cstr("fifo")]);
    r.ok();
    assert!(fs::symlink_metadata(share.join("fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    for (kind, rdev) in [(libc::S_IFBLK, 0x0800), (libc::S_IFCHR, 0x0103)] {
        let dev = MknodIn {
            mode: kind | 0o600,
            rdev,
            umask: 0,
            padding: 0,
        };
        let r = g.call(Opcode::Mknod, ROOT_ID, &[dev.as_slice(), &cstr("disk")]);
        assert_eq!(r.error(), -libc::EPERM);
        assert!(!share.join("disk").exists());
    }
    g.dev.shutdown();
}

#[test]
fn the_root_cannot_be_escaped() {
    let (tmp, share) = share();
    std::os::unix::fs::symlink(tmp.path(), share.join("abs")).unwrap();
    std::os::unix::fs::symlink("../outside.txt", share.join("rel")).unwrap();
    let mut g = Guest::start(&share, FsOptions::default());
    g.init();
    let root_ino = fs::metadata(&share).unwrap().ino();

    // `..` of the root is the root.
    let up = g.lookup(ROOT_ID, "..").unwrap();
    assert_eq!(up.nodeid, ROOT_ID);
    assert_eq!(up.attr.ino, root_ino);
    assert_eq!(
        g.lookup(up.nodeid, "outside.txt").unwrap_err(),
        libc::ENOENT
    );
    // Repeated `..` stays there.
    let up2 = g.lookup(up.nodeid, "..").unwrap();
    assert_eq!(up2.nodeid, ROOT_ID);
    // `..` of a subdirectory leads back to the root's nodeid.
    let sub = g.lookup(ROOT_ID, "sub").unwrap();
    let back = g.lookup(sub.nodeid, "..").unwrap();
    assert_eq!(back.nodeid, ROOT_ID);
    assert_eq!(g.lookup(back.nodeid, "..").unwrap().nodeid, ROOT_ID);
    // Multi-component names are refused.
    assert_eq!(
        g.lookup(ROOT_ID, "../outside.txt").unwrap_err(),
        libc::EINVAL
    );
    assert_eq!(
        g.lookup(sub.nodeid, "../../outside.txt").unwrap_err(),
        libc::EINVAL
    );
    assert_eq!(g.lookup(ROOT_ID, "/etc").unwrap_err(), libc::EINVAL);

    // Symlinks are served as symlinks and never followed on the host.
    for name in ["abs", "rel"] {
        let l = g.lookup(ROOT_ID, name).unwrap();
        assert_eq!(l.attr.mode & libc::S_IFMT, libc::S_IFLNK, "{name}");
        assert!(g.lookup(l.nodeid, "outside.txt").is_err(), "{name}");
        assert!(
            g.open(Opcode::Open, l.nodeid, libc::O_RDONLY).is_err(),
            "{name}"
        );
        assert!(
            g.open(Opcode::Opendir, l.nodeid, libc::O_RDONLY).is_err(),
            "{name}"
        );
    }
    let l = g.lookup(ROOT_ID, "rel").unwrap();
    let r = g.call(Opcode::Readlink, l.nodeid, &[]);
    assert_eq!(r.ok().data(), b"../outside.txt");

    // Nodeids never handed out are refused.
    assert_eq!(g.lookup(0xdead_beef, "x").unwrap_err(), libc::EBADF);
    assert_eq!(g.getattr(0).unwrap_err(), libc::EBADF);
    assert_eq!(g.getattr(u64::MAX).unwrap_err(), libc::EBADF);
    g.dev.shutdown();
}

#[test]
fn garbage_requests_get_errors_and_the_device_keeps_serving() {
    let (_tmp, share) = share();
    let mut g = Guest::start(&share, FsOptions::default());
    g.init();

    // Too short for a FUSE header: dropped.
    assert_eq!(
        g.raw(REQUEST_QUEUE, &[1, 2, 3, 4, 5, 6, 7, 8], RESP_LEN)
            .used_len,
        0
    );

    // Header len beyond the chain, or shorter than the header: EINVAL.
    for len in [9999u32, 10, 0] {
        let mut h = g.header(Opcode::Getattr as u32, ROOT_ID, size_of::<GetattrIn>());
        h.len = len;
        let req = [h.as_slice(), GetattrIn::default().as_slice()].concat();
        let r = g.raw(REQUEST_QUEUE, &req, RESP_LEN);
        assert_eq!(r.error(), -libc::EINVAL, "len {len}");
        assert_eq!(r.header().unique, h.unique);
    }

    // A chain longer than its header's len (trailing bytes the header
    // does not account for): EINVAL, nothing served.
    let body = [GetattrIn::default().as_slice(), &[0u8; 16]].concat();
    let h = g.header(Opcode::Getattr as u32, ROOT_ID, size_of::<GetattrIn>());
    let r = g.raw(REQUEST_QUEUE, &[h.as_slice(), &body].concat(), RESP_LEN);
    assert_eq!(r.error(), -libc::EINVAL);
    assert_eq!(r.header().unique, h.unique);

    // A request longer than the largest the server takes: EINVAL, and
    // not copied.
    let big = super::request::MAX_REQUEST_LEN + 1 - size_of::<InHeader>();
    let h = g.header(Opcode::Write as u32, ROOT_ID, big);
    g.mem
        .write_slice(h.as_slice(), GuestAddress(REQ_BUF))
        .unwrap();
    let used = g.submit_chain(
        REQUEST_QUEUE,
        &[
            (REQ_BUF, size_of::<InHeader>() as u32, 0),
            (0x28_0000, big as u32, 0),
            (RESP_BUF, 4096, F_WRITE),
        ],
    );
    assert_eq!(used, Some(size_of::<OutHeader>() as u32));
    let out: OutHeader = g.mem.read_obj(GuestAddress(RESP_BUF)).unwrap();
    assert_eq!((out.error, out.unique), (-libc::EINVAL, h.unique));

    // Unknown opcodes (including the holes of the opcode space and DAX
    // mapping requests): ENOSYS; IOCTL: ENOTTY.
    for op in [7u32, 19, 47, 48, 49, 50, 9999, u32::MAX] {
        let r = g.call_op(op, ROOT_ID, &[0u8; 64]);
        assert_eq!(r.error(), -libc::ENOSYS, "opcode {op}");
    }
    let r = g.call_op(Opcode::Ioctl as u32, ROOT_ID, &[0u8; 64]);
    assert_eq!(r.error(), -libc::ENOTTY);

    // Truncated arguments: the library fails to decode, the worker answers.
    let r = g.call(Opcode::Getattr, ROOT_ID, &[]);
    assert_eq!(r.error(), -libc::EINVAL);
    let r = g.call(Opcode::Read, ROOT_ID, &[&[0u8; 3]]);
    assert_eq!(r.error(), -libc::EINVAL);
    // A name without its NUL terminator.
    let r = g.call(Opcode::Lookup, ROOT_ID, &[b"hello.txt"]);
    assert_eq!(r.error(), -libc::EINVAL);
    // READ on a handle never opened.
    let r = g.read(Opcode::Read, ROOT_ID, 0x1234, 4096);
    assert!(r.error() < 0);
    // A huge READ size.
    let r = g.read(Opcode::Read, ROOT_ID, 0x1234, u32::MAX);
    assert!(r.error() < 0);

    // A request without a reply buffer cannot be answered: dropped.
    let name = cstr("hello.txt");
    let h = g.header(Opcode::Lookup as u32, ROOT_ID, name.len());
    let req = [h.as_slice(), &name].concat();
    assert_eq!(g.raw(REQUEST_QUEUE, &req, 0).used_len, 0);
    // A reply buffer too small for the reply: dropped or an error header.
    let r = g.raw(REQUEST_QUEUE, &req, 8);
    assert_eq!(r.used_len, 0);

    // Descriptors outside guest memory: dropped.
    let outside = MEM_SIZE as u64 + 0x1000;
    assert_eq!(
        g.submit_chain(REQUEST_QUEUE, &[(outside, 64, 0), (RESP_BUF, 64, F_WRITE)]),
        Some(0)
    );
    assert_eq!(
        g.submit_chain(REQUEST_QUEUE, &[(MEM_SIZE as u64 - 8, 64, 0)]),
        Some(0)
    );
    g.mem
        .write_slice(req.as_slice(), GuestAddress(REQ_BUF))
        .unwrap();
    assert_eq!(
        g.submit_chain(
            REQUEST_QUEUE,
            &[(REQ_BUF, req.len() as u32, 0), (outside, 4096, F_WRITE)]
        ),
        Some(0)
    );
    // Only writable descriptors.
    assert_eq!(
        g.submit_chain(REQUEST_QUEUE, &[(RESP_BUF, 4096, F_WRITE)]),
        Some(0)
    );

    // FORGET of a nodeid never looked up, and garbage on the hiprio queue.
    let h = g.header(Opcode::Forget as u32, 0xdead, size_of::<ForgetIn>());
    let req = [h.as_slice(), ForgetIn { nlookup: 5 }.as_slice()].concat();
    assert_eq!(g.raw(HIPRIO_QUEUE, &req, 0).used_len, 0);
    let h = g.header(Opcode::BatchForget as u32, 0, 4);
    let req = [h.as_slice(), &u32::MAX.to_le_bytes()].concat();
    assert_eq!(g.raw(HIPRIO_QUEUE, &req, 0).used_len, 0);
    assert_eq!(g.raw(HIPRIO_QUEUE, &[0xff; 3], 0).used_len, 0);

    // A second FUSE_INIT is harmless.
    g.init();

    // The device still answers.
    let e = g.lookup(ROOT_ID, "hello.txt").unwrap();
    assert_eq!(g.getattr(e.nodeid).unwrap().attr.size, 20);
    g.dev.shutdown();
}

impl Guest {
    /// A request with an arbitrary opcode and body.
    fn call_op(&mut self, opcode: u32, nodeid: u64, body: &[u8]) -> Reply {
        let h = self.header(opcode, nodeid, body.len());
        let req = [h.as_slice(), body].concat();
        self.raw(REQUEST_QUEUE, &req, RESP_LEN)
    }
}

#[test]
fn read_only_device_refuses_writes() {
    let (_tmp, share) = share();
    let opts = FsOptions {
        read_only: true,
        ..FsOptions::default()
    };
    let mut g = Guest::start(&share, opts);
    g.init();
    let e = g.lookup(ROOT_ID, "hello.txt").unwrap();

    let fh = g.open(Opcode::Open, e.nodeid, libc::O_RDONLY).unwrap();
    let r = g.read(Opcode::Read, e.nodeid, fh, 4096);
    assert_eq!(r.ok().data(), b"hello from the host\n");
    g.release(Opcode::Release, e.nodeid, fh);

    for flags in [libc::O_WRONLY, libc::O_RDWR, libc::O_RDONLY | libc::O_TRUNC] {
        assert_eq!(
            g.open(Opcode::Open, e.nodeid, flags).unwrap_err(),
            libc::EROFS
        );
    }
    let args = CreateIn {
        flags: (libc::O_WRONLY | libc::O_CREAT) as u32,
        mode: libc::S_IFREG | 0o644,
        umask: 0,
        fuse_flags: 0,
    };
    let r = g.call(
        Opcode::Create,
        ROOT_ID,
        &[args.as_slice(), &cstr("new.txt")],
    );
    assert_eq!(r.error(), -libc::EROFS);
    let r = g.call(Opcode::Unlink, ROOT_ID, &[&cstr("hello.txt")]);
    assert_eq!(r.error(), -libc::EROFS);
    assert!(!share.join("new.txt").exists());
    assert!(share.join("hello.txt").exists());
    g.dev.shutdown();
}

#[test]
fn reset_drops_the_backend_state_and_reactivates() {
    let (_tmp, share) = share();
    let mut g = Guest::start(&share, FsOptions::default());
    g.init();
    let e = g.lookup(ROOT_ID, "hello.txt").unwrap();
    assert!(g.dev.is_active());

    assert!(g.dev.reset());
    assert!(!g.dev.is_active());
    // A kick after the reset is not served.
    let zero = [0u8; 8];
    g.mem.write_slice(&zero, GuestAddress(REQ_BUF)).unwrap();
    g.evts[REQUEST_QUEUE].write(1).unwrap();

    g.activate();
    assert!(g.dev.is_active());
    g.init();
    // The old nodeid died with the old backend.
    assert_eq!(g.getattr(e.nodeid).unwrap_err(), libc::EBADF);
    let e2 = g.lookup(ROOT_ID, "hello.txt").unwrap();
    assert_eq!(g.getattr(e2.nodeid).unwrap().attr.size, 20);
    g.dev.shutdown();
}

#[test]
fn a_restored_device_serves_the_root_without_fuse_init() {
    let (_tmp, share) = share();
    let umask_before = process_umask();
    let mut g = Guest::start(&share, FsOptions::default());
    // Without FUSE_INIT a fresh backend knows no root inode.
    assert_eq!(g.lookup(ROOT_ID, "hello.txt").unwrap_err(), libc::EBADF);

    // As after a snapshot restore: the guest mounted the share long ago.
    assert!(g.dev.reset());
    g.dev.mark_restored();
    g.activate();
    let e = g.lookup(ROOT_ID, "hello.txt").unwrap();
    assert_eq!(g.getattr(e.nodeid).unwrap().attr.size, 20);
    assert_eq!(
        process_umask(),
        umask_before,
        "the import ran on the worker"
    );

    // Only the activation right after the restore imports by itself.
    assert!(g.dev.reset());
    g.activate();
    assert_eq!(g.lookup(ROOT_ID, "hello.txt").unwrap_err(), libc::EBADF);
    g.dev.shutdown();
}

#[test]
fn shutdown_joins_the_worker_and_is_idempotent() {
    let (_tmp, share) = share();
    let mut g = Guest::start(&share, FsOptions::default());
    g.init();
    // Activating twice is refused.
    let err = g
        .dev
        .activate(g.mem.clone(), g.irq.clone(), Vec::new(), Vec::new())
        .unwrap_err();
    assert!(matches!(
        err,
        crate::devices::virtio::ActivateError::AlreadyActive
    ));

    g.dev.shutdown();
    assert!(!g.dev.is_active());
    g.dev.shutdown();

    // Nobody serves the queue any more.
    let h = g.header(Opcode::Getattr as u32, ROOT_ID, size_of::<GetattrIn>());
    let req = [h.as_slice(), GetattrIn::default().as_slice()].concat();
    g.mem.write_slice(&req, GuestAddress(REQ_BUF)).unwrap();
    let mq = &g.queues[REQUEST_QUEUE];
    mq.desc_table()
        .store(
            0,
            RawDescriptor::from(SplitDescriptor::new(REQ_BUF, req.len() as u32, 0, 0)),
        )
        .unwrap();
    let avail = mq.avail();
    let idx = avail.idx().load();
    avail
        .ring()
        .ref_at(usize::from(idx % QSIZE))
        .unwrap()
        .store(0);
    avail.idx().store(idx.wrapping_add(1));
    g.evts[REQUEST_QUEUE].write(1).unwrap();
    assert_eq!(g.wait_used(REQUEST_QUEUE, Duration::from_millis(100)), None);
}

#[test]
fn worker_thread_is_named() {
    let (_tmp, share) = share();
    let g = Guest::start(&share, FsOptions::default());
    let names: Vec<String> = fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|s| s.trim().to_string())
        .collect();
    assert!(names.iter().any(|n| n == "ember-virtiofs"), "{names:?}");
    drop(g);
}

/// Fuzzing finding (virtio_fs target; issue 9, finding 7), against the
/// fake guest driver above: FUSE_OPEN with `O_PATH` among its flags gets
/// an `O_PATH` handle; a WRITE on it fails inside fuse-backend-rs 0.14's
/// passthrough `write` after it wrapped the handle's borrowed fd in a
/// `File`, whose drop on that error path closes the fd the handle still
/// owns, so RELEASE closes the same number a second time: whatever the
/// VMM opened there meanwhile (an abort in debug builds, a closed
/// unrelated descriptor in release builds). A Linux guest never sends
/// `O_PATH` in FUSE_OPEN (such opens do not reach FUSE), so the device
/// must refuse these flags before the library sees them. Reproducer:
/// `fuzz/corpus/virtio_fs/crash-c647252b1f3a8d8d333dcedfa274ea196a06c32f`.
#[test]
fn open_with_o_path_is_refused() {
    let (_tmp, share) = share();
    let mut g = Guest::start(&share, FsOptions::default());
    g.init();
    let e = g.lookup(ROOT_ID, "hello.txt").unwrap();
    let r = g.open(Opcode::Open, e.nodeid, libc::O_RDWR | libc::O_PATH);
    assert!(r.is_err(), "FUSE_OPEN with O_PATH was served: {r:?}");
}
