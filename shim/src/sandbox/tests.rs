//! The sandbox's launch, process lifecycle and teardown against a mock
//! agent and a fake hypervisor ([`super::fake_vm`]; no KVM): states, exits,
//! the error codes containerd gets, OOM ordering, a lost agent, a VM that
//! dies, a launch that fails, the order of teardown.
//!
//! Launching binds the pod's share and creating a container binds its
//! rootfs into it, which needs CAP_SYS_ADMIN: those tests are skipped when
//! not run as root.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ember_proto::agent::*;
use ember_proto::agent_ttrpc::{create_agent, Agent as AgentService};
use tokio::sync::{mpsc, watch};
use ttrpc::r#async::TtrpcContext;
use ttrpc::Code;

use super::fake_vm::{note, FakeLauncher, FakeVm, Journal};
use super::process::{Process, Status};
use super::*;
use crate::config::Config;
use crate::resources::spec::GUEST_SHARED_DIR;
use ember_vmm::ExitReason;

type Key = (String, String);
/// A process: its pid and its exit status once it has one.
type MockProc = (u32, watch::Sender<Option<u32>>);

/// An in-memory agent: processes "run" until signalled (or told to exit).
/// Its Shutdown powers the guest off: the launcher's last VM ends.
#[derive(Default)]
struct MockAgent {
    procs: Mutex<HashMap<Key, MockProc>>,
    next_pid: Mutex<u32>,
    specs: Mutex<Vec<serde_json::Value>>,
    updates: Mutex<Vec<(String, serde_json::Value)>>,
    oom_rx: tokio::sync::Mutex<Option<mpsc::Receiver<String>>>,
    journal: Journal,
    launcher: Option<Arc<FakeLauncher>>,
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

    async fn add_mounts(&self, _: &TtrpcContext, req: AddMountsRequest) -> ttrpc::Result<Empty> {
        for m in &req.mounts {
            note(
                &self.journal,
                format!("agent: mount {} {} at {}", m.fstype, m.source, m.target),
            );
        }
        Ok(Empty::new())
    }

