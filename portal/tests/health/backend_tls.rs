//! Probes over TLS to real backends (PostgreSQL, MariaDB, etcd) verifying the CA.

use super::*;

/// A CA that signs the database servers' certificate (for 127.0.0.1 and localhost), another CA
/// that signs nothing here, and their files.
struct BackendPki {
    _dir: TempDir,
    ca: std::path::PathBuf,
    wrong_ca: std::path::PathBuf,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
}

impl BackendPki {
    fn new() -> BackendPki {
        let dir = TempDir::new("backend-pki");
        let ca = tlsca::TestCa::new("database CA");
        let (cert, key) = ca
            .server("db", &["127.0.0.1", "localhost"])
            .write(dir.path(), "db");
        let ca_path = dir.path().join("ca.pem");
        std::fs::write(&ca_path, &ca.cert_pem).unwrap();
        let wrong_ca = dir.path().join("wrong-ca.pem");
        std::fs::write(&wrong_ca, tlsca::TestCa::new("another CA").cert_pem).unwrap();
        BackendPki {
            _dir: dir,
            ca: ca_path,
            wrong_ca,
            cert,
            key,
        }
    }

    /// `tls:` with backend TLS verified against `ca`, plaintext clients.
    fn yaml(ca: &std::path::Path, extra: &str) -> String {
        format!(
            "tls: {{mode: disabled, backend: {{enabled: true, caFile: \"{}\"}}}}\n{extra}",
            ca.display()
        )
    }

    /// The configuration for `engine` in front of `a` with TLS verified against the right CA
    /// (`wrong`: the other one).
    fn config(&self, engine: &str, a: &str, wrong: bool) -> Config {
        let ca = if wrong { &self.wrong_ca } else { &self.ca };
        config(engine, &[a.to_string()], &BackendPki::yaml(ca, ""))
    }

    /// A probe that trusts the wrong CA fails with a TLS error naming the cause.
    async fn assert_wrong_ca_refused(
        &self,
        engine: &str,
        a: &str,
        creds: Option<ProbeCredentials>,
    ) {
        let err = probe_one(&self.config(engine, a, true), creds, a)
            .await
            .unwrap_err();
        assert!(matches!(err, ProbeError::Tls(_)), "{engine}: {err}");
        assert!(err.to_string().contains("UnknownIssuer"), "{engine}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_probe_over_tls_verifies_the_ca() {
    if !installed(&format!("{PG_BIN}/postgres")) {
        eprintln!("postgresql 15 not installed; skipped");
        return;
    }
    let pki = BackendPki::new();
    let (cert, key) = (pki.cert.clone(), pki.key.clone());
    let pg = tokio::task::spawn_blocking(move || {
        let pg = Postgres::primary("pgpw");
        pg.enable_tls(&cert, &key, true);
        pg.psql("SET password_encryption = 'md5'; CREATE ROLE probe_md5 LOGIN PASSWORD 'md5pw'");
        pg.hba_first("hostssl all probe_md5 127.0.0.1/32 md5");
        pg
    })
    .await
    .unwrap();
    let a = pg.address();
    let pg_creds = creds(Some("postgres"), "pgpw");

    // TLS verified against the right CA: SCRAM-SHA-256 and md5 logins.
    let c = pki.config("postgres", &a, false);
    assert_eq!(probe_one(&c, pg_creds.clone(), &a).await, Ok(Role::Leader));
    assert_eq!(
        probe_one(&c, creds(Some("probe_md5"), "md5pw"), &a).await,
        Ok(Role::Leader)
    );

    // Without TLS the server refuses the login (hostnossl ... reject).
    let plain = config("postgres", std::slice::from_ref(&a), "");
    let err = probe_one(&plain, pg_creds.clone(), &a).await.unwrap_err();
    assert!(
        matches!(err, ProbeError::Auth(_)) && err.to_string().contains("no encryption"),
        "{err}"
    );

    // A CA that did not sign the server's certificate: a TLS error that says why.
    pki.assert_wrong_ca_refused("postgres", &a, pg_creds).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_probe_over_tls_with_secure_transport_required() {
    if !installed("mariadbd") {
        eprintln!("mariadb not installed; skipped");
        return;
    }
    let pki = BackendPki::new();
    let (cert, key, ca) = (pki.cert.clone(), pki.key.clone(), pki.ca.clone());
    let db =
        tokio::task::spawn_blocking(move || Mariadb::start_tls("probe", "mypw", &cert, &key, &ca))
            .await
            .unwrap();
    assert_eq!(db.sql("SELECT @@require_secure_transport"), "1");
    let a = db.address();
    let my = creds(Some("probe"), "mypw");

    let c = pki.config("mysql", &a, false);
    assert_eq!(probe_one(&c, my.clone(), &a).await, Ok(Role::Leader));
    db.sql("SET GLOBAL read_only = 1");
    assert_eq!(probe_one(&c, my.clone(), &a).await, Ok(Role::Replica));

    let plain = config("mysql", std::slice::from_ref(&a), "");
    // MariaDB refuses a plaintext login when secure transport is required.
    let err = probe_one(&plain, my.clone(), &a).await.unwrap_err();
    assert!(matches!(err, ProbeError::Auth(_)), "{err}");

    pki.assert_wrong_ca_refused("mysql", &a, my).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_probe_over_https() {
    if !installed("etcd") || !installed("etcdctl") {
        eprintln!("etcd not installed; skipped");
        return;
    }
    let pki = BackendPki::new();
    let tls = (pki.cert.clone(), pki.key.clone(), pki.ca.clone());
    let etcd = tokio::task::spawn_blocking(move || {
        Etcd::start(
            1,
            &EtcdOptions {
                tls: Some(tls),
                ..EtcdOptions::default()
            },
        )
    })
    .await
    .unwrap();
    let a = etcd.members[0].address();
    let c = pki.config("etcd", &a, false);
    let p = probe_node(&settings(&c, None), &addr(&a)).await.unwrap();
    assert_eq!(p.role, Role::SharedLeader);
    assert_eq!(p.engine_leader, Some(true), "member status read over HTTPS");

    let plain = config("etcd", std::slice::from_ref(&a), "");
    let err = probe_one(&plain, None, &a).await.unwrap_err().to_string();
    assert!(
        err.contains("without answering"),
        "plaintext HTTP to an HTTPS port: {err}"
    );

    pki.assert_wrong_ca_refused("etcd", &a, None).await;
}
