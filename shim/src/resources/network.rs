//! Pod networking through CNI, in "tcfilter" mode (as Kata's runtime-rs).
//!
//! CNI sets a pod up in a network namespace of its own (the sandbox spec's
//! `linux.namespaces[type=network].path`): a veth (usually `eth0`) with the
//! pod's addresses and routes. The VM cannot live in that namespace, so
//! for each interface there the shim
//! 1. reads what CNI configured: name, MAC, MTU, addresses, routes
//!    ([`PodNetwork::inspect`], before the VM boots, so a namespace
//!    without interfaces is refused before any boot);
//! 2. has the VMM create a tap in the same namespace (`tap<N>_ember`,
//!    [`PodNetwork::net_configs`]) and gives the guest a virtio-net device
//!    with the veth's MAC, so the peer's ARP entries stay right;
//! 3. once the VM is up ([`PodNetwork::connect`]): sets the tap's MTU and
//!    brings it up, adds an ingress qdisc on the veth and on the tap, and
//!    on each a u32 match-all filter with a `mirred egress redirect` to the
//!    other: every frame arriving on the veth leaves through the tap (into
//!    the guest), every frame of the guest leaves through the veth;
//! 4. hands the guest agent the interfaces and routes
//!    ([`PodNetwork::interfaces_request`], [`PodNetwork::routes_request`]),
//!    which it applies to the virtio-net interface found by MAC.
//!
//! Teardown: the taps are the VMM's (not persistent) and vanish with the VM,
//! their qdiscs and filters with them; [`PodNetwork::disconnect`] removes the
//! veth's ingress qdisc (and so its filter). The namespace itself and the
//! veth belong to CNI.
//!
//! All netlink talk goes through `rtnetlink`, on a socket opened inside
//! the pod's namespace (a netlink socket stays bound to the namespace it
//! was created in, whichever thread uses it later).

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ember_proto::agent::{
    Interface, IpAddress, Route as AgentRoute, UpdateInterfacesRequest, UpdateRoutesRequest,
};
use ember_vmm::net::{format_mac, in_netns};
use ember_vmm::NetConfig;
use futures::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{LinkAttribute, LinkLayerType, LinkMessage};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::packet_route::tc::TcHandle;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use serde_json::Value;
use tokio::task::JoinHandle;

use crate::sandbox::agent::Agent;

/// `ETH_P_ALL` in network byte order, as tc stores a filter's protocol.
const PROTOCOL_ALL: u16 = (libc::ETH_P_ALL as u16).to_be();
/// Priority of the redirect filters.
const FILTER_PRIORITY: u16 = 1;
/// The ingress qdisc's handle (`ffff:`).
const INGRESS_PARENT: u32 = 0xffff_0000;

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("network namespace {netns}: {what}: {source}")]
    Netlink {
        netns: String,
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("network namespace {netns}: {source}")]
    Netns {
        netns: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "network namespace {0} has no network interface besides lo: the CNI plugin \
         did not set up the pod's network (check the CNI configuration and containerd's log)"
    )]
    NoInterfaces(String),
    #[error("network namespace {netns}: interface {name}: {what}")]
    Unusable {
        netns: String,
        name: String,
        what: String,
    },
}

type Result<T, E = NetworkError> = std::result::Result<T, E>;

/// The network namespace path of an OCI spec (`linux.namespaces`, type
/// `network`, with a non-empty path), if it names one.
pub fn netns_of_spec(spec: &Value) -> Option<PathBuf> {
    spec.pointer("/linux/namespaces")?
        .as_array()?
        .iter()
        .find(|n| n.get("type").and_then(Value::as_str) == Some("network"))?
        .get("path")?
        .as_str()
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
}

/// Whether the spec asks for a new network namespace (an entry of type
/// `network`, with or without a path). A spec without one shares the
/// runtime's: a host-network pod.
pub fn has_network_namespace(spec: &Value) -> bool {
    spec.pointer("/linux/namespaces")
        .and_then(Value::as_array)
        .is_some_and(|a| {
            a.iter()
                .any(|n| n.get("type").and_then(Value::as_str) == Some("network"))
        })
}

/// An address with its prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

/// A CNI interface of the pod's namespace and the tap that stands in for
/// it towards the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The interface's name (also the guest interface's name).
    pub name: String,
    pub index: u32,
    pub mac: [u8; 6],
    pub mtu: u32,
    /// Global and site addresses (IPv6 link-local ones the guest makes
    /// itself).
    pub addresses: Vec<Cidr>,
    /// The tap the VMM creates in the namespace for this interface.
    pub tap: String,
}

