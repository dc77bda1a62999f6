//! The sandbox's process lifecycle against a mock agent (no VM): states,
//! exits, the error codes containerd gets, OOM ordering, a lost agent.
//!
//! Creating a container binds its rootfs into the share, which needs
//! CAP_SYS_ADMIN: those tests are skipped when not run as root.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ember_proto::agent::*;
use ember_proto::agent_ttrpc::{create_agent, Agent as AgentService};
use ember_proto::client::AgentClient;
use tokio::sync::{mpsc, watch};
use ttrpc::r#async::TtrpcContext;
use ttrpc::Code;

use super::process::{Process, Status};
use super::*;
use crate::config::Config;

type Key = (String, String);
/// A process: its pid and its exit status once it has one.
type MockProc = (u32, watch::Sender<Option<u32>>);

/// An in-memory agent: processes "run" until signalled (or told to exit).
#[derive(Default)]
struct MockAgent {
    procs: Mutex<HashMap<Key, MockProc>>,
    next_pid: Mutex<u32>,
    specs: Mutex<Vec<serde_json::Value>>,
    updates: Mutex<Vec<(String, serde_json::Value)>>,
    oom_rx: tokio::sync::Mutex<Option<mpsc::Receiver<String>>>,
}

fn status(code: Code, msg: &str) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg))
}

impl MockAgent {
    fn spawn(&self, cid: &str, eid: &str) -> u32 {
        let mut n = self.next_pid.lock().unwrap();
        *n += 1;
        let pid = 100 + *n;
        self.procs.lock().unwrap().insert(
            (cid.to_string(), eid.to_string()),
            (pid, watch::channel(None).0),
        );
        pid
    }

    fn exit(&self, cid: &str, eid: &str, code: u32) {
        if let Some((_, tx)) = self.procs.lock().unwrap().get(&(cid.into(), eid.into())) {
            tx.send_if_modified(|v| {
                if v.is_none() {
                    *v = Some(code);
                    true
                } else {
                    false
                }
            });
        }
    }
}

/// The ttrpc service around the shared mock.
struct MockService(Arc<MockAgent>);

impl std::ops::Deref for MockService {
    type Target = MockAgent;
    fn deref(&self) -> &MockAgent {
        &self.0
    }
}

#[ember_proto::async_trait]
impl AgentService for MockService {
    async fn create_container(
        &self,
        _: &TtrpcContext,
        req: CreateContainerRequest,
    ) -> ttrpc::Result<CreateContainerResponse> {
        let spec: serde_json::Value = serde_json::from_slice(&req.oci_spec).unwrap();
        if spec["process"]["args"][0] == "/no/such" {
            return Err(status(
                Code::FAILED_PRECONDITION,
                "exec: \"/no/such\": no such file or directory",
            ));
        }
        self.specs.lock().unwrap().push(spec);
        let mut r = CreateContainerResponse::new();
        r.pid = self.spawn(&req.container_id, "");
        Ok(r)
    }

    async fn start_container(
        &self,
        _: &TtrpcContext,
        req: StartContainerRequest,
    ) -> ttrpc::Result<StartContainerResponse> {
        let procs = self.procs.lock().unwrap();
        let (pid, _) = procs
            .get(&(req.container_id.clone(), String::new()))
            .ok_or_else(|| status(Code::NOT_FOUND, "no such container"))?;
        Ok(StartContainerResponse {
            pid: *pid,
            ..Default::default()
        })
    }

    async fn exec_process(
        &self,
        _: &TtrpcContext,
        req: ExecProcessRequest,
    ) -> ttrpc::Result<ExecProcessResponse> {
        serde_json::from_slice::<serde_json::Value>(&req.process)
            .map_err(|e| status(Code::INVALID_ARGUMENT, &e.to_string()))?;
        let mut r = ExecProcessResponse::new();
        r.pid = self.spawn(&req.container_id, &req.exec_id);
        Ok(r)
    }

