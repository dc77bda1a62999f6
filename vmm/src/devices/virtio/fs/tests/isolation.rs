//! Tests that play a hostile guest against the device's isolation: a vCPU
//! rewriting a request behind the device's back, a guest exhausting the
//! backend's tables, writes to a read-only share, and a worker that must
//! not reach outside its share.
//!
//! As in the parent module, [`Guest`] FAKES THE PEER (the guest's virtio-fs
//! driver) over real virtqueues; the racing vCPU is faked by the device's
//! after-copy test hook, which rewrites the request in guest memory right
//! after the device copied it, the worst moment for a device that would
//! read guest memory twice.

use std::fs;
use std::mem::size_of;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use fuse_backend_rs::abi::fuse_abi::{
    CreateIn, EntryOut, FallocateIn, ForgetIn, LinkIn, MkdirIn, MknodIn, Opcode, OpenIn, OpenOut,
    Rename2In, RenameIn, SetattrIn, SetxattrIn, WriteIn, ROOT_ID,
};
use vm_memory::{ByteValued, Bytes, GuestAddress};

use super::*;
use crate::config::FsLimits;

/// A vCPU stand-in: once armed, it overwrites the request buffer with the
/// armed bytes right after the device copied the next request.
struct RacingVcpu {
    armed: Arc<Mutex<Option<Vec<u8>>>>,
    runs: Arc<AtomicUsize>,
}

impl RacingVcpu {
    /// Installs the hook; call before the device is activated.
    fn install(g: &mut Guest) -> Self {
        let armed: Arc<Mutex<Option<Vec<u8>>>> = Arc::default();
        let runs = Arc::new(AtomicUsize::new(0));
        let mem = g.mem;
        let (a, r) = (armed.clone(), runs.clone());
        g.dev.after_copy = Some(Arc::new(move || {
            if let Some(evil) = a.lock().unwrap().take() {
                mem.write_slice(&evil, GuestAddress(REQ_BUF)).unwrap();
                r.fetch_add(1, Ordering::SeqCst);
            }
        }));
        Self { armed, runs }
    }

    fn arm(&self, evil: Vec<u8>) {
        *self.armed.lock().unwrap() = Some(evil);
    }

    fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }
}

fn mknod_req(g: &mut Guest, mode: u32, rdev: u32, name: &str) -> Vec<u8> {
    let args = MknodIn {
        mode,
        rdev,
        umask: 0,
        padding: 0,
    };
    let name = cstr(name);
    let h = g.header(
        Opcode::Mknod as u32,
        ROOT_ID,
        size_of::<MknodIn>() + name.len(),
    );
    [h.as_slice(), args.as_slice(), &name].concat()
}

/// A FIFO MKNOD is screened and allowed; a vCPU then turns it, in guest
/// memory, into a MKNOD of a character device with the same name and
/// length. The device serves what it screened: a FIFO.
#[test]
fn a_request_rewritten_after_screening_is_served_as_screened() {
    let (_tmp, share) = share();
    let mut g = Guest::new(&share, FsOptions::default());
    let vcpu = RacingVcpu::install(&mut g);
    g.activate();
    g.init();

    let allowed = mknod_req(&mut g, libc::S_IFIFO | 0o600, 0, "node");
    let mut evil = mknod_req(&mut g, libc::S_IFCHR | 0o600, 0x0103, "node");
    // Same request id, so the reply matches either way.
    evil[8..16].copy_from_slice(&allowed[8..16]);
    assert_eq!(allowed.len(), evil.len());
    vcpu.arm(evil.clone());
    let r = g.raw(REQUEST_QUEUE, &allowed, RESP_LEN);
    assert_eq!(vcpu.runs(), 1, "the racing vCPU ran");
    let mut in_guest = vec![0u8; evil.len()];
    g.mem
        .read_slice(&mut in_guest, GuestAddress(REQ_BUF))
        .unwrap();
    assert_eq!(in_guest, evil, "guest memory held the device node request");

    r.ok();
    let meta = fs::symlink_metadata(share.join("node")).unwrap();
    assert!(meta.file_type().is_fifo(), "{:?}", meta.file_type());
    assert_eq!(meta.rdev(), 0);
    g.dev.shutdown();
}

