//! OCI hooks with a real containerd 1.6 and `ctr run --config`, the way
//! nerdctl uses them (issue 13; no nerdctl here): the spec carries a
//! `createRuntime` hook that runs the Debian CNI bridge plugin (with
//! host-local IPAM) in `/proc/<state.pid>/ns/net`, as nerdctl's
//! `internal oci-hook createRuntime` does, and a `postStop` hook that runs
//! CNI DEL there. Every hook records the state JSON it got on stdin and
//! the links of that namespace.
//!
//! - `failing_hooks_fail_the_create_and_leave_nothing`: the CNI hook runs,
//!   then a hook that fails (exit status 3 with a message; a binary that
//!   does not exist; one that outlives its 1 s timeout; one that writes 1 MB
//!   of random bytes and exits 1): `ctr run` fails naming the failed hook
//!   and what it did (bounded); postStop ran (CNI DEL freed the address);
//!   no VM, no shim, no port on the bridge, no state directory is left. A
//!   `createContainer` hook is refused before anything runs. No VM boots.
//! - `a_network_set_up_by_hooks_reaches_the_guest`: the container gets the
//!   address CNI gave it: the host fetches a page from busybox httpd in the
//!   guest at that address; the `/etc/hosts`, `/etc/resolv.conf` and
//!   `/etc/hostname` the spec bind-mounts read the same in the guest;
//!   poststart ran with the VM's tap in the namespace; after `ctr task
//!   delete`, postStop ran once the VM (and its tap) was gone, and its CNI
//!   DEL freed the address.
//!
//! Skipped, loudly, only when /dev/kvm or the guest kernel/initrd are
//! missing. One VM boot (60-150 s on a host without VT-x).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use ember_e2e::containerd::{Containerd, Options, EMBER_RUNTIME, EMBER_STATE_DIR};
use ember_e2e::cri::CniNetwork;
use ember_e2e::vm_prerequisites_missing as missing_prerequisites;
use serde_json::{json, Value};

const NET_NAME: &str = "ember-e2e-hooks";
const NET_BRIDGE_BASE: &str = "ember-hk";
const NET_SUBNET_BASE: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 88, 140, 0);
/// A cold VM boot on a host without VT-x.
const BOOT_TIMEOUT: Duration = Duration::from_secs(1500);
const TASK_TIMEOUT: Duration = Duration::from_secs(120);
const HTTP_PORT: u16 = 8080;
const HTTPD_TIMEOUT: Duration = Duration::from_secs(300);
const ANNOTATION: (&str, &str) = ("org.example.hooks-test", "annotated");
const HOSTS: &str = "127.0.0.1 localhost\n10.0.0.7 from-the-client\n";
const RESOLV: &str = "nameserver 10.0.0.53\nsearch hooks.example\n";
const HOSTNAME: &str = "hooked\n";

fn skip_loudly(test: &str, why: &str) {
    let msg = format!("\n!!! SKIPPING {test}: {why}\n");
    println!("{msg}");
    eprintln!("{msg}");
}

/// The hook nerdctl's `oci-hook` stands for: `hook.sh <phase> <dir>`.
const CNI_HOOK: &str = r#"#!/bin/sh
phase=$1; dir=$2
state=$(cat)
printf '%s' "$state" > "$dir/$phase.json"
pid=$(printf '%s' "$state" | sed -n 's/.*"pid":\([0-9]*\).*/\1/p')
id=$(printf '%s' "$state" | sed -n 's/.*"id":"\([^"]*\)".*/\1/p')
ns=/proc/$pid/ns/net
readlink "$ns" > "$dir/$phase.netns"
nsenter --net="$ns" ip -o link > "$dir/$phase.links" 2>&1
export CNI_PATH=/usr/lib/cni CNI_CONTAINERID="$id" CNI_IFNAME=eth0 CNI_NETNS="$ns"
case $phase in
createRuntime) CNI_COMMAND=ADD /usr/lib/cni/bridge < "$dir/net.conf" > "$dir/add.out" || exit 1 ;;
poststop) CNI_COMMAND=DEL /usr/lib/cni/bridge < "$dir/net.conf" > "$dir/del.out" 2>&1 || exit 1 ;;
esac
"#;

