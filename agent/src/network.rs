//! Guest network configuration (UpdateInterfaces, UpdateRoutes) over
//! rtnetlink.
//!
//! The shim reads what CNI set up in the pod's network namespace on the
//! host and hands it over: each interface is found here by MAC (the
//! virtio-net device carries the CNI interface's MAC) or, failing that,
//! by name (a VM restored from a template still has the template's MAC:
//! its device is then given the pod's). The interface is renamed to the
//! CNI name, gets its MTU and exactly the given addresses, and goes up.
//! Routes are added (or replaced), directly connected ones first.
//!
//! Containers of the pod share the guest's root network namespace (the
//! shim removes the host netns path from their specs), so this is the pod
//! network every container sees.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ember_proto::agent::{Interface, Route, UpdateInterfacesRequest, UpdateRoutesRequest};
use futures::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use ttrpc::Code;

use crate::service::rpc_error;

/// Longest interface name Linux accepts (IFNAMSIZ - 1).
const MAX_IFNAME: usize = 15;

/// A netlink connection in the calling thread's network namespace; its
/// task ends when this is dropped.
struct Netlink {
    handle: Handle,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn internal(what: impl std::fmt::Display) -> impl FnOnce(rtnetlink::Error) -> ttrpc::Error {
    let what = what.to_string();
    move |e| rpc_error(Code::INTERNAL, format!("{what}: {e}"))
}

impl Netlink {
    fn open() -> ttrpc::Result<Netlink> {
        let (conn, handle, _) = rtnetlink::new_connection()
            .map_err(|e| rpc_error(Code::INTERNAL, format!("opening a netlink socket: {e}")))?;
        Ok(Netlink {
            handle,
            task: tokio::spawn(conn),
        })
    }

    async fn links(&self) -> ttrpc::Result<Vec<LinkMessage>> {
        self.handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(internal("listing interfaces"))
    }
}

fn link_name(l: &LinkMessage) -> Option<&str> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

fn link_mac(l: &LinkMessage) -> Option<&[u8]> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(m) => Some(m.as_slice()),
        _ => None,
    })
}

/// Parses "aa:bb:cc:dd:ee:ff".
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in mac.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Parses "10.0.0.0/24" (a bare address is a host route).
pub fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a.parse::<IpAddr>().ok()?, l.parse::<u8>().ok()?),
        None => {
            let a = s.parse::<IpAddr>().ok()?;
            (a, if a.is_ipv4() { 32 } else { 128 })
        }
    };
    let max = if addr.is_ipv4() { 32 } else { 128 };
    (len <= max).then_some((addr, len))
}

fn is_ipv6_link_local(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
}

/// An interface request, checked.
struct Wanted {
    name: String,
    mac: [u8; 6],
    mtu: u32,
    addresses: Vec<(IpAddr, u8)>,
}

fn check_interface(i: &Interface) -> ttrpc::Result<Wanted> {
    let invalid = |what: String| rpc_error(Code::INVALID_ARGUMENT, what);
    if i.name.is_empty()
        || i.name.len() > MAX_IFNAME
        || i.name.contains(['/', ':'])
        || i.name.contains(char::is_whitespace)
    {
        return Err(invalid(format!("invalid interface name {:?}", i.name)));
    }
    let mac = parse_mac(&i.hw_addr)
        .ok_or_else(|| invalid(format!("interface {}: invalid MAC {:?}", i.name, i.hw_addr)))?;
    if i.mtu != 0 && !(68..=65535).contains(&i.mtu) {
        return Err(invalid(format!(
            "interface {}: invalid MTU {}",
            i.name, i.mtu
        )));
    }
    let mut addresses = Vec::new();
    for a in &i.addresses {
        let ip: IpAddr = a.address.parse().map_err(|_| {
            invalid(format!(
                "interface {}: invalid address {:?}",
                i.name, a.address
            ))
        })?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        if a.prefix_len > max {
            return Err(invalid(format!(
                "interface {}: invalid prefix length {} for {ip}",
                i.name, a.prefix_len
            )));
        }
        addresses.push((ip, a.prefix_len as u8));
    }
    Ok(Wanted {
        name: i.name.clone(),
        mac,
        mtu: i.mtu,
        addresses,
    })
}

/// Applies UpdateInterfaces in the calling thread's network namespace.
pub async fn update_interfaces(req: &UpdateInterfacesRequest) -> ttrpc::Result<()> {
    let wanted = req
        .interfaces
        .iter()
        .map(check_interface)
        .collect::<ttrpc::Result<Vec<_>>>()?;
    let nl = Netlink::open()?;
    for w in &wanted {
        configure(&nl, w).await?;
        tracing::info!(
            "interface {}: {} addresses, MTU {}, up",
            w.name,
            w.addresses.len(),
            w.mtu
        );
    }
    Ok(())
}

