//! Where the shim's `tracing` output goes.
//!
//! containerd creates a fifo named `log` in the bundle directory (the
//! shim's working directory) and copies whatever the shim writes there into
//! its own log. The serving shim and `start` write there; `start` must never
//! write to stdout or stderr, because containerd reads its combined output
//! as the shim's address. `delete` writes warnings to stderr, which
//! containerd logs as "cleanup warnings".
//!
//! `log` records of the containerd-shim crate are forwarded to `tracing`.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Mutex;

use tracing_subscriber::EnvFilter;

/// With containerd in debug mode: the shim's own debug messages, the VMM's
/// at info (its debug level logs every vsock connection).
const CONTAINERD_DEBUG: &str = "info,ember_shim=debug,containerd_shim=debug";

/// The filter: `RUST_LOG` if set, else [`CONTAINERD_DEBUG`] when
/// containerd runs in debug mode, else the configured level.
fn filter(configured: &str, debug: bool) -> EnvFilter {
    if let Ok(f) = EnvFilter::try_from_default_env() {
        return f;
    }
    let level = if debug { CONTAINERD_DEBUG } else { configured };
    EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Opens containerd's log fifo for writing without blocking (there is a
/// reader when containerd started us), then makes writes blocking again so
/// lines are never cut.
pub fn open_log_fifo() -> std::io::Result<File> {
    let file = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("log")?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
    // SAFETY: fcntl on an fd we own, with plain integer arguments.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
    Ok(file)
}

/// Logging of the shim binary for `action` (`start`, `delete`, or empty for
/// the serving shim).
pub fn init_shim(action: &str, debug: bool, configured_level: &str) {
    let filter = filter(configured_level, debug);
    // A span's creation is logged with its fields: each task and sandbox
    // call (`#[tracing::instrument]`) shows up once as it arrives, and the
    // events inside it carry its name and fields.
    let builder = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_target(true)
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::NEW);
    let _ = match action {
        "delete" => builder
            .with_env_filter(EnvFilter::new("warn"))
            .with_writer(std::io::stderr)
            .try_init(),
        _ => match open_log_fifo() {
            Ok(file) => builder
                .with_env_filter(filter)
                .with_writer(Mutex::new(file))
                .try_init(),
            // No fifo (run by hand): stay silent rather than corrupt the
            // address `start` prints.
            Err(_) => builder
                .with_env_filter(EnvFilter::new("off"))
                .with_writer(std::io::sink)
                .try_init(),
        },
    };
}

/// Logging of the `ember` CLI: stderr.
pub fn init_cli(configured_level: &str) {
    let _ = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_env_filter(filter(configured_level, false))
        .with_writer(std::io::stderr)
        .try_init();
}
