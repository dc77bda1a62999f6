#!/usr/bin/env python3
"""Writes the committed seed corpus of every fuzz target (fuzz/corpus/).

Deterministic: running it again gives the same files. Each seed is a
well-formed input of its target's format (see the doc comment at the top
of fuzz_targets/<target>.rs) that reaches the interesting paths, so the
fuzzer starts from there instead of from random bytes. The wrapped-payload
seeds of snapshot_state are not made here: they come from the target's own
synthesized states (run the target on the synth-* seeds with EMBER_FUZZ_DUMP_STATE=<dir>; saved as wrapped-*).
"""

import json
import os
import struct
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def write(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ---- guest queue images (ember_fuzz::queue::GuestQueue::from_input) ----

F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
DATA_BASE = 0x10000


def image(descs, heads, data):
    """descs: (data offset or raw addr_sel, len, flags, next)."""
    out = bytes([len(descs)])
    for off, ln, flags, nxt in descs:
        out += struct.pack("<HHBB", off, ln, flags, nxt)
    out += bytes([len(heads)]) + bytes(heads)
    return out + data


def pad(b, n):
    return b + bytes(n - len(b))


def vsock_hdr(src_cid, dst_cid, src_port, dst_port, length, op, flags=0,
              buf_alloc=1 << 18, fwd_cnt=0, type_=1):
    return struct.pack("<QQIIIHHIII", src_cid, dst_cid, src_port, dst_port,
                       length, type_, op, flags, buf_alloc, fwd_cnt)


def vsock_packet():
    payload = b"hello"
    hdr = vsock_hdr(3, 2, 5000, 1024, len(payload), 5)
    data = pad(hdr, 64) + payload
    # TX: header descriptor + payload descriptor.
    write("vsock_packet", "tx-two-descriptors",
          struct.pack("<BH", 0, 0) +
          image([(0, 44, F_NEXT, 1), (64, 5, 0, 0)], [0], data))
    # TX: header and payload in one descriptor.
    write("vsock_packet", "tx-one-descriptor",
          struct.pack("<BH", 0, 0) +
          image([(0, 49, 0, 0)], [0], hdr + payload))
    # RX buffers: header + data, written with a 100-byte host packet.
    write("vsock_packet", "rx-buffers",
          struct.pack("<BH", 0xff, 100) +
          image([(0, 44, F_WRITE | F_NEXT, 1), (64, 4096, F_WRITE, 0),
                 (0x2000, 4140, F_WRITE, 0)], [0, 2], b""))
    # TX through an indirect table at data offset 0x200.
    table = struct.pack("<QIHH", DATA_BASE, 44, F_NEXT, 1) + \
        struct.pack("<QIHH", DATA_BASE + 64, 5, 0, 0)
    write("vsock_packet", "tx-indirect",
          struct.pack("<BH", 0, 0) +
          image([(0x200, 32, F_INDIRECT, 0)], [0], pad(data, 0x200) + table))
    # A descriptor loop and a head past the queue.
    write("vsock_packet", "tx-loop",
          struct.pack("<BH", 0, 0) +
          image([(0, 44, F_NEXT, 1), (64, 5, F_NEXT, 0)], [0, 200], data))
    # Header length larger than the buffer, and a 4 GiB descriptor.
    big = vsock_hdr(3, 2, 5000, 1024, 0xffffffff, 5)
    write("vsock_packet", "tx-lying-length",
          struct.pack("<BH", 0, 0) +
          image([(0, 44, F_NEXT, 1), (64, 0xffff, 0, 0)], [0], pad(big, 64)))


def net():
    vnet = bytes(12)
    frame = bytes.fromhex("ffffffffffff020000000001") + b"\x08\x06" + bytes(46)
    data = pad(vnet, 64) + frame
    write("net_tx", "tx-header-and-frame",
          image([(0, 12, F_NEXT, 1), (64, len(frame), 0, 0)], [0], data))
    write("net_tx", "tx-one-descriptor",
          image([(0, 12 + len(frame), 0, 0)], [0], vnet + frame))
    bad_hdr = bytes([1, 4]) + bytes(10)  # NEEDS_CSUM, GSO TCPv6
    write("net_tx", "tx-offload-header",
          image([(0, 12 + len(frame), 0, 0)], [0], bad_hdr + frame))
    write("net_tx", "tx-write-only-and-runt",
          image([(0, 12 + len(frame), F_WRITE, 0), (64, 20, 0, 0)], [0, 1],
                vnet + frame))
    table = struct.pack("<QIHH", DATA_BASE, 12, F_NEXT, 1) + \
        struct.pack("<QIHH", DATA_BASE + 64, len(frame), 0, 0)
    write("net_tx", "tx-indirect",
          image([(0x200, 32, F_INDIRECT, 0)], [0], pad(data, 0x200) + table))
    write("net_tx", "tx-loop-and-huge",
          image([(0, 12, F_NEXT, 1), (64, 60, F_NEXT, 0), (0, 0xffff, 0, 0)],
                [0, 2], data))

    def frames(lst):
        out = bytes([len(lst)])
        for ln, flags, gso in lst:
            out += struct.pack("<HBB", ln, flags, gso)
        return out

    rx = image([(0, 1526, F_WRITE, 0), (0x1000, 1526, F_WRITE, 0),
                (0x2000, 12, F_WRITE | F_NEXT, 3), (0x2100, 1514, F_WRITE, 0)],
               [0, 1, 2], b"")
    write("net_rx", "rx-frames", struct.pack("<H", 0) +
          frames([(74, 0, 0), (1526, 0, 0), (600, 0, 0)]) + rx)
    write("net_rx", "rx-mtu-and-oversized", struct.pack("<H", 1500) +
          frames([(1600, 0, 0), (0xffff, 0, 0), (20, 0, 0), (100, 1, 0),
                  (100, 0, 4)]) + rx)
    write("net_rx", "rx-read-only-buffer", struct.pack("<H", 0) +
          frames([(74, 0, 0)]) +
          image([(0, 1526, 0, 0), (0x1000, 10, F_WRITE, 0)], [0, 1], b""))


# ---- mmio (ops: op u8, offset u16, value u64) ----

def mmio():
    R, W = 2, 6  # 4-byte read, 4-byte write

    def op(o, off, v=0):
        return struct.pack("<BHQ", o, off, v)

    ops = [op(R, 0x000), op(R, 0x004), op(R, 0x008), op(R, 0x00c),
           op(W, 0x070, 0), op(W, 0x070, 1), op(W, 0x070, 3),
           op(W, 0x014, 0), op(R, 0x010), op(W, 0x014, 1), op(R, 0x010),
           op(W, 0x024, 0), op(W, 0x020, 1), op(W, 0x024, 1), op(W, 0x020, 1),
           op(W, 0x070, 0xb), op(R, 0x070)]
    for q, size in ((0, 16), (1, 8)):
        base = 0x1000 * (1 + 3 * q)
        ops += [op(W, 0x030, q), op(R, 0x034), op(W, 0x038, size),
                op(W, 0x080, base), op(W, 0x084, 0),
                op(W, 0x090, base + 0x1000), op(W, 0x094, 0),
                op(W, 0x0a0, base + 0x2000), op(W, 0x0a4, 0),
                op(W, 0x044, 1), op(R, 0x044)]
    ops += [op(W, 0x070, 0xf), op(R, 0x070), op(W, 0x050, 0), op(W, 0x050, 1),
            op(R, 0x060), op(W, 0x064, 1), op(R, 0x0fc),
            op(0, 0x100), op(1, 0x102), op(2, 0x104), op(3, 0x100),
            op(4, 0x101, 9), op(W, 0x106, 0xdeadbeef)]
    good = b"".join(ops)
    write("mmio", "driver-setup", b"\x00" + good)
    write("mmio", "driver-setup-snapshot-reset",
          b"\x00" + good + op(0xff, 0) + op(R, 0x070) + op(W, 0x070, 0))
    write("mmio", "activation-fails", b"\x01" + good + op(W, 0x070, 0))
    write("mmio", "reset-fails", b"\x02" + good + op(W, 0x070, 0) +
          op(W, 0x070, 1))
    write("mmio", "bad-widths-and-order",
          b"\x00" + op(W, 0x070, 0xf) + op(5, 0x070, 7) + op(0, 0x071) +
          op(W, 0x038, 4096) + op(W, 0x030, 0xffffffff) + op(W, 0x044, 1) +
          op(W, 0x0ff, 1) + op(W, 0xffc, 1) + op(R, 0x200) + op(0xff, 0))


# ---- vsock muxer ----

def muxer():
    def pkt(op, src_sel, dst_sel, payload=b"", flags=0, vflags=0,
            buf_alloc=1 << 16, fwd_cnt=0, extra=b""):
        # op 0: flags u8, len u16, [src_cid] [dst_cid], src port sel,
        # [u32], dst port sel, [u32], [type], op, flags, buf_alloc, fwd_cnt
        out = struct.pack("<BBH", 0, flags, len(payload)) + extra
        out += src_sel + dst_sel
        out += struct.pack("<BBII", op, vflags, buf_alloc, fwd_cnt)
        return out + payload

    guest_port = b"\xc8"  # 200
    svc = b"\x00"  # port 52
    poll, fill = b"\x02", b"\x03" + struct.pack("<H", 4096) + b"\x00"
    tick = b"\x04\x40"
    accept = b"\x05"

    def host_write(i, data):
        return b"\x06" + bytes([i, 1, len(data)]) + data

    def connect_line(i, sel):
        return b"\x06" + bytes([i, 0, 0]) + sel

    guest_connects = (pkt(1, guest_port, svc) + poll + fill + fill +
                      pkt(5, guest_port, svc, b"ping") + poll + accept +
                      host_write(0, b"pong") + poll + fill +
                      pkt(6, guest_port, svc, fwd_cnt=4) + fill +
                      pkt(7, guest_port, svc) + fill +
                      pkt(4, guest_port, svc, vflags=3) + fill + tick + fill +
                      pkt(3, guest_port, svc) + fill)
    write("vsock_muxer", "guest-connects", guest_connects)
    host_port = b"\xff" + struct.pack("<I", 1 << 30)
    host_connects = (accept + connect_line(0, b"\x80") + poll + fill +
                     pkt(2, b"\x80", host_port) + poll +
                     host_write(0, b"data from the host") + poll + fill +
                     pkt(5, b"\x80", host_port, b"reply") + poll + fill +
                     b"\x07\x00\x00" + poll + fill + tick + fill)
    write("vsock_muxer", "host-connects", host_connects)
    write("vsock_muxer", "bad-packets",
          pkt(5, guest_port, svc, b"x") + fill +
          pkt(1, guest_port, b"\xf0") + fill +
          pkt(1, guest_port, svc, flags=1, extra=struct.pack("<Q", 7)) +
          fill +
          accept + host_write(0, b"CONNECT 99999999999\n") + poll +
          tick * 4 + b"\x07\x00\xff" + fill)


# ---- virtio-fs (records: ctl u8, len u16, request) ----

OP = dict(LOOKUP=1, FORGET=2, GETATTR=3, SETATTR=4, READLINK=5, SYMLINK=6,
          MKNOD=8, MKDIR=9, UNLINK=10, RMDIR=11, RENAME=12, LINK=13, OPEN=14,
          READ=15, WRITE=16, STATFS=17, RELEASE=18, FSYNC=20, FLUSH=25,
          OPENDIR=27, READDIR=28, RELEASEDIR=29, ACCESS=34, CREATE=35,
          INTERRUPT=36, DESTROY=38, IOCTL=39, BATCH_FORGET=42, FALLOCATE=43,
          READDIRPLUS=44, RENAME2=45, LSEEK=46, COPY_FILE_RANGE=47,
          SYNCFS=50, TMPFILE=51)

unique = [100]


def fuse(opcode, nodeid, body=b"", uid=0, gid=0):
    unique[0] += 1
    hdr = struct.pack("<IIQQIIII", 40 + len(body), OP[opcode], unique[0],
                      nodeid, uid, gid, 1, 0)
    return hdr + body


def rec(req, ctl=0):
    return struct.pack("<BH", ctl, len(req)) + req


def z(name):
    return name.encode() + b"\0"


def read_in(fh, off, size):
    return struct.pack("<QQIIQII", fh, off, size, 0, 0, 0, 0)


def fs():
    S_IFCHR, S_IFBLK, S_IFIFO, S_IFREG = 0o20000, 0o60000, 0o10000, 0o100000
    O_RDONLY, O_RDWR, O_CREAT, O_TRUNC = 0, 2, 0o100, 0o1000
    # nodeids: root 1, then 2, 3, ... in lookup order; handles from 1.
    browse = [
        fuse("LOOKUP", 1, z("f")),                        # f -> 2
        fuse("GETATTR", 2, struct.pack("<IIQ", 0, 0, 0)),
        fuse("OPEN", 2, struct.pack("<II", O_RDWR, 0)),   # fh 1
        fuse("READ", 2, read_in(1, 0, 4096)),
        fuse("WRITE", 2, struct.pack("<QQIIQII", 1, 5, 3, 0, 0, 0, 0) + b"abc"),
        fuse("FLUSH", 2, struct.pack("<QIIQ", 1, 0, 0, 0)),
        fuse("FSYNC", 2, struct.pack("<QII", 1, 0, 0)),
        fuse("LSEEK", 2, struct.pack("<QQII", 1, 0, 3, 0)),
        fuse("RELEASE", 2, struct.pack("<QIIQ", 1, 0, 0, 0)),
        fuse("LOOKUP", 1, z("d")),                        # d -> 3
        fuse("OPENDIR", 3, struct.pack("<II", 0, 0)),     # fh 2
        fuse("READDIR", 3, read_in(2, 0, 4096)),
        fuse("READDIRPLUS", 3, read_in(2, 0, 4096)),
        fuse("RELEASEDIR", 3, struct.pack("<QIIQ", 2, 0, 0, 0)),
        fuse("LOOKUP", 1, z("l")),                        # symlink -> 4
        fuse("READLINK", 4),
        fuse("OPEN", 4, struct.pack("<II", O_RDONLY, 0)),
        fuse("LOOKUP", 1, z("p")),                        # fifo -> 5
        fuse("OPEN", 5, struct.pack("<II", O_RDONLY, 0)),
        fuse("STATFS", 1),
        fuse("ACCESS", 2, struct.pack("<II", 6, 0)),
        fuse("LOOKUP", 3, z("up")),
        fuse("LOOKUP", 3, z("..")),
        fuse("LOOKUP", 1, z("..")),
        fuse("LOOKUP", 1, z("d/g")),
        fuse("FORGET", 2, struct.pack("<Q", 1)),
    ]
    write("virtio_fs", "browse", b"\x00" + b"".join(rec(r) for r in browse))
    modify = [
        fuse("MKDIR", 1, struct.pack("<II", 0o755, 0) + z("new")),
        fuse("MKNOD", 1, struct.pack("<IIII", S_IFCHR | 0o666, 0x801, 0, 0) + z("sda")),
        fuse("MKNOD", 1, struct.pack("<IIII", S_IFBLK | 0o666, 0x800, 0, 0) + z("blk")),
        fuse("MKNOD", 1, struct.pack("<IIII", S_IFCHR, 0, 0, 0) + z("whiteout")),
        fuse("MKNOD", 1, struct.pack("<IIII", S_IFIFO | 0o644, 0, 0, 0) + z("fifo")),
        fuse("CREATE", 1, struct.pack("<IIII", O_RDWR | O_CREAT, S_IFREG | 0o4755, 0, 0) + z("c")),
        fuse("WRITE", 7, struct.pack("<QQIIQII", 1, 1 << 40, 4, 0, 0, 0, 0) + b"evil"),
        fuse("FALLOCATE", 7, struct.pack("<QQQII", 1, 0, 1 << 30, 0, 0)),
        fuse("SETATTR", 7, struct.pack("<IIQQQQQQIIIIIIII", 0x8 | 0x1, 0, 1, 10, 0, 0, 0, 0, 0, 0, 0, 0o6777, 0, 0, 0, 0)),
        fuse("SYMLINK", 1, z("s") + z("/etc/shadow")),
        fuse("LOOKUP", 1, z("f")),
        fuse("LINK", 1, struct.pack("<Q", 2) + z("hard")),
        fuse("RENAME", 1, struct.pack("<Q", 1) + z("f") + z("moved")),
        fuse("RENAME2", 1, struct.pack("<QII", 1, 2, 0) + z("moved") + z("new")),
        fuse("LOOKUP", 1, z("d")),
        fuse("COPY_FILE_RANGE", 7, struct.pack("<QQQQQQQ", 1, 0, 7, 1, 100, 1 << 20, 0)),
        fuse("UNLINK", 1, z("c")),
        fuse("RMDIR", 1, z("new")),
        fuse("RMDIR", 1, z("d")),
        fuse("BATCH_FORGET", 0, struct.pack("<II", 2, 0) + struct.pack("<QQ", 2, 1) + struct.pack("<QQ", 99, 5)),
        fuse("IOCTL", 2, bytes(32)),
        fuse("SYNCFS", 1, bytes(8)),
        fuse("TMPFILE", 1, struct.pack("<IIII", O_RDWR, 0o600, 0, 0) + z("t")),
        fuse("INTERRUPT", 0, struct.pack("<Q", 5)),
        fuse("DESTROY", 0),
    ]
    write("virtio_fs", "modify", b"\x00" + b"".join(rec(r) for r in modify))
    ro = [
        fuse("LOOKUP", 1, z("f")),
        fuse("OPEN", 2, struct.pack("<II", O_RDWR, 0)),
        fuse("OPEN", 2, struct.pack("<II", O_RDONLY | O_TRUNC, 0)),
        fuse("OPEN", 2, struct.pack("<II", O_RDONLY, 0)),
        fuse("READ", 2, read_in(1, 0, 100)),
        fuse("ACCESS", 2, struct.pack("<II", 2, 0)),
        fuse("MKDIR", 1, struct.pack("<II", 0o755, 0) + z("x")),
        fuse("SETATTR", 2, bytes(88)),
    ]
    write("virtio_fs", "read-only", b"\x01" + b"".join(rec(r) for r in ro))
    lookup = fuse("LOOKUP", 1, z("f"))
    malformed = (rec(lookup, 0x10 | 1) +                          # raw len, 2 pieces
                 rec(struct.pack("<I", 9999) + lookup[4:], 0x10) +   # len too large
                 rec(lookup[:20]) +                                  # no full header
                 rec(lookup, 0x20) +                                 # no reply buffer
                 rec(lookup, 0x40) +                                 # 15-byte reply buffer
                 rec(fuse("READ", 2, read_in(1, 0, 1 << 20)), 0x60 | 2) +
                 rec(fuse("MKNOD", 1, b"\x00\x20")) +                # MKNOD args cut short
                 rec(fuse("GETATTR", 12345, bytes(16))) +            # unknown nodeid
                 rec(struct.pack("<IIQQIIII", 40, 7, 1, 1, 0, 0, 0, 0)) +   # hole opcode 7
                 rec(struct.pack("<IIQQIIII", 40, 4096, 1, 1, 0, 0, 0, 0)))
    write("virtio_fs", "malformed", b"\x00" + malformed)
    # The guest caller's credentials: an unprivileged uid creating things.
    creds = [fuse("MKDIR", 1, struct.pack("<II", 0o777, 0) + z("u"), uid=1000, gid=1000),
             fuse("LOOKUP", 1, z("u"), uid=1000, gid=1000),
             fuse("CREATE", 2, struct.pack("<IIII", O_RDWR | O_CREAT, S_IFREG | 0o644, 0o22, 0) + z("mine"), uid=1000, gid=1000)]
    write("virtio_fs", "credentials", b"\x00" + b"".join(rec(r) for r in creds))


# ---- agent seccomp (OCI JSON) ----

def seccomp():
    docker_like = {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": 1,
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [
            {"names": ["read", "write", "openat", "close", "exit_group", "futex",
                       "mmap", "munmap", "brk", "rt_sigaction", "execve"],
             "action": "SCMP_ACT_ALLOW"},
            {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
             "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"}]},
            {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
             "args": [{"index": 0, "value": 8, "op": "SCMP_CMP_EQ"},
                      {"index": 0, "value": 131072, "op": "SCMP_CMP_EQ"}]},
            {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
             "args": [{"index": 0, "value": 2114060288, "valueTwo": 0,
                       "op": "SCMP_CMP_MASKED_EQ"}]},
            {"names": ["socket"], "action": "SCMP_ACT_ERRNO", "errnoRet": 97,
             "args": [{"index": 0, "value": 16, "op": "SCMP_CMP_EQ"},
                      {"index": 2, "value": 9, "op": "SCMP_CMP_EQ"}]},
        ],
    }
    write("agent_seccomp", "docker-like.json", json.dumps(docker_like).encode())
    ops = ["SCMP_CMP_NE", "SCMP_CMP_LT", "SCMP_CMP_LE", "SCMP_CMP_EQ",
           "SCMP_CMP_GE", "SCMP_CMP_GT", "SCMP_CMP_MASKED_EQ"]
    every_op = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "flags": ["SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_SPEC_ALLOW"],
        "syscalls": [{"names": ["ioctl"], "action": a,
                      "args": [{"index": i % 6, "value": v, "valueTwo": v >> 1, "op": op}]}
                     for i, (op, a, v) in enumerate(zip(
                         ops,
                         ["SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_TRAP",
                          "SCMP_ACT_ERRNO", "SCMP_ACT_TRACE", "SCMP_ACT_LOG",
                          "SCMP_ACT_KILL_THREAD"],
                         [0, 1 << 32, (1 << 64) - 1, 0x5401, 1 << 63, 7, 0xffffffff]))],
    }
    write("agent_seccomp", "every-operator.json", json.dumps(every_op).encode())
    write("agent_seccomp", "unknown-and-notify.json", json.dumps({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["no_such_call", "mount"], "action": "SCMP_ACT_ERRNO"},
                     {"names": ["bpf"], "action": "SCMP_ACT_NOTIFY"}]}).encode())
    write("agent_seccomp", "bad-index.json", json.dumps({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["kill"], "action": "SCMP_ACT_ERRNO",
                      "args": [{"index": 6, "value": 1, "op": "SCMP_CMP_EQ"}]}]}).encode())
    many = {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
        {"names": [n], "action": "SCMP_ACT_ALLOW",
         "args": [{"index": 1, "value": k, "op": "SCMP_CMP_EQ"}]}
        for k, n in enumerate(["read", "write", "close", "fstat", "lseek", "mmap",
                               "mprotect", "munmap", "brk", "ioctl", "pread64",
                               "readv", "writev", "access", "pipe", "select"])]}
    write("agent_seccomp", "many-rules.json", json.dumps(many).encode())


