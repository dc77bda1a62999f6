//! virtio-net TX: chains a hostile guest driver lays out (see
//! `ember_fuzz::queue`) on the transmit queue, through the device
//! worker's TX pass into a fake tap that checks every frame it gets.
//!
//! Input: the queue image of `GuestQueue::from_input`.
#![no_main]

use std::collections::VecDeque;
use std::sync::atomic::Ordering;

use ember_fuzz::fake_tap::FakeTap;
use ember_fuzz::queue::GuestQueue;
use ember_fuzz::Input;
use ember_vmm::fuzzing::net::NetHarness;
use ember_vmm::fuzzing::CountingInterrupt;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let gq = GuestQueue::from_input(&mut input);
    let tap = FakeTap::new(VecDeque::new());
    let sent = tap.sent.clone();
    let mut net = NetHarness::new(
        gq.mem.clone(),
        CountingInterrupt::new(),
        gq.idle_queue(),
        gq.queue(),
        Box::new(tap),
        None,
    )
    .expect("net harness");
    for _ in 0..8 {
        let (used, more) = net.process_tx();
        net.signal(used, false);
        if !more {
            break;
        }
    }
    let used = gq.used();
    assert!(
        used.len() <= usize::from(gq.published()),
        "more chains used than published"
    );
    assert!(
        used.iter().all(|&(_, len)| len == 0),
        "TX chain used with a length"
    );
    assert!(
        used.iter()
            .all(|&(id, _)| id < u32::from(ember_fuzz::queue::QSIZE)),
        "used entry for a descriptor outside the table"
    );
    let stats = net.stats();
    assert_eq!(stats.tx_frames as usize, sent.load(Ordering::Relaxed));
    // Every chain returned is counted; chains whose head is outside the
    // table are counted but cannot be returned.
    assert!(
        (stats.tx_frames + stats.tx_dropped + stats.tx_bad_chains) as usize >= used.len(),
        "a used TX chain was not counted"
    );
});