/// On a read-only share an O_RDONLY OPEN passes screening; a vCPU then
/// rewrites its flags to O_RDWR|O_TRUNC. The file keeps its content.
#[test]
fn a_read_only_open_rewritten_to_truncate_truncates_nothing() {
    let (_tmp, share) = share();
    let opts = FsOptions {
        read_only: true,
        ..FsOptions::default()
    };
    let mut g = Guest::new(&share, opts);
    let vcpu = RacingVcpu::install(&mut g);
    g.activate();
    g.init();
    let e = g.lookup(ROOT_ID, "hello.txt").unwrap();

    let h = g.header(Opcode::Open as u32, e.nodeid, size_of::<OpenIn>());
    let open = |flags: i32| OpenIn {
        flags: flags as u32,
        fuse_flags: 0,
    };
    let allowed = [h.as_slice(), open(libc::O_RDONLY).as_slice()].concat();
    let evil = [h.as_slice(), open(libc::O_RDWR | libc::O_TRUNC).as_slice()].concat();
    vcpu.arm(evil);
    let r = g.raw(REQUEST_QUEUE, &allowed, RESP_LEN);
    assert_eq!(vcpu.runs(), 1, "the racing vCPU ran");
    let fh = r.ok().body::<OpenOut>().fh;
    assert_eq!(
        fs::read(share.join("hello.txt")).unwrap(),
        b"hello from the host\n"
    );
    // The handle is read-only: a WRITE through it is refused anyway.
    g.release(Opcode::Release, e.nodeid, fh);
    g.dev.shutdown();
}

fn capped(max_inodes: u64, max_handles: u64, max_known_inodes: u64) -> FsOptions {
    FsOptions {
        limits: FsLimits {
            max_inodes,
            max_handles,
            max_known_inodes,
        },
        ..FsOptions::default()
    }
}

fn forget(g: &mut Guest, nodeid: u64, nlookup: u64) {
    let h = g.header(Opcode::Forget as u32, nodeid, size_of::<ForgetIn>());
    let req = [h.as_slice(), ForgetIn { nlookup }.as_slice()].concat();
    assert_eq!(g.raw(HIPRIO_QUEUE, &req, 0).used_len, 0);
}

fn usage(g: &Guest) -> super::super::limits::Usage {
    g.dev.backend.as_ref().expect("device active").usage()
}

/// The guest holds at most `max_inodes` inodes: one more LOOKUP, MKDIR or
/// READDIRPLUS entry gets ENFILE and the host tree is untouched; inodes it
/// already holds keep working; FORGET makes room again.
#[test]
fn inode_cap_gives_enfile_and_forget_frees() {
    let (_tmp, share) = share();
    for n in ["a", "b", "c"] {
        fs::write(share.join(n), n).unwrap();
    }
    fs::create_dir(share.join("d")).unwrap();
    fs::write(share.join("d/x"), "x").unwrap();
    let mut g = Guest::start(&share, capped(3, 16, 1000));
    g.init();
    let d = g.lookup(ROOT_ID, "d").unwrap();
    let dh = g.open(Opcode::Opendir, d.nodeid, libc::O_RDONLY).unwrap();
    let a = g.lookup(ROOT_ID, "a").unwrap();
    let b = g.lookup(ROOT_ID, "b").unwrap();
    assert_eq!(usage(&g).inodes, 3);

    assert_eq!(g.lookup(ROOT_ID, "c").unwrap_err(), libc::ENFILE);
    let mkdir = MkdirIn {
        mode: 0o755,
        umask: 0,
    };
    let r = g.call(Opcode::Mkdir, ROOT_ID, &[mkdir.as_slice(), &cstr("newdir")]);
    assert_eq!(r.error(), -libc::ENFILE);
    assert!(!share.join("newdir").exists());
    // READDIRPLUS of a directory of new inodes: ENFILE, not an empty list.
    let r = g.read(Opcode::Readdirplus, d.nodeid, dh, 4096);
    assert_eq!(r.error(), -libc::ENFILE);
    // What the guest holds still answers, and the root always does.
    assert_eq!(g.lookup(ROOT_ID, "a").unwrap().nodeid, a.nodeid);
    assert!(g.getattr(b.nodeid).is_ok());
    assert_eq!(g.lookup(ROOT_ID, "..").unwrap().nodeid, ROOT_ID);
    assert_eq!(usage(&g).inodes, 3, "refused lookups are not kept");

    // `a` was looked up twice.
    forget(&mut g, a.nodeid, 2);
    assert_eq!(usage(&g).inodes, 2);
    let c = g.lookup(ROOT_ID, "c").unwrap();
    assert_eq!(g.getattr(c.nodeid).unwrap().attr.size, 1);
    forget(&mut g, c.nodeid, 1);
    let r = g.read(Opcode::Readdirplus, d.nodeid, dh, 4096);
    assert!(r.ok().data().len() > size_of::<EntryOut>(), "x is listed");
    g.release(Opcode::Releasedir, d.nodeid, dh);
    g.dev.shutdown();
}

