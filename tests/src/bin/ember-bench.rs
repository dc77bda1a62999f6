//! Ember's snapshot benchmark: figures printed, nothing asserted.
//! (Boot figures: `ember bench boot`, which uses the shim's own boot path.)
//!
//!   ember-bench snapshot [N]    cold boot vs restore from a template, side
//!                               by side, and host memory (PSS) of N idle
//!                               restored VMs vs N idle cold-booted ones
//!
//! Uses the guest artifacts of EMBER_KERNEL / EMBER_INITRD (default
//! /var/lib/ember) and EMBER_CPU_TEMPLATE (default auto).

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ember_e2e::{vm_config, wait_for_agent};
use ember_proto::agent::ShutdownRequest;
use ember_proto::client::{self, AgentClient};
use ember_vmm::timing::fmt_duration;
use ember_vmm::{SnapshotFiles, Vm};

const BOOT_DEADLINE: Duration = Duration::from_secs(900);
const IDENTITY: &str = "ember-bench";

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

async fn shutdown(vm: Vm, agent: AgentClient) -> Duration {
    let t = Instant::now();
    let _ = agent
        .shutdown(
            client::context(Duration::from_secs(30)),
            &ShutdownRequest::new(),
        )
        .await;
    drop(agent);
    let _ = tokio::time::timeout(Duration::from_secs(120), vm.wait()).await;
    vm.shutdown().await;
    t.elapsed()
}

async fn boot(dir: &std::path::Path, n: usize) -> Result<(Vm, AgentClient, Duration)> {
    let vdir = dir.join(format!("vm{n}"));
    std::fs::create_dir_all(&vdir)?;
    let t = Instant::now();
    let vm = Vm::start(vm_config(&vdir, 3))
        .await
        .context("starting VM")?;
    let agent = wait_for_agent(&vm, BOOT_DEADLINE).await?;
    Ok((vm, agent, t.elapsed()))
}

async fn bench_snapshot(count: usize) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let base_pss = ember_vmm::process_memory::process_pss();

    // Cold boots, kept running to measure their memory together.
    let mut cold = Vec::new();
    for n in 0..count {
        let (vm, agent, ready) = boot(dir.path(), n).await?;
        println!("cold boot {n}: agent ready {}", fmt_duration(Some(ready)));
        cold.push((vm, agent, ready));
    }
    let cold_pss = ember_vmm::process_memory::process_pss().saturating_sub(base_pss);
    let cold_ready: Vec<Duration> = cold.iter().map(|c| c.2).collect();
    let mut cold = cold.into_iter();
    let (template_vm, template_agent, _) = cold.next().context("count must be at least 1")?;
    for (vm, agent, _) in cold {
        shutdown(vm, agent).await;
    }

    // Snapshot the first one as the template.
    drop(template_agent);
    let files = SnapshotFiles::new(dir.path().join("template"));
    let t = Instant::now();
    template_vm.snapshot(files.clone(), IDENTITY.into()).await?;
    println!(
        "template snapshot written in {}",
        fmt_duration(Some(t.elapsed()))
    );

    let base_pss = ember_vmm::process_memory::process_pss();
    let mut restored = Vec::new();
    for n in 0..count {
        let rdir = dir.path().join(format!("restored{n}"));
        std::fs::create_dir_all(&rdir)?;
        let t = Instant::now();
        let vm = Vm::restore(vm_config(&rdir, 3), files.clone(), IDENTITY.into()).await?;
        let agent = wait_for_agent(&vm, Duration::from_secs(120)).await?;
        let ready = t.elapsed();
        restored.push((vm, agent, ready));
    }
    let restored_pss = ember_vmm::process_memory::process_pss().saturating_sub(base_pss);

    println!();
    println!("sandbox-ready time, cold boot vs restore from template:");
    println!("pod  cold-boot  restore");
    for (n, (c, r)) in cold_ready
        .iter()
        .zip(restored.iter().map(|r| r.2))
        .enumerate()
    {
        println!(
            "{n:<4} {:>9}  {:>7}",
            fmt_duration(Some(*c)),
            fmt_duration(Some(r))
        );
    }
    println!();
    println!(
        "host memory (PSS) of {count} idle VMs: cold-booted {:.1} MiB ({:.1} per VM), restored {:.1} MiB ({:.1} per VM)",
        mib(cold_pss),
        mib(cold_pss) / count as f64,
        mib(restored_pss),
        mib(restored_pss) / count as f64
    );
    for (vm, agent, _) in restored {
        shutdown(vm, agent).await;
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let count = |i: usize, default: usize| -> Result<usize> {
        match args.get(i) {
            Some(s) => s.parse().with_context(|| format!("not a count: {s}")),
            None => Ok(default),
        }
    };
    match args.first().map(String::as_str) {
        Some("snapshot") => bench_snapshot(count(1, 3)?).await,
        _ => bail!("usage: ember-bench snapshot [N]"),
    }
}
