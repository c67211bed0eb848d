//! The portal in a cluster, against a real kube-apiserver (a private local control plane): it
//! serves the configuration of its ConfigMap, applies changes live, refuses a broken one while
//! the last good one keeps serving, swaps the certificate of its TLS Secret, and reports its view
//! on its own Pod, all with a Role limited to those objects by name; and through an outage of
//! the API server it keeps serving its last good configuration, then reconnects by itself.

#[path = "../common/mod.rs"]
mod common;
#[path = "../common/control_plane.rs"]
mod control_plane;

mod configmap;
mod outage;

use std::{
    net::SocketAddr,
    process::Command,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use common::{closed_within, echo_roundtrip, free_port, http_get, PortalProcess, TestServer};
use control_plane::{eventually, ControlPlane, PORTAL_USER};
use k8s_openapi::api::{
    core::v1::{ConfigMap, Container, Namespace, Pod, PodSpec, Secret},
    rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject},
};
use k8s_openapi::ByteString;
use kube::{
    api::{ObjectMeta, Patch, PatchParams, PostParams},
    config::Kubeconfig,
    Api, Client,
};
use tokio::{
    io::AsyncReadExt,
    net::{TcpListener, TcpStream},
    sync::oneshot,
    task::{AbortHandle, JoinHandle},
};

const NS: &str = "portals";
const CONFIGMAP: &str = "orders-portal";
const TLS_SECRET: &str = "orders-portal-tls";
const POD: &str = "orders-portal-0";
/// Bound for a change to be seen through the API.
const PROPAGATION: Duration = Duration::from_secs(20);

fn meta(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(NS.into()),
        ..Default::default()
    }
}

fn portal_yaml(backends: &[(&str, SocketAddr)], listen: u16, admin: u16, extra: &str) -> String {
    let mut y = format!(
        "engine: tcp\nport: 7000\nlisten: \"127.0.0.1:{listen}\"\nadmin: \"127.0.0.1:{admin}\"\ndrainTimeout: 1s\nbackends:\n"
    );
    for (name, addr) in backends {
        y.push_str(&format!("  - {{name: {name}, address: \"{addr}\"}}\n"));
    }
    y.push_str(extra);
    y.push('\n');
    y
}

async fn set_config(api: &Api<ConfigMap>, text: &str) {
    let patch = serde_json::json!({ "data": { "portal.yaml": text } });
    api.patch(CONFIGMAP, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("patch the ConfigMap");
}

/// The first line a connection through the portal receives (the backend's name), or `None` if
/// the portal closed it.
async fn first_line(addr: SocketAddr) -> Option<String> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut byte)).await {
            Ok(Ok(1)) if byte[0] == b'\n' => return String::from_utf8(buf).ok(),
            Ok(Ok(1)) => buf.push(byte[0]),
            _ => return None,
        }
    }
}

async fn served_by(addr: SocketAddr, name: &str) -> anyhow::Result<()> {
    match first_line(addr).await {
        Some(n) if n == name => Ok(()),
        other => anyhow::bail!("served by {other:?}, not {name}"),
    }
}

/// Grants the portal identity what the operator's Role grants a portal: its ConfigMap and
/// Secrets by name (get, list, watch) and its own Pod (get, patch).
async fn grant(admin: &Client) {
    let rule = |resource: &str, verbs: &[&str], name: &str| PolicyRule {
        api_groups: Some(vec![String::new()]),
        resources: Some(vec![resource.into()]),
        resource_names: Some(vec![name.into()]),
        verbs: verbs.iter().map(|v| v.to_string()).collect(),
        ..Default::default()
    };
    let role = Role {
        metadata: meta("portal"),
        rules: Some(vec![
            rule("configmaps", &["get", "list", "watch"], CONFIGMAP),
            rule("secrets", &["get", "list", "watch"], TLS_SECRET),
            rule("pods", &["get", "patch"], POD),
        ]),
    };
    Api::<Role>::namespaced(admin.clone(), NS)
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    let binding = RoleBinding {
        metadata: meta("portal"),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: "portal".into(),
        },
        subjects: Some(vec![Subject {
            kind: "User".into(),
            api_group: Some("rbac.authorization.k8s.io".into()),
            name: PORTAL_USER.into(),
            ..Default::default()
        }]),
    };
    Api::<RoleBinding>::namespaced(admin.clone(), NS)
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
}

/// The admin client of `plane`, with the namespace `NS` created and the portal's Role granted.
async fn portal_namespace(plane: &ControlPlane) -> kube::Client {
    let admin = plane.admin().await.unwrap();
    Api::<Namespace>::all(admin.clone())
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some(NS.into()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .unwrap();
    grant(&admin).await;
    admin
}