    async fn signal_process(
        &self,
        _: &TtrpcContext,
        req: SignalProcessRequest,
    ) -> ttrpc::Result<Empty> {
        let keys: Vec<Key> = self
            .procs
            .lock()
            .unwrap()
            .keys()
            .filter(|(c, e)| *c == req.container_id && (req.all || *e == req.exec_id))
            .cloned()
            .collect();
        if keys.is_empty() {
            return Err(status(Code::NOT_FOUND, "no such process"));
        }
        for (c, e) in keys {
            self.exit(&c, &e, 128 + req.signal);
        }
        Ok(Empty::new())
    }

    async fn wait_process(
        &self,
        _: &TtrpcContext,
        req: WaitProcessRequest,
    ) -> ttrpc::Result<WaitProcessResponse> {
        let (pid, mut rx) = {
            let procs = self.procs.lock().unwrap();
            let (pid, tx) = procs
                .get(&(req.container_id.clone(), req.exec_id.clone()))
                .ok_or_else(|| status(Code::NOT_FOUND, "no such process"))?;
            (*pid, tx.subscribe())
        };
        let code = rx.wait_for(Option::is_some).await.unwrap().unwrap();
        Ok(WaitProcessResponse {
            exit_status: code,
            pid,
            exited_at: Some(ember_proto::time::now()).into(),
            ..Default::default()
        })
    }

    async fn remove_container(
        &self,
        _: &TtrpcContext,
        req: RemoveContainerRequest,
    ) -> ttrpc::Result<Empty> {
        let mut procs = self.procs.lock().unwrap();
        let alive = procs
            .iter()
            .any(|((c, _), (_, tx))| *c == req.container_id && tx.borrow().is_none());
        if alive {
            return Err(status(Code::FAILED_PRECONDITION, "processes still alive"));
        }
        procs.retain(|(c, _), _| *c != req.container_id);
        Ok(Empty::new())
    }

    async fn list_processes(
        &self,
        _: &TtrpcContext,
        req: ListProcessesRequest,
    ) -> ttrpc::Result<ListProcessesResponse> {
        let mut pids: Vec<u32> = self
            .procs
            .lock()
            .unwrap()
            .iter()
            .filter(|((c, _), (_, tx))| *c == req.container_id && tx.borrow().is_none())
            .map(|(_, (pid, _))| *pid)
            .collect();
        pids.sort();
        Ok(ListProcessesResponse {
            pids,
            ..Default::default()
        })
    }

    async fn update_container(
        &self,
        _: &TtrpcContext,
        req: UpdateContainerRequest,
    ) -> ttrpc::Result<Empty> {
        let r = serde_json::from_slice(&req.resources)
            .map_err(|e| status(Code::INVALID_ARGUMENT, &e.to_string()))?;
        self.updates.lock().unwrap().push((req.container_id, r));
        Ok(Empty::new())
    }

    async fn stats_container(
        &self,
        _: &TtrpcContext,
        _: StatsContainerRequest,
    ) -> ttrpc::Result<StatsContainerResponse> {
        let mut r = StatsContainerResponse::new();
        r.pids = Some(PidsStats {
            current: 2,
            ..Default::default()
        })
        .into();
        Ok(r)
    }

    async fn pause_container(
        &self,
        _: &TtrpcContext,
        _: PauseContainerRequest,
    ) -> ttrpc::Result<Empty> {
        Ok(Empty::new())
    }

    async fn resume_container(
        &self,
        _: &TtrpcContext,
        _: ResumeContainerRequest,
    ) -> ttrpc::Result<Empty> {
        Ok(Empty::new())
    }

    async fn get_oom_event(
        &self,
        _: &TtrpcContext,
        _: GetOOMEventRequest,
    ) -> ttrpc::Result<OOMEvent> {
        let mut guard = self.oom_rx.lock().await;
        let Some(rx) = guard.as_mut() else {
            return Err(status(Code::UNIMPLEMENTED, "no OOM events"));
        };
        match rx.recv().await {
            Some(id) => Ok(OOMEvent {
                container_id: id,
                ..Default::default()
            }),
            None => std::future::pending().await,
        }
    }
}

