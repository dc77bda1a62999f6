//! `ember-agent`: PID 1 of an Ember microVM. See the library docs.

fn main() {
    ember_agent::init::main()
}
