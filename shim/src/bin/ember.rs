//! `ember`: the operator and debugging CLI of the Ember runtime. It reads
//! the same config as the shim (`/etc/ember/config.toml`, `EMBER_CONFIG`)
//! and boots VMs through the same code path as the shim's pods.
//!
//! ```text
//! ember config                 print the effective config and where it came from
//! ember check                  check KVM, guest kernel and initrd, CPU template, state dir
//! ember bench boot [--count N] [--vcpus N] [--mem MIB]
//!                              boot N VMs one after another and report each phase
//! ember bench template [--count N] [--vcpus N] [--mem MIB]
//!                              N pods cold vs N pods from a template: ready time, PSS
//! ember templates [list]       list the VM templates, their sizes and the total
//! ember templates drop ID|--all
//!                              remove one template, or all of them
//! ember version
//! ```

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ember_shim::config::Config;
use ember_shim::resources::sizing::VmSize;
use ember_shim::sandbox::agent::Agent;
use ember_shim::sandbox::boot::boot_vm;
use ember_shim::sandbox::paths::SandboxPaths;
use ember_shim::sandbox::template::{self, Launched};
use ember_shim::sandbox::{vm_config, SandboxSetup};
use ember_vmm::snapshot::store::TemplateStore;
use ember_vmm::timing::fmt_duration;

const USAGE: &str = "usage:
  ember config                 print the effective config (TOML) and its source
  ember check                  check KVM, guest kernel and initrd, CPU template, state dir
  ember bench boot [--count N] [--vcpus N] [--mem MIB]
                               boot N VMs one after another (no containerd): time to
                               first guest instruction, kernel to init, agent ready,
                               shutdown, and this process' memory per VM
  ember bench template [--count N] [--vcpus N] [--mem MIB]
                               the shim's pod start path, side by side: N pods booted
                               cold (templates off), then N pods with templates on
                               (the first makes a fresh template, in a temporary dir):
                               sandbox-ready time of each, host memory (PSS) of the N
                               idle VMs of each kind
  ember templates [list]       list the VM templates (template_dir): identity, size on
                               disk, total; `*` marks the one of a default-sized pod
  ember templates drop ID|--all
                               remove one template (pods of its identity make it
                               again), or every template
  ember version

The config is /etc/ember/config.toml, or the file named by EMBER_CONFIG.";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["config"] => cmd_config(),
        ["check"] => cmd_check(),
        ["bench", "boot", rest @ ..] => cmd_bench_boot(rest),
        ["bench", "template", rest @ ..] => cmd_bench_template(rest),
        ["templates"] | ["templates", "list"] => cmd_templates_list(),
        ["templates", "drop", "--all"] => cmd_templates_drop(None),
        ["templates", "drop", id] if !id.starts_with('-') => cmd_templates_drop(Some(id)),
        ["version"] | ["--version"] | ["-v"] => {
            println!("ember {}", ember_shim::VERSION);
            Ok(ExitCode::SUCCESS)
        }
        ["help"] | ["--help"] | ["-h"] => {
            println!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        _ => {
            eprintln!("{USAGE}");
            Ok(ExitCode::from(2))
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ember: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn cmd_config() -> Result<ExitCode> {
    let (config, source) = Config::load()?;
    println!("# Ember config: {source}");
    print!("{}", config.to_toml());
    Ok(ExitCode::SUCCESS)
}

/// KVM_GET_API_VERSION = _IO(KVMIO, 0x00).
const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;

fn check_kvm() -> Result<String> {
    use std::os::fd::AsRawFd;
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .context("opening /dev/kvm")?;
    // SAFETY: a KVM ioctl without arguments on an fd we own.
    let version = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_GET_API_VERSION as _, 0) };
    if version != 12 {
        bail!("/dev/kvm answers API version {version}, expected 12");
    }
    Ok("/dev/kvm usable (API 12)".into())
}

fn check_file(what: &str, path: &Path, elf: bool) -> Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("{what} {}", path.display()))?;
    let len = f.metadata()?.len();
    if elf {
        let mut magic = [0u8; 4];
        f.read_exact(&mut magic)
            .with_context(|| format!("reading {}", path.display()))?;
        if &magic != b"\x7fELF" {
            bail!(
                "{what} {} is not an uncompressed ELF vmlinux",
                path.display()
            );
        }
    }
    Ok(format!(
        "{what} {} ({:.1} MiB)",
        path.display(),
        len as f64 / (1 << 20) as f64
    ))
}

