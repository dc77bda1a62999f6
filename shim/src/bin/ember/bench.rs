//! `ember bench`: boot and pod-start figures measured through the shim's
//! own code paths, without containerd: `boot` boots VMs one after another
//! and reports each phase; `template` starts pods cold and from a template
//! side by side and reports ready times and host memory (PSS).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use ember_shim::config::Config;
use ember_shim::resources::sizing::VmSize;
use ember_shim::sandbox::agent::Agent;
use ember_shim::sandbox::boot::boot_vm;
use ember_shim::sandbox::paths::SandboxPaths;
use ember_shim::sandbox::{vm_config, SandboxSetup};
use ember_shim::templates::{self, Launched, TemplateStore};
use ember_vmm::timing::fmt_duration;

use crate::mib;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Boot N VMs one after another: time to first guest instruction,
    /// kernel to init, agent ready, shutdown, and this process' memory
    /// per VM.
    Boot(BenchArgs),
    /// The shim's pod start path, side by side: N pods booted cold
    /// (templates off), then N pods with templates on (the first makes a
    /// fresh template, in a temporary dir): sandbox-ready time of each,
    /// host memory (PSS) of the N idle VMs of each kind.
    Template(BenchArgs),
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// How many VMs (pods).
    #[arg(short = 'n', long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    count: u32,
    /// vCPUs per VM (default: the config's default_vcpus).
    #[arg(long)]
    vcpus: Option<u8>,
    /// Guest memory in MiB (default: the config's default_memory_mib).
    #[arg(long = "mem", alias = "mem-mib", value_name = "MIB")]
    mem_mib: Option<u32>,
}

impl BenchArgs {
    /// The VM size asked for, the config's defaults where not given.
    fn size(&self, config: &Config) -> VmSize {
        VmSize {
            vcpus: self.vcpus.unwrap_or(config.default_vcpus),
            mem_mib: self.mem_mib.unwrap_or(config.default_memory_mib),
        }
    }
}

pub fn run(command: BenchCommand) -> Result<ExitCode> {
    match command {
        BenchCommand::Boot(args) => boot(args),
        BenchCommand::Template(args) => template(args),
    }
}

