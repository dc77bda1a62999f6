//! Tests of the host end of port forwarding. The guest is faked: a Unix
//! socket plays the VMM's hybrid-vsock socket (`CONNECT 1025` / `OK 1025`)
//! and the agent behind it, well-behaved or hostile. The listeners are made
//! in this process' own network namespace (`/proc/self/ns/net`; entering it
//! needs root, as CI runs).

use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;

/// What the fake agent does with a stream once the handshake is done.
#[derive(Clone, Copy)]
enum Agent {
    /// Reply Connected, then echo.
    Echo,
    /// Reply Refused.
    Refuse,
    /// Read the request and never answer.
    Silent,
    /// Reply a byte that means nothing.
    Garbage,
    /// Reply Connected, then write as fast as the shim takes bytes.
    Flood,
}

/// Serves a fake hybrid-vsock socket at `path`; counts flooded bytes in
/// `flooded`.
fn fake_guest(path: &Path, agent: Agent, flooded: Arc<AtomicUsize>) -> JoinHandle<()> {
    let listener = tokio::net::UnixListener::bind(path).unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let flooded = flooded.clone();
            tokio::spawn(async move {
                let mut line = Vec::new();
                let mut b = [0u8; 1];
                while s.read_exact(&mut b).await.is_ok() && b[0] != b'\n' {
                    line.push(b[0]);
                }
                assert_eq!(line, format!("CONNECT {VSOCK_PORT}").as_bytes());
                s.write_all(format!("OK {VSOCK_PORT}\n").as_bytes())
                    .await
                    .unwrap();
                let mut raw = [0u8; ember_proto::port_forward::REQUEST_LEN];
                s.read_exact(&mut raw).await.unwrap();
                Request::decode(&raw).unwrap();
                match agent {
                    Agent::Echo => {
                        s.write_all(&[Reply::Connected as u8]).await.unwrap();
                        let (mut r, mut w) = s.split();
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                    }
                    Agent::Refuse => s.write_all(&[Reply::Refused as u8]).await.unwrap(),
                    Agent::Silent => std::future::pending::<()>().await,
                    Agent::Garbage => s.write_all(&[0xee]).await.unwrap(),
                    Agent::Flood => {
                        s.write_all(&[Reply::Connected as u8]).await.unwrap();
                        let chunk = vec![7u8; 64 * 1024];
                        while s.write_all(&chunk).await.is_ok() {
                            flooded.fetch_add(chunk.len(), Ordering::SeqCst);
                        }
                    }
                }
            });
        }
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Setup {
    _dir: tempfile::TempDir,
    _guest: JoinHandle<()>,
    fwd: PortForwarder,
    port: u16,
    flooded: Arc<AtomicUsize>,
}

async fn setup(agent: Agent, limits: Limits) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let vsock = dir.path().join("vsock.sock");
    let flooded = Arc::new(AtomicUsize::new(0));
    let guest = fake_guest(&vsock, agent, flooded.clone());
    let fwd = PortForwarder::new("/proc/self/ns/net".into(), vsock, limits);
    let port = free_port();
    fwd.add_ports(&[port]).await.unwrap();
    assert_eq!(fwd.ports(), vec![port]);
    Setup {
        _dir: dir,
        _guest: guest,
        fwd,
        port,
        flooded,
    }
}

const LIMITS: Limits = Limits {
    max_connections: 4,
    connect_timeout: Duration::from_secs(5),
};

async fn connect(port: u16) -> TcpStream {
    TcpStream::connect((Ipv4Addr::LOCALHOST, port))
        .await
        .unwrap()
}

/// Reads until EOF or error; returns the bytes and whether it was a reset.
async fn read_end(s: &mut TcpStream) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    match tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got)).await {
        Ok(Ok(_)) => (got, false),
        Ok(Err(e)) => (got, e.kind() == io::ErrorKind::ConnectionReset),
        Err(_) => panic!("the connection neither closed nor reset within 10 s"),
    }
}