fn check_state_dir(dir: &Path) -> Result<String> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let probe = dir.join(format!(".ember-check-{}", std::process::id()));
    std::fs::write(&probe, b"").with_context(|| format!("writing in {}", dir.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(format!("state dir {} writable", dir.display()))
}

/// Where containerd's config registers Ember (CONTAINERD_CONFIG, default
/// /etc/containerd/config.toml): a section containerd ignores at the
/// file's version, or a drop-in newer than the root config, fails.
fn check_containerd_config() -> Result<String> {
    let path = std::env::var_os("CONTAINERD_CONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/etc/containerd/config.toml"));
    if !path.exists() {
        return Ok(format!(
            "no {} (containerd defaults: `ctr run --runtime {}` works, no CRI handler)",
            path.display(),
            ember_shim::RUNTIME_ID
        ));
    }
    let found = ember_shim::containerd_config::check(&path)?;
    if !found.problems.is_empty() {
        bail!("{}", found.problems.join("; "));
    }
    if found.handlers.is_empty() {
        return Ok(format!(
            "{} registers no CRI handler for Ember (deploy/containerd/register.sh adds `ember`)",
            path.display()
        ));
    }
    Ok(format!("CRI handlers: {}", found.handlers.join(", ")))
}

fn cmd_check() -> Result<ExitCode> {
    let (config, source) = match Config::load() {
        Ok(c) => c,
        Err(e) => {
            println!("FAIL config: {e:#}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let template = config.cpu_template.resolve();
    let checks: Vec<(&str, Result<String>)> = vec![
        ("config", Ok(format!("{source}"))),
        ("kvm", check_kvm()),
        ("kernel", check_file("guest kernel", &config.kernel, true)),
        ("initrd", check_file("initrd", &config.initrd, false)),
        (
            "cpu",
            Ok(format!(
                "CPU template {} resolves to {template}{}",
                config.cpu_template,
                if template == ember_vmm::CpuTemplate::Emulated {
                    " (no VT-x/AMD-V: guest kernel emulated, boots take minutes)"
                } else {
                    ""
                }
            )),
        ),
        ("state", check_state_dir(&config.state_dir)),
        ("cri", check_containerd_config()),
    ];
    let mut failed = false;
    for (name, r) in checks {
        match r {
            Ok(msg) => println!("ok   {name:<7} {msg}"),
            Err(e) => {
                failed = true;
                println!("FAIL {name:<7} {e:#}");
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// The template identity of a default-sized pod under `config`.
fn default_identity(config: &Config) -> Result<String> {
    let paths = SandboxPaths::new(&config.state_dir, "ember", "template-probe");
    let setup = SandboxSetup {
        namespace: "ember".into(),
        id: "template-probe".into(),
        size: VmSize {
            vcpus: config.default_vcpus,
            mem_mib: config.default_memory_mib,
        },
        kernel_params: None,
        netns: None,
    };
    Ok(TemplateStore::identity(&vm_config(config, &paths, &setup))?)
}

fn cmd_templates_list() -> Result<ExitCode> {
    let (config, _) = Config::load()?;
    let store = TemplateStore::new(&config.template_dir);
    let current = default_identity(&config).ok();
    println!(
        "# VM templates in {} ({})",
        store.dir().display(),
        if config.templates {
            "templates on"
        } else {
            "templates off in the config"
        }
    );
    let list = store.list();
    for t in &list {
        let mark = if current.as_deref() == Some(t.identity.as_str()) {
            "*"
        } else {
            " "
        };
        println!(
            "{mark} {}  {:>10}  {}",
            t.identity,
            mib(t.disk_bytes),
            t.dir.display()
        );
    }
    println!(
        "{} template(s), {} on disk in {}",
        list.len(),
        mib(store.disk_bytes()),
        store.dir().display()
    );
    Ok(ExitCode::SUCCESS)
}

fn cmd_templates_drop(id: Option<&str>) -> Result<ExitCode> {
    let (config, _) = Config::load()?;
    let store = TemplateStore::new(&config.template_dir);
    match id {
        None => {
            let n = store.list().len();
            store.clear()?;
            println!("dropped {n} template(s) from {}", store.dir().display());
        }
        Some(id) => {
            if id.contains('/') || id.starts_with('.') || store.get(id).is_none() {
                bail!("no template {id:?} in {}", store.dir().display());
            }
            store.discard(id)?;
            // A pod may try this identity again.
            let _ = std::fs::remove_file(store.dir().join(format!(".broken-{id}")));
            println!("dropped template {id}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

struct BenchArgs {
    count: u32,
    vcpus: Option<u8>,
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

fn parse_bench_args(args: &[&str]) -> Result<BenchArgs> {
    let mut out = BenchArgs {
        count: 1,
        vcpus: None,
        mem_mib: None,
    };
    let mut it = args.iter().copied();
    while let Some(arg) = it.next() {
        let (flag, inline): (&str, Option<&str>) = match arg.split_once('=') {
            Some((f, v)) => (f, Some(v)),
            None => (arg, None),
        };
        let mut value = || -> Result<&str> {
            inline
                .or_else(|| it.next())
                .with_context(|| format!("{flag} needs a value"))
        };
        match flag {
            "--count" | "-n" => out.count = value()?.parse().context("--count")?,
            "--vcpus" => out.vcpus = Some(value()?.parse().context("--vcpus")?),
            "--mem" | "--mem-mib" => out.mem_mib = Some(value()?.parse().context("--mem")?),
            other => bail!("unknown option {other}\n{USAGE}"),
        }
    }
    if out.count == 0 {
        bail!("--count must be at least 1");
    }
    Ok(out)
}

fn mib(bytes: u64) -> String {
    format!("{:.1}MiB", bytes as f64 / (1 << 20) as f64)
}

fn cmd_bench_boot(args: &[&str]) -> Result<ExitCode> {
    let bench = parse_bench_args(args)?;
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
    let (vmm_rss, _shmem) = ember_vmm::memory::process_rss();
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
/// path ([`template::boot_or_restore`]).
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
    };
    let vm_cfg = vm_config(config, &paths, &setup);
    let launched = template::boot_or_restore(config, vm_cfg, name).await;
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

fn cmd_bench_template(args: &[&str]) -> Result<ExitCode> {
    let bench = parse_bench_args(args)?;
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
        let base = ember_vmm::memory::process_pss();
        let mut pods = Vec::new();
        for i in 0..n {
            let pod = bench_pod(&cold_cfg, size, &format!("cold{i}")).await?;
            if let Some(l) = &pod.launched {
                println!("cold {i}: {}", l.report);
                ready.push((l.report.total, Duration::ZERO, String::new()));
            }
            pods.push(pod);
        }
        let cold_pss = ember_vmm::memory::process_pss().saturating_sub(base);
        for pod in pods.drain(..) {
            pod.stop(&cold_cfg).await;
        }
        let base = ember_vmm::memory::process_pss();
        for i in 0..n {
            let pod = bench_pod(&tmpl_cfg, size, &format!("tmpl{i}")).await?;
            if let Some(l) = &pod.launched {
                println!("template {i}: {}", l.report);
                if let Some(r) = ready.get_mut(i) {
                    r.1 = l.report.total;
                    r.2 = match &l.report.origin {
                        template::Origin::Cold => "cold (template unusable)".into(),
                        template::Origin::Restored { created: true, .. } => {
                            "made the template, restored".into()
                        }
                        template::Origin::Restored { .. } => "restored".into(),
                    };
                }
            }
            pods.push(pod);
        }
        let tmpl_pss = ember_vmm::memory::process_pss().saturating_sub(base);
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
    use super::*;

    #[test]
    fn bench_arguments() {
        let a = parse_bench_args(&["--count", "3", "--vcpus=2", "--mem", "512"]).unwrap();
        assert_eq!((a.count, a.vcpus, a.mem_mib), (3, Some(2), Some(512)));
        let a = parse_bench_args(&[]).unwrap();
        assert_eq!((a.count, a.vcpus, a.mem_mib), (1, None, None));
        assert!(parse_bench_args(&["--count", "0"]).is_err());
        assert!(parse_bench_args(&["--count"]).is_err());
        assert!(parse_bench_args(&["--fast"]).is_err());
        assert!(parse_bench_args(&["--vcpus", "x"]).is_err());
    }

    #[test]
    fn files_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("vmlinux");
        std::fs::write(&k, b"\x7fELF....").unwrap();
        assert!(check_file("guest kernel", &k, true).is_ok());
        std::fs::write(&k, b"MZ......").unwrap();
        assert!(check_file("guest kernel", &k, true).is_err());
        assert!(check_file("initrd", &dir.path().join("none"), false).is_err());
        assert!(check_state_dir(&dir.path().join("state")).is_ok());
    }

    #[test]
    fn rss_is_read() {
        let (own, _) = ember_vmm::memory::process_rss();
        assert!(own > 0);
    }
}
