//! The portal in a cluster, against a real kube-apiserver (a private local control plane): it
//! serves the configuration of its ConfigMap, applies changes live, refuses a broken one while
//! the last good one keeps serving, swaps the certificate of its TLS Secret, and reports its view
//! on its own Pod, all with a Role limited to those objects by name; and through an outage of
//! the API server it keeps serving its last good configuration, then reconnects by itself.

mod common;
#[path = "common/control_plane.rs"]
mod control_plane;

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

fn self_signed(name: &str) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec![name.to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    (cert.pem(), key.serialize_pem())
}

fn tls_secret(cert: &str, key: &str) -> Secret {
    Secret {
        metadata: meta(TLS_SECRET),
        type_: Some("kubernetes.io/tls".into()),
        data: Some(
            [
                ("tls.crt".to_string(), ByteString(cert.as_bytes().to_vec())),
                ("tls.key".to_string(), ByteString(key.as_bytes().to_vec())),
            ]
            .into(),
        ),
        ..Default::default()
    }
}

/// The subject alternative name of the certificate the portal serves, by a TLS handshake that
/// accepts any certificate.
async fn served_certificate_pem_der(addr: SocketAddr) -> anyhow::Result<Vec<u8>> {
    #[derive(Debug)]
    struct AnyCert;
    impl rustls::client::danger::ServerCertVerifier for AnyCert {
        fn verify_server_cert(
            &self,
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &[rustls::pki_types::CertificateDer<'_>],
            _: &rustls::pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            portal::tls::provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(portal::tls::provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert))
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("portal.test")?;
    let tls = tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp)).await??;
    let (_, conn) = tls.get_ref();
    let certs = conn
        .peer_certificates()
        .ok_or_else(|| anyhow::anyhow!("no certificate"))?;
    Ok(certs[0].to_vec())
}

