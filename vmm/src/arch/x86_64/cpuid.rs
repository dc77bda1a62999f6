//! CPUID and CPU templates.
//!
//! A CPU template is the set of changes the VMM makes to what the guest sees
//! of the CPU, plus the kernel parameters that go with them:
//!
//! * `host`: KVM's supported CPUID as it is (only per-vCPU topology fixed).
//!   The default on real KVM hosts.
//! * `emulated`: for hosts whose KVM has no VT-x/AMD-V and interprets guest
//!   ring 0 (e.g. `kvm_pvm` with `pvm_native=Y`). It clears CMPXCHG16B in
//!   CPUID (the emulator lacks it and this bit is honoured), hides KVM
//!   paravirt features, masks the instruction-set extensions the emulator
//!   cannot run, adds `clearcpuid=...` and `nopv` to the kernel command line
//!   for the bits such hosts do not let CPUID hide (XSAVE, AVX, ...), and
//!   makes the vCPU loop turn the emulator's failure on a ring-0 `int3` into
//!   an injected #BP. The guest kernel must be built with
//!   `CONFIG_EMBER_EMULATED_KVM_FIXUPS=y` (deploy/kernel). Guest user space
//!   must be built for baseline x86-64: AVX state is not saved across
//!   context switches under this template.
//!
//! `auto` (the default) picks `emulated` when the host CPU has neither `vmx`
//! nor `svm`, else `host`.

use std::fmt;
use std::str::FromStr;

use kvm_bindings::CpuId;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CpuTemplate {
    #[default]
    Auto,
    Host,
    Emulated,
}

impl fmt::Display for CpuTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CpuTemplate::Auto => "auto",
            CpuTemplate::Host => "host",
            CpuTemplate::Emulated => "emulated",
        })
    }
}

impl FromStr for CpuTemplate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(CpuTemplate::Auto),
            "host" => Ok(CpuTemplate::Host),
            "emulated" => Ok(CpuTemplate::Emulated),
            other => Err(format!(
                "unknown CPU template {other:?} (expected auto, host or emulated)"
            )),
        }
    }
}

/// The instruction-set features the guest kernel must not use under the
/// `emulated` template (the list that got a minimal kernel to run, from
/// docs: nested-kvm).
pub const EMULATED_CLEARCPUID: &str = "xsave,smap,popcnt,bmi1,bmi2,movbe,rdrand,rdseed,\
fsgsbase,pcid,invpcid,avx,avx2,avx512f,pku,clflushopt,clwb,sha_ni,aes,pclmulqdq,sse4_2,\
sse4_1,ssse3,adx,rdpid,waitpkg,movdiri,movdir64b,serialize,gfni,vaes,vpclmulqdq,f16c,fma,\
abm,la57,tsc_deadline_timer,x2apic";

impl CpuTemplate {
    /// Resolves `auto` by looking at the host CPU flags.
    pub fn resolve(self) -> CpuTemplate {
        match self {
            CpuTemplate::Auto => {
                let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
                Self::detect_from_cpuinfo(&cpuinfo)
            }
            other => other,
        }
    }

    /// `emulated` when no CPU flags line lists `vmx` or `svm`.
    pub fn detect_from_cpuinfo(cpuinfo: &str) -> CpuTemplate {
        let hw_virt = cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
        if hw_virt {
            CpuTemplate::Host
        } else {
            CpuTemplate::Emulated
        }
    }

    /// Kernel parameters this template adds.
    pub fn kernel_params(self) -> String {
        match self {
            CpuTemplate::Emulated => format!("clearcpuid={EMULATED_CLEARCPUID} nopv"),
            _ => String::new(),
        }
    }

    /// Whether the vCPU loop turns a ring-0 `int3` emulation failure into
    /// an injected #BP.
    pub fn injects_breakpoints(self) -> bool {
        self == CpuTemplate::Emulated
    }
}

// CPUID bit positions.
const LEAF1_ECX_PCLMULQDQ: u32 = 1;
const LEAF1_ECX_SSSE3: u32 = 9;
const LEAF1_ECX_FMA: u32 = 12;
const LEAF1_ECX_CX16: u32 = 13;
const LEAF1_ECX_PCID: u32 = 17;
const LEAF1_ECX_SSE41: u32 = 19;
const LEAF1_ECX_SSE42: u32 = 20;
const LEAF1_ECX_X2APIC: u32 = 21;
const LEAF1_ECX_MOVBE: u32 = 22;
const LEAF1_ECX_POPCNT: u32 = 23;
const LEAF1_ECX_TSC_DEADLINE: u32 = 24;
const LEAF1_ECX_AES: u32 = 25;
const LEAF1_ECX_XSAVE: u32 = 26;
const LEAF1_ECX_AVX: u32 = 28;
const LEAF1_ECX_F16C: u32 = 29;
const LEAF1_ECX_RDRAND: u32 = 30;
const LEAF1_ECX_HYPERVISOR: u32 = 31;
const LEAF1_EDX_HTT: u32 = 28;
const LEAF7_EBX_MASKED: &[u32] = &[
    0,  // fsgsbase
    3,  // bmi1
    5,  // avx2
    8,  // bmi2
    10, // invpcid
    16, // avx512f
    18, // rdseed
    19, // adx
    20, // smap
    23, // clflushopt
    24, // clwb
    29, // sha
];
const LEAF7_ECX_MASKED: &[u32] = &[
    3,  // pku
    5,  // waitpkg
    8,  // gfni
    9,  // vaes
    10, // vpclmulqdq
    16, // la57
    22, // rdpid
    27, // movdiri
    28, // movdir64b
];
const LEAF7_EDX_SERIALIZE: u32 = 14;
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;