/// A route of the namespace, on one of the endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteInfo {
    /// None: the default route.
    pub destination: Option<Cidr>,
    pub gateway: Option<IpAddr>,
    /// The endpoint's name.
    pub device: String,
    pub source: Option<IpAddr>,
    pub metric: u32,
}

/// What CNI set up in a pod's namespace, and what Ember adds there.
#[derive(Debug, Clone)]
pub struct PodNetwork {
    pub netns: PathBuf,
    pub endpoints: Vec<Endpoint>,
    pub routes: Vec<RouteInfo>,
}

/// A netlink connection inside a network namespace; the connection task
/// ends when this is dropped.
struct Netlink {
    handle: Handle,
    task: JoinHandle<()>,
    netns: String,
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Netlink {
    /// Opens a netlink socket inside `netns` and drives it on the current
    /// tokio runtime.
    fn open(netns: &Path) -> Result<Netlink> {
        let name = netns.display().to_string();
        let rt = tokio::runtime::Handle::current();
        let made = in_netns(netns, move || {
            // The socket registers with this runtime's reactor.
            let _guard = rt.enter();
            rtnetlink::new_connection()
        })
        .and_then(|r| r)
        .map_err(|source| NetworkError::Netns {
            netns: name.clone(),
            source,
        })?;
        let (conn, handle, _) = made;
        Ok(Netlink {
            handle,
            task: tokio::spawn(conn),
            netns: name,
        })
    }

    fn err(&self, what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetworkError + '_ {
        let what = what.into();
        move |source| NetworkError::Netlink {
            netns: self.netns.clone(),
            what,
            source,
        }
    }

    async fn links(&self) -> Result<Vec<LinkMessage>> {
        self.handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(self.err("listing interfaces"))
    }

    async fn link_index(&self, name: &str) -> Result<u32> {
        let links = self.links().await?;
        links
            .iter()
            .find(|l| link_name(l).as_deref() == Some(name))
            .map(|l| l.header.index)
            .ok_or_else(|| NetworkError::Unusable {
                netns: self.netns.clone(),
                name: name.to_string(),
                what: "not found".into(),
            })
    }

    async fn addresses(&self, index: u32) -> Result<Vec<Cidr>> {
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(self.err("listing addresses"))?;
        let mut out = Vec::new();
        for m in msgs {
            if m.header.index != index {
                continue;
            }
            // IFA_LOCAL is the interface's own address on point-to-point
            // links; IFA_ADDRESS otherwise.
            let local = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let addr = local.or_else(|| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
            });
            if let Some(addr) = addr {
                if is_link_local(&addr) {
                    continue;
                }
                out.push(Cidr {
                    addr,
                    prefix: m.header.prefix_len,
                });
            }
        }
        Ok(out)
    }

    /// Deletes the ingress qdisc of link `index` (and its filters).
    async fn del_ingress(&self, index: u32) -> Result<(), rtnetlink::Error> {
        let mut del = self.handle.qdisc().del(index as i32);
        del.message_mut().header.parent = TcHandle::INGRESS;
        del.message_mut().header.handle = TcHandle::from(INGRESS_PARENT);
        del.execute().await
    }

    async fn routes(&self) -> Result<Vec<RouteMessage>> {
        let mut all = Vec::new();
        for req in [
            RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
            RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
        ] {
            let msgs: Vec<_> = self
                .handle
                .route()
                .get(req)
                .execute()
                .try_collect()
                .await
                .map_err(self.err("listing routes"))?;
            all.extend(msgs);
        }
        Ok(all)
    }
}

fn link_name(l: &LinkMessage) -> Option<String> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })
}

fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// The name of the tap standing in for endpoint `n`.
pub fn tap_name(n: usize) -> String {
    format!("tap{n}_ember")
}

