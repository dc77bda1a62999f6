//! Against the real kernel, in a fresh network namespace made for each
//! test on a thread of its own (root only; skipped with a message
//! otherwise). A veth stands in for the guest's virtio-net.

use std::process::Command;

use ember_proto::agent::IpAddress;
use rtnetlink::LinkVeth;

use super::*;

const MAC: [u8; 6] = [0x02, 0x42, 0x0a, 0x63, 0x00, 0x02];

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs `f` on a new thread, in a new network namespace, on a
/// current-thread runtime (as the agent runs).
fn in_fresh_netns<F, Fut>(f: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let t = std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(f());
    });
    if let Err(p) = t.join() {
        std::panic::resume_unwind(p);
    }
}

/// `ip` run from this thread (so in its network namespace). Its output is
/// read to EOF; the exit is not waited for with `output()`, because the
/// reaper tests of this crate run `waitpid(-1)` meanwhile and may collect
/// the child first (ECHILD).
fn ip(args: &[&str]) -> String {
    use std::io::Read;
    let mut child = Command::new("ip")
        .args(args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("ip runs");
    let mut out = String::new();
    child
        .stdout
        .take()
        .expect("piped stdout")
        .read_to_string(&mut out)
        .expect("ip output");
    let _ = child.wait();
    out
}

async fn add_veth(name: &str, mac: [u8; 6]) {
    let nl = Netlink::open().unwrap();
    nl.handle
        .link()
        .add(LinkVeth::new(name, "peer0").address(mac.to_vec()).build())
        .execute()
        .await
        .expect("add a veth");
}

fn interface(name: &str, mac: &str, mtu: u32, addrs: &[(&str, u32)]) -> Interface {
    let mut i = Interface::new();
    i.name = name.into();
    i.hw_addr = mac.into();
    i.mtu = mtu;
    for (a, l) in addrs {
        let mut x = IpAddress::new();
        x.address = (*a).into();
        x.prefix_len = *l;
        i.addresses.push(x);
    }
    i
}

fn route(dst: &str, gw: &str, dev: &str) -> Route {
    let mut r = Route::new();
    r.destination = dst.into();
    r.gateway = gw.into();
    r.device = dev.into();
    r
}

#[test]
fn parsing() {
    assert_eq!(parse_mac("02:42:0a:63:00:02"), Some(MAC));
    assert_eq!(format_mac(&MAC), "02:42:0a:63:00:02");
    assert_eq!(parse_mac("02:42:0a:63:00"), None);
    assert_eq!(parse_mac("02:42:0a:63:00:02:01"), None);
    assert_eq!(parse_mac("zz:42:0a:63:00:02"), None);
    assert_eq!(
        parse_cidr("10.0.0.0/8"),
        Some(("10.0.0.0".parse().unwrap(), 8))
    );
    assert_eq!(
        parse_cidr("fd00::1"),
        Some(("fd00::1".parse().unwrap(), 128))
    );
    assert_eq!(parse_cidr("10.0.0.0/33"), None);
    assert_eq!(parse_cidr("x/8"), None);
}

#[test]
fn bad_requests_are_invalid_argument() {
    for i in [
        interface("", "02:42:0a:63:00:02", 0, &[]),
        interface("eth0", "nope", 0, &[]),
        interface("eth0", "02:42:0a:63:00:02", 20, &[]),
        interface("eth0", "02:42:0a:63:00:02", 0, &[("10.0.0.300", 24)]),
        interface("eth0", "02:42:0a:63:00:02", 0, &[("10.0.0.1", 40)]),
    ] {
        let e = check_interface(&i).err().expect("refused");
        assert!(
            matches!(&e, ttrpc::Error::RpcStatus(s) if s.code() == Code::INVALID_ARGUMENT),
            "{e:?}"
        );
    }
    for r in [
        route("", "", "eth0"),
        route("10.0.0.0/8", "fd00::1", "eth0"),
        route("10.0.0.0/8", "", ""),
        route("bad", "", "eth0"),
    ] {
        assert!(check_route(&r).is_err());
    }
}

#[test]
fn interfaces_and_routes_are_configured() {
    if !is_root() {
        eprintln!("SKIPPED: needs root (network namespaces)");
        return;
    }
    in_fresh_netns(|| async {
        // Found by MAC, renamed, MTU, addresses replaced, up.
        add_veth("dummy7", MAC).await;
        let nl = Netlink::open().unwrap();
        let idx = nl
            .links()
            .await
            .unwrap()
            .iter()
            .find(|l| link_name(l) == Some("dummy7"))
            .unwrap()
            .header
            .index;
        nl.handle
            .address()
            .add(idx, "192.168.5.5".parse().unwrap(), 24)
            .execute()
            .await
            .unwrap();
        let mut req = UpdateInterfacesRequest::new();
        req.interfaces.push(interface(
            "eth0",
            "02:42:0a:63:00:02",
            1400,
            &[("10.99.0.2", 24), ("fd00:99::2", 64)],
        ));
        update_interfaces(&req).await.expect("UpdateInterfaces");
        let shown = ip(&["addr", "show", "dev", "eth0"]);
        assert!(shown.contains("mtu 1400"), "{shown}");
        assert!(shown.contains(",UP"), "{shown}");
        assert!(shown.contains("link/ether 02:42:0a:63:00:02"), "{shown}");
        assert!(shown.contains("inet 10.99.0.2/24"), "{shown}");
        assert!(shown.contains("inet6 fd00:99::2/64"), "{shown}");
        assert!(
            !shown.contains("192.168.5.5"),
            "the old address stayed: {shown}"
        );
        // Idempotent.
        update_interfaces(&req)
            .await
            .expect("UpdateInterfaces again");

        let mut routes = UpdateRoutesRequest::new();
        // The default route first: the agent orders them.
        routes.routes.push(route("", "10.99.0.1", "eth0"));
        routes.routes.push(route("10.100.0.0/16", "", "eth0"));
        update_routes(&routes).await.expect("UpdateRoutes");
        let shown = ip(&["route", "show"]);
        assert!(shown.contains("default via 10.99.0.1 dev eth0"), "{shown}");
        assert!(
            shown
                .lines()
                .any(|l| l.starts_with("10.100.0.0/16 dev eth0") && l.contains("scope link")),
            "{shown}"
        );
        update_routes(&routes)
            .await
            .expect("UpdateRoutes again (replace)");

        // Found by name when the MAC is another (a restored template).
        let mut req = UpdateInterfacesRequest::new();
        req.interfaces.push(interface(
            "eth0",
            "02:42:0a:63:00:09",
            0,
            &[("10.99.0.2", 24)],
        ));
        update_interfaces(&req).await.expect("by name");
        let shown = ip(&["link", "show", "dev", "eth0"]);
        assert!(shown.contains("link/ether 02:42:0a:63:00:09"), "{shown}");

        // Neither MAC nor name: NOT_FOUND, naming what there is.
        let mut req = UpdateInterfacesRequest::new();
        req.interfaces
            .push(interface("eth5", "02:00:00:00:00:05", 0, &[]));
        let e = update_interfaces(&req).await.unwrap_err();
        let text = format!("{e:?}");
        assert!(
            matches!(&e, ttrpc::Error::RpcStatus(s) if s.code() == Code::NOT_FOUND)
                && text.contains("eth0"),
            "{text}"
        );
        let e = update_routes(&{
            let mut r = UpdateRoutesRequest::new();
            r.routes.push(route("", "10.99.0.1", "eth9"));
            r
        })
        .await
        .unwrap_err();
        assert!(matches!(&e, ttrpc::Error::RpcStatus(s) if s.code() == Code::NOT_FOUND));
    });
}
