//! cgroup v2: one cgroup per container under the agent's own root
//! (default `/sys/fs/cgroup/ember`, env `EMBER_AGENT_CGROUP_ROOT`).
//! The host's `cgroupsPath` is ignored. Missing controllers are tolerated:
//! the limit is skipped and logged.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

use ember_proto::agent::*;
use oci_spec::runtime::LinuxResources;

/// Controllers enabled for container cgroups (when available).
pub const CONTROLLERS: &[&str] = &["cpu", "memory", "pids", "cpuset", "io", "hugetlb"];

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Whether `path` is on a cgroup v2 file system.
pub fn is_cgroup2(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type().0 == CGROUP2_SUPER_MAGIC)
        .unwrap_or(false)
}

/// Create the root (if needed) and enable the controllers in its parent's
/// and its own `cgroup.subtree_control`.
pub fn prepare_root(root: &Path) -> io::Result<()> {
    match std::fs::create_dir(root) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    for dir in [root.parent(), Some(root)].into_iter().flatten() {
        enable_controllers(dir);
    }
    Ok(())
}

fn enable_controllers(dir: &Path) {
    let available = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    let want: Vec<String> = CONTROLLERS
        .iter()
        .filter(|c| available.split_whitespace().any(|a| a == **c))
        .map(|c| format!("+{c}"))
        .collect();
    let missing: Vec<&str> = CONTROLLERS
        .iter()
        .copied()
        .filter(|c| !available.split_whitespace().any(|a| a == *c))
        .collect();
    if !missing.is_empty() {
        tracing::info!(
            "cgroup {}: controllers not available: {missing:?}",
            dir.display()
        );
    }
    if want.is_empty() {
        return;
    }
    if let Err(e) = std::fs::write(dir.join("cgroup.subtree_control"), want.join(" ")) {
        tracing::warn!(
            "enabling {} in {}/cgroup.subtree_control: {e}",
            want.join(" "),
            dir.display()
        );
    }
}

/// The cgroup v2 file writes for OCI `linux.resources`, in order.
pub fn resource_writes(r: &LinuxResources) -> Result<Vec<(String, String)>, String> {
    let mut w: Vec<(String, String)> = Vec::new();
    let max = |v: i64| {
        if v < 0 {
            "max".to_string()
        } else {
            v.to_string()
        }
    };
    if let Some(m) = r.memory() {
        if let Some(l) = m.limit() {
            w.push(("memory.max".into(), max(l)));
        }
        if let Some(l) = m.reservation() {
            w.push(("memory.low".into(), max(l)));
        }
        if let Some(s) = m.swap() {
            // OCI swap is memory+swap (v1); v2 wants swap alone (runc).
            let v = match (s, m.limit()) {
                (-1, _) => "max".to_string(),
                (0, _) => String::new(),
                (s, Some(l)) if l > 0 => {
                    if s < l {
                        return Err(format!(
                            "memory+swap limit {s} is lower than the memory limit {l}"
                        ));
                    }
                    (s - l).to_string()
                }
                (_, Some(-1)) => "max".to_string(),
                _ => return Err("a swap limit needs a memory limit".into()),
            };
            if !v.is_empty() {
                w.push(("memory.swap.max".into(), v));
            }
        }
        if m.swappiness().is_some() || m.kernel().is_some() || m.kernel_tcp().is_some() {
            tracing::debug!("cgroup v2 has no swappiness/kernel memory limits: ignored");
        }
    }
    if let Some(c) = r.cpu() {
        if let Some(shares) = c.shares().filter(|s| *s != 0) {
            let s = shares.clamp(2, 262_144);
            let weight = 1 + ((s - 2) * 9999) / 262_142;
            w.push(("cpu.weight".into(), weight.to_string()));
        }
        if c.quota().is_some() || c.period().is_some() {
            let quota = match c.quota() {
                Some(q) if q > 0 => q.to_string(),
                _ => "max".to_string(),
            };
            let period = c.period().filter(|p| *p > 0).unwrap_or(100_000);
            w.push(("cpu.max".into(), format!("{quota} {period}")));
        }
        if let Some(b) = c.burst() {
            w.push(("cpu.max.burst".into(), b.to_string()));
        }
        if let Some(i) = c.idle() {
            w.push(("cpu.idle".into(), i.to_string()));
        }
        if let Some(cpus) = c.cpus().as_ref().filter(|s| !s.is_empty()) {
            w.push(("cpuset.cpus".into(), cpus.clone()));
        }
        if let Some(mems) = c.mems().as_ref().filter(|s| !s.is_empty()) {
            w.push(("cpuset.mems".into(), mems.clone()));
        }
    }
    if let Some(p) = r.pids() {
        let v = if p.limit() > 0 {
            p.limit().to_string()
        } else {
            "max".to_string()
        };
        w.push(("pids.max".into(), v));
    }
    if let Some(b) = r.block_io() {
        let conv = |w: u16| 1 + (w.clamp(10, 1000) as u64 - 10) * 9999 / 990;
        if let Some(weight) = b.weight().filter(|w| *w > 0) {
            w.push(("io.weight".into(), format!("default {}", conv(weight))));
        }
        for d in b.weight_device().iter().flatten() {
            if let Some(weight) = d.weight() {
                w.push((
                    "io.weight".into(),
                    format!("{}:{} {}", d.major(), d.minor(), conv(weight)),
                ));
            }
        }
        let throttles = [
            (b.throttle_read_bps_device(), "rbps"),
            (b.throttle_write_bps_device(), "wbps"),
            (b.throttle_read_iops_device(), "riops"),
            (b.throttle_write_iops_device(), "wiops"),
        ];
        for (list, key) in throttles {
            for d in list.iter().flatten() {
                let rate = if d.rate() == 0 {
                    "max".to_string()
                } else {
                    d.rate().to_string()
                };
                w.push((
                    "io.max".into(),
                    format!("{}:{} {key}={rate}", d.major(), d.minor()),
                ));
            }
        }
    }
    for h in r.hugepage_limits().iter().flatten() {
        w.push((format!("hugetlb.{}.max", h.page_size()), max(h.limit())));
    }
    if let Some(u) = r.unified() {
        let mut keys: Vec<&String> = u.keys().collect();
        keys.sort();
        for k in keys {
            if k.contains('/') || k.starts_with('.') || k.is_empty() {
                return Err(format!("invalid unified cgroup key {k:?}"));
            }
            w.push((k.clone(), u[k].clone()));
        }
    }
    if r.devices().as_ref().is_some_and(|d| !d.is_empty()) {
        tracing::debug!("device cgroup rules ignored (cgroup v2 needs an eBPF program; the guest has only the container's devices)");
    }
    Ok(w)
}