fn der_of(pem: &str) -> Vec<u8> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portal_follows_its_configmap_secret_and_reports_on_its_pod() {
    let plane = ControlPlane::start("cluster").expect("control plane");
    let admin = portal_namespace(&plane).await;

    let a = TestServer::named("a").await;
    let b = TestServer::named("b").await;
    let (listen, admin_port) = (free_port(), free_port());
    let addr: SocketAddr = format!("127.0.0.1:{listen}").parse().unwrap();
    let admin_addr: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    let configmaps: Api<ConfigMap> = Api::namespaced(admin.clone(), NS);
    let good = portal_yaml(
        &[("a", a.addr)],
        listen,
        admin_port,
        "tls: {mode: disabled}",
    );
    configmaps
        .create(
            &PostParams::default(),
            &ConfigMap {
                metadata: meta(CONFIGMAP),
                data: Some([("portal.yaml".to_string(), good.clone())].into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let (cert1, key1) = self_signed("one.portal.test");
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), NS);
    secrets
        .create(&PostParams::default(), &tls_secret(&cert1, &key1))
        .await
        .unwrap();
    // The Pod the portal reports on: without a node it stays Pending, which is enough.
    let pods: Api<Pod> = Api::namespaced(admin.clone(), NS);
    let pod = Pod {
        metadata: meta(POD),
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "portal".into(),
                image: Some("dbportal/portal:test".into()),
                ..Default::default()
            }],
            automount_service_account_token: Some(false),
            ..Default::default()
        }),
        ..Default::default()
    };
    eventually("create the Pod", PROPAGATION, || async {
        // The namespace's default service account appears shortly after the namespace.
        pods.create(&PostParams::default(), &pod).await?;
        Ok(())
    })
    .await
    .unwrap();

    // The portal, in-process, with the identity the Role allows.
    let client = plane.portal().await.unwrap();
    let options = portal::cluster::Options {
        namespace: NS.into(),
        configmap: CONFIGMAP.into(),
        tls_secret: Some(TLS_SECRET.into()),
        credentials_secret: None,
        users_secret: None,
        pod_name: Some(POD.into()),
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(portal::server::cluster(client, options, async {
        let _ = stopped.await;
    }));

    // It serves the ConfigMap's configuration.
    eventually("served by a", PROPAGATION, || served_by(addr, "a"))
        .await
        .unwrap();

    // A new backend applies live.
    set_config(
        &configmaps,
        &portal_yaml(
            &[("b", b.addr)],
            listen,
            admin_port,
            "tls: {mode: disabled}",
        ),
    )
    .await;
    eventually("served by b", PROPAGATION, || served_by(addr, "b"))
        .await
        .unwrap();

    // A narrower allow-list applies live: loopback clients are refused.
    set_config(
        &configmaps,
        &portal_yaml(
            &[("b", b.addr)],
            listen,
            admin_port,
            "tls: {mode: disabled}\nallowedCIDRs: [\"10.0.0.0/8\"]",
        ),
    )
    .await;
    eventually("loopback refused", PROPAGATION, || async {
        let mut s = TcpStream::connect(addr).await?;
        anyhow::ensure!(closed_within(&mut s, Duration::from_secs(2)).await);
        Ok(())
    })
    .await
    .unwrap();
    let served = portal_yaml(
        &[("b", b.addr)],
        listen,
        admin_port,
        "tls: {mode: disabled}",
    );
    set_config(&configmaps, &served).await;
    eventually("served by b again", PROPAGATION, || served_by(addr, "b"))
        .await
        .unwrap();

    // A broken configuration is refused with the field named; the last good one serves on.
    set_config(
        &configmaps,
        &portal_yaml(
            &[("a", "127.0.0.1:0".parse().unwrap())],
            listen,
            admin_port,
            "tls: {mode: disabled}",
        ),
    )
    .await;
    let status = eventually("refusal in /status", PROPAGATION, || async {
        let (code, body) = http_get(admin_addr, "/status").await;
        anyhow::ensure!(code == 200, "status {code}");
        let v: serde_json::Value = serde_json::from_str(&body)?;
        anyhow::ensure!(v["config"]["reload"]["stale"] == true, "not stale yet: {v}");
        Ok(v)
    })
    .await
    .unwrap();
    assert_eq!(
        status["config"]["reload"]["lastErrorFields"][0], "backends[0].address",
        "{status}"
    );
    assert!(status["config"]["reload"]["source"]
        .as_str()
        .unwrap()
        .contains(CONFIGMAP));
    served_by(addr, "b").await.unwrap();
    // Invalid YAML too.
    set_config(&configmaps, "engine: [tcp\n").await;
    eventually("second refusal", PROPAGATION, || async {
        let (_, body) = http_get(admin_addr, "/status").await;
        let v: serde_json::Value = serde_json::from_str(&body)?;
        anyhow::ensure!(v["config"]["reload"]["reloadsFailed"] == 2, "{v}");
        Ok(())
    })
    .await
    .unwrap();
    served_by(addr, "b").await.unwrap();

    // The report on the Pod.
    let report = eventually("report on the Pod", PROPAGATION, || async {
        let p = pods.get(POD).await?;
        let text = p
            .metadata
            .annotations
            .and_then(|a| a.get(portal::cluster::REPORT_ANNOTATION).cloned())
            .ok_or_else(|| anyhow::anyhow!("no report yet"))?;
        let v: serde_json::Value = serde_json::from_str(&text)?;
        anyhow::ensure!(v["configStale"] == true, "report not current: {v}");
        Ok(v)
    })
    .await
    .unwrap();
    assert_eq!(report["ready"], true, "{report}");
    assert_eq!(report["backends"][0]["name"], "b", "{report}");

    // TLS from the Secret: terminate with its pair, then a rotation swaps it live.
    set_config(
        &configmaps,
        &portal_yaml(
            &[("b", b.addr)],
            listen,
            admin_port,
            "tls: {mode: terminate}",
        ),
    )
    .await;
    eventually("first certificate", PROPAGATION, || async {
        anyhow::ensure!(served_certificate_pem_der(addr).await? == der_of(&cert1));
        Ok(())
    })
    .await
    .unwrap();
    let (cert2, key2) = self_signed("two.portal.test");
    secrets
        .replace(TLS_SECRET, &PostParams::default(), &{
            let mut s = tls_secret(&cert2, &key2);
            s.metadata.resource_version = secrets
                .get(TLS_SECRET)
                .await
                .unwrap()
                .metadata
                .resource_version;
            s
        })
        .await
        .unwrap();
    eventually("rotated certificate", PROPAGATION, || async {
        anyhow::ensure!(served_certificate_pem_der(addr).await? == der_of(&cert2));
        Ok(())
    })
    .await
    .unwrap();
    // A broken pair (key of another certificate) is refused; the current one serves on.
    let patch = serde_json::json!({ "data": { "tls.key": ByteString(key1.as_bytes().to_vec()) } });
    secrets
        .patch(TLS_SECRET, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    eventually("refused pair in /status", PROPAGATION, || async {
        let (_, body) = http_get(admin_addr, "/status").await;
        let v: serde_json::Value = serde_json::from_str(&body)?;
        anyhow::ensure!(
            !v["tls"]["certificate"]["lastRefusal"].is_null(),
            "no refusal yet: {v}"
        );
        Ok(())
    })
    .await
    .unwrap();
    assert_eq!(
        served_certificate_pem_der(addr).await.unwrap(),
        der_of(&cert2)
    );

    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(15), task)
        .await
        .expect("the portal stops")
        .unwrap()
        .unwrap();
    drop(plane);
    let _ = (a, b);
}