fn clear(reg: &mut u32, bits: &[u32]) {
    for b in bits {
        *reg &= !(1u32 << b);
    }
}

/// Adjusts KVM's supported CPUID for vCPU `vcpu_id` of `vcpu_count`.
pub fn apply(cpuid: &mut CpuId, template: CpuTemplate, vcpu_id: u8, vcpu_count: u8) {
    for entry in cpuid.as_mut_slice().iter_mut() {
        match entry.function {
            0x1 => {
                // Initial APIC id, logical processor count, CLFLUSH line size.
                entry.ebx = (u32::from(vcpu_id) << 24) | (u32::from(vcpu_count) << 16) | (8 << 8);
                entry.ecx |= 1 << LEAF1_ECX_HYPERVISOR;
                if vcpu_count > 1 {
                    entry.edx |= 1 << LEAF1_EDX_HTT;
                } else {
                    entry.edx &= !(1 << LEAF1_EDX_HTT);
                }
                if template == CpuTemplate::Emulated {
                    clear(
                        &mut entry.ecx,
                        &[
                            LEAF1_ECX_PCLMULQDQ,
                            LEAF1_ECX_SSSE3,
                            LEAF1_ECX_FMA,
                            LEAF1_ECX_CX16,
                            LEAF1_ECX_PCID,
                            LEAF1_ECX_SSE41,
                            LEAF1_ECX_SSE42,
                            LEAF1_ECX_X2APIC,
                            LEAF1_ECX_MOVBE,
                            LEAF1_ECX_POPCNT,
                            LEAF1_ECX_TSC_DEADLINE,
                            LEAF1_ECX_AES,
                            LEAF1_ECX_XSAVE,
                            LEAF1_ECX_AVX,
                            LEAF1_ECX_F16C,
                            LEAF1_ECX_RDRAND,
                        ],
                    );
                }
            }
            0x7 if entry.index == 0 && template == CpuTemplate::Emulated => {
                clear(&mut entry.ebx, LEAF7_EBX_MASKED);
                clear(&mut entry.ecx, LEAF7_ECX_MASKED);
                clear(&mut entry.edx, &[LEAF7_EDX_SERIALIZE]);
            }
            0xb | 0x1f => {
                // x2APIC id of this vCPU at every topology level.
                entry.edx = u32::from(vcpu_id);
            }
            LEAF_KVM_FEATURES if template == CpuTemplate::Emulated => {
                // No paravirt features: the guest hangs in kvm_hypercall2
                // when they are on and ring 0 is interpreted.
                entry.eax = 0;
                entry.edx = 0;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn sample() -> CpuId {
        let entries = [
            kvm_cpuid_entry2 {
                function: 1,
                ecx: u32::MAX,
                edx: u32::MAX,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 7,
                index: 0,
                ebx: u32::MAX,
                ecx: u32::MAX,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: LEAF_KVM_FEATURES,
                eax: u32::MAX,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                ..Default::default()
            },
        ];
        CpuId::from_entries(&entries).unwrap()
    }

    #[test]
    fn emulated_template_clears_cx16_and_pv_features() {
        let mut cpuid = sample();
        apply(&mut cpuid, CpuTemplate::Emulated, 1, 2);
        let e = cpuid.as_slice();
        assert_eq!(e[0].ecx & (1 << LEAF1_ECX_CX16), 0);
        assert_eq!(e[0].ecx & (1 << LEAF1_ECX_XSAVE), 0);
        assert_ne!(e[0].ecx & (1 << LEAF1_ECX_HYPERVISOR), 0);
        assert_eq!(e[0].ebx >> 24, 1, "APIC id");
        assert_eq!(e[1].ebx & (1 << 20), 0, "SMAP");
        assert_eq!(e[2].eax, 0);
        assert_eq!(e[3].edx, 1, "x2APIC id");
    }

    #[test]
    fn host_template_keeps_features() {
        let mut cpuid = sample();
        apply(&mut cpuid, CpuTemplate::Host, 0, 1);
        let e = cpuid.as_slice();
        assert_ne!(e[0].ecx & (1 << LEAF1_ECX_CX16), 0);
        assert_eq!(e[2].eax, u32::MAX);
        assert!(CpuTemplate::Host.kernel_params().is_empty());
        assert!(CpuTemplate::Emulated
            .kernel_params()
            .contains("clearcpuid=xsave"));
    }

    #[test]
    fn detection_and_parsing() {
        assert_eq!(
            CpuTemplate::detect_from_cpuinfo("flags\t: fpu vme vmx sse\n"),
            CpuTemplate::Host
        );
        assert_eq!(
            CpuTemplate::detect_from_cpuinfo("flags\t: fpu vme sse\n"),
            CpuTemplate::Emulated
        );
        assert_eq!("emulated".parse::<CpuTemplate>(), Ok(CpuTemplate::Emulated));
        assert!("fast".parse::<CpuTemplate>().is_err());
    }
}
