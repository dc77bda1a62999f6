//! `containerd-shim-ember-v2`: containerd runs this binary for the runtime
//! `io.containerd.ember.v2`. See the library ([`ember_shim`]) for how it
//! works.

use ember_shim::shim::{confine_if_serving, shim_config, EmberShim};

fn main() {
    // Before the runtime starts any thread: capabilities are per thread,
    // and every thread must inherit the serving shim's confinement.
    confine_if_serving();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!(
                "{}: cannot start the tokio runtime: {e}",
                ember_shim::RUNTIME_ID
            );
            std::process::exit(1);
        }
    };
    runtime.block_on(async {
        // `start` and `-info` are Ember's own (containerd 1.6 to 2.3+).
        if let Some(code) = ember_shim::start::intercept().await {
            std::process::exit(code);
        }
        // The serving shim (no action): Ember's server, with the Sandbox
        // API next to the task service. `delete`: containerd-shim's.
        let args: Vec<_> = std::env::args_os().collect();
        if let Ok(flags) = containerd_shim::parse(&args[1..]) {
            if flags.action.is_empty() && !flags.socket.is_empty() && !flags.version && !flags.info
            {
                if let Err(e) = ember_shim::serve::serve(ember_shim::RUNTIME_ID, flags).await {
                    eprintln!("{}: {e:#}", ember_shim::RUNTIME_ID);
                    std::process::exit(1);
                }
                return;
            }
        }
        containerd_shim::asynchronous::run::<EmberShim>(
            ember_shim::RUNTIME_ID,
            Some(shim_config()),
        )
        .await;
    });
}
