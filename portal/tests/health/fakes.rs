//! Probes and the checker against small fakes: Redis roles, AUTH and loading, a silent node,
//! custom steps, promotion and conflicts, KeyDB active replicas, fast failover and
//! configuration changes.

use super::*;

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
