//! `containerd-shim-ember-v2`: containerd runs this binary for the runtime
//! `io.containerd.ember.v2`. See the library ([`ember_shim`]) for how it
//! works.

use ember_shim::shim::{shim_config, EmberShim};

#[tokio::main]
async fn main() {
    containerd_shim::asynchronous::run::<EmberShim>(ember_shim::RUNTIME_ID, Some(shim_config()))
        .await;
}
