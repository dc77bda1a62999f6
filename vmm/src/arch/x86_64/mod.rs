//! x86_64 boot: memory layout, zero page and e820, MP table, vCPU registers
//! and CPUID templates.

pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod regs;
