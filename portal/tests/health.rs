//! Health probes and the checker against real servers on loopback (Redis, PostgreSQL, MariaDB,
//! etcd) and small fakes (KeyDB roles, a loading node, custom steps).

mod common;

use common::tls as tlsca;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use common::fake_redis::{Fake, FakeRedis};
use common::*;
use portal::{
    config::{Address, Config},
    health::{
        probe::{probe, probe_node, ProbeError, ProbeSettings},
        spawn_checker, HealthHandle, HealthView, ProbeCredentials, Role, StandaloneCredentials,
    },
};
use tokio::sync::watch;

/// A validated configuration for `engine` with these backends and extra YAML (plaintext
/// clients unless `extra` has a `tls:` of its own).
fn config(engine: &str, backends: &[String], extra: &str) -> Config {
    let tls = if extra.contains("tls:") {
        ""
    } else {
        "tls: {mode: disabled}\n"
    };
    let mut yaml = format!("engine: {engine}\nport: 7000\n{tls}backends:\n");
    for (i, b) in backends.iter().enumerate() {
        yaml.push_str(&format!("  - {{name: n{i}, address: \"{b}\"}}\n"));
    }
    yaml.push_str(extra);
    portal::config::parse_yaml(&yaml)
        .and_then(|s| s.validate())
        .unwrap_or_else(|e| panic!("{e}\n{yaml}"))
}

fn settings(config: &Config, creds: Option<ProbeCredentials>) -> ProbeSettings {
    ProbeSettings::new(config, Arc::new(creds))
}

fn creds(user: Option<&str>, password: &str) -> Option<ProbeCredentials> {
    Some(ProbeCredentials {
        username: user.map(String::from),
        password: password.into(),
    })
}

fn addr(a: &str) -> Address {
    a.parse().unwrap()
}

async fn probe_one(
    config: &Config,
    creds: Option<ProbeCredentials>,
    a: &str,
) -> Result<Role, ProbeError> {
    probe(&settings(config, creds), &addr(a)).await
}

/// Waits until the published view satisfies `ok`.
async fn wait_view(
    rx: &mut watch::Receiver<HealthView>,
    within: Duration,
    what: &str,
    ok: impl Fn(&HealthView) -> bool,
) -> HealthView {
    let seen = match tokio::time::timeout(within, rx.wait_for(|v| ok(v))).await {
        Ok(Ok(v)) => Some(v.clone()),
        _ => None,
    };
    seen.unwrap_or_else(|| {
        panic!(
            "{what} not seen within {within:?}; last view: {:#?}",
            *rx.borrow()
        )
    })
}

fn start(config: Config) -> (watch::Sender<Arc<Config>>, HealthHandle) {
    let (tx, rx) = watch::channel(Arc::new(config));
    let handle = spawn_checker(rx, Arc::new(StandaloneCredentials));
    (tx, handle)
}

// ---- fakes -------------------------------------------------------------------------------

#[tokio::test]
async fn redis_probe_roles_auth_and_loading() {
    let fake = FakeRedis::start(Fake::Master).await;
    let c = config("redis", &[fake.address()], "");
    let a = fake.address();
    assert_eq!(probe_one(&c, None, &a).await, Ok(Role::Leader));
    fake.set(Fake::Replica);
    assert_eq!(probe_one(&c, None, &a).await, Ok(Role::Replica));
    fake.set(Fake::ActiveReplica);
    assert_eq!(probe_one(&c, None, &a).await, Ok(Role::SharedLeader));
    fake.set(Fake::RoleForbidden);
    assert_eq!(
        probe_one(&c, None, &a).await,
        Ok(Role::Leader),
        "INFO replication fallback"
    );
    fake.set(Fake::Loading);
    assert_eq!(probe_one(&c, None, &a).await, Err(ProbeError::Loading));

    fake.set(Fake::Master);
    probe_one(&c, creds(Some("probe"), "pw"), &a).await.unwrap();
    probe_one(&c, creds(None, "only-pw"), &a).await.unwrap();
    assert_eq!(
        *fake.auths.lock().unwrap(),
        vec![
            vec!["probe".to_string(), "pw".into()],
            vec!["only-pw".to_string()]
        ]
    );
}