pub(crate) struct Harness {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
    agent: Arc<MockAgent>,
    pub(crate) sandbox: Arc<Sandbox>,
    events: crate::events::Recorded,
    oom_tx: mpsc::Sender<String>,
    /// Aborting it cuts the shim's connection to the agent.
    proxy: tokio::task::JoinHandle<()>,
    _server: ttrpc::r#async::Server,
}

/// Serves the mock agent on a Unix socket and connects the sandbox to it
/// through a proxy the test can cut.
pub(crate) async fn harness() -> Option<Harness> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let (oom_tx, oom_rx) = mpsc::channel(4);
    let agent = Arc::new(MockAgent {
        oom_rx: tokio::sync::Mutex::new(Some(oom_rx)),
        ..Default::default()
    });
    let server_path = root.join("agent.sock");
    let listener = tokio::net::UnixListener::bind(&server_path).unwrap();
    let mut server = ttrpc::r#async::Server::new()
        .register_service(create_agent(Arc::new(MockService(agent.clone()))))
        .add_listener(listener.into());
    server.start().await.unwrap();

    let (client_end, proxy_end) = tokio::net::UnixStream::pair().unwrap();
    let proxy = tokio::spawn(async move {
        let mut upstream = tokio::net::UnixStream::connect(&server_path).await.unwrap();
        let mut proxy_end = proxy_end;
        let _ = tokio::io::copy_bidirectional(&mut proxy_end, &mut upstream).await;
    });
    let client = AgentClient::from_stream(client_end);
    let paths = SandboxPaths::new(&root.join("state"), "ns", "pod");
    std::fs::create_dir_all(&paths.shared).unwrap();
    let (events, recorded) = EventSink::recording();
    let sandbox = Sandbox::for_tests(paths, Agent::new(client, Duration::from_secs(10)), events);
    Some(Harness {
        _dir: dir,
        root,
        agent,
        sandbox,
        events: recorded,
        oom_tx,
        proxy,
        _server: server,
    })
}

impl Harness {
    /// A bundle whose spec runs `args`.
    fn bundle(&self, id: &str, args: &[&str]) -> NewContainer {
        let bundle = self.root.join("bundles").join(id);
        std::fs::create_dir_all(bundle.join("rootfs/bin")).unwrap();
        let spec = serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": args, "cwd": "/"},
            "root": {"path": "rootfs"},
            "linux": {"cgroupsPath": "/default/x", "namespaces": [{"type": "pid"}]}
        });
        NewContainer {
            id: id.into(),
            bundle,
            spec,
            rootfs: Vec::new(),
            stdio: StdioPaths::default(),
        }
    }

    fn topics(&self, id: &str) -> Vec<String> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, text)| text.contains(&format!("\"{id}\"")))
            .map(|(t, _)| t.clone())
            .collect()
    }

    fn shared(&self, id: &str) -> std::path::PathBuf {
        self.sandbox.share.container_host(id)
    }
}

fn code<T>(r: Result<T>) -> Code {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.code(),
    }
}

#[tokio::test]
async fn an_exec_that_fails_to_start_is_waitable_and_deletable_at_once() {
    let Some(h) = harness().await else { return };
    let sb = &h.sandbox;
    sb.create_container(h.bundle("c9", &["sleep", "1000"]))
        .await
        .unwrap();
    sb.start("c9", "").await.unwrap();
    // The mock agent refuses a process that is not JSON, as the real one
    // refuses a missing command.
    sb.add_exec("c9", "bad", StdioPaths::default(), b"not json".to_vec())
        .await
        .unwrap();
    assert_eq!(code(sb.start("c9", "bad").await), Code::INVALID_ARGUMENT);
    let x = sb.process("c9", "bad").unwrap();
    assert_eq!(wait_exit(&x).await.status, 127);
    assert_eq!(sb.delete_exec("c9", "bad").unwrap().1.status, 127);
    sb.kill("c9", "", 9, false).await.unwrap();
    sb.delete_container("c9").await.unwrap();
}

async fn wait_exit(p: &Process) -> Exit {
    tokio::time::timeout(Duration::from_secs(10), p.wait())
        .await
        .expect("the process exits")
}