/// Apply `r` to the cgroup at `dir`. Missing files (controller not
/// available) are skipped with a log line; other failures are errors.
pub fn apply(dir: &Path, r: &LinuxResources) -> Result<(), String> {
    for (file, value) in resource_writes(r)? {
        let path = dir.join(&file);
        // cgroupfs answers EACCES (not ENOENT) for files that do not exist.
        let res = if path.exists() {
            std::fs::write(&path, &value)
        } else {
            Err(io::ErrorKind::NotFound.into())
        };
        match res {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                tracing::info!(
                    "cgroup {}: no {file} (controller not available): limit {value:?} skipped",
                    dir.display()
                );
            }
            Err(e) => return Err(format!("writing {value:?} to {file}: {e}")),
        }
    }
    Ok(())
}

/// Pids listed in `cgroup.procs`.
pub fn procs(dir: &Path) -> io::Result<Vec<u32>> {
    let s = std::fs::read_to_string(dir.join("cgroup.procs"))?;
    Ok(s.split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect())
}

/// Value of `key` in a flat-keyed file ("key value" lines).
pub fn keyed(content: &str, key: &str) -> Option<u64> {
    content.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok())?
    })
}

fn keyed_map(content: &str) -> HashMap<&str, u64> {
    content
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k, v.trim().parse().ok()?))
        })
        .collect()
}