/// The routes worth giving the guest: unicast routes of the main table
/// through one of `endpoints`, except those the kernel derives from an
/// address (the guest's kernel makes them too) and IPv6 link-local and
/// multicast ones.
fn guest_routes(msgs: &[RouteMessage], endpoints: &[Endpoint]) -> Vec<RouteInfo> {
    let mut out = Vec::new();
    for m in msgs {
        let h = &m.header;
        let table = m
            .attributes
            .iter()
            .find_map(|a| match a {
                RouteAttribute::Table(t) => Some(*t),
                _ => None,
            })
            .unwrap_or(u32::from(h.table));
        if table != u32::from(RouteHeader::RT_TABLE_MAIN)
            || h.kind != RouteType::Unicast
            || h.protocol == RouteProtocol::Kernel
        {
            continue;
        }
        let mut dst = None;
        let mut gateway = None;
        let mut oif = None;
        let mut source = None;
        let mut metric = 0;
        for a in &m.attributes {
            match a {
                RouteAttribute::Destination(d) => dst = route_ip(d),
                RouteAttribute::Gateway(g) => gateway = route_ip(g),
                RouteAttribute::Oif(i) => oif = Some(*i),
                RouteAttribute::PrefSource(s) => source = route_ip(s),
                RouteAttribute::Priority(p) => metric = *p,
                _ => {}
            }
        }
        let Some(ep) = endpoints.iter().find(|e| Some(e.index) == oif) else {
            continue;
        };
        let destination = match dst {
            Some(addr) if h.destination_prefix_length > 0 => {
                if is_link_local(&addr) || matches!(addr, IpAddr::V6(v6) if v6.is_multicast()) {
                    continue;
                }
                Some(Cidr {
                    addr,
                    prefix: h.destination_prefix_length,
                })
            }
            _ => None,
        };
        out.push(RouteInfo {
            destination,
            gateway,
            device: ep.name.clone(),
            source,
            metric,
        });
    }
    // Directly connected routes first: a gateway must be reachable
    // before a route through it can be added.
    out.sort_by_key(|r| r.gateway.is_some());
    out
}

impl PodNetwork {
    /// Reads what CNI set up in `netns`. Errors: the namespace cannot be
    /// entered, or it has no interface besides `lo`.
    pub async fn inspect(netns: &Path) -> Result<PodNetwork> {
        let nl = Netlink::open(netns)?;
        let mut endpoints = Vec::new();
        for link in nl.links().await? {
            let Some(name) = link_name(&link) else {
                continue;
            };
            if link.header.link_layer_type == LinkLayerType::Loopback || name == "lo" {
                continue;
            }
            // Ours, left by an earlier VM of this pod (e.g. a crashed shim).
            if name.ends_with("_ember") {
                continue;
            }
            let unusable = |what: String| NetworkError::Unusable {
                netns: nl.netns.clone(),
                name: name.clone(),
                what,
            };
            if link.header.link_layer_type != LinkLayerType::Ether {
                return Err(unusable(format!(
                    "link type {:?} is not Ethernet (only Ethernet interfaces such as veths can be attached to the VM)",
                    link.header.link_layer_type
                )));
            }
            let mut mac = None;
            let mut mtu = 1500;
            for a in &link.attributes {
                match a {
                    LinkAttribute::Address(a) => mac = <[u8; 6]>::try_from(a.as_slice()).ok(),
                    LinkAttribute::Mtu(m) => mtu = *m,
                    _ => {}
                }
            }
            let mac = mac.ok_or_else(|| unusable("no MAC address".into()))?;
            let addresses = nl.addresses(link.header.index).await?;
            endpoints.push(Endpoint {
                tap: tap_name(endpoints.len()),
                name,
                index: link.header.index,
                mac,
                mtu,
                addresses,
            });
        }
        if endpoints.is_empty() {
            return Err(NetworkError::NoInterfaces(netns.display().to_string()));
        }
        endpoints.sort_by_key(|e| e.index);
        for (n, e) in endpoints.iter_mut().enumerate() {
            e.tap = tap_name(n);
        }
        let routes = guest_routes(&nl.routes().await?, &endpoints);
        Ok(PodNetwork {
            netns: netns.to_path_buf(),
            endpoints,
            routes,
        })
    }

    /// One virtio-net device per endpoint: the tap, in the pod's
    /// namespace, with the endpoint's MAC and MTU.
    pub fn net_configs(&self) -> Vec<NetConfig> {
        self.endpoints
            .iter()
            .map(|e| NetConfig {
                tap: e.tap.clone(),
                netns: Some(self.netns.clone()),
                mac: e.mac,
                mtu: u16::try_from(e.mtu).ok(),
            })
            .collect()
    }

