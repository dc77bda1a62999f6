//! The Sandbox API's lifecycle against a pod whose VMs come from a fake
//! hypervisor (the sandbox tests' fixture: a mock agent over a Unix
//! socket, no KVM). What containerd's `shim` sandbox
//! controller relies on: NOT_FOUND for ids the shim does not know, one
//! create, the VM held while no container is in it, Wait returning when
//! the sandbox ends (0 when stopped, 255 when the VM died), Shutdown
//! ending the shim.

use std::sync::Arc;
use std::time::Duration;

use containerd_shim::{ExitSignal, TtrpcContext};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::sandbox_api::*;
use containerd_shim_protos::sandbox_async::Sandbox as _;

use super::SandboxService;
use crate::events::EventSink;
use crate::sandbox::tests::{fixture, Fixture};
use crate::task::pod::Pod;

/// A request of type `$t` for this shim's sandbox, `sb1`.
macro_rules! req {
    ($t:ident) => {
        $t {
            sandbox_id: "sb1".into(),
            ..Default::default()
        }
    };
}

fn ctx() -> TtrpcContext {
    TtrpcContext {
        mh: Default::default(),
        metadata: Default::default(),
        timeout_nano: 0,
    }
}

fn code<T: std::fmt::Debug>(r: ttrpc::Result<T>) -> ttrpc::Code {
    match r.unwrap_err() {
        ttrpc::Error::RpcStatus(s) => s.code(),
        e => panic!("not a status: {e:?}"),
    }
}

/// A service over a pod whose VMs come from the fixture's fake
/// hypervisor, and the pod's exit signal.
fn service(f: &Fixture) -> (SandboxService, Arc<Pod>, Arc<ExitSignal>) {
    let exit = Arc::new(ExitSignal::default());
    let pod = Arc::new(Pod::with_launcher(
        "k8s.io",
        "sb1",
        f.config.clone(),
        EventSink::disabled(),
        exit.clone(),
        f.launcher.clone(),
    ));
    (SandboxService::new(pod.clone(), exit.clone()), pod, exit)
}

fn create_request() -> CreateSandboxRequest {
    req!(CreateSandboxRequest)
}

#[tokio::test]
async fn calls_for_unknown_sandboxes_are_not_found() {
    let Some(f) = fixture().await else { return };
    let (s, _, _) = service(&f);
    let c = ctx();
    assert_eq!(
        code(s.start_sandbox(&c, req!(StartSandboxRequest)).await),
        ttrpc::Code::NOT_FOUND
    );
    assert_eq!(
        code(s.sandbox_status(&c, req!(SandboxStatusRequest)).await),
        ttrpc::Code::NOT_FOUND
    );
    assert_eq!(
        code(s.wait_sandbox(&c, req!(WaitSandboxRequest)).await),
        ttrpc::Code::NOT_FOUND
    );
    assert_eq!(
        code(s.stop_sandbox(&c, req!(StopSandboxRequest)).await),
        ttrpc::Code::NOT_FOUND
    );
    assert_eq!(
        code(s.ping_sandbox(&c, req!(PingRequest)).await),
        ttrpc::Code::NOT_FOUND
    );
    assert_eq!(
        code(s.platform(&c, req!(PlatformRequest)).await),
        ttrpc::Code::NOT_FOUND
    );
    assert_eq!(
        code(s.sandbox_metrics(&c, req!(SandboxMetricsRequest)).await),
        ttrpc::Code::NOT_FOUND
    );
    let other_shutdown = ShutdownSandboxRequest {
        sandbox_id: "other".into(),
        ..Default::default()
    };
    assert_eq!(
        code(s.shutdown_sandbox(&c, other_shutdown).await),
        ttrpc::Code::NOT_FOUND
    );
    // Another pod's id, after this one exists.
    s.create_sandbox(&c, create_request()).await.unwrap();
    let other = SandboxStatusRequest {
        sandbox_id: "other".into(),
        ..Default::default()
    };
    assert_eq!(
        code(s.sandbox_status(&c, other).await),
        ttrpc::Code::NOT_FOUND
    );
    let wrong_shim = CreateSandboxRequest {
        sandbox_id: "other".into(),
        ..Default::default()
    };
    assert_eq!(
        code(s.create_sandbox(&c, wrong_shim).await),
        ttrpc::Code::INVALID_ARGUMENT
    );
}

