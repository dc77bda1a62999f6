//! Ember's in-process VMM: boots a Linux microVM on KVM.

pub mod bus;
pub mod devices;