/// The guest holds at most `max_handles` open files and directories: one
/// more OPEN, OPENDIR or CREATE gets EMFILE (CREATE creates nothing);
/// RELEASE makes room again.
#[test]
fn handle_cap_gives_emfile_and_release_frees() {
    let (_tmp, share) = share();
    let mut g = Guest::start(&share, capped(100, 2, 1000));
    g.init();
    let e = g.lookup(ROOT_ID, "hello.txt").unwrap();
    let f1 = g.open(Opcode::Open, e.nodeid, libc::O_RDONLY).unwrap();
    let d1 = g.open(Opcode::Opendir, ROOT_ID, libc::O_RDONLY).unwrap();
    assert_eq!(usage(&g).handles, 2);

    assert_eq!(
        g.open(Opcode::Open, e.nodeid, libc::O_RDONLY).unwrap_err(),
        libc::EMFILE
    );
    assert_eq!(
        g.open(Opcode::Opendir, ROOT_ID, libc::O_RDONLY)
            .unwrap_err(),
        libc::EMFILE
    );
    let args = CreateIn {
        flags: (libc::O_WRONLY | libc::O_CREAT) as u32,
        mode: libc::S_IFREG | 0o644,
        umask: 0,
        fuse_flags: 0,
    };
    let r = g.call(Opcode::Create, ROOT_ID, &[args.as_slice(), &cstr("new")]);
    assert_eq!(r.error(), -libc::EMFILE);
    assert!(!share.join("new").exists());
    // Open handles still work.
    let r = g.read(Opcode::Read, e.nodeid, f1, 64);
    assert_eq!(r.ok().data(), b"hello from the host\n");

    g.release(Opcode::Release, e.nodeid, f1);
    assert_eq!(usage(&g).handles, 1);
    let r = g.call(Opcode::Create, ROOT_ID, &[args.as_slice(), &cstr("new")]);
    r.ok();
    assert!(share.join("new").exists());
    g.release(Opcode::Releasedir, ROOT_ID, d1);
    g.dev.shutdown();
}

/// The backend remembers a nodeid for every inode the guest ever looked
/// up, forgotten or not; past `max_known_inodes` new inodes get ENFILE.
#[test]
fn known_inode_cap_bounds_the_forgotten_records() {
    let (_tmp, share) = share();
    for i in 0..4 {
        fs::write(share.join(format!("f{i}")), "x").unwrap();
    }
    let mut g = Guest::start(&share, capped(2, 2, 3));
    g.init();
    let mut first = Vec::new();
    for i in 0..3 {
        let e = g.lookup(ROOT_ID, &format!("f{i}")).unwrap();
        forget(&mut g, e.nodeid, 1);
        first.push(e.nodeid);
    }
    assert_eq!(usage(&g).inodes, 0);
    assert_eq!(usage(&g).known_inodes, 3);
    assert_eq!(g.lookup(ROOT_ID, "f3").unwrap_err(), libc::ENFILE);
    // An inode known before comes back under its old nodeid.
    assert_eq!(g.lookup(ROOT_ID, "f1").unwrap().nodeid, first[1]);
    g.dev.shutdown();
}