#[tokio::test]
async fn a_sandbox_lives_from_create_to_stop_without_containers_then_shuts_the_shim() {
    let Some(f) = fixture().await else { return };
    let (s, pod, exit) = service(&f);
    let c = ctx();
    s.create_sandbox(&c, create_request()).await.unwrap();
    assert_eq!(
        code(s.create_sandbox(&c, create_request()).await),
        ttrpc::Code::ALREADY_EXISTS
    );
    let started = s
        .start_sandbox(&c, req!(StartSandboxRequest))
        .await
        .unwrap();
    assert_eq!(started.pid, std::process::id());
    let status = s
        .sandbox_status(
            &c,
            SandboxStatusRequest {
                sandbox_id: "sb1".into(),
                verbose: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(status.state, "SANDBOX_READY");
    assert_eq!(status.created_at, started.created_at);
    let detail: serde_json::Value = serde_json::from_str(&status.info["info"]).unwrap();
    assert_eq!(detail["runtimeType"], crate::RUNTIME_ID);
    assert_eq!(detail["pid"], std::process::id());
    let platform = s.platform(&c, req!(PlatformRequest)).await.unwrap();
    assert_eq!(platform.platform.os, "linux");

    // The task service's Shutdown after a container's delete: the VM is
    // held by the sandbox, so neither it nor the shim goes.
    assert!(!pod.teardown_if_unused().await);
    assert!(pod.sandbox().is_some());

    let waiter = {
        let s = Arc::new(s);
        let w = s.clone();
        let handle =
            tokio::spawn(async move { w.wait_sandbox(&ctx(), req!(WaitSandboxRequest)).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !handle.is_finished(),
            "Wait returned while the sandbox runs"
        );
        s.stop_sandbox(&c, req!(StopSandboxRequest)).await.unwrap();
        let waited = tokio::time::timeout(Duration::from_secs(10), handle)
            .await
            .expect("Wait returns once the sandbox stopped")
            .unwrap()
            .unwrap();
        assert_eq!(waited.exit_status, 0);
        assert!(pod.sandbox().is_none(), "StopSandbox tore the VM down");
        let status = s
            .sandbox_status(&c, req!(SandboxStatusRequest))
            .await
            .unwrap();
        assert_eq!(status.state, "SANDBOX_NOTREADY");
        assert!(status.exited_at.is_some());
        assert_eq!(
            code(s.ping_sandbox(&c, req!(PingRequest)).await),
            ttrpc::Code::UNAVAILABLE
        );
        s
    };
    // Stop again is fine (containerd retries); Shutdown ends the shim.
    waiter
        .stop_sandbox(&c, req!(StopSandboxRequest))
        .await
        .unwrap();
    waiter
        .shutdown_sandbox(&c, req!(ShutdownSandboxRequest))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), exit.wait())
        .await
        .expect("ShutdownSandbox ends the shim");
}

/// containerd (`plugins/sandbox/controller.go`) answers a failed
/// CreateSandbox with ShutdownSandbox, then deletes the shim's bundle: the
/// shim must end, or it lives on serving nothing (found by `cri_ember`
/// under `sandboxer = "shim"`: a pod refused for asking more than the host
/// has left its shim behind).
#[tokio::test]
async fn shutdown_after_a_refused_create_ends_the_shim() {
    let Some(f) = fixture().await else { return };
    let (s, pod, exit) = service(&f);
    let c = ctx();
    let mut refused = create_request();
    refused.options = Some(Any {
        type_url: "runtime.v1.PodSandboxConfig".into(),
        value: vec![0xff; 7],
        ..Default::default()
    })
    .into();
    assert_eq!(
        code(s.create_sandbox(&c, refused).await),
        ttrpc::Code::INVALID_ARGUMENT
    );
    assert!(pod.sandbox().is_none(), "a refused create booted a VM");
    assert_eq!(f.launcher.launches(), 0, "a refused create launched a VM");
    s.shutdown_sandbox(&c, req!(ShutdownSandboxRequest))
        .await
        .expect("ShutdownSandbox after a failed create");
    tokio::time::timeout(Duration::from_secs(5), exit.wait())
        .await
        .expect("the shim ends after a failed create's ShutdownSandbox");
}

#[tokio::test]
async fn a_vm_that_dies_ends_the_sandbox_with_status_255() {
    let Some(f) = fixture().await else { return };
    let (s, _, _) = service(&f);
    let c = ctx();
    s.create_sandbox(&c, create_request()).await.unwrap();
    f.vm().die(ember_vmm::ExitReason::GuestPanic(
        "test: the guest panicked".into(),
    ));
    let waited = tokio::time::timeout(
        Duration::from_secs(10),
        s.wait_sandbox(&c, req!(WaitSandboxRequest)),
    )
    .await
    .expect("Wait returns when the VM dies")
    .unwrap();
    assert_eq!(waited.exit_status, 255);
    let status = s
        .sandbox_status(&c, req!(SandboxStatusRequest))
        .await
        .unwrap();
    assert_eq!(status.state, "SANDBOX_NOTREADY");
}