const FAILING_HOOK: &str = "#!/bin/sh\necho 'no address for you' >&2\nexit 3\n";
const SLOW_HOOK: &str = "#!/bin/sh\necho sleeping\nsleep 100\n";
const GARBAGE_HOOK: &str = "#!/bin/sh\nhead -c 1000000 /dev/urandom\nexit 1\n";

struct Fixture {
    dir: tempfile::TempDir,
    cni: CniNetwork,
    /// host-local's allocations.
    ipam_dir: PathBuf,
    /// The bridge plugin's config (stdin of CNI ADD and DEL).
    net_conf: String,
}

impl Fixture {
    fn new() -> Result<Fixture> {
        let cni = CniNetwork::pick(NET_NAME, NET_BRIDGE_BASE, NET_SUBNET_BASE, 8)?;
        let dir = tempfile::Builder::new()
            .prefix("ember-hooks-")
            .tempdir_in("/tmp")?;
        let conflist: Value = serde_json::from_str(&cni.conflist())?;
        let mut plugin = conflist["plugins"][0].clone();
        plugin["cniVersion"] = conflist["cniVersion"].clone();
        plugin["name"] = conflist["name"].clone();
        let ipam_dir = PathBuf::from(
            plugin["ipam"]["dataDir"]
                .as_str()
                .context("dataDir in the conflist")?,
        )
        .join(NET_NAME);
        let f = Fixture {
            dir,
            cni,
            ipam_dir,
            net_conf: plugin.to_string(),
        };
        for (name, body) in [
            ("hook.sh", CNI_HOOK),
            ("fail.sh", FAILING_HOOK),
            ("slow.sh", SLOW_HOOK),
            ("garbage.sh", GARBAGE_HOOK),
        ] {
            let p = f.path(name);
            std::fs::write(&p, body)?;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
        }
        for (name, body) in [
            ("hosts", HOSTS),
            ("resolv.conf", RESOLV),
            ("hostname", HOSTNAME),
        ] {
            std::fs::write(f.path(name), body)?;
        }
        f.rootfs()?;
        Ok(f)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A busybox rootfs.
    fn rootfs(&self) -> Result<()> {
        let root = self.path("rootfs");
        for d in ["bin", "etc", "tmp", "proc", "sys", "dev", "run"] {
            std::fs::create_dir_all(root.join(d))?;
        }
        for f in ["hosts", "resolv.conf", "hostname"] {
            std::fs::write(root.join("etc").join(f), "")?;
        }
        std::fs::copy("/bin/busybox", root.join("bin/busybox")).context("busybox-static")?;
        for applet in ["sh", "cp", "echo", "httpd", "cat"] {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
        }
        Ok(())
    }

    fn hook(&self, script: &str, args: &[&str]) -> Value {
        let path = self.path(script).display().to_string();
        let mut argv = vec![path.clone()];
        argv.extend(args.iter().map(|a| a.to_string()));
        json!({"path": path, "args": argv, "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"], "timeout": 30})
    }

