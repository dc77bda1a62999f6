//! The agent's top level: PID 1 start-up, the serving loop, and the end.

use std::panic::{catch_unwind, AssertUnwindSafe};

use anyhow::Context as _;

use crate::service::{AgentService, Config};
use crate::{cmdline, console, logging, mounts, port_forward, power, reaper::Reaper, server, Mode};

/// Exit status when the agent refuses to run (not PID 1, no test socket).
pub const EXIT_REFUSED: i32 = 2;

/// Decide how to run from the pid and the environment. PID 1 always runs
/// as init (an `EMBER_AGENT_TEST_LISTEN` from the kernel command line is
/// ignored); any other pid needs the test socket variable.
pub fn mode_from(pid: u32, test_listen: Option<std::ffi::OsString>) -> Option<Mode> {
    match (pid, test_listen) {
        (1, _) => Some(Mode::Init),
        (_, Some(p)) if !p.is_empty() => Some(Mode::Test { socket: p.into() }),
        _ => None,
    }
}

/// Entry point of the binary.
pub fn main() {
    let mode = mode_from(std::process::id(), std::env::var_os(crate::TEST_LISTEN_ENV));
    match mode {
        Some(Mode::Init) => init_main(),
        Some(Mode::Test { socket }) => test_main(socket),
        None => {
            eprintln!(
                "ember-agent: refusing to run: not PID 1. This is the init of an Ember \
                 microVM; to serve on a Unix socket for host-side testing set {}=<socket path>",
                crate::TEST_LISTEN_ENV
            );
            std::process::exit(EXIT_REFUSED);
        }
    }
}

/// PID 1: never returns and never exits (that would panic the kernel).
fn init_main() -> ! {
    let console_ok = console::stdout_is_usable();
    if console_ok {
        console::line(console::STARTED);
    }
    let outcomes = mounts::mount_early();
    if !console_ok {
        // No console from the kernel (stdout closed or /dev/null): try
        // devtmpfs' /dev/console.
        if console::attach_console().is_ok() {
            console::line(console::STARTED);
        }
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    logging::init(cmdline::log_directive(&cmdline), logging::Target::Stdout);
    tracing::info!(
        "ember-agent {} (protocol {}) on kernel {}",
        crate::AGENT_VERSION,
        ember_proto::PROTOCOL_VERSION,
        crate::service::kernel_release()
    );
    mounts::log_outcomes(&outcomes);

    match catch_unwind(AssertUnwindSafe(|| run_runtime(Mode::Init))) {
        Ok(Ok(())) => tracing::info!("shutting down as requested"),
        Ok(Err(e)) => tracing::error!("fatal: {e:#}"),
        Err(_) => tracing::error!("fatal: the agent panicked"),
    }
    power::power_off()
}

/// Test mode: serve on a Unix socket until Shutdown, then exit 0.
fn test_main(socket: std::path::PathBuf) -> ! {
    logging::init(
        std::env::var("EMBER_LOG").ok().as_deref(),
        logging::Target::Stderr,
    );
    let code = match run_runtime(Mode::Test { socket }) {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!("fatal: {e:#}");
            1
        }
    };
    std::process::exit(code)
}

/// Run [`serve`] on a current-thread runtime (fewer threads, fewer syscalls).
pub fn run_runtime(mode: Mode) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    rt.block_on(serve(mode))
}

/// Start the reaper and the ttrpc server; return once Shutdown was
/// answered (the caller then powers off or exits).
pub async fn serve(mode: Mode) -> anyhow::Result<()> {
    let reaper = Reaper::new();
    let _reaper_task = reaper.start().context("installing the SIGCHLD handler")?;
    let config = match mode {
        Mode::Init => Config::init(),
        Mode::Test { .. } => Config::test(),
    };
    if mode == Mode::Init {
        // The per-VM virtio-fs share (best effort: absent in some setups).
        crate::sandbox::mount_shared(&config.containers.shared_dir);
        crate::sandbox::loopback_up();
    }
    let config_run_dir = config.containers.run_dir.clone();
    let (service, mut shutdown) = AgentService::new(config, reaper);
    let (listener, marker) = match &mode {
        Mode::Init => (server::bind_vsock().await?, console::LISTENING.to_string()),
        Mode::Test { socket } => (
            server::bind_unix(socket)?,
            format!("ember-agent: listening on unix socket {}", socket.display()),
        ),
    };
    let _server = server::start(service, listener).await?;
    let _port_forward = start_port_forward(&mode, &config_run_dir);
    console::line(&marker);
    tracing::info!("serving");
    shutdown.requested().await;
    Ok(())
}

/// Start the port-forward listener (best effort: without it the pod
/// runs, only `kubectl port-forward` fails).
fn start_port_forward(
    mode: &Mode,
    run_dir: &std::path::Path,
) -> Option<tokio::task::JoinHandle<()>> {
    let listener = match mode {
        Mode::Init => port_forward::Listener::bind_vsock(),
        Mode::Test { .. } => port_forward::Listener::bind_unix(&run_dir.join("port-forward.sock")),
    };
    match listener {
        Ok(l) => Some(tokio::spawn(port_forward::serve(l))),
        Err(e) => {
            tracing::warn!("port-forward listener: {e}; kubectl port-forward will not work");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_selection() {
        assert_eq!(mode_from(1, None), Some(Mode::Init));
        assert_eq!(mode_from(1, Some("/tmp/x".into())), Some(Mode::Init));
        assert_eq!(mode_from(42, None), None);
        assert_eq!(mode_from(42, Some("".into())), None);
        assert_eq!(
            mode_from(42, Some("/tmp/x.sock".into())),
            Some(Mode::Test {
                socket: "/tmp/x.sock".into()
            })
        );
    }
}