#[tokio::test]
async fn bytes_arrive_intact_both_ways_on_v4_and_v6() {
    let s = setup(Agent::Echo, LIMITS).await;
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 253) as u8).collect();
    let mut addrs: Vec<SocketAddr> = vec![(Ipv4Addr::LOCALHOST, s.port).into()];
    if std::net::TcpListener::bind("[::1]:0").is_ok() {
        addrs.push((Ipv6Addr::LOCALHOST, s.port).into());
    }
    for addr in addrs {
        let mut c = TcpStream::connect(addr).await.unwrap();
        let (mut r, mut w) = c.split();
        let send = async {
            w.write_all(&data).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let mut got = Vec::new();
        let (_, n) = tokio::join!(send, r.read_to_end(&mut got));
        n.unwrap();
        assert!(
            got == data,
            "{addr}: {} bytes back, not the same",
            got.len()
        );
    }
}

#[tokio::test]
async fn a_refused_or_garbled_or_silent_guest_resets_the_client() {
    for (agent, within) in [
        (Agent::Refuse, Duration::from_secs(2)),
        (Agent::Garbage, Duration::from_secs(2)),
        (Agent::Silent, Duration::from_secs(4)),
    ] {
        let limits = Limits {
            connect_timeout: Duration::from_secs(1),
            ..LIMITS
        };
        let s = setup(agent, limits).await;
        let t0 = std::time::Instant::now();
        let mut c = connect(s.port).await;
        let (got, was_reset) = read_end(&mut c).await;
        assert!(got.is_empty());
        assert!(was_reset, "the client gets a reset, not a clean end");
        assert!(t0.elapsed() < within, "took {:?}", t0.elapsed());
    }
}

#[tokio::test]
async fn connections_past_the_limit_are_reset_at_once() {
    let limits = Limits {
        max_connections: 2,
        ..LIMITS
    };
    let s = setup(Agent::Echo, limits).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = connect(s.port).await;
        c.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        c.read_exact(&mut b).await.unwrap();
        held.push(c);
    }
    let mut third = connect(s.port).await;
    let (_, was_reset) = read_end(&mut third).await;
    assert!(was_reset, "a third connection is reset");
    // A slot frees when a connection ends.
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut again = connect(s.port).await;
    again.write_all(b"y").await.unwrap();
    let mut b = [0u8; 1];
    again.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"y");
}

#[tokio::test]
async fn a_flooding_guest_is_held_back_by_a_client_that_does_not_read() {
    let s = setup(Agent::Flood, LIMITS).await;
    let _c = connect(s.port).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let a = s.flooded.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let b = s.flooded.load(Ordering::SeqCst);
    assert_eq!(a, b, "the guest's writes are blocked once buffers are full");
    // Socket buffers plus the shim's fixed copy buffer, nothing more.
    assert!(a < 64 << 20, "{a} bytes taken from the guest");
}

#[tokio::test]
async fn close_ends_connections_and_stops_listening() {
    let s = setup(Agent::Echo, LIMITS).await;
    let mut c = connect(s.port).await;
    c.write_all(b"z").await.unwrap();
    let mut b = [0u8; 1];
    c.read_exact(&mut b).await.unwrap();
    s.fwd.close();
    let (_, _) = read_end(&mut c).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let e = TcpStream::connect((Ipv4Addr::LOCALHOST, s.port))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
    s.fwd.add_ports(&[free_port()]).await.unwrap();
    assert_eq!(
        s.fwd.ports(),
        vec![s.port],
        "a closed forwarder adds nothing"
    );
}

#[test]
fn ports_from_annotations() {
    assert_eq!(parse_ports("8080, 9090,"), Ok(vec![8080, 9090]));
    assert!(parse_ports("80,http").is_err());
    assert!(parse_ports("0").is_err());
    assert!(parse_ports("65536").is_err());
    assert_eq!(
        kubelet_ports(
            r#"[{"containerPort":80,"protocol":"TCP"},{"name":"dns","containerPort":53,"protocol":"UDP"},{"containerPort":8443}]"#
        ),
        vec![80, 8443]
    );
    assert!(kubelet_ports("not json").is_empty());
    let ann: HashMap<String, String> = [
        (PORTS_ANNOTATION.to_string(), "8080".to_string()),
        (
            KUBELET_PORTS_ANNOTATION.to_string(),
            r#"[{"containerPort":80,"protocol":"TCP"}]"#.to_string(),
        ),
    ]
    .into();
    assert_eq!(ports_of_annotations(&ann), Ok(vec![8080, 80]));
    let bad: HashMap<String, String> = [(PORTS_ANNOTATION.to_string(), "x".to_string())].into();
    assert!(ports_of_annotations(&bad)
        .unwrap_err()
        .contains(PORTS_ANNOTATION));
}