    /// `ctr oci spec` made into this case's container.
    fn spec(&self, ctrd: &Containerd, case: &str, hooks: Value) -> Result<PathBuf> {
        let out = ctrd.ctr(&["oci", "spec"]);
        out.ok()?;
        let mut spec: Value = serde_json::from_str(&out.stdout_str())?;
        spec["root"] = json!({"path": self.path("rootfs"), "readonly": false});
        spec["process"]["terminal"] = json!(false);
        spec["process"]["args"] = json!([
            "/bin/sh",
            "-c",
            format!(
                "echo starting; cp /etc/hosts /etc/resolv.conf /etc/hostname /tmp/ && \
                 echo hello-from-the-guest > /tmp/index.html && \
                 echo serving && exec httpd -f -vv -p {HTTP_PORT} -h /tmp"
            )
        ]);
        spec["hooks"] = hooks;
        spec["annotations"] = json!({ANNOTATION.0: ANNOTATION.1});
        let mounts = spec["mounts"].as_array_mut().context("mounts")?;
        mounts.push(json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]}));
        for f in ["hosts", "resolv.conf", "hostname"] {
            mounts.push(json!({
                "destination": format!("/etc/{f}"),
                "type": "bind",
                "source": self.path(f),
                "options": ["rbind", "ro"],
            }));
        }
        std::fs::create_dir_all(self.path(case))?;
        std::fs::write(self.path(case).join("net.conf"), &self.net_conf)?;
        let path = self.path(case).join("config.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&spec)?)?;
        Ok(path)
    }

    fn record(&self, case: &str, file: &str) -> Result<String> {
        let p = self.path(case).join(file);
        std::fs::read_to_string(&p).with_context(|| format!("{} (did the hook run?)", p.display()))
    }

    fn state(&self, case: &str, phase: &str) -> Result<Value> {
        Ok(serde_json::from_str(
            &self.record(case, &format!("{phase}.json"))?,
        )?)
    }

    /// The address CNI ADD gave the container.
    fn address(&self, case: &str) -> Result<std::net::Ipv4Addr> {
        let add: Value = serde_json::from_str(&self.record(case, "add.out")?)?;
        let cidr = add["ips"][0]["address"]
            .as_str()
            .context("no address in the CNI result")?;
        Ok(cidr.split('/').next().unwrap_or_default().parse()?)
    }

    fn bridge_ports(&self) -> Vec<String> {
        std::fs::read_dir(format!("/sys/class/net/{}/brif", self.cni.bridge))
            .map(|d| {
                d.filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Checks a state JSON field by field.
fn check_state(state: &Value, ctrd: &Containerd, id: &str, status: &str) -> Result<u64> {
    let bundle = ctrd
        .state()
        .join("io.containerd.runtime.v2.task/default")
        .join(id);
    ensure!(
        state["ociVersion"] == json!("1.0.2-dev")
            || state["ociVersion"]
                .as_str()
                .is_some_and(|v| v.starts_with("1.")),
        "ociVersion: {state}"
    );
    ensure!(state["id"] == json!(id), "id: {state}");
    ensure!(
        state["status"] == json!(status),
        "status (want {status}): {state}"
    );
    ensure!(
        state["bundle"] == json!(bundle.display().to_string()),
        "bundle (want {}): {state}",
        bundle.display()
    );
    ensure!(
        state["annotations"][ANNOTATION.0] == json!(ANNOTATION.1),
        "annotations: {state}"
    );
    let pid = state["pid"]
        .as_u64()
        .filter(|p| *p > 1)
        .with_context(|| format!("pid: {state}"))?;
    ensure!(
        state.as_object().map(|o| o.len()) == Some(6),
        "unexpected fields: {state}"
    );
    Ok(pid)
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !ok() {
        ensure!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let get = || -> Result<String> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
        // busybox httpd forks per request: slow in a guest on a loaded
        // host without VT-x.
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        write!(s, "GET {path} HTTP/1.0\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        let (head, body) = body.split_once("\r\n\r\n").context("no HTTP header end")?;
        ensure!(
            head.starts_with("HTTP/1.") && head.contains(" 200 "),
            "{head}"
        );
        Ok(body.to_string())
    };
    get().with_context(|| format!("GET http://{addr}{path}"))
}

fn ember_containerd() -> Result<Containerd> {
    Containerd::start(Options::with_ember()?)
}

#[test]
fn failing_hooks_fail_the_create_and_leave_nothing() {
    if let Some(why) = missing_prerequisites() {
        return skip_loudly("the failing OCI hooks test", &why);
    }
    let fixture = Fixture::new().expect("fixture");
    let ctrd = ember_containerd().expect("containerd starts");
    let mut failures = Vec::new();
    let mut note = |name: &str, t0: Instant, r: Result<()>| {
        println!(
            "[ctr_hooks] {name}: {} in {:.1}s",
            if r.is_ok() { "ok" } else { "FAILED" },
            t0.elapsed().as_secs_f64()
        );
        if let Err(e) = r {
            failures.push(format!("{name}: {e:#}"));
        }
    };
    for (case, bad, want) in bad_hooks(&fixture) {
        let t0 = Instant::now();
        let r = failing_create(&fixture, &ctrd, case, bad, &want);
        note(&format!("createRuntime hook fails ({case})"), t0, r);
    }
    let t0 = Instant::now();
    let r = refused_create_container_hook(&fixture, &ctrd);
    note("createContainer hook refused", t0, r);
    if !failures.is_empty() {
        println!("containerd log:\n{}", ctrd.log_tail(80));
    }
    let report = ctrd.shutdown();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(report.is_clean(), "containerd shutdown: {report:?}");
}

#[test]
fn a_network_set_up_by_hooks_reaches_the_guest() {
    if let Some(why) = missing_prerequisites() {
        return skip_loudly("the OCI hooks network test", &why);
    }
    let fixture = Fixture::new().expect("fixture");
    let ctrd = ember_containerd().expect("containerd starts");
    let t0 = Instant::now();
    let r = network_from_hooks(&fixture, &ctrd);
    println!(
        "[ctr_hooks] network from hooks: {} in {:.1}s",
        if r.is_ok() { "ok" } else { "FAILED" },
        t0.elapsed().as_secs_f64()
    );
    if r.is_err() {
        println!("containerd log:\n{}", ctrd.log_tail(80));
    }
    let report = ctrd.shutdown();
    if let Err(e) = r {
        panic!("{e:#}");
    }
    assert!(report.is_clean(), "containerd shutdown: {report:?}");
}

fn no_pod_left(ctrd: &Containerd, id: &str) -> Result<()> {
    wait_for("the shim exits", Duration::from_secs(60), || {
        ctrd.shim_processes()
            .iter()
            .all(|(_, cmd)| !cmd.contains(&format!("-id {id} ")))
    })?;
    let state_dir = Path::new(EMBER_STATE_DIR).join("default").join(id);
    ensure!(!state_dir.exists(), "{} is left", state_dir.display());
    Ok(())
}

/// The bad hook a case puts after the CNI hook, and what the error says.
fn bad_hooks(f: &Fixture) -> Vec<(&'static str, Value, String)> {
    let fail = f.path("fail.sh").display().to_string();
    let slow = f.path("slow.sh").display().to_string();
    let garbage = f.path("garbage.sh").display().to_string();
    let mut slow_hook = f.hook("slow.sh", &[]);
    slow_hook["timeout"] = json!(1);
    vec![
        (
            "exit",
            f.hook("fail.sh", &[]),
            format!("createRuntime hook #1 ({fail}) exited with status 3; stderr: no address for you"),
        ),
        (
            "missing",
            json!({"path": "/nonexistent/oci-hook"}),
            "createRuntime hook #1 (/nonexistent/oci-hook) cannot be run: No such file or directory".into(),
        ),
        (
            "timeout",
            slow_hook,
            format!("createRuntime hook #1 ({slow}) did not finish within 1 s and was killed; stdout: sleeping"),
        ),
        (
            "garbage",
            f.hook("garbage.sh", &[]),
            format!("createRuntime hook #1 ({garbage}) exited with status 1; stdout: "),
        ),
    ]
}

/// A createRuntime hook that fails after the CNI hook ran: `ctr run` fails
/// naming it; postStop ran and undid CNI; nothing is left.
fn failing_create(
    f: &Fixture,
    ctrd: &Containerd,
    case: &str,
    bad: Value,
    want: &str,
) -> Result<()> {
    let id = format!("hooks-{case}");
    let id = id.as_str();
    let dir = f.path(case).display().to_string();
    let hooks = json!({
        "createRuntime": [f.hook("hook.sh", &["createRuntime", &dir]), bad],
        "poststop": [f.hook("hook.sh", &["poststop", &dir])],
    });
    let t0 = Instant::now();
    let err = run_refused(
        f,
        ctrd,
        case,
        id,
        hooks,
        "ctr run succeeded despite a failing createRuntime hook",
    )?;
    ensure!(
        err.contains(want),
        "the error does not name the failed hook: {err}"
    );
    ensure!(
        err.len() < 16 << 10,
        "the error is {} bytes long",
        err.len()
    );
    ensure!(
        t0.elapsed() < Duration::from_secs(60),
        "took {:?}",
        t0.elapsed()
    );
    // The first hook configured the namespace; postStop undid it.
    let created = f.state(case, "createRuntime")?;
    let pid = check_state(&created, ctrd, id, "creating")?;
    let stopped = f.state(case, "poststop")?;
    ensure!(
        check_state(&stopped, ctrd, id, "stopped")? == pid,
        "poststop got another pid: {stopped}"
    );
    ensure!(
        f.record(case, "poststop.links")?.contains("eth0"),
        "poststop did not see CNI's eth0"
    );
    let ip = f.address(case)?;
    ensure!(
        !f.ipam_dir.join(ip.to_string()).exists(),
        "host-local still holds {ip}: CNI DEL did not run"
    );
    ensure!(
        f.bridge_ports().is_empty(),
        "ports left on the bridge: {:?}",
        f.bridge_ports()
    );
    let host_ns = std::fs::read_link("/proc/self/ns/net")?;
    ensure!(
        f.record(case, "createRuntime.netns")?.trim() != host_ns.to_string_lossy(),
        "the hook ran CNI in the host's namespace"
    );
    no_pod_left(ctrd, id)?;
    wait_for("the namespace holder goes", Duration::from_secs(10), || {
        !Path::new(&format!("/proc/{pid}/ns/net")).exists()
    })?;
    Ok(())
}

/// `ctr run` of case `case`'s spec with `hooks`, which must fail
/// (`unexpected` otherwise); the container record is deleted either way.
/// Returns ctr's stderr.
fn run_refused(
    f: &Fixture,
    ctrd: &Containerd,
    case: &str,
    id: &str,
    hooks: Value,
    unexpected: &str,
) -> Result<String> {
    let config = f.spec(ctrd, case, hooks)?;
    let config = config.display().to_string();
    let out = ctrd.ctr_timeout(
        &["run", "--runtime", EMBER_RUNTIME, "--config", &config, id],
        BOOT_TIMEOUT,
    );
    let _ = ctrd.ctr(&["containers", "delete", id]);
    ensure!(!out.success(), "{unexpected}");
    Ok(out.stderr_str())
}

/// A hook that would have to run inside the guest is refused before
/// anything runs.
fn refused_create_container_hook(f: &Fixture, ctrd: &Containerd) -> Result<()> {
    let id = "hooks-incontainer";
    let dir = f.path("incontainer").display().to_string();
    let hooks = json!({
        "createRuntime": [f.hook("hook.sh", &["createRuntime", &dir])],
        "createContainer": [f.hook("hook.sh", &["createContainer", &dir])],
    });
    let err = run_refused(
        f,
        ctrd,
        "incontainer",
        id,
        hooks,
        "ctr run succeeded with a createContainer hook",
    )?;
    ensure!(
        err.contains("createContainer hook") && err.contains("inside the pod's VM"),
        "{err}"
    );
    ensure!(
        !f.path("incontainer").join("createRuntime.json").exists(),
        "a hook ran although the spec was refused"
    );
    no_pod_left(ctrd, id)
}

fn network_from_hooks(f: &Fixture, ctrd: &Containerd) -> Result<()> {
    let id = "hooks-web";
    let dir = f.path("web").display().to_string();
    let hooks = json!({
        "createRuntime": [f.hook("hook.sh", &["createRuntime", &dir])],
        "poststart": [f.hook("hook.sh", &["poststart", &dir])],
        "poststop": [f.hook("hook.sh", &["poststop", &dir])],
    });
    let config = f.spec(ctrd, "web", hooks)?;
    let config = config.display().to_string();
    let t0 = Instant::now();
    // In the foreground, its output into a file; it ends with the task.
    let log = f.path("web").join("output.log");
    let out = std::fs::File::create(&log)?;
    let mut ctr = ctrd
        .ctr_command("default")
        .args(["run", "--runtime", EMBER_RUNTIME, "--config", &config, id])
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()?;
    let output = || std::fs::read_to_string(&log).unwrap_or_default();
    let running = wait_for("the task runs", BOOT_TIMEOUT, || {
        matches!(ctr.try_wait(), Ok(Some(_)))
            || ctrd
                .ctr(&["task", "ls"])
                .stdout_str()
                .lines()
                .any(|l| l.starts_with(id) && l.contains("RUNNING"))
    });
    if let Ok(Some(status)) = ctr.try_wait() {
        bail!("ctr run ended ({status}): {}", output());
    }
    if let Err(e) = running {
        let _ = ctr.kill();
        let _ = ctr.wait();
        return Err(e.context(output()));
    }
    println!("[ctr_hooks] pod up in {:.1}s", t0.elapsed().as_secs_f64());
    let result = (|| -> Result<()> {
        let created = f.state("web", "createRuntime")?;
        let pid = check_state(&created, ctrd, id, "creating")?;
        let links = f.record("web", "createRuntime.links")?;
        ensure!(
            !links.contains("eth0"),
            "the namespace was not new: {links}"
        );
        let started = f.state("web", "poststart")?;
        ensure!(
            check_state(&started, ctrd, id, "running")? == pid,
            "poststart got another pid"
        );
        let links = f.record("web", "poststart.links")?;
        ensure!(
            links.contains("eth0") && links.contains("tap0_ember"),
            "at poststart: {links}"
        );
        let ip = f.address("web")?;
        ensure!(
            f.cni.contains(ip) && f.ipam_dir.join(ip.to_string()).exists(),
            "{ip}"
        );
        let addr = SocketAddr::from((ip, HTTP_PORT));
        let mut last = String::new();
        // Slow on a loaded host without VT-x: the guest runs ~1M
        // instructions/s.
        wait_for(
            &format!("httpd answers at {addr}"),
            HTTPD_TIMEOUT,
            || match http_get(addr, "/index.html") {
                Ok(body) => {
                    last = body;
                    true
                }
                Err(e) => {
                    last = format!("{e:#}");
                    false
                }
            },
        )
        .with_context(|| format!("{last}; the container's output: {:?}", output()))?;
        ensure!(
            last.trim() == "hello-from-the-guest",
            "GET /index.html: {last:?}"
        );
        for (file, want) in [
            ("hosts", HOSTS),
            ("resolv.conf", RESOLV),
            ("hostname", HOSTNAME),
        ] {
            let got = http_get(addr, &format!("/{file}"))?;
            ensure!(
                got == want,
                "/etc/{file} in the guest: {got:?}, want {want:?}"
            );
        }
        ensure!(
            !f.path("web").join("poststop.json").exists(),
            "poststop ran while the container runs"
        );
        Ok(())
    })();
    let _ = ctrd.ctr_timeout(&["task", "kill", "-s", "KILL", id], TASK_TIMEOUT);
    wait_for("ctr run ends with the task", TASK_TIMEOUT, || {
        matches!(ctr.try_wait(), Ok(Some(_)))
    })?;
    let deleted = ctrd.ctr_timeout(&["task", "delete", id], TASK_TIMEOUT);
    let _ = ctrd.ctr(&["containers", "delete", id]);
    result?;
    // `ctr run` in the foreground deletes the task itself once it exits.
    ensure!(
        deleted.success() || deleted.stderr_str().contains("not found"),
        "ctr task delete: {}",
        deleted.describe()
    );
    // postStop ran before Delete returned, after the VM was gone.
    let stopped = f.state("web", "poststop")?;
    let pid = check_state(&stopped, ctrd, id, "stopped")?;
    let links = f.record("web", "poststop.links")?;
    ensure!(
        links.contains("eth0"),
        "poststop did not see the pod's namespace: {links}"
    );
    ensure!(
        !links.contains("tap0_ember"),
        "the VM's tap was still there at poststop: {links}"
    );
    let ip = f.address("web")?;
    ensure!(
        !f.ipam_dir.join(ip.to_string()).exists(),
        "host-local still holds {ip}"
    );
    ensure!(
        f.bridge_ports().is_empty(),
        "ports left on the bridge: {:?}",
        f.bridge_ports()
    );
    no_pod_left(ctrd, id)?;
    if Path::new(&format!("/proc/{pid}/ns/net")).exists() {
        bail!("the namespace holder {pid} is left");
    }
    Ok(())
}