# ---- agent replies (kind u8 + protobuf) ----

def varint(n):
    out = b""
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7f
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def field(num, wire, payload):
    key = varint((num << 3) | wire)
    if wire == 0:
        return key + varint(payload)
    return key + varint(len(payload)) + payload


def replies():
    # StatsContainerResponse: cpu(1){usage_usec=1..}, memory(2), pids(3), io(4)
    cpu = b"".join(field(i, 0, 1000 * i) for i in range(1, 7))
    mem = b"".join(field(i, 0, (1 << 20) * i) for i in range(1, 23))
    pids = field(1, 0, 3) + field(2, 0, 0)
    io = field(1, 0, 8) + field(2, 0, 0) + field(3, 0, 4096) + field(4, 0, 512)
    stats = field(1, 2, cpu) + field(2, 2, mem) + field(3, 2, pids) + \
        field(4, 2, io) + field(4, 2, io)
    write("agent_replies", "stats", b"\x00" + stats)
    write("agent_replies", "stats-max", b"\x00" + field(2, 2, b"".join(
        field(i, 0, (1 << 64) - 1) for i in range(1, 23))))
    # WaitProcessResponse: exit_status(1), exited_at(2){seconds(1), nanos(2)}
    for name, secs, nanos in (("exit-now", 1700000000, 5), ("exit-min", -(1 << 63), 0),
                              ("exit-min-nanos", -(1 << 63), 1),
                              ("exit-max", (1 << 63) - 1, 999999999),
                              ("exit-bad-nanos", 1, -1)):
        ts = field(1, 0, secs) + field(2, 0, nanos)
        write("agent_replies", name, b"\x01" + field(1, 0, 137) + field(2, 2, ts))
    write("agent_replies", "oom", b"\x02" + field(1, 2, b"c" * 64))
    write("agent_replies", "pids", b"\x03" + field(1, 2, b"".join(varint(p) for p in (1, 7, 0, 4294967295))))
    write("agent_replies", "create", b"\x04" + field(1, 0, 42))