#[tokio::test]
async fn a_silent_node_fails_within_the_check_timeout() {
    let fake = FakeRedis::start(Fake::Silent).await;
    let c = config("redis", &[fake.address()], "timeouts: {check: 300ms}\n");
    let started = Instant::now();
    let err = probe_one(&c, None, &fake.address()).await.unwrap_err();
    assert!(matches!(err, ProbeError::Timeout(_)), "{err}");
    assert!(
        started.elapsed() < Duration::from_millis(800),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn custom_steps_pass_fail_and_time_out() {
    let good = FakeRedis::start(Fake::Master).await;
    let replica = FakeRedis::start(Fake::Replica).await;
    let silent = FakeRedis::start(Fake::Silent).await;
    let steps = "timeouts: {check: 400ms}\nhealthCheck:\n  steps:\n    - {send: \"PING\\r\\n\", expect: \"+PONG\"}\n    - {send: \"INFO replication\\r\\n\", expect: \"role:master\"}\n";
    let c = config("redis", &[good.address()], steps);
    assert_eq!(probe_one(&c, None, &good.address()).await, Ok(Role::Leader));

    let err = probe_one(&c, None, &replica.address())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("step 2") && err.contains("role:slave"),
        "wrong reply: {err}"
    );

    let started = Instant::now();
    let err = probe_one(&c, None, &silent.address())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("step 1"), "silent server: {err}");
    assert!(started.elapsed() < Duration::from_secs(1));

    // tcp engine: connect only, or steps; no role.
    let c = config("tcp", &[good.address()], "");
    assert_eq!(
        probe_one(&c, None, &good.address()).await,
        Ok(Role::Unknown)
    );
    let port = free_port();
    let err = probe_one(&c, None, &format!("127.0.0.1:{port}"))
        .await
        .unwrap_err();
    assert!(matches!(err, ProbeError::Connect(_)), "{err}");
}

#[tokio::test]
async fn checker_follows_promotion_and_reports_conflicts() {
    let a = FakeRedis::start(Fake::Master).await;
    let b = FakeRedis::start(Fake::Replica).await;
    let c = config(
        "redis",
        &[a.address(), b.address()],
        "healthCheck: {interval: 200ms}\n",
    );
    let (_cfg, handle) = start(c);
    let mut rx = handle.view();
    wait_view(&mut rx, Duration::from_secs(2), "leader a", |v| {
        v.leader == Some(0)
    })
    .await;

    // Split brain: both claim to lead -> no leader, conflict.
    b.set(Fake::Master);
    let v = wait_view(&mut rx, Duration::from_secs(2), "conflict", |v| v.conflict).await;
    assert_eq!(v.leader, None);
    assert_eq!(v.stats.conflicts, 1);
    // a steps down: b leads.
    a.set(Fake::Replica);
    let v = wait_view(&mut rx, Duration::from_secs(2), "leader b", |v| {
        v.leader == Some(1)
    })
    .await;
    assert!(!v.conflict);
    assert_eq!(v.stats.changes, 1);
    assert_eq!(v.stats.failovers, 1);
    assert!(v.stats.last_failover.is_some() && v.stats.last_change.is_some());
    assert_eq!(v.backends[0].role, Role::Replica);
    assert!(v.backends[0].up);
}