/// A TCP forwarder on loopback between the portal and the API server, which the test cuts: all
/// open connections closed, new ones accepted and dropped at once, until restored.
struct Forwarder {
    addr: SocketAddr,
    /// Forwarding, and the open connections' tasks (one lock, so a cut misses none).
    state: Arc<Mutex<(bool, Vec<AbortHandle>)>>,
    forwarded: Arc<AtomicUsize>,
    dropped: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Forwarder {
    async fn start(to: SocketAddr) -> Forwarder {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new((true, Vec::<AbortHandle>::new())));
        let (forwarded, dropped) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let task = tokio::spawn({
            let (state, forwarded, dropped) = (state.clone(), forwarded.clone(), dropped.clone());
            async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    let mut state = state.lock().unwrap();
                    if !state.0 {
                        dropped.fetch_add(1, Ordering::SeqCst);
                        continue;
                    }
                    forwarded.fetch_add(1, Ordering::SeqCst);
                    let conn = tokio::spawn(async move {
                        if let Ok(mut server) = TcpStream::connect(to).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    });
                    state.1.retain(|h| !h.is_finished());
                    state.1.push(conn.abort_handle());
                }
            }
        });
        Forwarder {
            addr,
            state,
            forwarded,
            dropped,
            task,
        }
    }

    /// Closes every open connection and drops new ones; returns how many were open.
    fn cut(&self) -> usize {
        let mut state = self.state.lock().unwrap();
        state.0 = false;
        let open = state.1.iter().filter(|h| !h.is_finished()).count();
        for h in state.1.drain(..) {
            h.abort();
        }
        open
    }

    fn restore(&self) {
        self.state.lock().unwrap().0 = true;
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

/// The API server of `kubeconfig`; the test's forwarder listens on the same host, which its
/// certificate names, so the portal verifies it as usual.
fn api_server(kubeconfig: &std::path::Path) -> SocketAddr {
    let kc = Kubeconfig::read_from(kubeconfig).unwrap();
    let server = kc.clusters[0]
        .cluster
        .as_ref()
        .unwrap()
        .server
        .clone()
        .unwrap();
    let hostport = server
        .strip_prefix("https://")
        .unwrap()
        .trim_end_matches('/');
    assert!(hostport.starts_with("127.0.0.1:"), "server {server}");
    hostport.parse().unwrap()
}

/// A copy of `kubeconfig` at `out` whose clusters' server is `https://{via}`.
fn kubeconfig_via(kubeconfig: &std::path::Path, via: SocketAddr, out: &std::path::Path) {
    let mut kc = Kubeconfig::read_from(kubeconfig).unwrap();
    for cluster in &mut kc.clusters {
        cluster.cluster.as_mut().unwrap().server = Some(format!("https://{via}"));
    }
    std::fs::write(out, serde_norway::to_string(&kc).unwrap()).unwrap();
}

/// Reads the first line a session receives (the backend's name).
async fn read_line(s: &mut TcpStream) -> anyhow::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut byte))
        .await??
        .eq(&1)
        && byte[0] != b'\n'
    {
        line.push(byte[0]);
    }
    Ok(String::from_utf8(line)?)
}

