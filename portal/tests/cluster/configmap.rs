//! The portal following its ConfigMap and its TLS Secret live, refusing a broken
//! configuration, and reporting on its own Pod.

use super::*;

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
