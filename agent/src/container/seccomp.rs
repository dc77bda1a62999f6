//! OCI seccomp profiles to classic BPF, by hand (no libseccomp).
//!
//! The program is built in the agent before the container process is
//! cloned; the child only hands it to `seccomp(SECCOMP_SET_MODE_FILTER)`.
//!
//! Layout of the generated program:
//! 1. `arch != AUDIT_ARCH_X86_64` -> kill the thread (libseccomp's default
//!    "bad arch" action: 32-bit `int 0x80` calls must not bypass the
//!    filter);
//! 2. x32 system calls (`nr >= 0x40000000`) -> `ERRNO(ENOSYS)`;
//! 3. a balanced binary search over the system call numbers that have
//!    rules (a guest syscall is expensive enough already: ~9 comparisons
//!    instead of a linear scan over ~350 names), whose leaves hold the
//!    rules of one number in profile order (rules with argument conditions
//!    before unconditional ones), each ending in its action;
//! 4. everything else -> the default action.
//!
//! Semantics follow runc: unknown system call names are skipped (debug
//! log); several conditions of one rule are ANDed, except when two of them
//! test the same argument, in which case each condition becomes a rule of
//! its own (ORed), as runc does. `SCMP_ACT_NOTIFY` is refused (no seccomp
//! agent exists in the guest).

use libc::sock_filter;
use oci_spec::runtime::{
    LinuxSeccomp, LinuxSeccompAction, LinuxSeccompFilterFlag, LinuxSeccompOperator,
};

use super::syscalls;

/// BPF_LD | BPF_W | BPF_ABS (0x00 | 0x00 | 0x20).
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JMP: u16 = 0x05;
const BPF_JA: u16 = 0x00;
const BPF_JEQ: u16 = 0x10;
const BPF_JGT: u16 = 0x20;
const BPF_JGE: u16 = 0x30;
const BPF_K: u16 = 0x00;
const BPF_RET_K: u16 = 0x06;
const BPF_ALU_AND_K: u16 = 0x04 | 0x50;

const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
const BPF_MAXINSNS: usize = 4096;

const RET_KILL_THREAD: u32 = 0x0000_0000;
const RET_KILL_PROCESS: u32 = 0x8000_0000;
const RET_TRAP: u32 = 0x0003_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const RET_TRACE: u32 = 0x7ff0_0000;
const RET_LOG: u32 = 0x7ffc_0000;
const RET_ALLOW: u32 = 0x7fff_0000;

/// `seccomp(2)` filter flags.
pub const SECCOMP_FILTER_FLAG_TSYNC: u32 = 1;
pub const SECCOMP_FILTER_FLAG_LOG: u32 = 2;
pub const SECCOMP_FILTER_FLAG_SPEC_ALLOW: u32 = 4;

/// A compiled filter, ready for `seccomp(SECCOMP_SET_MODE_FILTER, flags)`.
#[derive(Debug, Clone)]
pub struct Filter {
    pub program: Vec<sock_filter>,
    pub flags: u32,
}

/// One argument comparison (OCI semantics, 64-bit values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cond {
    index: u32,
    op: LinuxSeccompOperator,
    value: u64,
    value_two: u64,
}

#[derive(Debug, Clone)]
struct Rule {
    conds: Vec<Cond>,
    action: u32,
}

/// The seccomp return value of an OCI action.
fn action_value(action: LinuxSeccompAction, errno: Option<u32>) -> Result<u32, String> {
    Ok(match action {
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => RET_KILL_THREAD,
        LinuxSeccompAction::ScmpActKillProcess => RET_KILL_PROCESS,
        LinuxSeccompAction::ScmpActTrap => RET_TRAP,
        LinuxSeccompAction::ScmpActErrno => {
            RET_ERRNO | (errno.unwrap_or(libc::EPERM as u32) & 0xffff)
        }
        LinuxSeccompAction::ScmpActTrace => RET_TRACE | (errno.unwrap_or(0) & 0xffff),
        LinuxSeccompAction::ScmpActLog => RET_LOG,
        LinuxSeccompAction::ScmpActAllow => RET_ALLOW,
        LinuxSeccompAction::ScmpActNotify => {
            return Err("seccomp action SCMP_ACT_NOTIFY is not supported".into())
        }
    })
}