async fn max_connections(admin: SocketAddr) -> serde_json::Value {
    let (code, body) = http_get(admin, "/status").await;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["connections"]["max"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portal_serves_through_an_api_outage_and_reconnects() {
    let plane = ControlPlane::start("outage").expect("control plane");
    let admin = portal_namespace(&plane).await;

    let a = TestServer::named("a").await;
    let (listen, admin_port) = (free_port(), free_port());
    let yaml = |max: u32| {
        portal_yaml(
            &[("a", a.addr)],
            listen,
            admin_port,
            &format!("tls: {{mode: disabled}}\nlimits: {{maxConnections: {max}}}"),
        )
    };
    let configmaps: Api<ConfigMap> = Api::namespaced(admin.clone(), NS);
    configmaps
        .create(
            &PostParams::default(),
            &ConfigMap {
                metadata: meta(CONFIGMAP),
                data: Some([("portal.yaml".to_string(), yaml(100))].into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();

    // The portal binary reaches the API server only through the forwarder.
    let kubeconfig = plane.dir.join("portal-via-forwarder.kubeconfig");
    let forwarder = Forwarder::start(api_server(&plane.portal_kubeconfig)).await;
    kubeconfig_via(&plane.portal_kubeconfig, forwarder.addr, &kubeconfig);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_portal"));
    cmd.args(["--configmap", CONFIGMAP, "--namespace", NS])
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("POD_NAME")
        .env_remove("POD_NAMESPACE")
        .env_remove("KUBERNETES_SERVICE_HOST");
    let mut portal = PortalProcess::spawn_command(cmd);
    let (addr, admin_addr) = (portal.addr, portal.admin);
    eventually("served by a", PROPAGATION, || served_by(addr, "a"))
        .await
        .unwrap();
    assert_eq!(max_connections(admin_addr).await, 100);
    let mut held = TcpStream::connect(addr).await.unwrap();
    assert_eq!(read_line(&mut held).await.unwrap(), "a");
    assert!(forwarder.forwarded.load(Ordering::SeqCst) > 0);

    // The outage: the watch's connection is cut and no new one gets through.
    let open = forwarder.cut();
    eprintln!("outage: {open} open API connection(s) cut");
    assert!(
        open > 0,
        "the portal had no open connection to the API server"
    );
    // The change lands at the API server while the portal cannot see it.
    set_config(&configmaps, &yaml(7)).await;
    let outage = Duration::from_secs(6);
    let started = Instant::now();
    let mut checks = 0;
    while started.elapsed() < outage {
        served_by(addr, "a").await.unwrap();
        assert_eq!(
            echo_roundtrip(&mut held, b"still here").await.unwrap(),
            b"still here"
        );
        let (code, body) = http_get(admin_addr, "/readyz").await;
        assert_eq!(code, 200, "not ready during the outage: {body}");
        assert_eq!(
            max_connections(admin_addr).await,
            100,
            "last good configuration"
        );
        assert!(
            portal.proc.running(),
            "the portal exited during the outage: {:?}",
            portal.log.lock().unwrap()
        );
        checks += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let dropped = forwarder.dropped.load(Ordering::SeqCst);
    eprintln!("outage: {checks} rounds of checks over {outage:?}; {dropped} reconnection attempt(s) dropped");
    assert!(
        dropped > 0,
        "the portal did not try to reconnect during the outage"
    );
    // An operator can tell from the log what failed and that the portal carries on.
    let outage_lines: Vec<String> = portal
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("watch failed; keeping the current state and retrying with backoff"))
        .cloned()
        .collect();
    assert!(
        outage_lines
            .iter()
            .any(|l| l.contains(&format!("ConfigMap {NS}/{CONFIGMAP}"))),
        "no log line about the failed watch: {:?}",
        portal.log.lock().unwrap()
    );
    eprintln!("outage logged as: {}", outage_lines[0]);

    // Restored: the portal reconnects by itself and applies the change made meanwhile.
    forwarder.restore();
    let restored = Instant::now();
    eventually(
        "change applied after the outage",
        Duration::from_secs(30),
        || async {
            let max = max_connections(admin_addr).await;
            anyhow::ensure!(max == 7, "maxConnections {max}");
            Ok(())
        },
    )
    .await
    .unwrap();
    eprintln!(
        "after the outage of {outage:?}: change applied {:.1?} after the API server was reachable again",
        restored.elapsed()
    );
    assert_eq!(echo_roundtrip(&mut held, b"after").await.unwrap(), b"after");
    served_by(addr, "a").await.unwrap();
    // ... and the log says the watch is back, and why it had failed (the cause, not only
    // the outermost error).
    {
        let log = portal.log.lock().unwrap();
        assert!(
            log.iter()
                .any(|l| l.contains("watch restored")
                    && l.contains(&format!("ConfigMap {CONFIGMAP}"))),
            "no log line about the restored watch: {log:?}"
        );
        assert!(
            outage_lines.iter().any(|l| l.matches(": ").count() >= 2),
            "the failed watch is logged without its cause: {outage_lines:?}"
        );
    }

    for line in portal.log.lock().unwrap().iter() {
        if line.contains("portal::cluster") {
            eprintln!("portal log: {line}");
        }
    }
    portal.proc.signal("TERM");
    let exit = tokio::task::block_in_place(|| portal.proc.wait_exit(Duration::from_secs(15)));
    assert!(exit.expect("the portal stops").success());
    drop(forwarder);
    drop(plane);
    let _ = a;
}
