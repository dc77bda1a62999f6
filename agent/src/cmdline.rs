//! Kernel command line parameters the agent reads (from /proc/cmdline).
//!
//! - `ember.log=<directive>`: log filter, e.g. `debug`, `trace`,
//!   `info,ember_agent=debug` (tracing-subscriber `EnvFilter` syntax).
//!   Default `info`. The last occurrence wins.

/// Parameter name of the log filter.
pub const LOG_PARAM: &str = "ember.log";

/// The value of parameter `name` (`name=value`) on a kernel command line;
/// the last occurrence wins. Parameters after a bare `--` belong to init's
/// argv and are ignored, like the kernel does. Quoted values
/// (`name="a b"`) are unquoted.
pub fn param<'a>(cmdline: &'a str, name: &str) -> Option<&'a str> {
    let mut found = None;
    for token in split_params(cmdline) {
        if token == "--" {
            break;
        }
        if let Some((key, value)) = token.split_once('=') {
            if key == name {
                found = Some(value.trim_matches('"'));
            }
        }
    }
    found
}

/// The log filter directive from a kernel command line, if any (non-empty).
pub fn log_directive(cmdline: &str) -> Option<&str> {
    param(cmdline, LOG_PARAM).filter(|v| !v.is_empty())
}

/// Split a command line into parameters on whitespace, keeping
/// double-quoted parts (`a="b c"`) together.
fn split_params(cmdline: &str) -> impl Iterator<Item = &str> {
    let bytes = cmdline.as_bytes();
    let mut pos = 0;
    std::iter::from_fn(move || {
        while pos < bytes.len() && bytes[pos].is_ascii_whitespace() {
            pos += 1;
        }
        if pos >= bytes.len() {
            return None;
        }
        let start = pos;
        let mut quoted = false;
        while pos < bytes.len() && (quoted || !bytes[pos].is_ascii_whitespace()) {
            if bytes[pos] == b'"' {
                quoted = !quoted;
            }
            pos += 1;
        }
        Some(&cmdline[start..pos])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_log_level() {
        let c = "console=ttyS0 reboot=k ember.log=debug panic=-1\n";
        assert_eq!(log_directive(c), Some("debug"));
    }

    #[test]
    fn absent_or_empty() {
        assert_eq!(log_directive("console=ttyS0 quiet"), None);
        assert_eq!(log_directive(""), None);
        assert_eq!(log_directive("ember.log="), None);
        assert_eq!(log_directive("ember.log"), None);
        // A different parameter with the same prefix does not match.
        assert_eq!(log_directive("ember.logx=debug xember.log=trace"), None);
    }

    #[test]
    fn last_wins_and_quotes() {
        assert_eq!(
            log_directive("ember.log=info ember.log=trace"),
            Some("trace")
        );
        assert_eq!(
            log_directive("a=\"x y\" ember.log=\"info,ember_agent=debug\" b"),
            Some("info,ember_agent=debug")
        );
        assert_eq!(param("a=\"x y\" b=2", "a"), Some("x y"));
    }

    #[test]
    fn stops_at_double_dash() {
        assert_eq!(
            log_directive("ember.log=warn -- ember.log=trace"),
            Some("warn")
        );
    }

    #[test]
    fn whitespace_variants() {
        assert_eq!(log_directive("\tember.log=error\n"), Some("error"));
        assert_eq!(param("  x=1   y=2  ", "y"), Some("2"));
    }
}
