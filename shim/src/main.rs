//! `containerd-shim-ember-v2`: containerd runs this binary for the runtime
//! `io.containerd.ember.v2`. See the library ([`ember_shim`]) for how it
//! works.

use ember_shim::shim::{shim_config, EmberShim};

#[tokio::main]
async fn main() {
    // `start` and `-info` are Ember's own (containerd 1.6 to 2.3+).
    if let Some(code) = ember_shim::start::intercept().await {
        std::process::exit(code);
    }
    containerd_shim::asynchronous::run::<EmberShim>(ember_shim::RUNTIME_ID, Some(shim_config()))
        .await;
}