#[tokio::test]
async fn lifecycle_of_a_container() {
    let Some(h) = harness().await else { return };
    let sb = &h.sandbox;
    let c = sb
        .create_container(h.bundle("c1", &["sleep", "1000"]))
        .await
        .unwrap();
    assert_eq!(c.init.status(), Status::Created);
    assert!(
        h.shared("c1").join("rootfs/bin").is_dir(),
        "rootfs bound into the share"
    );
    let spec = h.agent.specs.lock().unwrap()[0].clone();
    assert!(spec["linux"].get("cgroupsPath").is_none(), "spec rewritten");
    assert_eq!(
        code(sb.create_container(h.bundle("c1", &["x"])).await),
        Code::ALREADY_EXISTS
    );

    let pid = sb.start("c1", "").await.unwrap();
    assert_eq!(pid, c.init.pid());
    assert_eq!(c.init.status(), Status::Running);
    assert_eq!(code(sb.start("c1", "").await), Code::FAILED_PRECONDITION);
    assert_eq!(
        code(sb.delete_container("c1").await),
        Code::FAILED_PRECONDITION
    );

    sb.pause("c1").await.unwrap();
    assert_eq!(c.init.status(), Status::Paused);
    assert_eq!(code(sb.pause("c1").await), Code::FAILED_PRECONDITION);
    sb.resume("c1").await.unwrap();
    assert_eq!(c.init.status(), Status::Running);

    sb.update("c1", br#"{"memory":{"limit":67108864}}"#.to_vec())
        .await
        .unwrap();
    assert_eq!(
        h.agent.updates.lock().unwrap()[0],
        (
            "c1".to_string(),
            serde_json::json!({"memory": {"limit": 67108864}})
        )
    );
    assert_eq!(sb.stats("c1").await.unwrap().pids.current, 2);
    assert_eq!(code(sb.stats("nope").await), Code::NOT_FOUND);

    // An exec: registered, started, listed with its exec id, exits.
    sb.add_exec(
        "c1",
        "x1",
        StdioPaths::default(),
        br#"{"args":["sh"]}"#.to_vec(),
    )
    .await
    .unwrap();
    assert_eq!(
        code(
            sb.add_exec("c1", "x1", StdioPaths::default(), b"{}".to_vec())
                .await
        ),
        Code::ALREADY_EXISTS
    );
    let xpid = sb.start("c1", "x1").await.unwrap();
    let pids = sb.pids("c1").await.unwrap();
    assert!(pids.contains(&(pid, None)));
    assert!(pids.contains(&(xpid, Some("x1".to_string()))));
    h.agent.exit("c1", "x1", 3);
    let x = sb.process("c1", "x1").unwrap();
    assert_eq!(wait_exit(&x).await.status, 3);
    assert_eq!(sb.delete_exec("c1", "x1").unwrap().1.status, 3);
    assert_eq!(code(sb.process("c1", "x1")), Code::NOT_FOUND);

    // SIGKILL from us: 137 at once (no wait for an OOM event).
    let started = std::time::Instant::now();
    sb.kill("c1", "", 9, false).await.unwrap();
    assert_eq!(wait_exit(&c.init).await.status, 137);
    assert!(started.elapsed() < oom::OOM_GRACE);
    assert_eq!(code(sb.kill("c1", "", 9, false).await), Code::NOT_FOUND);
    assert_eq!(
        code(
            sb.add_exec("c1", "x2", StdioPaths::default(), b"{}".to_vec())
                .await
        ),
        Code::FAILED_PRECONDITION
    );

    let (dpid, exit) = sb.delete_container("c1").await.unwrap();
    assert_eq!((dpid, exit.status), (pid, 137));
    assert!(!h.shared("c1").exists(), "host mounts undone");
    assert_eq!(sb.container_count(), 0);
    assert_eq!(
        h.topics("c1"),
        [
            "/tasks/create",
            "/tasks/start",
            "/tasks/paused",
            "/tasks/resumed",
            "/tasks/exec-added",
            "/tasks/exec-started",
            "/tasks/exit",
            "/tasks/exit",
            "/tasks/delete"
        ]
    );
}

#[tokio::test]
async fn a_failed_create_leaves_nothing_behind() {
    let Some(h) = harness().await else { return };
    let e = h
        .sandbox
        .create_container(h.bundle("bad", &["/no/such"]))
        .await
        .err()
        .expect("create fails");
    assert_eq!(e.code(), Code::FAILED_PRECONDITION);
    assert!(e.to_string().contains("no such file"), "{e}");
    assert!(!h.shared("bad").exists());
    assert_eq!(h.sandbox.container_count(), 0);
    // The pod still works.
    h.sandbox
        .create_container(h.bundle("good", &["true"]))
        .await
        .unwrap();
}

#[tokio::test]
async fn deleting_a_created_container_kills_it() {
    let Some(h) = harness().await else { return };
    let c = h
        .sandbox
        .create_container(h.bundle("c1", &["sleep", "1"]))
        .await
        .unwrap();
    let (_, exit) = h.sandbox.delete_container("c1").await.unwrap();
    assert_eq!(exit.status, 137);
    assert_eq!(c.init.status(), Status::Stopped);
}

#[tokio::test]
async fn an_oom_event_is_published_before_the_exit() {
    let Some(h) = harness().await else { return };
    let sb = &h.sandbox;
    let c = sb.create_container(h.bundle("c1", &["hog"])).await.unwrap();
    sb.start("c1", "").await.unwrap();
    // The OOM killer's SIGKILL arrives before the OOM event.
    h.agent.exit("c1", "", 137);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        c.init.status(),
        Status::Running,
        "exit held back for the OOM event"
    );
    h.oom_tx.send("c1".into()).await.unwrap();
    assert_eq!(wait_exit(&c.init).await.status, 137);
    let topics = h.topics("c1");
    let oom = topics.iter().position(|t| t == "/tasks/oom").unwrap();
    let exit = topics.iter().position(|t| t == "/tasks/exit").unwrap();
    assert!(oom < exit, "{topics:?}");
}

