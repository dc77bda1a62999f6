//! virtio-net RX: frames from a fake tap (any length, any vnet header)
//! delivered through the device worker's RX pass into chains a hostile
//! guest driver lays out (see `ember_fuzz::queue`) on the receive queue.
//!
//! Input: `mtu: u16` (0: no MTU feature), `nframes: u8` (% 8), then per
//! frame `len: u16` (0xffff: 128 KiB), `flags: u8, gso: u8` (the first
//! two bytes of its vnet header; the rest is a pattern), then
//! the queue image of `GuestQueue::from_input`.
#![no_main]

use std::collections::VecDeque;

use ember_fuzz::fake_tap::FakeTap;
use ember_fuzz::queue::GuestQueue;
use ember_fuzz::Input;
use ember_vmm::fuzzing::net::NetHarness;
use ember_vmm::fuzzing::CountingInterrupt;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let mtu = match input.u16() {
        0 => None,
        m => Some(m.max(ember_vmm::fuzzing::net::MIN_MTU)),
    };
    let nframes = input.u8() % 8;
    let mut frames = VecDeque::new();
    for i in 0..nframes {
        // 0xffff stands for a frame longer than any the device takes.
        let len = match input.u16() {
            0xffff => 1 << 17,
            l => usize::from(l),
        };
        let mut frame = vec![i; len];
        if len >= 2 {
            frame[0] = input.u8();
            frame[1] = input.u8();
        }
        frames.push_back(frame);
    }
    let gq = GuestQueue::from_input(&mut input);
    let mut net = NetHarness::new(
        gq.mem.clone(),
        CountingInterrupt::new(),
        gq.queue(),
        gq.idle_queue(),
        Box::new(FakeTap::new(frames)),
        mtu,
    )
    .expect("net harness");
    for _ in 0..8 {
        let (used, more) = net.process_rx();
        net.signal(false, used);
        if !more {
            break;
        }
    }
    // The used ring itself is not checked entry by entry: a guest may
    // point an RX buffer at its own rings, and the frame then lands there.
    let used = gq.used();
    assert!(
        used.len() <= usize::from(gq.published()),
        "more chains used than published"
    );
    let stats = net.stats();
    assert!(stats.rx_frames as usize <= usize::from(nframes));
});