async fn configure(nl: &Netlink, w: &Wanted) -> ttrpc::Result<()> {
    let links = nl.links().await?;
    let link = links
        .iter()
        .find(|l| link_mac(l) == Some(&w.mac[..]))
        .or_else(|| links.iter().find(|l| link_name(l) == Some(w.name.as_str())))
        .ok_or_else(|| {
            let have: Vec<&str> = links.iter().filter_map(link_name).collect();
            rpc_error(
                Code::NOT_FOUND,
                format!(
                    "no guest interface with MAC {} or name {} (the guest has: {})",
                    crate::network::format_mac(&w.mac),
                    w.name,
                    have.join(", ")
                ),
            )
        })?;
    let index = link.header.index;
    let what = |op: &str| format!("interface {}: {op}", w.name);

    // Renaming and changing the MAC need the link down.
    let rename = link_name(link) != Some(w.name.as_str());
    let new_mac = link_mac(link) != Some(&w.mac[..]);
    if rename || new_mac {
        nl.handle
            .link()
            .set(LinkUnspec::new_with_index(index).down().build())
            .execute()
            .await
            .map_err(internal(what("set down")))?;
    }
    if rename {
        nl.handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .name(w.name.clone())
                    .build(),
            )
            .execute()
            .await
            .map_err(internal(what("rename")))?;
    }
    if new_mac {
        nl.handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .address(w.mac.to_vec())
                    .build(),
            )
            .execute()
            .await
            .map_err(internal(what("set the MAC")))?;
    }
    if w.mtu != 0 {
        nl.handle
            .link()
            .set(LinkUnspec::new_with_index(index).mtu(w.mtu).build())
            .execute()
            .await
            .map_err(internal(what("set the MTU")))?;
    }

    // Exactly the given addresses (IPv6 link-local ones are the kernel's).
    let current: Vec<_> = nl
        .handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(internal(what("list addresses")))?;
    for msg in current {
        let addr = msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        });
        let keep = addr.is_some_and(|ip| {
            is_ipv6_link_local(&ip) || w.addresses.contains(&(ip, msg.header.prefix_len))
        });
        if msg.header.index == index && !keep {
            nl.handle
                .address()
                .del(msg)
                .execute()
                .await
                .map_err(internal(what("remove an old address")))?;
        }
    }
    for (ip, len) in &w.addresses {
        nl.handle
            .address()
            .add(index, *ip, *len)
            .replace()
            .execute()
            .await
            .map_err(internal(what(&format!("add {ip}/{len}"))))?;
    }
    nl.handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(internal(what("set up")))?;
    Ok(())
}

/// A route request, checked.
struct WantedRoute {
    destination: (IpAddr, u8),
    gateway: Option<IpAddr>,
    device: String,
    source: Option<IpAddr>,
    metric: u32,
}

fn check_route(r: &Route) -> ttrpc::Result<WantedRoute> {
    let invalid = |what: String| rpc_error(Code::INVALID_ARGUMENT, what);
    let opt_ip = |s: &str, what: &str| -> ttrpc::Result<Option<IpAddr>> {
        if s.is_empty() {
            return Ok(None);
        }
        s.parse()
            .map(Some)
            .map_err(|_| invalid(format!("route: invalid {what} {s:?}")))
    };
    let gateway = opt_ip(&r.gateway, "gateway")?;
    let source = opt_ip(&r.source, "source")?;
    let destination = if r.destination.is_empty() || r.destination == "default" {
        let v6 = gateway.or(source).map(|ip| ip.is_ipv6()).ok_or_else(|| {
            invalid("route: a default route needs a gateway or a source address".into())
        })?;
        let any = if v6 {
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        } else {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        };
        (any, 0)
    } else {
        parse_cidr(&r.destination)
            .ok_or_else(|| invalid(format!("route: invalid destination {:?}", r.destination)))?
    };
    for ip in gateway.iter().chain(source.iter()) {
        if ip.is_ipv4() != destination.0.is_ipv4() {
            return Err(invalid(format!(
                "route to {}: {ip} is of another address family",
                r.destination
            )));
        }
    }
    if r.device.is_empty() {
        return Err(invalid(format!("route to {}: no device", r.destination)));
    }
    Ok(WantedRoute {
        destination,
        gateway,
        device: r.device.clone(),
        source,
        metric: r.metric,
    })
}

/// Applies UpdateRoutes in the calling thread's network namespace: each
/// route is added, or replaces the route to the same destination.
pub async fn update_routes(req: &UpdateRoutesRequest) -> ttrpc::Result<()> {
    let mut routes = req
        .routes
        .iter()
        .map(check_route)
        .collect::<ttrpc::Result<Vec<_>>>()?;
    // A gateway must be reachable before a route through it is added.
    routes.sort_by_key(|r| r.gateway.is_some());
    let nl = Netlink::open()?;
    let links = nl.links().await?;
    for r in &routes {
        let (dst, len) = r.destination;
        let what = format!("route to {dst}/{len} via {:?} dev {}", r.gateway, r.device);
        let index = links
            .iter()
            .find(|l| link_name(l) == Some(r.device.as_str()))
            .map(|l| l.header.index)
            .ok_or_else(|| {
                rpc_error(
                    Code::NOT_FOUND,
                    format!("{what}: no interface {}", r.device),
                )
            })?;
        let invalid = |e| rpc_error(Code::INVALID_ARGUMENT, format!("{what}: {e}"));
        let mut b = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dst, len)
            .map_err(invalid)?
            .output_interface(index);
        if let Some(gw) = r.gateway {
            b = b.gateway(gw).map_err(invalid)?;
        } else {
            b = b.scope(RouteScope::Link);
        }
        if let Some(src) = r.source {
            b = b.pref_source(src).map_err(invalid)?;
        }
        if r.metric != 0 {
            b = b.priority(r.metric);
        }
        nl.handle
            .route()
            .add(b.build())
            .replace()
            .execute()
            .await
            .map_err(internal(&what))?;
        tracing::info!("{what}: added");
    }
    Ok(())
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    let [a, b, c, d, e, f] = *mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}

#[cfg(test)]
mod tests;
