//! `tracing` setup: human-readable lines, no colours, time since agent
//! start (the guest wall clock is wrong until the host calls SetTime).

use tracing_subscriber::EnvFilter;

/// Filter used when none is given or the given one does not parse.
pub const DEFAULT_DIRECTIVE: &str = "info";

/// Where log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// stdout: the console when PID 1.
    Stdout,
    /// stderr (test mode, so stdout carries only marker lines).
    Stderr,
}

/// Parse a filter directive; on error fall back to [`DEFAULT_DIRECTIVE`]
/// and return the error text too, to be logged once logging works.
pub fn filter(directive: Option<&str>) -> (EnvFilter, Option<String>) {
    match directive {
        None => (EnvFilter::new(DEFAULT_DIRECTIVE), None),
        Some(d) => match EnvFilter::try_new(d) {
            Ok(f) => (f, None),
            Err(e) => (
                EnvFilter::new(DEFAULT_DIRECTIVE),
                Some(format!(
                    "invalid log filter {d:?} ({e}); using {DEFAULT_DIRECTIVE:?}"
                )),
            ),
        },
    }
}

/// Install the global subscriber. Calling it twice is harmless (the second
/// call does nothing).
pub fn init(directive: Option<&str>, target: Target) {
    let (filter, warning) = filter(directive);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_target(false)
        .with_timer(tracing_subscriber::fmt::time::uptime());
    let installed = match target {
        Target::Stdout => builder.with_writer(std::io::stdout).try_init(),
        Target::Stderr => builder.with_writer(std::io::stderr).try_init(),
    };
    if installed.is_ok() {
        if let Some(w) = warning {
            tracing::warn!("{w}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_parsing() {
        assert!(filter(None).1.is_none());
        assert!(filter(Some("debug")).1.is_none());
        assert!(filter(Some("info,ember_agent=trace")).1.is_none());
        let (f, w) = filter(Some("info,=[bad"));
        assert!(w.is_some(), "expected a warning, got filter {f}");
    }
}