/// Compile an OCI seccomp profile.
pub fn compile(profile: &LinuxSeccomp) -> Result<Filter, String> {
    let default = action_value(profile.default_action(), profile.default_errno_ret())?;
    let mut flags = 0;
    for f in profile.flags().iter().flatten() {
        flags |= match f {
            LinuxSeccompFilterFlag::SeccompFilterFlagLog => SECCOMP_FILTER_FLAG_LOG,
            LinuxSeccompFilterFlag::SeccompFilterFlagTsync => SECCOMP_FILTER_FLAG_TSYNC,
            LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow => SECCOMP_FILTER_FLAG_SPEC_ALLOW,
        };
    }
    let mut rules: std::collections::BTreeMap<u32, Vec<Rule>> = Default::default();
    for sc in profile.syscalls().iter().flatten() {
        let action = action_value(sc.action(), sc.errno_ret())?;
        let mut conds = Vec::new();
        for a in sc.args().iter().flatten() {
            if a.index() > 5 {
                return Err(format!(
                    "seccomp: argument index {} out of range",
                    a.index()
                ));
            }
            conds.push(Cond {
                index: a.index() as u32,
                op: a.op(),
                value: a.value(),
                value_two: a.value_two().unwrap_or(0),
            });
        }
        // runc: conditions on the same argument are ORed (one rule each).
        let repeated = conds
            .iter()
            .enumerate()
            .any(|(i, c)| conds[..i].iter().any(|d| d.index == c.index));
        let variants: Vec<Vec<Cond>> = if repeated {
            conds.iter().map(|c| vec![*c]).collect()
        } else {
            vec![conds]
        };
        for name in sc.names() {
            let Some(nr) = syscalls::number(name) else {
                tracing::debug!("seccomp: unknown system call {name:?}, skipped");
                continue;
            };
            for conds in &variants {
                rules.entry(nr).or_default().push(Rule {
                    conds: conds.clone(),
                    action,
                });
            }
        }
    }
    for list in rules.values_mut() {
        // Stable: keep profile order within each group.
        list.sort_by_key(|r| r.conds.is_empty());
    }
    let mut asm = Asm::default();
    let bad_arch = asm.label();
    let x32 = asm.label();
    asm.ld(4);
    asm.jump(
        BPF_JEQ,
        AUDIT_ARCH_X86_64,
        Target::Next,
        Target::Label(bad_arch),
    );
    asm.ld(0);
    asm.jump(BPF_JGE, X32_SYSCALL_BIT, Target::Label(x32), Target::Next);
    let nrs: Vec<u32> = rules.keys().copied().collect();
    emit_tree(&mut asm, &nrs, &rules, default);
    asm.place(bad_arch);
    asm.ret(RET_KILL_THREAD);
    asm.place(x32);
    asm.ret(RET_ERRNO | libc::ENOSYS as u32);
    let program = asm.finish()?;
    if program.len() > BPF_MAXINSNS {
        return Err(format!(
            "seccomp: the profile compiles to {} BPF instructions (max {BPF_MAXINSNS})",
            program.len()
        ));
    }
    Ok(Filter { program, flags })
}

/// Binary search over `nrs` (sorted); the accumulator holds the number.
fn emit_tree(
    asm: &mut Asm,
    nrs: &[u32],
    rules: &std::collections::BTreeMap<u32, Vec<Rule>>,
    default: u32,
) {
    if nrs.len() <= 4 {
        for nr in nrs {
            let skip = asm.label();
            asm.jump(BPF_JEQ, *nr, Target::Next, Target::Label(skip));
            emit_rules(asm, &rules[nr], default);
            // Reached only through the JEQ: the accumulator still holds
            // the number.
            asm.place(skip);
        }
        asm.ret(default);
        return;
    }
    let mid = nrs.len() / 2;
    let right = asm.label();
    asm.jump(BPF_JGE, nrs[mid], Target::Label(right), Target::Next);
    emit_tree(asm, &nrs[..mid], rules, default);
    asm.place(right);
    emit_tree(asm, &nrs[mid..], rules, default);
}

