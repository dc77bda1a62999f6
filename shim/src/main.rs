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
        containerd_shim::asynchronous::run::<EmberShim>(
            ember_shim::RUNTIME_ID,
            Some(shim_config()),
        )
        .await;
    });
}