    async fn shutdown(&self, _: &TtrpcContext, _: ShutdownRequest) -> ttrpc::Result<Empty> {
        note(&self.journal, "agent: shutdown");
        if let Some(vm) = self.launcher.as_ref().and_then(|l| l.last_vm()) {
            vm.die(ExitReason::GuestReset);
        }
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

/// A mock agent serving on a Unix socket, a fake hypervisor whose VMs
/// talk to it, and a config whose state directory is a temporary one.
pub(crate) struct Fixture {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
    agent: Arc<MockAgent>,
    pub(crate) launcher: Arc<FakeLauncher>,
    pub(crate) journal: Journal,
    pub(crate) config: Arc<Config>,
    oom_tx: mpsc::Sender<String>,
    _server: ttrpc::r#async::Server,
}

/// A fixture whose launcher (it may fail or wait) and config are adjusted
/// before they are shared.
pub(crate) async fn fixture_with(
    adjust: impl FnOnce(&mut FakeLauncher, &mut Config),
) -> Option<Fixture> {
    if !nix::unistd::geteuid().is_root() {
        // The sandbox mounts the pod's share: root only (CI runs as root).
        eprintln!("!!! SKIPPED: the sandbox tests need root (they mount the pod's share)");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let journal = Journal::default();
    let server_path = root.join("agent.sock");
    let mut launcher = FakeLauncher::new(server_path.clone(), journal.clone());
    let mut config = Config {
        state_dir: root.join("state"),
        agent_timeout_secs: 10,
        ..Config::default()
    };
    adjust(&mut launcher, &mut config);
    let launcher = Arc::new(launcher);
    let (oom_tx, oom_rx) = mpsc::channel(4);
    let agent = Arc::new(MockAgent {
        oom_rx: tokio::sync::Mutex::new(Some(oom_rx)),
        journal: journal.clone(),
        launcher: Some(launcher.clone()),
        ..Default::default()
    });
    let listener = tokio::net::UnixListener::bind(&server_path).unwrap();
    let mut server = ttrpc::r#async::Server::new()
        .register_service(create_agent(Arc::new(MockService(agent.clone()))))
        .add_listener(listener.into());
    server.start().await.unwrap();
    Some(Fixture {
        _dir: dir,
        root,
        agent,
        launcher,
        journal,
        config: Arc::new(config),
        oom_tx,
        _server: server,
    })
}

pub(crate) async fn fixture() -> Option<Fixture> {
    fixture_with(|_, _| {}).await
}

impl Fixture {
    /// The setup of pod `id` in namespace `ns`.
    pub(crate) fn setup(&self, ns: &str, id: &str) -> SandboxSetup {
        SandboxSetup {
            namespace: ns.into(),
            id: id.into(),
            size: VmSize {
                vcpus: 1,
                mem_mib: 128,
            },
            kernel_params: None,
            netns: None,
            hostname: None,
        }
    }

    /// Where pod `id` of namespace `ns` keeps its state.
    pub(crate) fn paths(&self, ns: &str, id: &str) -> SandboxPaths {
        SandboxPaths::new(&self.config.state_dir, ns, id)
    }

    fn journal(&self) -> Vec<String> {
        self.journal.lock().unwrap().clone()
    }

    /// The VM launched last.
    pub(crate) fn vm(&self) -> Arc<FakeVm> {
        self.launcher.last_vm().expect("a VM was launched")
    }

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
}

impl Drop for Fixture {
    /// Unmounts what a test left (a sandbox it did not shut down).
    fn drop(&mut self) {
        let state = &self.config.state_dir;
        let pods = std::fs::read_dir(state)
            .into_iter()
            .flatten()
            .flatten()
            .flat_map(|ns| std::fs::read_dir(ns.path()).into_iter().flatten().flatten());
        for pod in pods {
            let path = pod.path();
            let (Some(ns), Some(id)) =
                (path.parent().and_then(|p| p.file_name()), path.file_name())
            else {
                continue;
            };
            let paths = SandboxPaths::new(state, &ns.to_string_lossy(), &id.to_string_lossy());
            let _ = cleanup_state(&paths);
        }
    }
}

/// A fixture with a sandbox launched on a fake VM, recording its events.
pub(crate) struct Harness {
    pub(crate) sandbox: Arc<Sandbox>,
    events: crate::events::Recorded,
    fixture: Fixture,
}

impl std::ops::Deref for Harness {
    type Target = Fixture;
    fn deref(&self) -> &Fixture {
        &self.fixture
    }
}

pub(crate) async fn harness() -> Option<Harness> {
    let fixture = fixture().await?;
    let (events, recorded) = EventSink::recording();
    let sandbox = Sandbox::launch(
        fixture.config.clone(),
        events,
        fixture.setup("ns", "pod"),
        fixture.launcher.as_ref(),
    )
    .await
    .unwrap();
    Some(Harness {
        sandbox,
        events: recorded,
        fixture,
    })
}

impl Harness {
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

    h.vm().cut_agent();
    assert_eq!(wait_exit(&c1.init).await.status, UNKNOWN_EXIT_STATUS);
    // The created one has no waiter; the VM's end reaches it.
    h.vm().die(ExitReason::GuestReset);
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
    use crate::task::pod::Pod;
    use containerd_shim::ExitSignal;

    let boot_done = Arc::new(tokio::sync::Notify::new());
    let gate = boot_done.clone();
    let Some(f) = fixture_with(|l, _| l.gate = Some(gate)).await else {
        return;
    };
    let exit = Arc::new(ExitSignal::default());
    let pod = Arc::new(Pod::with_launcher(
        "ns",
        "pod",
        f.config.clone(),
        EventSink::disabled(),
        exit.clone(),
        f.launcher.clone(),
    ));
    let (p, new, setup) = (
        pod.clone(),
        f.bundle("c1", &["sleep", "1000"]),
        f.setup("ns", "pod"),
    );
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
    assert!(pod.sandbox().is_none(), "the VM is torn down");
    assert_eq!(f.vm().stops(), 1, "the VM is stopped once");
    assert!(
        !f.paths("ns", "pod").state_dir.exists(),
        "the pod's state is gone"
    );
    assert!(!pod.is_being_created("c1"));
    tokio::time::timeout(Duration::from_secs(5), exit.wait())
        .await
        .expect("the shim exits");
}

/// A pod whose VMs come from the fixture's fake hypervisor.
fn fake_pod(f: &Fixture) -> Arc<crate::task::pod::Pod> {
    Arc::new(crate::task::pod::Pod::with_launcher(
        "ns",
        "pod",
        f.config.clone(),
        EventSink::disabled(),
        Arc::new(containerd_shim::ExitSignal::default()),
        f.launcher.clone(),
    ))
}

/// The guest dies by itself (a kernel panic): every process of the pod,
/// running or never started, ends with 255; the pod says why, refuses new
/// work with that reason, and its teardown does not talk to the dead agent.
#[tokio::test]
async fn a_vm_that_dies_on_its_own_ends_every_process_with_255_and_its_reason() {
    let Some(h) = harness().await else { return };
    let sb = &h.sandbox;
    let c1 = sb
        .create_container(h.bundle("c1", &["sleep", "1000"]))
        .await
        .unwrap();
    sb.start("c1", "").await.unwrap();
    sb.add_exec(
        "c1",
        "x1",
        StdioPaths::default(),
        br#"{"args":["sh"]}"#.to_vec(),
    )
    .await
    .unwrap();
    sb.start("c1", "x1").await.unwrap();
    let x1 = sb.process("c1", "x1").unwrap();
    let c2 = sb
        .create_container(h.bundle("c2", &["sleep", "1000"]))
        .await
        .unwrap();
    assert!(sb.dead().is_none());

    h.vm().die(ExitReason::GuestPanic(
        "Kernel panic - not syncing: test".into(),
    ));
    for p in [&c1.init, &x1, &c2.init] {
        assert_eq!(
            wait_exit(p).await.status,
            UNKNOWN_EXIT_STATUS,
            "{}",
            p.label()
        );
    }
    let reason = tokio::time::timeout(Duration::from_secs(5), sb.wait_dead())
        .await
        .expect("the death is reported");
    assert_eq!(
        reason,
        "the pod's VM ended: guest kernel panic: Kernel panic - not syncing: test"
    );
    assert_eq!(sb.dead().as_deref(), Some(reason.as_str()));
    let refused = sb.start("c2", "").await.expect_err("a dead pod refuses");
    assert_eq!(refused.code(), Code::FAILED_PRECONDITION);
    assert!(
        refused.to_string().contains("guest kernel panic"),
        "{refused}"
    );
    assert_eq!(
        h.topics("c2"),
        ["/tasks/create", "/tasks/exit"],
        "the never-started task's exit is published"
    );
    assert_eq!(
        h.topics("c1")
            .iter()
            .filter(|t| *t == "/tasks/exit")
            .count(),
        2,
        "init and exec exits are published"
    );
    assert_eq!(h.vm().stops(), 0, "the VM released itself");

    sb.delete_container("c1").await.unwrap();
    sb.delete_container("c2").await.unwrap();
    sb.shutdown().await;
    assert!(
        !h.journal().iter().any(|e| e == "agent: shutdown"),
        "no Shutdown to a dead agent: {:?}",
        h.journal()
    );
    assert_eq!(h.vm().stops(), 1);
    assert!(!h.paths("ns", "pod").state_dir.exists());
}

/// A VM that cannot be brought up leaves nothing: no sandbox, no state
/// directory, no create in progress, no hold of the Sandbox API, no host
/// cgroup; the next create boots afresh.
#[tokio::test]
async fn a_failed_launch_leaves_nothing_behind() {
    let Some(f) = fixture_with(|l, _| {
        *l.fail.get_mut().unwrap() = Some("no KVM here".into());
    })
    .await
    else {
        return;
    };
    let pod = fake_pod(&f);
    let e = pod
        .create(f.bundle("c1", &["sleep"]), f.setup("ns", "pod"))
        .await
        .err()
        .expect("the create fails");
    assert_eq!(e.code(), Code::INTERNAL);
    let text = format!("{e:#}");
    assert!(
        text.contains("booting the pod's VM") && text.contains("no KVM here"),
        "{text}"
    );
    assert_eq!(f.launcher.launches(), 1);
    assert!(pod.sandbox().is_none());
    assert!(!pod.is_being_created("c1"));
    assert!(pod.host_cgroup_usage().is_none());
    assert!(
        !f.paths("ns", "pod").state_dir.exists(),
        "state directory removed"
    );

    // The Sandbox API's create: the hold is released too.
    let e = pod
        .boot_held(f.setup("ns", "pod"), &serde_json::json!({}))
        .await
        .err()
        .expect("CreateSandbox fails");
    assert_eq!(e.code(), Code::INTERNAL);
    assert!(!pod.is_held() && pod.sandbox().is_none());
    assert!(!f.paths("ns", "pod").state_dir.exists());

    // The pod still works once VMs can be launched.
    *f.launcher.fail.lock().unwrap() = None;
    let (sb, _) = pod
        .create(f.bundle("c1", &["sleep"]), f.setup("ns", "pod"))
        .await
        .unwrap();
    assert_eq!(f.launcher.launches(), 3);
    sb.delete_container("c1").await.unwrap();
    assert!(pod.teardown_if_unused().await);
    assert_eq!(f.vm().stops(), 1);
}

/// The shim joins the pod's host cgroup only for a VM that runs in the
/// shim, and before launching it: a cgroup that cannot be placed refuses
/// the create before any VM is launched.
#[tokio::test]
async fn the_host_cgroup_is_placed_only_for_an_in_shim_vm_and_before_its_launch() {
    let bad_parent = |c: &mut Config| c.cgroup_parent = "not/absolute".into();
    let Some(f) = fixture_with(|l, c| {
        l.in_shim = true;
        bad_parent(c);
    })
    .await
    else {
        return;
    };
    let pod = fake_pod(&f);
    let e = pod
        .create(f.bundle("c1", &["sleep"]), f.setup("ns", "pod"))
        .await
        .err()
        .expect("the create fails");
    assert_eq!(e.code(), Code::INVALID_ARGUMENT);
    assert!(e.to_string().contains("cgroup_parent"), "{e}");
    assert_eq!(f.launcher.launches(), 0, "no VM launched");
    assert!(pod.sandbox().is_none() && pod.host_cgroup_usage().is_none());
    assert!(!f.paths("ns", "pod").state_dir.exists());

    // A VM outside the shim: the cgroup is never looked at.
    let Some(f) = fixture_with(|_, c| bad_parent(c)).await else {
        return;
    };
    let pod = fake_pod(&f);
    let (sb, _) = pod
        .create(f.bundle("c1", &["sleep"]), f.setup("ns", "pod"))
        .await
        .unwrap();
    assert!(pod.host_cgroup_usage().is_none());
    sb.delete_container("c1").await.unwrap();
    assert!(pod.teardown_if_unused().await);
}

/// A VM that runs in the shim is launched from inside the pod's host
/// cgroup (the test process really joins one, under a parent of its own);
/// when the launch fails the shim goes back where it was and the pod's
/// cgroup is removed.
#[tokio::test]
async fn a_failed_launch_of_an_in_shim_vm_leaves_the_host_cgroup_it_joined() {
    use crate::resources::cgroup::{self, CgroupPath};

    let parent = format!("/ember-unit-{}", std::process::id());
    let p = parent.clone();
    let Some(f) = fixture_with(|l, c| {
        l.in_shim = true;
        *l.fail.get_mut().unwrap() = Some("no KVM here".into());
        c.cgroup_parent = p;
    })
    .await
    else {
        return;
    };
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let pod = fake_pod(&f);
    let e = pod
        .create(f.bundle("c1", &["sleep"]), f.setup("ns", "pod"))
        .await
        .err()
        .expect("the create fails");
    assert_eq!(e.code(), Code::INTERNAL);
    assert_eq!(f.launcher.launches(), 1);
    let during = f.launcher.cgroup_at_launch().unwrap();
    assert!(
        during.contains(&format!("{parent}/ns-pod")),
        "launched inside the pod's cgroup: {during}"
    );
    assert_eq!(
        std::fs::read_to_string("/proc/self/cgroup").unwrap(),
        own,
        "back in the shim's own cgroups"
    );
    assert!(pod.host_cgroup_usage().is_none());
    // The parent can go: the pod's cgroup below it is gone already.
    let errors = cgroup::remove(
        &CgroupPath::parse_absolute(&parent, "test parent").unwrap(),
        std::time::Duration::ZERO,
    );
    assert!(errors.is_empty(), "{errors:?}");
}

/// StopSandbox with a container still running: the agent is asked to shut
/// down, the guest powers off, the VM is stopped (released) once, and only
/// then does the pod's share leave the host; the container's task ends
/// with 255. A second StopSandbox (containerd retries) stops nothing.
#[tokio::test]
async fn teardown_powers_the_guest_off_stops_the_vm_once_then_removes_the_share() {
    let Some(f) = fixture().await else { return };
    let pod = fake_pod(&f);
    pod.boot_held(f.setup("ns", "pod"), &serde_json::json!({}))
        .await
        .unwrap();
    let (sb, c1) = pod
        .create(f.bundle("c1", &["sleep", "1000"]), f.setup("ns", "pod"))
        .await
        .unwrap();
    sb.start("c1", "").await.unwrap();
    assert_eq!(f.launcher.launches(), 1, "the container joined the held VM");

    pod.stop_held().await;
    pod.stop_held().await;
    assert_eq!(
        f.journal(),
        [
            "vm launched: pod".to_string(),
            format!("agent: mount virtiofs {SHARE_TAG} at {GUEST_SHARED_DIR}"),
            "agent: shutdown".into(),
            "vm ended: guest reset".into(),
            "vm stop".into(),
        ]
    );
    assert_eq!(f.vm().stops(), 1, "the VM is stopped exactly once");
    assert_eq!(
        f.vm().share_at_stop(),
        Some(true),
        "the share outlives the VM"
    );
    assert!(
        !f.paths("ns", "pod").state_dir.exists(),
        "the share is gone"
    );
    assert_eq!(wait_exit(&c1.init).await.status, UNKNOWN_EXIT_STATUS);
    assert!(pod.sandbox().is_none() && !pod.is_held());
    tokio::time::timeout(Duration::from_millis(100), sb.wait_dead())
        .await
        .expect_err("a VM powered off by the shim's Shutdown is not a death");
}