def snapshot():
    """Synthesized states (mode bit 1): transports of every device type."""
    def queue(max_size, size, ready, base):
        return struct.pack("<HIBQQQHH", max_size, size, ready, base,
                           base + 0x1000, base + 0x2000, 3, 3)

    def device(sel, status, acked, queues):
        out = struct.pack("<BIQIIIII", sel, status, acked, 0, 1, 0, 1, 0)
        return out + bytes([len(queues)]) + b"".join(queues)

    serial = bytes([12, 0, 1, 1, 3, 0x60, 8, 0xb0, 0]) + bytes([3]) + b"abc"
    running = device(1, 0xf, 1 << 32, [queue(256, 256, 1, 0x1000), queue(256, 256, 1, 0x4000),
                                       queue(256, 256, 1, 0x7000)])
    setup = device(0, 0xb, 1 << 32, [queue(256, 128, 1, 0x1000), queue(256, 0, 0, 0)])
    broken = device(2, 0xf, 1 << 32, [queue(1024, 5000, 1, 1 << 40), queue(3, 3, 1, 0)])
    for name, devs in (("synth-running", [running]), ("synth-two", [setup, running]),
                       ("synth-bad-queues", [broken, device(3, 0x8f, 0, [])])):
        body = bytes([4]) + b"test" + struct.pack("<Q", 1 << 20) + bytes([len(devs)])
        write("snapshot_state", name, b"\x02" + body + b"".join(devs) + serial)
    # Whole files: truncated, wrong magic, wrong version.
    write("snapshot_state", "file-bad-magic", b"\x01NOTEMBER" + bytes(60))
    write("snapshot_state", "file-bad-version", b"\x01EMBERSNP" + struct.pack("<IQ", 99, 0) + bytes(32))


def main():
    snapshot()
    vsock_packet()
    net()
    mmio()
    muxer()
    fs()
    seccomp()
    replies()
    return 0


if __name__ == "__main__":
    sys.exit(main())