#[tokio::test]
async fn a_lost_agent_ends_every_task_with_255_and_delete_still_works() {
    let Some(h) = harness().await else { return };
    let sb = &h.sandbox;
    let c1 = sb
        .create_container(h.bundle("c1", &["sleep"]))
        .await
        .unwrap();
    sb.start("c1", "").await.unwrap();
    let c2 = sb
        .create_container(h.bundle("c2", &["sleep"]))
        .await
        .unwrap();

    h.proxy.abort();
    assert_eq!(wait_exit(&c1.init).await.status, UNKNOWN_EXIT_STATUS);
    // The created one has no waiter; the VM's end reaches it.
    sb.death.declare("test: the VM ended");
    assert_eq!(wait_exit(&c2.init).await.status, UNKNOWN_EXIT_STATUS);
    assert_eq!(code(sb.start("c2", "").await), Code::FAILED_PRECONDITION);
    assert_eq!(code(sb.kill("c2", "", 9, false).await), Code::NOT_FOUND);

    sb.delete_container("c1").await.unwrap();
    sb.delete_container("c2").await.unwrap();
    assert_eq!(sb.container_count(), 0);
    assert!(!h.shared("c1").exists() && !h.shared("c2").exists());
}

#[tokio::test]
async fn a_cri_container_joins_its_sandbox_namespaces() {
    let Some(h) = harness().await else { return };
    let sb = &h.sandbox;
    let mut pause = h.bundle("sb1", &["/pause"]);
    pause.spec["annotations"] = serde_json::json!({"io.kubernetes.cri.sandbox-id": "sb1"});
    let p = sb.create_container(pause).await.unwrap();
    let mut app = h.bundle("app", &["sh"]);
    app.spec["annotations"] = serde_json::json!({"io.kubernetes.cri.sandbox-id": "sb1"});
    app.spec["linux"]["namespaces"] = serde_json::json!([
        {"type": "ipc", "path": "/proc/4242/ns/ipc"},
        {"type": "network", "path": "/var/run/netns/cni-x"}
    ]);
    sb.create_container(app).await.unwrap();
    let spec = h.agent.specs.lock().unwrap()[1].clone();
    assert_eq!(
        spec["linux"]["namespaces"],
        serde_json::json!([{"type": "ipc", "path": format!("/proc/{}/ns/ipc", p.init.pid())}])
    );
}