#[tokio::test]
async fn keydb_active_replicas_lead_without_conflict_and_loading_is_down() {
    let a = FakeRedis::start(Fake::ActiveReplica).await;
    let b = FakeRedis::start(Fake::ActiveReplica).await;
    let l = FakeRedis::start(Fake::Loading).await;
    let c = config(
        "redis",
        &[a.address(), b.address(), l.address()],
        "healthCheck: {interval: 100ms}\n",
    );
    let (_cfg, handle) = start(c);
    let mut rx = handle.view();
    let v = wait_view(&mut rx, Duration::from_secs(2), "shared leaders", |v| {
        v.leader.is_some() && !v.backends[2].up
    })
    .await;
    assert_eq!(v.leader, Some(0));
    assert!(!v.conflict);
    assert_eq!(v.backends[1].role, Role::SharedLeader);
    assert!(v.backends[2]
        .last_error
        .as_deref()
        .unwrap()
        .contains("loading"));

    // The current shared leader keeps the role while healthy; when it goes, the next takes it.
    let mut a = a;
    a.stop();
    wait_view(&mut rx, Duration::from_secs(3), "b leads", |v| {
        v.leader == Some(1)
    })
    .await;
}

#[tokio::test]
async fn fast_failover_does_not_wait_for_the_interval() {
    let mut a = FakeRedis::start(Fake::Master).await;
    let b = FakeRedis::start(Fake::Replica).await;
    // A slow interval: failover must come from fast probing, not from the regular schedule.
    let c = config(
        "redis",
        &[a.address(), b.address()],
        "healthCheck: {interval: 5s, fall: 2}\n",
    );
    let (_cfg, handle) = start(c);
    let mut rx = handle.view();
    wait_view(&mut rx, Duration::from_secs(2), "leader a", |v| {
        v.leader == Some(0)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    a.stop();
    b.set(Fake::Master);
    let started = Instant::now();
    handle.report_connect_failure("n0");
    let v = wait_view(&mut rx, Duration::from_secs(2), "leader b", |v| {
        v.leader == Some(1)
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    assert!(!v.backends[0].up);
    wait_view(&mut rx, Duration::from_secs(2), "fast probing off", |v| {
        !v.stats.fast_probing
    })
    .await;
}

#[tokio::test]
async fn configuration_changes_keep_unchanged_backends() {
    let a = FakeRedis::start(Fake::Master).await;
    let b = FakeRedis::start(Fake::Replica).await;
    let c1 = config("redis", &[a.address()], "healthCheck: {interval: 100ms}\n");
    let (cfg, handle) = start(c1);
    let mut rx = handle.view();
    wait_view(&mut rx, Duration::from_secs(2), "leader a", |v| {
        v.leader == Some(0)
    })
    .await;

    // b is added in front of a: a keeps its state and stays leader, no leader change counted.
    let mut c2 = config(
        "redis",
        &[b.address(), a.address()],
        "healthCheck: {interval: 100ms}\n",
    );
    c2.backends[0].name = "nb".into();
    c2.backends[1].name = "n0".into();
    cfg.send_replace(Arc::new(c2));
    let v = wait_view(&mut rx, Duration::from_secs(2), "b probed", |v| {
        v.backends.len() == 2 && v.backends[0].role == Role::Replica
    })
    .await;
    assert_eq!(v.leader_name(), Some("n0"));
    assert_eq!(v.stats.changes, 0);
    assert_eq!(v.stats.failovers, 0);
}

// ---- real servers ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_primary_and_replica() {
    if !installed("redis-server") {
        eprintln!("redis-server not installed; skipped");
        return;
    }
    let mut primary = Redis::start_with(&["--requirepass", "pw", "--masterauth", "pw"]);
    let replica = Redis::start_with(&[
        "--replicaof",
        "127.0.0.1",
        &primary.port.to_string(),
        "--requirepass",
        "pw",
        "--masterauth",
        "pw",
    ]);
    let c = config(
        "redis",
        &[primary.address(), replica.address()],
        "healthCheck: {interval: 200ms, credentials: {password: pw}}\n",
    );
    let err = probe_one(&c, creds(None, "wrong"), &primary.address())
        .await
        .unwrap_err();
    assert!(matches!(err, ProbeError::Auth(_)), "{err}");
    let err = probe_one(&c, None, &primary.address()).await.unwrap_err();
    assert!(matches!(err, ProbeError::Auth(_)), "no AUTH: {err}");
    assert_eq!(
        probe_one(&c, creds(None, "pw"), &replica.address()).await,
        Ok(Role::Replica)
    );

    let (_cfg, handle) = start(c);
    let mut rx = handle.view();
    wait_view(&mut rx, Duration::from_secs(3), "primary leads", |v| {
        v.leader == Some(0)
    })
    .await;

    primary.kill();
    handle.report_connect_failure("n0");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let promoted = Instant::now();
    replica.cli(&["-a", "pw", "--no-auth-warning", "REPLICAOF", "NO", "ONE"]);
    let v = wait_view(&mut rx, Duration::from_secs(3), "replica leads", |v| {
        v.leader == Some(1)
    })
    .await;
    eprintln!(
        "redis: replica led {:?} after its promotion",
        promoted.elapsed()
    );
    assert!(!v.backends[0].up);
    assert!(v.stats.failovers >= 1);
}

/// The error replies a Redis probe can meet, each decided on purpose: -MISCONF keeps the node
/// up (it still leads, reads work), -MASTERDOWN is down (a replica that refuses reads),
/// -NOAUTH / -WRONGPASS are reported as a credentials problem.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_error_replies_are_decided_on_purpose() {
    if !installed("redis-server") {
        return;
    }
    // MISCONF: a server with a save point whose background save failed (its directory is
    // gone) refuses writes and PING until a save succeeds.
    let r = Redis::start_with(&["--save", "3600 1", "--stop-writes-on-bgsave-error", "yes"]);
    let c = config("redis", &[r.address()], "");
    let dir = r.cli(&["CONFIG", "GET", "dir"]);
    let dir = dir.lines().nth(1).unwrap().to_string();
    std::fs::remove_dir_all(&dir).unwrap();
    r.cli(&["BGSAVE"]);
    let s = settings(&c, None);
    let deadline = Instant::now() + Duration::from_secs(10);
    let probed = loop {
        let p = probe_node(&s, &addr(&r.address())).await;
        if p.as_ref().is_ok_and(|p| p.caveat.is_some()) || Instant::now() > deadline {
            break p;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        probed,
        Ok(portal::health::Probed {
            caveat: Some(portal::health::Caveat::Misconf),
            ..Role::Leader.into()
        }),
        "a leader that cannot persist stays up and leading"
    );
    assert!(r.cli(&["PING"]).starts_with("MISCONF"), "PING is refused");

    // MASTERDOWN: a replica of a master that is gone, told not to serve stale data.
    let gone = free_port();
    let replica = Redis::start_with(&[
        "--replicaof",
        "127.0.0.1",
        &gone.to_string(),
        "--replica-serve-stale-data",
        "no",
    ]);
    let err = probe_one(&c, None, &replica.address()).await.unwrap_err();
    assert!(
        matches!(&err, ProbeError::Protocol(m) if m.contains("MASTERDOWN") && m.contains("stale")),
        "{err}"
    );

    // NOAUTH and WRONGPASS: the credentials, not the node.
    let locked = Redis::start_with(&["--requirepass", "pw"]);
    for (creds, what) in [(None, "NOAUTH"), (creds(None, "wrong"), "WRONGPASS")] {
        let err = probe_one(&c, creds, &locked.address()).await.unwrap_err();
        assert!(matches!(err, ProbeError::Auth(_)), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("healthCheck credentials") && text.contains(what),
            "{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_acl_user() {
    if !installed("redis-server") {
        return;
    }
    let r = Redis::start();
    r.cli(&[
        "ACL", "SETUSER", "probe", "on", ">s3cret", "+ping", "+role", "+auth",
    ]);
    let c = config("redis", &[r.address()], "");
    assert_eq!(
        probe_one(&c, creds(Some("probe"), "s3cret"), &r.address()).await,
        Ok(Role::Leader)
    );
    let err = probe_one(&c, creds(Some("probe"), "nope"), &r.address())
        .await
        .unwrap_err();
    assert!(matches!(err, ProbeError::Auth(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_standby_promotion_with_scram_and_md5() {
    if !installed(&format!("{PG_BIN}/postgres")) {
        eprintln!("postgresql 15 not installed; skipped");
        return;
    }
    let primary = Postgres::primary("pgpw");
    let standby = Postgres::standby_of(&primary);
    let c = config(
        "postgres",
        &[primary.address(), standby.address()],
        "healthCheck: {interval: 200ms, credentials: {username: postgres, password: pgpw}}\n",
    );
    let pg = creds(Some("postgres"), "pgpw");
    assert_eq!(
        probe_one(&c, pg.clone(), &primary.address()).await,
        Ok(Role::Leader)
    );
    assert_eq!(
        probe_one(&c, pg.clone(), &standby.address()).await,
        Ok(Role::Replica)
    );
    let err = probe_one(&c, creds(Some("postgres"), "bad"), &primary.address())
        .await
        .unwrap_err();
    assert!(matches!(err, ProbeError::Auth(_)), "{err}");

    // md5: a role whose password is stored as md5, allowed by an md5 pg_hba line.
    primary.psql("SET password_encryption = 'md5'; CREATE ROLE probe_md5 LOGIN PASSWORD 'md5pw'");
    primary.hba_first("host all probe_md5 127.0.0.1/32 md5");
    assert_eq!(
        probe_one(&c, creds(Some("probe_md5"), "md5pw"), &primary.address()).await,
        Ok(Role::Leader)
    );

    let (_cfg, handle) = start(c);
    let mut rx = handle.view();
    wait_view(&mut rx, Duration::from_secs(5), "primary leads", |v| {
        v.leader == Some(0) && v.backends[1].role == Role::Replica
    })
    .await;
    let mut primary = primary;
    primary.stop();
    standby.promote();
    let v = wait_view(&mut rx, Duration::from_secs(5), "standby leads", |v| {
        v.leader == Some(1)
    })
    .await;
    assert!(!v.backends[0].up);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_read_only_moves_the_leader() {
    if !installed("mariadbd") {
        eprintln!("mariadb not installed; skipped");
        return;
    }
    let a = Mariadb::start("probe", "mypw");
    let b = Mariadb::start("probe", "mypw");
    b.sql("SET GLOBAL read_only = 1");
    let c = config(
        "mysql",
        &[a.address(), b.address()],
        "healthCheck: {interval: 200ms, credentials: {username: probe, password: mypw}}\n",
    );
    let err = probe_one(&c, creds(Some("probe"), "bad"), &a.address())
        .await
        .unwrap_err();
    assert!(matches!(err, ProbeError::Auth(_)), "{err}");

    let (_cfg, handle) = start(c);
    let mut rx = handle.view();
    wait_view(&mut rx, Duration::from_secs(5), "a leads", |v| {
        v.leader == Some(0) && v.backends[1].role == Role::Replica
    })
    .await;
    a.sql("SET GLOBAL read_only = 1");
    b.sql("SET GLOBAL read_only = 0");
    wait_view(&mut rx, Duration::from_secs(5), "b leads", |v| {
        v.leader == Some(1)
    })
    .await;
}

/// The backends that report being etcd's raft leader.
fn raft_leaders(v: &HealthView) -> Vec<usize> {
    (0..v.backends.len())
        .filter(|&i| v.backends[i].engine_leader == Some(true))
        .collect()
}

/// The first backend reporting raft leadership (there must be one).
fn raft_leader_of(v: &HealthView) -> usize {
    *raft_leaders(v)
        .first()
        .unwrap_or_else(|| panic!("no raft leader reported: {v:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_member_status_raft_leader_and_quorum_loss() {
    if !installed("etcd") {
        eprintln!("etcd not installed; skipped");
        return;
    }
    let mut etcd = Etcd::cluster(3);
    let addrs: Vec<String> = etcd.members.iter().map(EtcdMember::address).collect();
    let c = config("etcd", &addrs, "healthCheck: {interval: 200ms}\n");
    // Every member may serve; exactly one is raft leader.
    let mut leading = 0;
    for a in &addrs {
        let p = probe_node(&settings(&c, None), &addr(a)).await.unwrap();
        assert_eq!(p.role, Role::SharedLeader);
        assert!(p.engine_leader.is_some(), "member status read: {p:?}");
        leading += usize::from(p.engine_leader == Some(true));
    }
    assert_eq!(leading, 1);

    let (_cfg, handle) = start(c);
    let mut rx = handle.view();
    let v = wait_view(&mut rx, Duration::from_secs(5), "all up", |v| {
        v.leader.is_some()
            && v.backends
                .iter()
                .all(|b| b.up && b.role == Role::SharedLeader && b.engine_leader.is_some())
    })
    .await;
    let raft = raft_leader_of(&v);
    assert_eq!(raft_leaders(&v), vec![raft_leader_of(&v)], "{v:?}");

    // Stop the raft leader: it drops out, another member becomes raft leader, and sessions go
    // to a member that is up.
    etcd.members[raft].stop();
    let v = wait_view(&mut rx, Duration::from_secs(10), "raft leader moved", |v| {
        !v.backends[raft].up
            && v.backends
                .iter()
                .enumerate()
                .any(|(i, b)| i != raft && b.up && b.engine_leader == Some(true))
    })
    .await;
    assert!(v.leader.is_some_and(|l| l != raft), "{v:?}");
    assert!(!v.conflict);
    assert_eq!(
        v.backends[raft].engine_leader, None,
        "down: no longer reported"
    );
    assert_eq!(raft_leaders(&v), vec![raft_leader_of(&v)], "{v:?}");

    // Stop one more: the survivor has no quorum, hence no raft leader, and is not healthy.
    let other = (0..3).find(|&i| i != raft).unwrap();
    let survivor = (0..3).find(|&i| i != raft && i != other).unwrap();
    etcd.members[other].stop();
    let v = wait_view(&mut rx, Duration::from_secs(10), "no member up", |v| {
        v.backends.iter().all(|b| !b.up)
    })
    .await;
    assert_eq!(v.leader, None);
    let error = v.backends[survivor].last_error.clone().unwrap_or_default();
    // Without quorum etcd's own /health says false too; which of the two checks the probe
    // meets first depends on how far the member got in noticing the loss.
    assert!(
        error.contains("no raft leader")
            || (error.contains("/health answered 503") && error.contains("\"health\":\"false\"")),
        "survivor: {error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_nospace_alarm_makes_a_member_unhealthy() {
    if !installed("etcd") || !installed("etcdctl") {
        eprintln!("etcd not installed; skipped");
        return;
    }
    let etcd = tokio::task::spawn_blocking(|| {
        Etcd::start(
            1,
            &EtcdOptions {
                extra: vec!["--quota-backend-bytes=200000".into()],
                ..EtcdOptions::default()
            },
        )
    })
    .await
    .unwrap();
    let a = etcd.members[0].address();
    let c = config("etcd", std::slice::from_ref(&a), "");
    let p = probe_node(&settings(&c, None), &addr(&a)).await.unwrap();
    assert_eq!(p.engine_leader, Some(true), "a lone member leads raft");

    // Fill the quota until etcd refuses writes and raises NOSPACE (bounded: 40 writes).
    let member = &etcd.members[0];
    let value = "x".repeat(30_000);
    let refused = (0..40).find(|i| member.etcdctl(&["put", &format!("k{i}"), &value]).is_none());
    assert!(refused.is_some(), "the quota never filled");
    let alarms = member.etcdctl(&["alarm", "list"]).unwrap_or_default();
    assert!(alarms.contains("NOSPACE"), "{alarms}");

    let err = probe_node(&settings(&c, None), &addr(&a))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("NOSPACE"), "{err}");
}

// ---- TLS to real backends ----------------------------------------------------------------

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