/// The rules of one system call, then the default action.
fn emit_rules(asm: &mut Asm, rules: &[Rule], default: u32) {
    for rule in rules {
        let fail = asm.label();
        for c in &rule.conds {
            emit_cond(asm, c, fail);
        }
        asm.ret(rule.action);
        asm.place(fail);
    }
    asm.ret(default);
}

/// Fall through when `c` holds, jump to `fail` otherwise.
fn emit_cond(asm: &mut Asm, c: &Cond, fail: Label) {
    use LinuxSeccompOperator::*;
    let lo_off = 16 + 8 * c.index;
    let hi_off = lo_off + 4;
    let (vhi, vlo) = ((c.value >> 32) as u32, c.value as u32);
    let fail = Target::Label(fail);
    let next = Target::Next;
    match c.op {
        ScmpCmpEq => {
            asm.ld(hi_off);
            asm.jump(BPF_JEQ, vhi, next, fail);
            asm.ld(lo_off);
            asm.jump(BPF_JEQ, vlo, next, fail);
        }
        ScmpCmpNe => {
            let ok = asm.label();
            asm.ld(hi_off);
            asm.jump(BPF_JEQ, vhi, next, Target::Label(ok));
            asm.ld(lo_off);
            asm.jump(BPF_JEQ, vlo, fail, next);
            asm.place(ok);
        }
        ScmpCmpGt | ScmpCmpGe => {
            let ok = asm.label();
            asm.ld(hi_off);
            asm.jump(BPF_JGT, vhi, Target::Label(ok), next);
            asm.jump(BPF_JEQ, vhi, next, fail);
            asm.ld(lo_off);
            let op = if c.op == ScmpCmpGt { BPF_JGT } else { BPF_JGE };
            asm.jump(op, vlo, next, fail);
            asm.place(ok);
        }
        ScmpCmpLt | ScmpCmpLe => {
            let ok = asm.label();
            asm.ld(hi_off);
            asm.jump(BPF_JGT, vhi, fail, next);
            asm.jump(BPF_JEQ, vhi, next, Target::Label(ok));
            asm.ld(lo_off);
            // lo < v  <=>  !(lo >= v);  lo <= v  <=>  !(lo > v)
            let op = if c.op == ScmpCmpLt { BPF_JGE } else { BPF_JGT };
            asm.jump(op, vlo, fail, next);
            asm.place(ok);
        }
        ScmpCmpMaskedEq => {
            let (mhi, mlo) = (vhi, vlo);
            let (dhi, dlo) = ((c.value_two >> 32) as u32, c.value_two as u32);
            asm.ld(hi_off);
            asm.and(mhi);
            asm.jump(BPF_JEQ, dhi, next, fail);
            asm.ld(lo_off);
            asm.and(mlo);
            asm.jump(BPF_JEQ, dlo, next, fail);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Label(usize);

#[derive(Debug, Clone, Copy)]
enum Target {
    Next,
    Label(Label),
}

enum Op {
    Plain(sock_filter),
    Cond {
        code: u16,
        k: u32,
        t: Target,
        f: Target,
    },
    Place(Label),
}

/// A tiny BPF assembler with labels.
#[derive(Default)]
struct Asm {
    ops: Vec<Op>,
    labels: usize,
}

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

impl Asm {
    fn label(&mut self) -> Label {
        self.labels += 1;
        Label(self.labels - 1)
    }
    fn place(&mut self, l: Label) {
        self.ops.push(Op::Place(l));
    }
    fn ld(&mut self, off: u32) {
        self.ops.push(Op::Plain(stmt(BPF_LD_W_ABS, off)));
    }
    fn and(&mut self, k: u32) {
        self.ops.push(Op::Plain(stmt(BPF_ALU_AND_K, k)));
    }
    fn ret(&mut self, k: u32) {
        self.ops.push(Op::Plain(stmt(BPF_RET_K, k)));
    }
    /// A conditional jump (forward only). A target farther than 255
    /// instructions goes through an unconditional `ja` trampoline placed
    /// right after it.
    fn jump(&mut self, op: u16, k: u32, t: Target, f: Target) {
        self.ops.push(Op::Cond {
            code: BPF_JMP | op | BPF_K,
            k,
            t,
            f,
        });
    }

    fn finish(self) -> Result<Vec<sock_filter>, String> {
        // Conditional jumps reach 255 instructions; route every labelled
        // target through a `ja` trampoline when it is farther than that.
        // First pass: lay out with trampolines where needed (iterate until
        // stable, since trampolines move labels).
        let mut tramp: Vec<(bool, bool)> = vec![(false, false); self.ops.len()];
        loop {
            let (pos, labels) = self.layout(&tramp);
            let mut changed = false;
            for (i, op) in self.ops.iter().enumerate() {
                if let Op::Cond { t, f, .. } = op {
                    let base = pos[i] + 1 + tramp[i].0 as usize + tramp[i].1 as usize;
                    for (which, target) in [(0, t), (1, f)] {
                        if let Target::Label(l) = target {
                            let dist = labels[l.0].checked_sub(base).ok_or("backward jump")?;
                            let need = dist > 255;
                            let slot = if which == 0 {
                                &mut tramp[i].0
                            } else {
                                &mut tramp[i].1
                            };
                            if need && !*slot {
                                *slot = true;
                                changed = true;
                            }
                        }
                    }
                }
            }
            if !changed {
                break;
            }
        }
        let (pos, labels) = self.layout(&tramp);
        let mut out = Vec::with_capacity(pos.last().copied().unwrap_or(0) + 4);
        for (i, op) in self.ops.iter().enumerate() {
            match op {
                Op::Plain(s) => out.push(*s),
                Op::Place(_) => {}
                Op::Cond { code, k, t, f } => {
                    let (tt, tf) = tramp[i];
                    let me = pos[i];
                    let after = me + 1 + tt as usize + tf as usize;
                    // Offsets relative to me + 1.
                    let mut jt;
                    let mut jf;
                    let mut tramps = Vec::new();
                    let mut slot = me + 1;
                    match t {
                        Target::Next => jt = after - (me + 1),
                        Target::Label(l) if tt => {
                            jt = slot - (me + 1);
                            tramps.push((slot, labels[l.0]));
                            slot += 1;
                        }
                        Target::Label(l) => jt = labels[l.0] - (me + 1),
                    }
                    match f {
                        Target::Next => jf = after - (me + 1),
                        Target::Label(l) if tf => {
                            jf = slot - (me + 1);
                            tramps.push((slot, labels[l.0]));
                        }
                        Target::Label(l) => jf = labels[l.0] - (me + 1),
                    }
                    if jt > 255 || jf > 255 {
                        return Err("seccomp: BPF jump out of range".into());
                    }
                    // `Next` with trampolines in between skips them.
                    jt = jt.min(255);
                    jf = jf.min(255);
                    out.push(sock_filter {
                        code: *code,
                        jt: jt as u8,
                        jf: jf as u8,
                        k: *k,
                    });
                    for (at, target) in tramps {
                        out.push(stmt(BPF_JMP | BPF_JA, (target - (at + 1)) as u32));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Position of each op and of each label, given the trampolines.
    fn layout(&self, tramp: &[(bool, bool)]) -> (Vec<usize>, Vec<usize>) {
        let mut pos = Vec::with_capacity(self.ops.len());
        let mut labels = vec![0; self.labels];
        let mut at = 0;
        for (i, op) in self.ops.iter().enumerate() {
            pos.push(at);
            match op {
                Op::Place(l) => labels[l.0] = at,
                Op::Plain(_) => at += 1,
                Op::Cond { .. } => at += 1 + tramp[i].0 as usize + tramp[i].1 as usize,
            }
        }
        (pos, labels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run a classic BPF program on (arch, nr, args).
    fn run(prog: &[sock_filter], arch: u32, nr: u32, args: [u64; 6]) -> u32 {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&nr.to_le_bytes());
        data[4..8].copy_from_slice(&arch.to_le_bytes());
        for (i, a) in args.iter().enumerate() {
            data[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_le_bytes());
        }
        let mut acc: u32 = 0;
        let mut pc = 0usize;
        for _ in 0..10_000 {
            let ins = prog[pc];
            match ins.code {
                BPF_LD_W_ABS => {
                    let k = ins.k as usize;
                    acc = u32::from_le_bytes(data[k..k + 4].try_into().unwrap());
                    pc += 1;
                }
                BPF_ALU_AND_K => {
                    acc &= ins.k;
                    pc += 1;
                }
                BPF_RET_K => return ins.k,
                c if c == BPF_JMP | BPF_JA => pc += 1 + ins.k as usize,
                c => {
                    let taken = match c & 0xf0 {
                        BPF_JEQ => acc == ins.k,
                        BPF_JGT => acc > ins.k,
                        BPF_JGE => acc >= ins.k,
                        _ => panic!("unexpected op {c:#x}"),
                    };
                    pc += 1 + if taken { ins.jt } else { ins.jf } as usize;
                }
            }
        }
        panic!("program did not return");
    }

    fn profile(json: &str) -> LinuxSeccomp {
        serde_json::from_str(json).unwrap()
    }

    fn nr(name: &str) -> u32 {
        syscalls::number(name).unwrap()
    }

    #[test]
    fn syscall_table() {
        assert_eq!(syscalls::number("read"), Some(0));
        assert_eq!(syscalls::number("write"), Some(1));
        assert_eq!(syscalls::number("clone3"), Some(435));
        assert_eq!(syscalls::number("no_such_call"), None);
        assert!(syscalls::SYSCALLS.windows(2).all(|w| w[0].0 < w[1].0));
    }

    #[test]
    fn allowlist_with_errno_default() {
        // Many names, so the search tree has several levels.
        let names: Vec<&str> = syscalls::SYSCALLS
            .iter()
            .map(|(n, _)| *n)
            .filter(|n| *n != "mkdir" && *n != "unshare")
            .collect();
        let json = format!(
            r#"{{"defaultAction":"SCMP_ACT_ERRNO","defaultErrnoRet":1,
               "syscalls":[{{"names":{},"action":"SCMP_ACT_ALLOW"}},
                           {{"names":["bogus_call"],"action":"SCMP_ACT_ALLOW"}},
                           {{"names":["clone3"],"action":"SCMP_ACT_ERRNO","errnoRet":38}}]}}"#,
            serde_json::to_string(&names).unwrap()
        );
        let f = compile(&profile(&json)).unwrap();
        let a = AUDIT_ARCH_X86_64;
        for (n, _) in syscalls::SYSCALLS {
            let got = run(&f.program, a, nr(n), [0; 6]);
            let want = match *n {
                "mkdir" | "unshare" => RET_ERRNO | 1,
                // Earlier rule wins (allow): runc semantics are "first match".
                _ => RET_ALLOW,
            };
            assert_eq!(got, want, "{n}");
        }
        assert_eq!(run(&f.program, a, 999, [0; 6]), RET_ERRNO | 1);
        assert_eq!(
            run(&f.program, a, X32_SYSCALL_BIT | 1, [0; 6]),
            RET_ERRNO | libc::ENOSYS as u32
        );
        assert_eq!(run(&f.program, 0x4000_0003, 1, [0; 6]), RET_KILL_THREAD);
    }

    #[test]
    fn argument_comparisons() {
        let f = compile(&profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[
              {"names":["personality"],"action":"SCMP_ACT_ERRNO",
               "args":[{"index":0,"value":8,"op":"SCMP_CMP_NE"}]},
              {"names":["kill"],"action":"SCMP_ACT_ERRNO","errnoRet":3,
               "args":[{"index":1,"value":4294967296,"op":"SCMP_CMP_GT"}]},
              {"names":["tkill"],"action":"SCMP_ACT_ERRNO","errnoRet":4,
               "args":[{"index":1,"value":10,"op":"SCMP_CMP_LE"}]},
              {"names":["clone"],"action":"SCMP_ACT_ERRNO","errnoRet":5,
               "args":[{"index":0,"value":2114060288,"valueTwo":0,"op":"SCMP_CMP_MASKED_EQ"}]},
              {"names":["dup2"],"action":"SCMP_ACT_ERRNO","errnoRet":6,
               "args":[{"index":0,"value":1,"op":"SCMP_CMP_EQ"},
                       {"index":0,"value":2,"op":"SCMP_CMP_EQ"}]},
              {"names":["dup3"],"action":"SCMP_ACT_ERRNO","errnoRet":7,
               "args":[{"index":0,"value":1,"op":"SCMP_CMP_GE"},
                       {"index":1,"value":5,"op":"SCMP_CMP_LT"}]}
            ]}"#,
        ))
        .unwrap();
        let a = AUDIT_ARCH_X86_64;
        let r = |n: &str, args: [u64; 6]| run(&f.program, a, nr(n), args);
        assert_eq!(r("personality", [8, 0, 0, 0, 0, 0]), RET_ALLOW);
        assert_eq!(r("personality", [9, 0, 0, 0, 0, 0]), RET_ERRNO | 1);
        assert_eq!(
            r("personality", [8 | 1 << 40, 0, 0, 0, 0, 0]),
            RET_ERRNO | 1
        );
        assert_eq!(r("kill", [0, 1 << 32, 0, 0, 0, 0]), RET_ALLOW);
        assert_eq!(r("kill", [0, (1 << 32) + 1, 0, 0, 0, 0]), RET_ERRNO | 3);
        assert_eq!(r("kill", [0, 1 << 33, 0, 0, 0, 0]), RET_ERRNO | 3);
        assert_eq!(r("kill", [0, 5, 0, 0, 0, 0]), RET_ALLOW);
        assert_eq!(r("tkill", [0, 10, 0, 0, 0, 0]), RET_ERRNO | 4);
        assert_eq!(r("tkill", [0, 11, 0, 0, 0, 0]), RET_ALLOW);
        assert_eq!(r("tkill", [0, 1 << 32, 0, 0, 0, 0]), RET_ALLOW);
        assert_eq!(r("clone", [0x11, 0, 0, 0, 0, 0]), RET_ERRNO | 5);
        assert_eq!(r("clone", [0x2000_0000, 0, 0, 0, 0, 0]), RET_ALLOW);
        assert_eq!(r("dup2", [1, 0, 0, 0, 0, 0]), RET_ERRNO | 6);
        assert_eq!(r("dup2", [2, 0, 0, 0, 0, 0]), RET_ERRNO | 6);
        assert_eq!(r("dup2", [3, 0, 0, 0, 0, 0]), RET_ALLOW);
        assert_eq!(r("dup3", [1, 4, 0, 0, 0, 0]), RET_ERRNO | 7);
        assert_eq!(r("dup3", [1, 5, 0, 0, 0, 0]), RET_ALLOW);
        assert_eq!(r("dup3", [0, 4, 0, 0, 0, 0]), RET_ALLOW);
        assert_eq!(r("read", [0; 6]), RET_ALLOW);
    }

    #[test]
    fn far_jumps_use_trampolines() {
        // One system call with many conditional rules makes a leaf longer
        // than 255 instructions.
        let rules: Vec<String> = (0..80)
            .map(|i| {
                format!(
                    r#"{{"names":["ioctl"],"action":"SCMP_ACT_ALLOW",
                        "args":[{{"index":1,"value":{i},"op":"SCMP_CMP_EQ"}}]}}"#
                )
            })
            .collect();
        let json = format!(
            r#"{{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[{},
               {{"names":["read","write","close","openat","mmap"],"action":"SCMP_ACT_ALLOW"}}]}}"#,
            rules.join(",")
        );
        let f = compile(&profile(&json)).unwrap();
        let a = AUDIT_ARCH_X86_64;
        assert_eq!(
            run(&f.program, a, nr("ioctl"), [0, 79, 0, 0, 0, 0]),
            RET_ALLOW
        );
        assert_eq!(
            run(&f.program, a, nr("ioctl"), [0, 80, 0, 0, 0, 0]),
            RET_ERRNO | 1
        );
        assert_eq!(run(&f.program, a, nr("mmap"), [0; 6]), RET_ALLOW);
        assert_eq!(run(&f.program, a, nr("mkdir"), [0; 6]), RET_ERRNO | 1);
    }

    #[test]
    fn notify_is_refused() {
        let p = profile(r#"{"defaultAction":"SCMP_ACT_NOTIFY"}"#);
        assert!(compile(&p).unwrap_err().contains("NOTIFY"));
    }
}