#[test]
fn vm_config_of_a_pod() {
    let config = Config {
        kernel_params: "quiet".into(),
        ..Config::default()
    };
    let paths = SandboxPaths::new(&config.state_dir, "default", "pod");
    let setup = SandboxSetup {
        namespace: "default".into(),
        id: "pod".into(),
        size: VmSize {
            vcpus: 2,
            mem_mib: 512,
        },
        kernel_params: Some("loglevel=3".into()),
        netns: None,
        hostname: None,
    };
    let vm = vm_config(&config, &paths, &setup);
    assert_eq!((vm.vcpus, vm.mem_mib), (2, 512));
    assert_eq!(vm.cmdline_extra, "quiet loglevel=3");
    assert_eq!(vm.vsock.as_ref().unwrap().guest_cid, GUEST_CID);
    assert_eq!(
        vm.vsock.as_ref().unwrap().uds_path,
        Path::new("/run/ember/default/pod/vsock.sock")
    );
    assert_eq!(vm.fs_shares.len(), 1);
    assert_eq!(vm.fs_shares[0].tag, "ember");
    assert_eq!(
        vm.fs_shares[0].shared_dir,
        Path::new("/run/ember/default/pod/shared")
    );
    assert_eq!(vm.initrd, Some(config.initrd.clone()));
    vm.validate().unwrap();
}

/// kubelet's deadline passes during a slow boot and containerd, giving up
/// on the create, sends Delete for its id: the create undoes itself once
/// the boot ends, the VM goes, and the shim exits. A Shutdown during the
/// boot answers at once instead of waiting for it.
#[tokio::test]
async fn a_create_abandoned_during_the_boot_is_undone_and_the_shim_exits() {
    use crate::resources::sizing::VmSize;
    use crate::task::pod::Pod;
    use containerd_shim::ExitSignal;

    let Some(h) = harness().await else { return };
    let boot_done = Arc::new(tokio::sync::Notify::new());
    let exit = Arc::new(ExitSignal::default());
    let (sandbox, release) = (h.sandbox.clone(), boot_done.clone());
    let pod = Arc::new(Pod::with_launcher(
        "ns",
        "pod",
        Arc::new(Config::default()),
        EventSink::disabled(),
        exit.clone(),
        Box::new(move |_, _, _| {
            let (sandbox, release) = (sandbox.clone(), release.clone());
            Box::pin(async move {
                release.notified().await;
                Ok(sandbox)
            })
        }),
    ));
    let setup = SandboxSetup {
        namespace: "ns".into(),
        id: "pod".into(),
        size: VmSize {
            vcpus: 1,
            mem_mib: 128,
        },
        kernel_params: None,
        netns: None,
        hostname: None,
    };
    let (p, new) = (pod.clone(), h.bundle("c1", &["sleep", "1000"]));
    let create = tokio::spawn(async move { p.create(new, setup).await });
    while !pod.is_being_created("c1") {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let idle = tokio::time::timeout(Duration::from_secs(2), pod.teardown_if_unused())
        .await
        .expect("Shutdown does not wait for a boot in progress");
    assert!(!idle, "a create in flight keeps the pod");
    assert!(!pod.abandon("c2"), "no create of c2 in progress");
    assert!(pod.abandon("c1"));

    boot_done.notify_one();
    let r = tokio::time::timeout(Duration::from_secs(20), create)
        .await
        .expect("the create ends once the boot does")
        .unwrap();
    assert_eq!(code(r), Code::FAILED_PRECONDITION);
    assert!(!h.sandbox.has_container("c1"));
    assert!(pod.sandbox().is_none(), "the VM is torn down");
    assert!(!pod.is_being_created("c1"));
    tokio::time::timeout(Duration::from_secs(5), exit.wait())
        .await
        .expect("the shim exits");
}