/// The library's CREATE of an existing name keeps a reference (and an
/// `O_PATH` descriptor) when opening the file fails; the device must not
/// let a guest pin inodes that way.
#[test]
fn a_failed_create_of_an_existing_file_pins_nothing() {
    let (_tmp, share) = share();
    let mut g = Guest::start(&share, FsOptions::default());
    g.init();
    let fifo = share.canonicalize().unwrap().join("fifo");
    let req = mknod_req(&mut g, libc::S_IFIFO | 0o600, 0, "fifo");
    let r = g.raw(REQUEST_QUEUE, &req, RESP_LEN);
    let e: EntryOut = r.ok().body();
    forget(&mut g, e.nodeid, 1);
    assert_eq!(usage(&g).inodes, 0);
    assert!(
        open_fds_to(&fifo).is_empty(),
        "forgotten: no descriptor left"
    );

    let args = CreateIn {
        flags: libc::O_RDWR as u32,
        mode: libc::S_IFREG | 0o644,
        umask: 0,
        fuse_flags: 0,
    };
    for _ in 0..3 {
        let r = g.call(Opcode::Create, ROOT_ID, &[args.as_slice(), &cstr("fifo")]);
        assert!(r.error() < 0, "a FIFO is never opened");
    }
    assert_eq!(usage(&g).inodes, 0);
    assert_eq!(open_fds_to(&fifo), Vec::<String>::new());
    // `.` and `..` are not names to create.
    for name in [".", ".."] {
        let r = g.call(Opcode::Create, ROOT_ID, &[args.as_slice(), &cstr(name)]);
        assert_eq!(r.error(), -libc::EINVAL, "{name}");
    }
    g.dev.shutdown();
}

/// Descriptors of this process that point at `path`.
fn open_fds_to(path: &Path) -> Vec<String> {
    fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let target = fs::read_link(e.path()).ok()?;
            (target == path).then(|| e.file_name().to_string_lossy().into_owned())
        })
        .collect()
}

