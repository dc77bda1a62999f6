//! Container metrics for containerd: the agent's cgroup v2 numbers as
//! `io.containerd.cgroups.v2.Metrics`, the type containerd's runc shim
//! sends on a cgroup v2 host, which `ctr task metrics` and the CRI plugin
//! decode (the guest always runs cgroup v2, whatever the host runs).

use containerd_shim_protos::cgroups_v2::metrics::{
    CPUStat, IOEntry, IOStat, MemoryEvents, MemoryStat, Metrics, PidsStat,
};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::{Message, MessageField, MessageFull};
use ember_proto::agent::StatsContainerResponse;

/// cgroup v2 writes "max" for "no limit"; containerd's cgroups library
/// reports that as the largest u64, and so do we. The agent sends 0.
fn limit(v: u64) -> u64 {
    if v == 0 {
        u64::MAX
    } else {
        v
    }
}

/// Converts the agent's stats into containerd's cgroup v2 metrics.
pub fn to_cgroup2(stats: &StatsContainerResponse) -> Metrics {
    let mut m = Metrics::new();
    if let Some(p) = stats.pids.as_ref() {
        m.pids = MessageField::some(PidsStat {
            current: p.current,
            limit: limit(p.limit),
            ..Default::default()
        });
    }
    if let Some(c) = stats.cpu.as_ref() {
        m.cpu = MessageField::some(CPUStat {
            usage_usec: c.usage_usec,
            user_usec: c.user_usec,
            system_usec: c.system_usec,
            nr_periods: c.nr_periods,
            nr_throttled: c.nr_throttled,
            throttled_usec: c.throttled_usec,
            ..Default::default()
        });
    }
    if let Some(mem) = stats.memory.as_ref() {
        m.memory = MessageField::some(MemoryStat {
            usage: mem.usage,
            usage_limit: limit(mem.limit),
            swap_usage: mem.swap_usage,
            swap_limit: limit(mem.swap_limit),
            anon: mem.anon,
            file: mem.file,
            kernel_stack: mem.kernel_stack,
            slab: mem.slab,
            sock: mem.sock,
            shmem: mem.shmem,
            file_mapped: mem.file_mapped,
            file_dirty: mem.file_dirty,
            file_writeback: mem.file_writeback,
            active_anon: mem.active_anon,
            inactive_anon: mem.inactive_anon,
            active_file: mem.active_file,
            inactive_file: mem.inactive_file,
            unevictable: mem.unevictable,
            pgfault: mem.pgfault,
            pgmajfault: mem.pgmajfault,
            ..Default::default()
        });
        m.memory_events = MessageField::some(MemoryEvents {
            oom: mem.oom_events,
            oom_kill: mem.oom_kill_events,
            ..Default::default()
        });
    }
    if !stats.io.is_empty() {
        m.io = MessageField::some(IOStat {
            usage: stats
                .io
                .iter()
                .map(|d| IOEntry {
                    major: u64::from(d.major),
                    minor: u64::from(d.minor),
                    rbytes: d.rbytes,
                    wbytes: d.wbytes,
                    rios: d.rios,
                    wios: d.wios,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        });
    }
    m
}

/// The metrics packed the way containerd expects them in
/// `StatsResponse.stats`: type URL `io.containerd.cgroups.v2.Metrics`.
pub fn to_any(metrics: &Metrics) -> protobuf::Result<Any> {
    Ok(Any {
        type_url: Metrics::descriptor().full_name().to_string(),
        value: metrics.write_to_bytes()?,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_proto::agent::{CpuStats, IoDeviceStats, MemoryStats, PidsStats};

    #[test]
    fn agent_stats_become_cgroup2_metrics() {
        let mut s = StatsContainerResponse::new();
        s.cpu = MessageField::some(CpuStats {
            usage_usec: 1500,
            user_usec: 1000,
            system_usec: 500,
            ..Default::default()
        });
        s.memory = MessageField::some(MemoryStats {
            usage: 4096,
            limit: 0,
            anon: 1024,
            file: 2048,
            oom_kill_events: 1,
            ..Default::default()
        });
        s.pids = MessageField::some(PidsStats {
            current: 3,
            limit: 100,
            ..Default::default()
        });
        s.io.push(IoDeviceStats {
            major: 254,
            minor: 1,
            rbytes: 10,
            ..Default::default()
        });
        let m = to_cgroup2(&s);
        assert_eq!(m.cpu.usage_usec, 1500);
        assert_eq!(m.cpu.system_usec, 500);
        assert_eq!(m.memory.usage, 4096);
        assert_eq!(m.memory.usage_limit, u64::MAX);
        assert_eq!(m.memory.anon, 1024);
        assert_eq!(m.memory_events.oom_kill, 1);
        assert_eq!(m.pids.current, 3);
        assert_eq!(m.pids.limit, 100);
        assert_eq!(m.io.usage[0].major, 254);

        let any = to_any(&m).unwrap();
        assert_eq!(any.type_url, "io.containerd.cgroups.v2.Metrics");
        assert_eq!(Metrics::parse_from_bytes(&any.value).unwrap(), m);
    }

    #[test]
    fn missing_sections_stay_unset() {
        let m = to_cgroup2(&StatsContainerResponse::new());
        assert!(m.cpu.is_none() && m.memory.is_none() && m.pids.is_none() && m.io.is_none());
    }
}
