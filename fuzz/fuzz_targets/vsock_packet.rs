//! vsock packets: chains a hostile guest driver lays out (see
//! `ember_fuzz::queue`) parsed as TX packets (`packet::read_tx`) and as RX
//! buffers (`RxBuffer::parse`, then a write of a host packet into them).
//!
//! Input: `mode: u8` (bit i: chain i is an RX buffer, else a TX packet),
//! `rx_len: u16` (payload of the host packet written to RX buffers), then
//! the queue image of `GuestQueue::from_input`.
#![no_main]

use ember_fuzz::queue::GuestQueue;
use ember_fuzz::Input;
use ember_vmm::fuzzing::vsock::packet::{
    read_tx, Header, RxBuffer, HDR_SIZE, MAX_PKT_DATA, OP_RW, TYPE_STREAM,
};
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let mode = input.u8();
    let rx_len = usize::from(input.u16());
    let gq = GuestQueue::from_input(&mut input);
    let mem = gq.mem.clone();
    let mut q = gq.queue();
    let mut scratch = vec![0u8; MAX_PKT_DATA as usize];
    let payload = vec![0x5au8; rx_len.min(MAX_PKT_DATA as usize)];
    for i in 0..64u32 {
        let Some(mut chain) = q.pop_descriptor_chain(&mem) else {
            break;
        };
        if mode & (1 << (i % 8)) == 0 {
            if let Ok((hdr, len)) = read_tx(&mem, &mut chain, &mut scratch) {
                assert_eq!(
                    hdr.len as usize, len,
                    "payload length differs from the header's"
                );
                assert!(len <= MAX_PKT_DATA as usize);
            }
        } else if let Ok(mut buf) = RxBuffer::parse(&mem, &mut chain) {
            let cap = buf.capacity();
            assert!(cap <= MAX_PKT_DATA as usize);
            let data = &payload[..payload.len().min(cap)];
            let hdr = Header {
                src_cid: 2,
                dst_cid: 3,
                src_port: 1024,
                dst_port: 5000,
                len: data.len() as u32,
                type_: TYPE_STREAM,
                op: OP_RW,
                flags: 0,
                buf_alloc: 1 << 18,
                fwd_cnt: 0,
            };
            if let Ok(used) = buf.write(&hdr, data) {
                assert_eq!(used as usize, HDR_SIZE + data.len());
            }
        }
    }
});
