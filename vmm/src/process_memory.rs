//! How much host memory a VMM process uses, from /proc: its own memory
//! apart from guest RAM, its proportional share of pages it shares with
//! other VMs (templates), and the copy-on-write pages of a restored guest.
//! For the shim's benchmarks and the VMM's own memory report.

/// (RssAnon + RssFile, RssShmem) of this process in bytes. Guest RAM of a
/// booted VM is a memfd and shows as RssShmem, so the first number is the
/// VMM's own memory (for VMs restored from a snapshot, pages read from the
/// memory file count as RssFile).
pub fn process_rss() -> (u64, u64) {
    rss_of("self")
}

/// [`process_rss`] of process `pid` (a number, or "self"); zeros if it
/// cannot be read.
pub fn rss_of(pid: &str) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (field("RssAnon:") + field("RssFile:"), field("RssShmem:"))
}

/// Proportional set size of this process (shared pages divided among
/// the processes mapping them), from /proc/self/smaps_rollup; 0 if
/// unreadable. What N VMs restored from one template really cost.
pub fn process_pss() -> u64 {
    std::fs::read_to_string("/proc/self/smaps_rollup")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Pss:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

/// Bytes of private (copy-on-write) pages this process holds in its
/// mappings of `path`, from /proc/self/smaps.
pub(crate) fn private_dirty_of(path: &std::path::Path) -> u64 {
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        return 0;
    };
    let name = path.to_string_lossy();
    let mut in_mapping = false;
    let mut total = 0;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            in_mapping = line.ends_with(name.as_ref());
        } else if in_mapping && first == "Private_Dirty:" {
            total += line
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
                * 1024;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pss_counts_a_private_buffer_once_written() {
        let before = process_pss();
        assert!(before > 0, "a running process has a PSS");
        // Large against what other tests running meanwhile may free.
        let buf = vec![1u8; 128 << 20];
        let after = process_pss();
        assert!(
            after >= before + (64 << 20),
            "128 MiB written: PSS {before} -> {after}"
        );
        drop(buf);
    }
}
