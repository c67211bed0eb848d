//! Probes and the checker against real servers: Redis (primary and replica, error replies,
//! an ACL user), PostgreSQL standby promotion, MariaDB read-only and etcd members.

use super::*;

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
        probed.map(|p| (p.role, p.caveat)),
        Ok((Role::Leader, Some(portal::health::Caveat::Misconf))),
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
