//! The agent's OCI seccomp compiler: any JSON a pod spec could carry as
//! `linux.seccomp`, compiled to classic BPF; a program the compiler
//! accepts must pass the kernel's checks (checked here the way the kernel
//! does: length, jumps in range, known instructions, loads inside
//! `seccomp_data`, ends in RET) and kill any non-x86_64 system call.
//!
//! Input: the JSON text.
#![no_main]

use ember_agent::container::seccomp::compile;
use libfuzzer_sys::fuzz_target;
use oci_spec::runtime::LinuxSeccomp;

const BPF_CLASS_LD: u16 = 0x00;
const BPF_CLASS_ALU: u16 = 0x04;
const BPF_CLASS_JMP: u16 = 0x05;
const BPF_CLASS_RET: u16 = 0x06;
const SECCOMP_DATA_LEN: u32 = 64;

/// The kernel's `bpf_check_classic` + `seccomp_check_filter`, for the
/// instructions the compiler emits.
fn check(program: &[libc::sock_filter]) {
    assert!(
        !program.is_empty() && program.len() <= 4096,
        "length {}",
        program.len()
    );
    for (i, insn) in program.iter().enumerate() {
        let rest = program.len() - i - 1;
        match insn.code & 0x07 {
            BPF_CLASS_LD => {
                assert_eq!(insn.code, 0x20, "insn {i}: only LD|W|ABS loads");
                assert!(
                    insn.k < SECCOMP_DATA_LEN && insn.k % 4 == 0,
                    "insn {i}: load at {} outside seccomp_data",
                    insn.k
                );
            }
            BPF_CLASS_ALU => assert_eq!(insn.code, 0x54, "insn {i}: only ALU|AND|K"),
            BPF_CLASS_JMP => {
                if insn.code == 0x05 {
                    assert!((insn.k as usize) < rest, "insn {i}: JA past the end");
                } else {
                    assert!(
                        matches!(insn.code, 0x15 | 0x25 | 0x35 | 0x45),
                        "insn {i}: jump code {:#x}",
                        insn.code
                    );
                    assert!(
                        usize::from(insn.jt) < rest && usize::from(insn.jf) < rest,
                        "insn {i}: conditional jump past the end"
                    );
                }
            }
            BPF_CLASS_RET => assert_eq!(insn.code, 0x06, "insn {i}: only RET|K"),
            _ => panic!("insn {i}: code {:#x}", insn.code),
        }
    }
    let last = program[program.len() - 1];
    assert_eq!(
        last.code & 0x07,
        BPF_CLASS_RET,
        "program does not end in RET"
    );
}

/// Runs the program on `seccomp_data` words (nr, arch, ip lo/hi, args).
fn run(program: &[libc::sock_filter], data: &[u32; 16]) -> u32 {
    let (mut pc, mut acc) = (0usize, 0u32);
    loop {
        let insn = program[pc];
        match insn.code {
            0x20 => acc = data[(insn.k / 4) as usize],
            0x54 => acc &= insn.k,
            0x05 => pc += insn.k as usize,
            0x06 => return insn.k,
            code => {
                let hit = match code {
                    0x15 => acc == insn.k,
                    0x25 => acc > insn.k,
                    0x35 => acc >= insn.k,
                    _ => acc & insn.k != 0,
                };
                pc += usize::from(if hit { insn.jt } else { insn.jf });
            }
        }
        pc += 1;
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(profile) = serde_json::from_slice::<LinuxSeccomp>(data) else {
        return;
    };
    let Ok(filter) = compile(&profile) else {
        return;
    };
    check(&filter.program);
    // i386 (AUDIT_ARCH_I386): always killed, whatever the profile says.
    let mut words = [0u32; 16];
    words[1] = 0x4000_0003;
    assert_eq!(
        run(&filter.program, &words),
        0,
        "a 32-bit system call was not killed"
    );
    // x86_64 calls: the program terminates with some action.
    words[1] = 0xc000_003e;
    for nr in [0u32, 1, 59, 231, 0x4000_0000, u32::MAX] {
        words[0] = nr;
        run(&filter.program, &words);
    }
});