/// Every request that would modify a read-only share is refused before
/// the backend sees it, with well-formed arguments; the host tree is
/// unchanged afterwards.
#[test]
fn a_read_only_share_refuses_every_write() {
    let (_tmp, share) = share();
    let snapshot = |p: &Path| {
        let mut v: Vec<(String, u64, i64, Vec<u8>)> = fs::read_dir(p)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let m = fs::symlink_metadata(e.path()).unwrap();
                let data = if m.is_file() {
                    fs::read(e.path()).unwrap()
                } else {
                    Vec::new()
                };
                (
                    e.file_name().to_string_lossy().into_owned(),
                    m.len(),
                    m.mtime(),
                    data,
                )
            })
            .collect();
        v.sort();
        v
    };
    let before = snapshot(&share);
    let opts = FsOptions {
        read_only: true,
        ..FsOptions::default()
    };
    let mut g = Guest::start(&share, opts);
    g.init();
    let file = g.lookup(ROOT_ID, "hello.txt").unwrap().nodeid;
    let sub = g.lookup(ROOT_ID, "sub").unwrap().nodeid;
    let fh = g.open(Opcode::Open, file, libc::O_RDONLY).unwrap();

    let setattr = SetattrIn {
        valid: 0x8, // FATTR_SIZE
        size: 0,
        ..Default::default()
    };
    let mkdir = MkdirIn {
        mode: 0o755,
        umask: 0,
    };
    let mknod = MknodIn {
        mode: libc::S_IFIFO | 0o600,
        rdev: 0,
        umask: 0,
        padding: 0,
    };
    let create = CreateIn {
        flags: (libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC) as u32,
        mode: libc::S_IFREG | 0o644,
        umask: 0,
        fuse_flags: 0,
    };
    let write = WriteIn {
        fh,
        offset: 0,
        size: 4,
        ..Default::default()
    };
    let xattr = SetxattrIn { size: 1, flags: 0 };
    let falloc = FallocateIn {
        fh,
        offset: 0,
        length: 1 << 20,
        mode: 0,
        padding: 0,
    };
    let rename = RenameIn { newdir: ROOT_ID };
    let rename2 = Rename2In {
        newdir: ROOT_ID,
        flags: 0,
        padding: 0,
    };
    let link = LinkIn { oldnodeid: file };
    let copy = fuse_backend_rs::abi::fuse_abi::CopyFileRangeIn {
        fh_in: fh,
        nodeid_out: file,
        fh_out: fh,
        len: 4,
        ..Default::default()
    };
    let cases: Vec<(u32, u64, Vec<u8>, i32)> = vec![
        (
            Opcode::Setattr as u32,
            file,
            setattr.as_slice().to_vec(),
            libc::EROFS,
        ),
        (
            Opcode::Symlink as u32,
            ROOT_ID,
            [cstr("ln"), cstr("/etc/passwd")].concat(),
            libc::EROFS,
        ),
        (
            Opcode::Mknod as u32,
            ROOT_ID,
            [mknod.as_slice(), &cstr("fifo")].concat(),
            libc::EROFS,
        ),
        (
            Opcode::Mkdir as u32,
            ROOT_ID,
            [mkdir.as_slice(), &cstr("d")].concat(),
            libc::EROFS,
        ),
        (
            Opcode::Unlink as u32,
            ROOT_ID,
            cstr("hello.txt"),
            libc::EROFS,
        ),
        (Opcode::Rmdir as u32, ROOT_ID, cstr("sub"), libc::EROFS),
        (
            Opcode::Rename as u32,
            ROOT_ID,
            [rename.as_slice(), &cstr("hello.txt"), &cstr("moved")].concat(),
            libc::EROFS,
        ),
        (
            Opcode::Rename2 as u32,
            ROOT_ID,
            [rename2.as_slice(), &cstr("hello.txt"), &cstr("moved")].concat(),
            libc::EROFS,
        ),
        (
            Opcode::Link as u32,
            sub,
            [link.as_slice(), &cstr("hard")].concat(),
            libc::EROFS,
        ),
        (
            Opcode::Write as u32,
            file,
            [write.as_slice(), b"evil"].concat(),
            libc::EROFS,
        ),
        (
            Opcode::Setxattr as u32,
            file,
            [xattr.as_slice(), &cstr("user.x"), b"v"].concat(),
            libc::EROFS,
        ),
        (
            Opcode::Removexattr as u32,
            file,
            cstr("user.x"),
            libc::EROFS,
        ),
        (
            Opcode::Create as u32,
            ROOT_ID,
            [create.as_slice(), &cstr("hello.txt")].concat(),
            libc::EROFS,
        ),
        (
            Opcode::Fallocate as u32,
            file,
            falloc.as_slice().to_vec(),
            libc::EROFS,
        ),
        // COPY_FILE_RANGE is not served at all.
        (47, file, copy.as_slice().to_vec(), libc::ENOSYS),
    ];
    for (op, nodeid, body, errno) in cases {
        let r = g.call_op(op, nodeid, &body);
        assert_eq!(r.error(), -errno, "opcode {op}");
    }
    for flags in [
        libc::O_WRONLY,
        libc::O_RDWR,
        libc::O_RDONLY | libc::O_TRUNC,
        libc::O_RDONLY | libc::O_CREAT,
        libc::O_WRONLY | libc::O_APPEND,
    ] {
        assert_eq!(
            g.open(Opcode::Open, file, flags).unwrap_err(),
            libc::EROFS,
            "flags {flags:#o}"
        );
    }
    let access = fuse_backend_rs::abi::fuse_abi::AccessIn {
        mask: libc::W_OK as u32,
        padding: 0,
    };
    let r = g.call(Opcode::Access, file, &[access.as_slice()]);
    assert_eq!(r.error(), -libc::EROFS);
    g.release(Opcode::Release, file, fh);
    assert_eq!(snapshot(&share), before);
    g.dev.shutdown();
}

