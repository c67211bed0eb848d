//! The portal serving its last good configuration through an API server outage, then
//! reconnecting by itself.

use super::*;

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
