//! `kubectl port-forward` to an Ember pod, through a real CRI `PortForward`
//! call against the harness containerd and its streaming server (spoken
//! with the `v4.channel.k8s.io` port-forward protocol, as kubectl over
//! websockets; tests/src/cri.rs).
//!
//! One pod (one VM boot) on a CNI bridge, one busybox container running
//! echo servers (`nc -ll -p P -e cat`) on 8080, 8081 and 8082. The shim
//! learns the ports three ways, one port each: the pod annotation
//! `io.ember.port_forward=8080,8083`, kubelet's container annotation
//! `io.kubernetes.container.ports` (8081; the harness passes it, as
//! deploy/containerd does; with the Sandbox API also the pod's CRI port
//! mappings, where kubelet lists every container port), and the config's `port_forward_ports = [8082]`.
//! Cases, in order:
//!   - every declared port echoes a line;
//!   - 4 MiB sent to the echo server come back intact (both directions at
//!     once), with the throughput printed;
//!   - 8083 is declared but nothing listens there in the guest: the stream
//!     reports an error on its error channel and ends, it does not hang;
//!   - a port nobody declared errors out the same way (containerd's own
//!     dial is refused);
//!   - a forward open while the pod is stopped ends, and the stop succeeds.
//!
//! `EMBER_E2E_CRI_HANDLER=ember-sandbox-api` (containerd 2.x) runs the same
//! cases with the shim as the Sandbox API controller.
//!
//! Skipped, loudly, when /dev/kvm or the guest kernel/initrd are missing.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use ember_e2e::containerd::{Containerd, Options};
use ember_e2e::cri::{api, container_config, pod_config, CniNetwork, Cri, PodNetwork};
use ember_e2e::image::BUSYBOX_IMAGE;

/// The CRI runtime handler: `ember` (podsandbox), or with
/// `EMBER_E2E_CRI_HANDLER=ember-sandbox-api` on containerd 2.x the handler
/// registered with `sandboxer = "shim"` (the shim is the sandbox controller
/// and gets the pod's port mappings itself).
fn handler() -> String {
    std::env::var("EMBER_E2E_CRI_HANDLER").unwrap_or_else(|_| "ember".into())
}
/// Echo servers in the guest, by how the shim learns of them.
const PORT_POD_ANNOTATION: u16 = 8080;
const PORT_KUBELET: u16 = 8081;
const PORT_CONFIG: u16 = 8082;
/// Declared by the pod annotation, nothing listens on it in the guest.
const PORT_NO_LISTENER: u16 = 8083;
/// Declared nowhere.
const PORT_UNDECLARED: u16 = 9;
/// Bytes sent (and echoed back) in the bulk case.
const BULK: usize = 4 << 20;
const WAIT: Duration = Duration::from_secs(60);

fn missing_prerequisites() -> Option<String> {
    if !Path::new("/dev/kvm").exists() {
        return Some("/dev/kvm is absent".into());
    }
    let (kernel, initrd) = ember_e2e::artifacts();
    [kernel, initrd]
        .into_iter()
        .find(|p| !p.exists())
        .map(|p| format!("{} is missing", p.display()))
}