/// The tid of this process's thread whose root is `root`, if any.
fn thread_rooted_at(root: &Path) -> Option<String> {
    fs::read_dir("/proc/self/task").unwrap().find_map(|t| {
        let t = t.ok()?;
        let link = fs::read_link(t.path().join("root")).ok()?;
        (link == root).then(|| t.file_name().to_string_lossy().into_owned())
    })
}

/// The worker thread's root is the share (a chroot of its own fs_struct);
/// the rest of the process keeps `/`. Through the device, `..`, absolute
/// and relative symlinks lead nowhere outside the share: the marker file
/// next to the share is never served.
#[test]
fn the_worker_is_chrooted_and_nothing_outside_is_reachable() {
    let (tmp, share) = share();
    let marker = tmp.path().join("outside.txt");
    std::os::unix::fs::symlink(&marker, share.join("abs_marker")).unwrap();
    std::os::unix::fs::symlink("/", share.join("host_root")).unwrap();
    std::os::unix::fs::symlink("../../../../../../../..", share.join("up")).unwrap();
    let share = share.canonicalize().unwrap();
    let mut g = Guest::start(&share, FsOptions::default());
    g.init();

    let tid = thread_rooted_at(&share).expect("a thread rooted at the share");
    let comm = fs::read_to_string(format!("/proc/self/task/{tid}/comm")).unwrap();
    assert_eq!(comm.trim(), "ember-virtiofs");
    assert_eq!(fs::read_link("/proc/self/root").unwrap(), Path::new("/"));

    assert_eq!(g.lookup(ROOT_ID, "..").unwrap().nodeid, ROOT_ID);
    assert_eq!(g.lookup(ROOT_ID, "outside.txt").unwrap_err(), libc::ENOENT);
    for name in ["abs_marker", "host_root", "up"] {
        let l = g.lookup(ROOT_ID, name).unwrap();
        assert_eq!(l.attr.mode & libc::S_IFMT, libc::S_IFLNK, "{name}");
        assert!(
            g.open(Opcode::Open, l.nodeid, libc::O_RDONLY).is_err(),
            "{name}"
        );
        assert!(
            g.open(Opcode::Opendir, l.nodeid, libc::O_RDONLY).is_err(),
            "{name}"
        );
        assert!(g.lookup(l.nodeid, "outside.txt").is_err(), "{name}");
        assert!(g.lookup(l.nodeid, "etc").is_err(), "{name}");
    }
    // The marker is still there for the host.
    assert_eq!(fs::read(&marker).unwrap(), b"host secret\n");
    g.dev.shutdown();
}

/// What the chroot itself guarantees, on a thread of this test: absolute
/// paths, `..` and absolute symlinks all resolve inside the share, while
/// the other threads keep the host's root.
#[test]
fn a_confined_thread_resolves_every_path_inside_the_share() {
    let (tmp, share) = share();
    let marker = tmp.path().join("outside.txt");
    std::os::unix::fs::symlink(&marker, share.join("abs_marker")).unwrap();
    let fd: std::os::fd::OwnedFd = fs::File::open(&share).unwrap().into();
    let results = std::thread::spawn(move || {
        super::super::chroot::confine_thread_to(&fd).unwrap();
        let read = |p: &str| fs::read(p).map_err(|e| e.raw_os_error());
        (
            read("/hello.txt"),
            read("/../outside.txt"),
            read("../../outside.txt"),
            read("/abs_marker"),
            read(marker.to_str().unwrap()),
        )
    })
    .join()
    .unwrap();
    assert_eq!(results.0, Ok(b"hello from the host\n".to_vec()));
    assert_eq!(results.1, Err(Some(libc::ENOENT)));
    assert_eq!(results.2, Err(Some(libc::ENOENT)));
    assert_eq!(results.3, Err(Some(libc::ENOENT)));
    assert_eq!(results.4, Err(Some(libc::ENOENT)));
    assert_eq!(
        fs::read(tmp.path().join("outside.txt")).unwrap(),
        b"host secret\n"
    );
}