fn read_u64_or_max(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Resource usage from the cgroup's files; missing files give zeros.
pub fn stats(dir: &Path) -> StatsContainerResponse {
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
    let mut cpu = CpuStats::new();
    let s = read("cpu.stat");
    let m = keyed_map(&s);
    let g = |k: &str| m.get(k).copied().unwrap_or(0);
    cpu.usage_usec = g("usage_usec");
    cpu.user_usec = g("user_usec");
    cpu.system_usec = g("system_usec");
    cpu.nr_periods = g("nr_periods");
    cpu.nr_throttled = g("nr_throttled");
    cpu.throttled_usec = g("throttled_usec");

    let mut mem = MemoryStats::new();
    mem.usage = read_u64_or_max(&dir.join("memory.current"));
    mem.limit = read_u64_or_max(&dir.join("memory.max"));
    mem.swap_usage = read_u64_or_max(&dir.join("memory.swap.current"));
    mem.swap_limit = read_u64_or_max(&dir.join("memory.swap.max"));
    let s = read("memory.stat");
    let m = keyed_map(&s);
    let g = |k: &str| m.get(k).copied().unwrap_or(0);
    mem.anon = g("anon");
    mem.file = g("file");
    mem.kernel_stack = g("kernel_stack");
    mem.slab = g("slab");
    mem.sock = g("sock");
    mem.shmem = g("shmem");
    mem.file_mapped = g("file_mapped");
    mem.file_dirty = g("file_dirty");
    mem.file_writeback = g("file_writeback");
    mem.active_anon = g("active_anon");
    mem.inactive_anon = g("inactive_anon");
    mem.active_file = g("active_file");
    mem.inactive_file = g("inactive_file");
    mem.unevictable = g("unevictable");
    mem.pgfault = g("pgfault");
    mem.pgmajfault = g("pgmajfault");
    let s = read("memory.events");
    mem.oom_events = keyed(&s, "oom").unwrap_or(0);
    mem.oom_kill_events = keyed(&s, "oom_kill").unwrap_or(0);

    let mut pids = PidsStats::new();
    pids.current = read_u64_or_max(&dir.join("pids.current"));
    pids.limit = read_u64_or_max(&dir.join("pids.max"));
    if pids.current == 0 {
        // No pids controller: count the processes.
        pids.current = procs(dir).map(|p| p.len() as u64).unwrap_or(0);
    }

    let mut r = StatsContainerResponse::new();
    r.io = parse_io_stat(&read("io.stat"));
    r.cpu = Some(cpu).into();
    r.memory = Some(mem).into();
    r.pids = Some(pids).into();
    r
}

/// Parse `io.stat` ("8:0 rbytes=1 wbytes=2 rios=3 wios=4 ...").
pub fn parse_io_stat(s: &str) -> Vec<IoDeviceStats> {
    s.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let (maj, min) = it.next()?.split_once(':')?;
            let mut d = IoDeviceStats::new();
            d.major = maj.parse().ok()?;
            d.minor = min.parse().ok()?;
            for kv in it {
                let Some((k, v)) = kv.split_once('=') else {
                    continue;
                };
                let v: u64 = v.parse().unwrap_or(0);
                match k {
                    "rbytes" => d.rbytes = v,
                    "wbytes" => d.wbytes = v,
                    "rios" => d.rios = v,
                    "wios" => d.wios = v,
                    _ => {}
                }
            }
            Some(d)
        })
        .collect()
}

/// The cgroup directory of a container.
pub fn container_dir(root: &Path, id: &str) -> PathBuf {
    root.join(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oci_resources_to_cgroup2_files() {
        let r: LinuxResources = serde_json::from_str(
            r#"{"memory":{"limit":104857600,"swap":209715200,"reservation":-1},
                "cpu":{"shares":1024,"quota":50000,"period":100000,"cpus":"0-1"},
                "pids":{"limit":64},
                "blockIO":{"weight":500,"throttleReadBpsDevice":[{"major":8,"minor":0,"rate":1000}]},
                "hugepageLimits":[{"pageSize":"2MB","limit":0}],
                "unified":{"memory.high":"90000000"}}"#,
        )
        .unwrap();
        let w = resource_writes(&r).unwrap();
        let get = |f: &str| w.iter().find(|(k, _)| k == f).map(|(_, v)| v.as_str());
        assert_eq!(get("memory.max"), Some("104857600"));
        assert_eq!(get("memory.swap.max"), Some("104857600"));
        assert_eq!(get("memory.low"), Some("max"));
        assert_eq!(get("cpu.weight"), Some("39"));
        assert_eq!(get("cpu.max"), Some("50000 100000"));
        assert_eq!(get("cpuset.cpus"), Some("0-1"));
        assert_eq!(get("pids.max"), Some("64"));
        assert_eq!(get("io.weight"), Some("default 4950"));
        assert_eq!(get("io.max"), Some("8:0 rbps=1000"));
        assert_eq!(get("hugetlb.2MB.max"), Some("0"));
        assert_eq!(get("memory.high"), Some("90000000"));

        let bad: LinuxResources =
            serde_json::from_str(r#"{"memory":{"limit":200,"swap":100}}"#).unwrap();
        assert!(resource_writes(&bad).is_err());
        let bad: LinuxResources = serde_json::from_str(r#"{"unified":{"../x":"1"}}"#).unwrap();
        assert!(resource_writes(&bad).is_err());
    }

    #[test]
    fn parses_stat_files() {
        assert_eq!(keyed("oom 1\noom_kill 2\n", "oom_kill"), Some(2));
        assert_eq!(keyed("oom 1\n", "oom_kill"), None);
        let io = parse_io_stat("8:0 rbytes=10 wbytes=20 rios=1 wios=2 dbytes=0 dios=0\n");
        assert_eq!(io.len(), 1);
        assert_eq!(
            (io[0].major, io[0].minor, io[0].rbytes, io[0].wios),
            (8, 0, 10, 2)
        );
    }
}
