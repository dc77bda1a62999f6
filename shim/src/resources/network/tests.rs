//! Against the real kernel, in throwaway network namespaces (root only;
//! skipped with a message otherwise): a "pod" namespace with a veth as CNI
//! would leave it, its peer in a "node" namespace.

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};

use ember_vmm::net::{NetBackend, Tap, VNET_HDR_LEN};

use super::*;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip runs");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn tc_show(ns: &str, args: &[&str]) -> String {
    let out = Command::new("tc")
        .args(["-n", ns])
        .args(args)
        .output()
        .expect("tc runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A named namespace, deleted on drop.
struct Ns(String);

impl Ns {
    fn new(tag: &str) -> Ns {
        let name = format!("ember-t{}-{tag}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        Ns(name)
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.0)
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// pod: eth0 10.99.0.2/24 + fd00:99::2/64, default via 10.99.0.1, MTU
/// 1400; node: veth-node 10.99.0.1/24.
fn cni_like(tag: &str) -> (Ns, Ns) {
    let pod = Ns::new(&format!("{tag}p"));
    let node = Ns::new(&format!("{tag}n"));
    ip(&[
        "-n",
        &pod.0,
        "link",
        "add",
        "eth0",
        "mtu",
        "1400",
        "type",
        "veth",
        "peer",
        "name",
        "veth-node",
        "mtu",
        "1400",
        "netns",
        &node.0,
    ]);
    ip(&["-n", &pod.0, "addr", "add", "10.99.0.2/24", "dev", "eth0"]);
    ip(&[
        "-n",
        &pod.0,
        "addr",
        "add",
        "fd00:99::2/64",
        "dev",
        "eth0",
        "nodad",
    ]);
    ip(&["-n", &pod.0, "link", "set", "eth0", "up"]);
    ip(&["-n", &pod.0, "link", "set", "lo", "up"]);
    ip(&[
        "-n",
        &pod.0,
        "route",
        "add",
        "default",
        "via",
        "10.99.0.1",
        "dev",
        "eth0",
    ]);
    ip(&[
        "-n",
        &node.0,
        "addr",
        "add",
        "10.99.0.1/24",
        "dev",
        "veth-node",
    ]);
    ip(&["-n", &node.0, "link", "set", "veth-node", "up"]);
    (pod, node)
}

#[test]
fn netns_of_spec_reads_the_network_entry() {
    let with = serde_json::json!({"linux": {"namespaces": [
        {"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-1"}]}});
    assert_eq!(
        netns_of_spec(&with),
        Some(PathBuf::from("/var/run/netns/cni-1"))
    );
    assert!(has_network_namespace(&with));
    let new_ns = serde_json::json!({"linux": {"namespaces": [{"type": "network"}]}});
    assert_eq!(netns_of_spec(&new_ns), None);
    assert!(has_network_namespace(&new_ns));
    let host = serde_json::json!({"linux": {"namespaces": [{"type": "pid"}]}});
    assert_eq!(netns_of_spec(&host), None);
    assert!(!has_network_namespace(&host));
    assert!(!has_network_namespace(&serde_json::json!({})));
}

#[tokio::test]
async fn inspect_reads_what_cni_set_up() {
    if !is_root() {
        eprintln!("SKIPPED: needs root (network namespaces)");
        return;
    }
    let (pod, _node) = cni_like("i");
    let net = PodNetwork::inspect(&pod.path()).await.expect("inspect");
    assert_eq!(net.endpoints.len(), 1, "{net:?}");
    let e = &net.endpoints[0];
    assert_eq!(e.name, "eth0");
    assert_eq!(e.mtu, 1400);
    assert_eq!(e.tap, "tap0_ember");
    assert_ne!(e.mac, [0; 6]);
    assert_eq!(
        e.addresses,
        vec![
            Cidr {
                addr: "10.99.0.2".parse().unwrap(),
                prefix: 24
            },
            Cidr {
                addr: "fd00:99::2".parse().unwrap(),
                prefix: 64
            },
        ]
    );
    assert_eq!(
        net.routes,
        vec![RouteInfo {
            destination: None,
            gateway: Some("10.99.0.1".parse().unwrap()),
            device: "eth0".into(),
            source: None,
            metric: 0,
        }]
    );
    let cfg = net.net_configs();
    assert_eq!(cfg.len(), 1);
    assert_eq!(cfg[0].mac, e.mac);
    assert_eq!(cfg[0].mtu, Some(1400));
    assert_eq!(cfg[0].netns.as_deref(), Some(pod.path().as_path()));

    let ifs = net.interfaces_request();
    assert_eq!(ifs.interfaces[0].name, "eth0");
    assert_eq!(ifs.interfaces[0].hw_addr, format_mac(&e.mac));
    assert_eq!(ifs.interfaces[0].addresses[0].address, "10.99.0.2");
    assert_eq!(ifs.interfaces[0].addresses[0].prefix_len, 24);
    let routes = net.routes_request();
    assert_eq!(routes.routes[0].destination, "");
    assert_eq!(routes.routes[0].gateway, "10.99.0.1");
    assert_eq!(routes.routes[0].device, "eth0");
}

#[tokio::test]
async fn a_namespace_without_interfaces_is_refused() {
    if !is_root() {
        eprintln!("SKIPPED: needs root (network namespaces)");
        return;
    }
    let empty = Ns::new("e");
    let err = PodNetwork::inspect(&empty.path()).await.unwrap_err();
    assert!(matches!(err, NetworkError::NoInterfaces(_)), "{err}");
    assert!(
        err.to_string().contains("no network interface besides lo"),
        "{err}"
    );
    let missing = PodNetwork::inspect(Path::new("/var/run/netns/ember-no-such-ns"))
        .await
        .unwrap_err();
    assert!(
        missing.to_string().contains("ember-no-such-ns"),
        "{missing}"
    );
}

/// An ARP request ("who has `target`? tell `sender`") from `mac`.
fn arp_request(mac: [u8; 6], sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend([0xff; 6]);
    f.extend(mac);
    f.extend([0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    f.extend(mac);
    f.extend(sender.octets());
    f.extend([0; 6]);
    f.extend(target.octets());
    f
}

/// Reads frames from the tap until `want` accepts one (an Ethernet frame).
fn wait_frame(tap: &mut Tap, what: &str, want: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = vec![0u8; 2048];
    loop {
        match tap.recv(&mut buf) {
            Ok(n) if n >= VNET_HDR_LEN + 42 => {
                let f = &buf[VNET_HDR_LEN..n];
                if want(f) {
                    return f.to_vec();
                }
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("tap read: {e}"),
        }
        assert!(Instant::now() < deadline, "no {what} on the tap");
    }
}

#[tokio::test]
async fn connect_redirects_both_ways_and_disconnect_cleans_up() {
    if !is_root() {
        eprintln!("SKIPPED: needs root (network namespaces)");
        return;
    }
    let (pod, node) = cni_like("c");
    let net = PodNetwork::inspect(&pod.path()).await.expect("inspect");
    let mac = net.endpoints[0].mac;
    // What the VMM does with NetConfig.
    let mut tap = Tap::open_in_netns(&pod.path(), "tap0_ember").expect("tap");
    net.connect().await.expect("connect");

    let filters = tc_show(&pod.0, &["filter", "show", "dev", "eth0", "ingress"]);
    assert!(
        filters.contains("Egress Redirect to device tap0_ember")
            && filters.contains("protocol all"),
        "{filters}"
    );
    let filters = tc_show(&pod.0, &["filter", "show", "dev", "tap0_ember", "ingress"]);
    assert!(
        filters.contains("Egress Redirect to device eth0"),
        "{filters}"
    );
    let link = Command::new("ip")
        .args(["-n", &pod.0, "link", "show", "tap0_ember"])
        .output()
        .unwrap();
    let link = String::from_utf8_lossy(&link.stdout);
    assert!(link.contains("mtu 1400") && link.contains(",UP"), "{link}");

    // Guest -> node: an ARP request written to the tap leaves through
    // eth0; the node's answer comes back through eth0 into the tap (the
    // pod namespace's own stack never sees it).
    let pod_ip = Ipv4Addr::new(10, 99, 0, 2);
    let node_ip = Ipv4Addr::new(10, 99, 0, 1);
    tap.send(&arp_request(mac, pod_ip, node_ip))
        .expect("tap write");
    let reply = wait_frame(&mut tap, "ARP reply from the node", |f| {
        f[12..14] == [0x08, 0x06] && f[21] == 2 && f[28..32] == node_ip.octets()
    });
    assert_eq!(reply[0..6], mac, "the reply is addressed to the guest MAC");

    // Node -> guest: a packet for the pod IP reaches the tap (the node
    // learnt the guest's MAC from the ARP request above).
    // (A UDP datagram sent from a socket made inside the node namespace.)
    let sock = in_netns(&node.path(), || std::net::UdpSocket::bind("10.99.0.1:0"))
        .expect("enter the node namespace")
        .expect("bind in the node namespace");
    sock.send_to(b"hello-guest", "10.99.0.2:9").expect("send");
    let frame = wait_frame(&mut tap, "IPv4 packet from the node", |f| {
        f[12..14] == [0x08, 0x00] && f[26..30] == node_ip.octets() && f[30..34] == pod_ip.octets()
    });
    assert!(frame.ends_with(b"hello-guest"), "{frame:?}");

    // A second connect (a new VM after a crashed shim left the filters)
    // replaces the stale redirect instead of failing.
    net.connect().await.expect("connect again");
    let filters = tc_show(&pod.0, &["filter", "show", "dev", "eth0", "ingress"]);
    assert_eq!(filters.matches("Egress Redirect").count(), 1, "{filters}");

    net.disconnect().await;
    let qdiscs = tc_show(&pod.0, &["qdisc", "show", "dev", "eth0"]);
    assert!(!qdiscs.contains("ingress"), "{qdiscs}");
    drop(tap);
    let links = Command::new("ip")
        .args(["-n", &pod.0, "link"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&links.stdout).contains("tap0_ember"),
        "the tap outlived its descriptor"
    );
}