    /// Wires each endpoint to its tap (which the VMM must have created):
    /// tap MTU and up, ingress qdiscs and redirect filters both ways.
    pub async fn connect(&self) -> Result<()> {
        let nl = Netlink::open(&self.netns)?;
        for e in &self.endpoints {
            let tap = nl.link_index(&e.tap).await?;
            nl.handle
                .link()
                .set(LinkUnspec::new_with_index(tap).mtu(e.mtu).up().build())
                .execute()
                .await
                .map_err(nl.err(format!("bringing {} up", e.tap)))?;
            // A redirect left by an earlier VM of this pod (a crashed
            // shim) points at a tap that is gone: start clean.
            for (index, name) in [(e.index, &e.name), (tap, &e.tap)] {
                if nl.del_ingress(index).await.is_ok() {
                    tracing::warn!(netns = %self.netns.display(), "removed a stale ingress qdisc from {name}");
                }
            }
            for (from, from_name, to, to_name) in [
                (e.index, &e.name, tap, &e.tap),
                (tap, &e.tap, e.index, &e.name),
            ] {
                nl.handle
                    .qdisc()
                    .add(from as i32)
                    .ingress()
                    .execute()
                    .await
                    .map_err(nl.err(format!("adding an ingress qdisc to {from_name}")))?;
                nl.handle
                    .traffic_filter(from as i32)
                    .add()
                    .parent(INGRESS_PARENT)
                    .priority(FILTER_PRIORITY)
                    .protocol(PROTOCOL_ALL)
                    .redirect(to)
                    .map_err(nl.err("building the redirect filter"))?
                    .execute()
                    .await
                    .map_err(nl.err(format!(
                        "adding the filter redirecting {from_name} to {to_name}"
                    )))?;
            }
            tracing::info!(
                netns = %self.netns.display(),
                "pod network: {} <-> {} (tc mirred), guest MAC {}",
                e.name,
                e.tap,
                format_mac(&e.mac)
            );
        }
        Ok(())
    }

    /// Wires the pod network to a booted VM: [`PodNetwork::connect`], then
    /// the guest agent configures its interfaces and routes.
    pub async fn attach(&self, agent: &Agent) -> crate::error::Result<()> {
        let started = std::time::Instant::now();
        self.connect()
            .await
            .map_err(|e| crate::error::Error::Internal(anyhow::Error::from(e)))?;
        agent
            .update_interfaces(&self.interfaces_request())
            .await
            .map_err(|e| e.context("configuring the guest's network interfaces"))?;
        if !self.routes.is_empty() {
            agent
                .update_routes(&self.routes_request())
                .await
                .map_err(|e| e.context("adding the pod's routes in the guest"))?;
        }
        tracing::info!(
            netns = %self.netns.display(),
            took = ?started.elapsed(),
            "pod network attached: {} interface(s), {} route(s)",
            self.endpoints.len(),
            self.routes.len()
        );
        Ok(())
    }

    /// Removes the ingress qdiscs (and so the redirect filters) from the
    /// CNI interfaces. Best effort: a namespace CNI already removed has
    /// nothing left to clean. The taps go with the VM.
    pub async fn disconnect(&self) {
        if !self.netns.exists() {
            return;
        }
        let nl = match Netlink::open(&self.netns) {
            Ok(nl) => nl,
            Err(e) => {
                tracing::debug!("pod network cleanup: {e}");
                return;
            }
        };
        for e in &self.endpoints {
            if let Err(err) = nl.del_ingress(e.index).await {
                tracing::debug!(
                    netns = %self.netns.display(),
                    "removing the ingress qdisc of {}: {err}",
                    e.name
                );
            }
        }
    }

    /// The agent request configuring the guest's interfaces.
    pub fn interfaces_request(&self) -> UpdateInterfacesRequest {
        let mut req = UpdateInterfacesRequest::new();
        for e in &self.endpoints {
            let mut i = Interface::new();
            i.name = e.name.clone();
            i.hw_addr = format_mac(&e.mac);
            i.mtu = e.mtu;
            for a in &e.addresses {
                let mut ip = IpAddress::new();
                ip.address = a.addr.to_string();
                ip.prefix_len = u32::from(a.prefix);
                i.addresses.push(ip);
            }
            req.interfaces.push(i);
        }
        req
    }

    /// The agent request adding the namespace's routes in the guest.
    pub fn routes_request(&self) -> UpdateRoutesRequest {
        let mut req = UpdateRoutesRequest::new();
        for r in &self.routes {
            let mut x = AgentRoute::new();
            x.destination = r
                .destination
                .map(|c| format!("{}/{}", c.addr, c.prefix))
                .unwrap_or_default();
            x.gateway = r.gateway.map(|g| g.to_string()).unwrap_or_default();
            x.device = r.device.clone();
            x.source = r.source.map(|s| s.to_string()).unwrap_or_default();
            x.metric = r.metric;
            req.routes.push(x);
        }
        req
    }
}

#[cfg(test)]
mod tests;
