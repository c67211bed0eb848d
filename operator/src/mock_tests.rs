//! The reconciler against a mocked API server, for answers a real one rarely gives on demand:
//! a server error (requeue with backoff, counted by error kind) and a conflict on status.
//!
//! Tests sit on top of every layer and may import any module.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::Client;
use serde_json::json;

use crate::apply::ApiSupport;
use crate::build::Settings;
use crate::controller::{error_policy, reconcile, Context};
use crate::fixtures::{orders, PortalFixture};
use crate::metrics::Metrics;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

fn context() -> (Arc<Context>, Handle) {
    let (mock, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(mock, "default");
    let ctx = Context::new(
        client,
        Settings::default(),
        ApiSupport::default(),
        Metrics::default(),
        "test",
        crate::watches::Watched::none(),
    );
    (Arc::new(ctx), handle)
}

fn status(code: u16, reason: &str) -> Response<Body> {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": reason, "reason": reason, "code": code
    });
    Response::builder()
        .status(code)
        .body(Body::from(serde_json::to_vec(&body).unwrap()))
        .unwrap()
}

/// Answers like an API server that accepts every apply and create (echoing the object), lists
/// no Services, has no Secret yet, and answers `on_status` to status writes.
async fn serve(mut handle: Handle, on_status: fn() -> Response<Body>) {
    use http_body_util::BodyExt;
    while let Some((request, send)) = handle.next_request().await {
        let (parts, body) = request.into_parts();
        let path = parts.uri.path().to_string();
        let bytes = body.collect().await.unwrap().to_bytes();
        let response = if path.ends_with("/status") {
            on_status()
        } else if parts.method == http::Method::GET && path.contains("/secrets/") {
            status(404, "NotFound")
        } else if parts.method == http::Method::GET {
            let list = json!({"apiVersion": "v1", "kind": "List", "metadata": {}, "items": []});
            Response::new(Body::from(serde_json::to_vec(&list).unwrap()))
        } else {
            Response::new(Body::from(bytes.to_vec()))
        };
        send.send_response(response);
    }
}

#[tokio::test]
async fn a_server_error_requeues_with_backoff_and_is_counted() {
    let (ctx, handle) = context();
    tokio::spawn(async move {
        let mut handle = handle;
        while let Some((_, send)) = handle.next_request().await {
            send.send_response(status(500, "InternalError"));
        }
    });
    let dp = Arc::new(orders().with_tls_disabled());
    let err = reconcile(dp.clone(), ctx.clone()).await.unwrap_err();
    assert_eq!(err.metric_label(), "Apply");
    assert_eq!(err.api_code(), Some(500));
    assert_eq!(
        error_policy(dp.clone(), &err, ctx.clone()),
        Action::requeue(Duration::from_secs(1))
    );
    assert_eq!(
        error_policy(dp.clone(), &err, ctx.clone()),
        Action::requeue(Duration::from_secs(2))
    );
    assert_eq!(ctx.metrics.failures("Apply"), 2);
    assert_eq!(ctx.metrics.reconciles(), 1);
}

#[tokio::test]
async fn a_conflict_on_status_fails_the_reconcile_as_a_status_error() {
    let (ctx, handle) = context();
    tokio::spawn(serve(handle, || status(409, "Conflict")));
    let dp = Arc::new(orders().with_tls_disabled());
    let err = tokio::time::timeout(Duration::from_secs(10), reconcile(dp.clone(), ctx.clone()))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.metric_label(), "Status");
    assert_eq!(err.api_code(), Some(409));
    let _ = error_policy(dp, &err, ctx.clone());
    assert_eq!(ctx.metrics.failures("Status"), 1);
}

#[tokio::test]
async fn an_invalid_spec_writes_status_and_waits_for_a_change() {
    let (ctx, handle) = context();
    tokio::spawn(serve(handle, || {
        Response::new(Body::from(serde_json::to_vec(&orders()).unwrap()))
    }));
    let dp = Arc::new(orders().patch_spec(r#"allowedCIDRs: ["10.0.0.0/99"]"#));
    let action = tokio::time::timeout(Duration::from_secs(10), reconcile(dp, ctx.clone()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(action, Action::await_change());
    assert_eq!(ctx.metrics.failures("InvalidSpec"), 1);
}