fn boot(bench: BenchArgs) -> Result<ExitCode> {
    let (config, source) = Config::load()?;
    ember_shim::logging::init_cli("warn");
    let size = bench.size(&config);
    println!(
        "# ember bench boot: {} VM(s), {} vCPU, {} MiB, kernel {}, config {source}",
        bench.count,
        size.vcpus,
        size.mem_mib,
        config.kernel.display()
    );
    let rt = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    rt.block_on(async {
        let mut ready = Vec::new();
        for i in 1..=bench.count {
            let r = bench_one(&config, size, i).await?;
            ready.push(r);
        }
        if ready.len() > 1 {
            let min = ready.iter().min().copied().unwrap_or_default();
            let max = ready.iter().max().copied().unwrap_or_default();
            let avg = ready.iter().sum::<Duration>() / ready.len() as u32;
            println!(
                "# agent-ready over {} boots: min={} avg={} max={}",
                ready.len(),
                fmt_duration(Some(min)),
                fmt_duration(Some(avg)),
                fmt_duration(Some(max))
            );
        }
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Boots one VM exactly as a pod's first container does, waits for the
/// agent, measures, and shuts it down as a pod's teardown does.
async fn bench_one(config: &Config, size: VmSize, i: u32) -> Result<Duration> {
    let paths = SandboxPaths::new(
        &config.state_dir.join("bench"),
        &std::process::id().to_string(),
        &format!("vm{i}"),
    );
    std::fs::create_dir_all(&paths.shared)
        .with_context(|| format!("creating {}", paths.shared.display()))?;
    let setup = SandboxSetup {
        namespace: "bench".into(),
        id: format!("vm{i}"),
        size,
        kernel_params: None,
        netns: None,
        hostname: None,
    };
    let vm_cfg = vm_config(config, &paths, &setup);
    let result = bench_boot_and_stop(config, vm_cfg, i).await;
    let _ = std::fs::remove_dir_all(&paths.state_dir);
    // <state_dir>/bench/<pid>, then <state_dir>/bench, if empty.
    for dir in paths.state_dir.ancestors().skip(1).take(2) {
        let _ = std::fs::remove_dir(dir);
    }
    result
}

async fn bench_boot_and_stop(
    config: &Config,
    vm_cfg: ember_vmm::VmConfig,
    i: u32,
) -> Result<Duration> {
    let booted = boot_vm(vm_cfg, config.boot_timeout())
        .await
        .with_context(|| format!("VM {i}"))?;
    let (vmm_rss, _shmem) = ember_vmm::process_memory::process_rss();
    let touched = booted.vm.guest_memory_usage();
    let report = booted.report;

    let t = Instant::now();
    let agent = Agent::new(booted.agent, config.agent_timeout());
    let vm = booted.vm;
    if let Err(e) = agent.shutdown(Duration::from_secs(10)).await {
        eprintln!("VM {i}: agent Shutdown: {e}");
    }
    // The guest powers off by itself after Shutdown; give it a while.
    let poweroff_deadline = Instant::now() + Duration::from_secs(30);
    while vm.exit_reason().is_none() && Instant::now() < poweroff_deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ended = vm.exit_reason();
    let reason = vm.shutdown().await;
    let shutdown = t.elapsed();

    println!(
        "vm {i}: first-instruction={} kernel-to-init={} init-to-agent={} agent-ready={} shutdown={}{} vmm-rss={} guest-touched={}",
        fmt_duration(report.timings.to_first_instruction),
        fmt_duration(report.timings.kernel_to_init),
        fmt_duration(report.timings.init_to_agent),
        fmt_duration(Some(report.agent_ready)),
        fmt_duration(Some(shutdown)),
        if ended.is_some() { "" } else { " (forced)" },
        mib(vmm_rss),
        touched.map_or("n/a".into(), |(size, used)| format!("{}/{}", mib(used), mib(size))),
    );
    tracing::debug!("VM {i} ended: {reason}");
    Ok(report.agent_ready)
}

/// One benchmark pod: its state dir and VM, started by the shim's own
/// path ([`templates::boot_or_restore`]).
struct BenchPod {
    paths: SandboxPaths,
    launched: Option<Launched>,
}

async fn bench_pod(config: &Config, size: VmSize, name: &str) -> Result<BenchPod> {
    let paths = SandboxPaths::new(
        &config.state_dir.join("bench"),
        &std::process::id().to_string(),
        name,
    );
    std::fs::create_dir_all(&paths.shared)
        .with_context(|| format!("creating {}", paths.shared.display()))?;
    let setup = SandboxSetup {
        namespace: "bench".into(),
        id: name.into(),
        size,
        kernel_params: None,
        netns: None,
        hostname: None,
    };
    let vm_cfg = vm_config(config, &paths, &setup);
    let launched = templates::boot_or_restore(config, vm_cfg, name).await;
    let mut pod = BenchPod {
        paths,
        launched: None,
    };
    match launched {
        Ok(l) => {
            pod.launched = Some(l);
            Ok(pod)
        }
        Err(e) => {
            pod.stop(config).await;
            Err(anyhow::Error::from(e).context(format!("pod {name}")))
        }
    }
}

impl BenchPod {
    async fn stop(mut self, config: &Config) {
        if let Some(l) = self.launched.take() {
            let agent = Agent::new(l.booted.agent, config.agent_timeout());
            let _ = agent.shutdown(Duration::from_secs(10)).await;
            drop(agent);
            let vm = l.booted.vm;
            let _ = tokio::time::timeout(Duration::from_secs(30), vm.wait()).await;
            vm.shutdown().await;
        }
        let _ = std::fs::remove_dir_all(&self.paths.state_dir);
    }
}

fn template(bench: BenchArgs) -> Result<ExitCode> {
    let (config, source) = Config::load()?;
    ember_shim::logging::init_cli("warn");
    let size = bench.size(&config);
    let n = bench.count as usize;
    let bench_dir = config
        .state_dir
        .join("bench")
        .join(std::process::id().to_string());
    let cold_cfg = Config {
        templates: false,
        ..config.clone()
    };
    let tmpl_cfg = Config {
        templates: true,
        template_dir: bench_dir.join("templates"),
        ..config.clone()
    };
    println!(
        "# ember bench template: {n} pod(s) cold, then {n} with templates; {} vCPU, {} MiB, kernel {}, config {source}",
        size.vcpus,
        size.mem_mib,
        config.kernel.display()
    );
    let rt = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    let result = rt.block_on(async {
        let mut ready = Vec::new();
        let base = ember_vmm::process_memory::process_pss();
        let mut pods = Vec::new();
        for i in 0..n {
            let pod = bench_pod(&cold_cfg, size, &format!("cold{i}")).await?;
            if let Some(l) = &pod.launched {
                println!("cold {i}: {}", l.report);
                ready.push((l.report.total, Duration::ZERO, String::new()));
            }
            pods.push(pod);
        }
        let cold_pss = ember_vmm::process_memory::process_pss().saturating_sub(base);
        for pod in pods.drain(..) {
            pod.stop(&cold_cfg).await;
        }
        let base = ember_vmm::process_memory::process_pss();
        for i in 0..n {
            let pod = bench_pod(&tmpl_cfg, size, &format!("tmpl{i}")).await?;
            if let Some(l) = &pod.launched {
                println!("template {i}: {}", l.report);
                if let Some(r) = ready.get_mut(i) {
                    r.1 = l.report.total;
                    r.2 = match &l.report.origin {
                        templates::Origin::Cold => "cold (template unusable)".into(),
                        templates::Origin::Restored { created: true, .. } => {
                            "made the template, restored".into()
                        }
                        templates::Origin::Restored { .. } => "restored".into(),
                    };
                }
            }
            pods.push(pod);
        }
        let tmpl_pss = ember_vmm::process_memory::process_pss().saturating_sub(base);
        let store = TemplateStore::new(&tmpl_cfg.template_dir);
        let template_disk = store.disk_bytes();
        for pod in pods.drain(..) {
            pod.stop(&tmpl_cfg).await;
        }
        println!();
        println!("sandbox ready (shim path: VM up, agent answering, clock/entropy/hostname set):");
        println!("pod  cold-boot  with-template  ");
        for (i, (c, t, how)) in ready.iter().enumerate() {
            println!(
                "{i:<4} {:>9}  {:>13}  {how}",
                fmt_duration(Some(*c)),
                fmt_duration(Some(*t))
            );
        }
        let restores: Vec<Duration> = ready.iter().skip(1).map(|r| r.1).collect();
        if !restores.is_empty() {
            let avg_cold = ready.iter().map(|r| r.0).sum::<Duration>() / ready.len() as u32;
            let avg_restore = restores.iter().sum::<Duration>() / restores.len() as u32;
            println!(
                "# average: cold boot {}, restore from the template {}",
                fmt_duration(Some(avg_cold)),
                fmt_duration(Some(avg_restore))
            );
        }
        println!(
            "# host memory (PSS) of {n} idle VMs: cold {} ({} per VM), from the template {} ({} per VM); template on disk {}",
            mib(cold_pss),
            mib(cold_pss / n as u64),
            mib(tmpl_pss),
            mib(tmpl_pss / n as u64),
            mib(template_disk)
        );
        Ok::<_, anyhow::Error>(())
    });
    let _ = std::fs::remove_dir_all(&bench_dir);
    if let Some(dir) = bench_dir.parent() {
        let _ = std::fs::remove_dir(dir);
    }
    result?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Wrap {
        #[command(subcommand)]
        bench: BenchCommand,
    }

    fn parse(args: &[&str]) -> Result<BenchArgs, clap::Error> {
        let argv = ["bench", "boot"].iter().chain(args);
        match Wrap::try_parse_from(argv)?.bench {
            BenchCommand::Boot(a) | BenchCommand::Template(a) => Ok(a),
        }
    }

    #[test]
    fn bench_arguments() {
        let a = parse(&["--count", "3", "--vcpus=2", "--mem", "512"]).unwrap();
        assert_eq!((a.count, a.vcpus, a.mem_mib), (3, Some(2), Some(512)));
        let a = parse(&["-n", "2", "--mem-mib", "128"]).unwrap();
        assert_eq!((a.count, a.mem_mib), (2, Some(128)));
        let a = parse(&[]).unwrap();
        assert_eq!((a.count, a.vcpus, a.mem_mib), (1, None, None));
        for bad in [
            &["--count", "0"][..],
            &["--count"],
            &["--fast"],
            &["--vcpus", "x"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn rss_is_read() {
        let (own, _) = ember_vmm::process_memory::process_rss();
        assert!(own > 0);
    }
}