/// Deterministic bytes that are not periodic over the transfer.
fn pattern(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Sends `line` to `port` and waits for the echo.
fn echo_line(cri: &Cri, pod: &str, port: u16) -> Result<()> {
    let s = cri.port_forward(pod, &[port])?;
    let line = format!("hello port {port}\n");
    s.send(port, line.as_bytes())?;
    let got = s.wait_for(port, WAIT, "the echo", |p| p.data.len() >= line.len())?;
    ensure!(
        got.data == line.as_bytes(),
        "port {port} echoed {:?}",
        String::from_utf8_lossy(&got.data)
    );
    ensure!(got.error.is_empty(), "error channel: {:?}", got.error);
    Ok(())
}

/// Opens a forward to `port` and expects an error on its error channel and
/// the end of the stream, not a hang.
fn expect_refused(cri: &Cri, pod: &str, port: u16) -> Result<String> {
    let t0 = Instant::now();
    let s = cri.port_forward(pod, &[port])?;
    let got = s.wait_for(port, WAIT, "an error", |p| !p.error.is_empty())?;
    s.wait_closed(WAIT)?;
    ensure!(got.data.is_empty(), "data from port {port}: {:?}", got.data);
    let msg = String::from_utf8_lossy(&got.error).into_owned();
    println!(
        "[cri_portforward]   port {port}: error after {:.2}s: {msg}",
        t0.elapsed().as_secs_f64()
    );
    Ok(msg)
}

fn echo_servers(pod_config: &api::PodSandboxConfig) -> api::ContainerConfig {
    let script = format!(
        "for p in {PORT_POD_ANNOTATION} {PORT_KUBELET} {PORT_CONFIG}; do \
         nc -ll -p $p -e cat & done; wait"
    );
    let mut c = container_config("echo", 0, BUSYBOX_IMAGE, &["sh", "-c", &script], pod_config);
    // What kubelet records for `ports: [{containerPort: 8081}]`.
    c.annotations.insert(
        "io.kubernetes.container.ports".into(),
        format!(r#"[{{"containerPort":{PORT_KUBELET},"protocol":"TCP"}}]"#),
    );
    c
}

/// Waits until the guest listens on every echo port (one `netstat` a
/// round: every process start is slow in this guest). On failure the error
/// carries what was listening and the container's processes.
fn wait_listening(cri: &Cri, container: &str) -> Result<()> {
    let cmd = format!(
        "for i in $(seq 150); do s=$(netstat -ltn); n=0; \
         for p in {PORT_POD_ANNOTATION} {PORT_KUBELET} {PORT_CONFIG}; do \
         case \"$s\" in *\":$p \"*) n=$((n+1));; esac; done; \
         [ $n = 3 ] && exit 0; sleep 0.5; done; echo \"$s\"; ps; exit 1"
    );
    let out = cri.exec_sync(container, &["sh", "-c", &cmd], Duration::from_secs(240))?;
    ensure!(
        out.exit_code == 0,
        "the echo servers do not listen: {}{}",
        out.stdout_str(),
        out.stderr_str()
    );
    Ok(())
}

fn run(cri: &Cri, ctrd: &Containerd, pod_id: &mut Option<String>) -> Result<()> {
    let log_dir = ctrd.dir().join("pods").join("pf");
    std::fs::create_dir_all(&log_dir)?;
    let uid = format!("pf-0000-4000-8000-{:012x}", std::process::id());
    let mut config = pod_config("pf", "e2e", &uid, &log_dir, PodNetwork::Pod);
    config.annotations = HashMap::from([(
        "io.ember.port_forward".to_string(),
        format!("{PORT_POD_ANNOTATION},{PORT_NO_LISTENER}"),
    )]);
    // As kubelet does for every container port (host port 0: no hostPort).
    config.port_mappings = vec![api::PortMapping {
        protocol: api::Protocol::Tcp as i32,
        container_port: i32::from(PORT_KUBELET),
        ..Default::default()
    }];
    let t0 = Instant::now();
    let pod = cri.run_pod(&config, &handler())?;
    *pod_id = Some(pod.clone());
    println!(
        "[cri_portforward] RunPodSandbox ({}): {:.1}s, id {pod}",
        handler(),
        t0.elapsed().as_secs_f64()
    );
    let ctr = cri.create_container(&pod, &echo_servers(&config), &config)?;
    cri.start_container(&ctr)?;
    wait_listening(cri, &ctr)?;

    for port in [PORT_POD_ANNOTATION, PORT_KUBELET, PORT_CONFIG] {
        echo_line(cri, &pod, port).with_context(|| format!("echo through port {port}"))?;
        println!("[cri_portforward] case echo on port {port}: ok");
    }

    // Bulk: both directions at once through the echo server.
    let data = pattern(BULK);
    let s = cri.port_forward(&pod, &[PORT_POD_ANNOTATION])?;
    let t0 = Instant::now();
    s.send(PORT_POD_ANNOTATION, &data)?;
    let got = s.wait_for(
        PORT_POD_ANNOTATION,
        Duration::from_secs(600),
        "the whole echo",
        |p| p.data.len() >= BULK,
    )?;
    let secs = t0.elapsed().as_secs_f64();
    ensure!(got.data.len() == BULK, "{} bytes back", got.data.len());
    let first_bad = got.data.iter().zip(&data).position(|(a, b)| a != b);
    ensure!(
        first_bad.is_none(),
        "echoed data differs from byte {first_bad:?}"
    );
    println!(
        "[cri_portforward] case {} MiB each way intact: ok, {secs:.1}s ({:.2} MiB/s each way)",
        BULK >> 20,
        (BULK as f64 / (1 << 20) as f64) / secs
    );
    drop(s);

    let msg = expect_refused(cri, &pod, PORT_NO_LISTENER)?;
    ensure!(
        msg.contains(&PORT_NO_LISTENER.to_string()),
        "error names the port: {msg}"
    );
    println!("[cri_portforward] case declared port without listener errors: ok");
    expect_refused(cri, &pod, PORT_UNDECLARED)?;
    println!("[cri_portforward] case undeclared port errors: ok");

    // A forward open while the pod stops.
    let s = cri.port_forward(&pod, &[PORT_POD_ANNOTATION])?;
    s.send(PORT_POD_ANNOTATION, b"x")?;
    s.wait_for(PORT_POD_ANNOTATION, WAIT, "the echo", |p| p.data == b"x")?;
    let t0 = Instant::now();
    cri.stop_pod(&pod)?;
    s.wait_closed(WAIT)
        .context("the forward outlived the pod")?;
    println!(
        "[cri_portforward] case forward ends with the pod: ok (stop + close {:.1}s)",
        t0.elapsed().as_secs_f64()
    );
    drop(s);
    cri.remove_pod(&pod)?;
    *pod_id = None;
    Ok(())
}

#[test]
fn cri_port_forward() {
    if let Some(why) = missing_prerequisites() {
        let msg = format!("!!! SKIPPING the CRI port-forward test: {why}");
        println!("{msg}");
        eprintln!("{msg}");
        return;
    }
    let cni = CniNetwork::pick("ember-pf", "ember-pf", Ipv4Addr::new(10, 88, 120, 0), 8)
        .expect("CNI network");
    let mut opts = Options::with_ember().expect("containerd-shim-ember-v2 is built");
    if let Some(c) = &mut opts.ember_config {
        c.push_str(&format!(
            "port_forward_ports = [{PORT_CONFIG}]\nport_forward_max_connections = 16\n"
        ));
    }
    opts.cni = Some(cni.options());
    let ctrd = Containerd::start(opts).expect("containerd starts");
    let cri = Cri::for_containerd(&ctrd).expect("CRI client connects");
    cri.wait_ready(true, Duration::from_secs(30))
        .expect("CRI ready");
    let mut pod = None;
    let r = run(&cri, &ctrd, &mut pod);
    if let Some(id) = &pod {
        let _ = cri.stop_and_remove_pod(id);
    }
    let log_tail = ctrd.log_tail(60);
    drop(cri);
    let report = ctrd.shutdown();
    if r.is_err() || !report.is_clean() {
        println!("{log_tail}");
    }
    r.expect("port-forward cases");
    assert!(report.is_clean(), "leaks: {report:?}");
}
