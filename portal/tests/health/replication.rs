//! Replication lag read by the probes on real replication: a PostgreSQL standby whose replay
//! is paused and resumed, then orphaned; a Redis replica whose link is cut and restored; a
//! MariaDB replica whose replication is stopped and started; the members of an etcd cluster.

use super::*;
use portal::health::{Lag, Replicating};

const PW: &str = "pw";

/// The lag the checker measured for `name` (`None` while it measures none).
fn lag(handle: &HealthHandle, name: &str) -> Option<Lag> {
    handle.checks().get(name).lag
}

/// Waits until the lag of `name` satisfies `ok`.
async fn wait_lag(handle: &HealthHandle, name: &str, what: &str, ok: impl Fn(&Lag) -> bool) -> Lag {
    let mut last = None;
    for _ in 0..150 {
        last = lag(handle, name);
        if last.as_ref().is_some_and(&ok) {
            return last.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: not seen within 15 s; last lag of {name}: {last:?}");
}

fn standing(v: &HealthView, i: usize) -> Option<Replicating> {
    v.backends[i].replicating
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_standby_lag_grows_while_replay_is_paused() {
    if skip_without(&["/usr/lib/postgresql/15/bin/postgres"]) {
        return;
    }
    let mut primary = Postgres::primary(PW);
    let standby = Postgres::standby_of(&primary);
    let c = config(
        "postgres",
        &[primary.address(), standby.address()],
        "healthCheck: {interval: 200ms, credentials: {username: postgres, password: pw}}\n",
    );
    let (_cfg, handle) = start(c);
    let mut rx = handle.view();
    wait_view(
        &mut rx,
        Duration::from_secs(10),
        "a leader and a replica",
        |v| v.leader == Some(0) && standing(v, 1) == Some(Replicating::Within),
    )
    .await;
    assert_eq!(standing(&rx.borrow(), 0), None, "the leader is no replica");
    assert_eq!(lag(&handle, "n0"), None);
    wait_lag(&handle, "n1", "caught up", |l| {
        l.behind == Some(0) && l.time == Some(Duration::ZERO)
    })
    .await;

    standby.psql("SELECT pg_wal_replay_pause()");
    primary.psql("CREATE TABLE t AS SELECT g FROM generate_series(1, 10000) g");
    let behind = wait_lag(&handle, "n1", "behind while paused", |l| {
        l.behind.unwrap_or(0) > 0 && l.time.unwrap_or_default() >= Duration::from_secs(1)
    })
    .await;
    eprintln!("paused standby: {behind:?}");
    assert_eq!(behind.broken, None, "paused, not broken");

    standby.psql("SELECT pg_wal_replay_resume()");
    wait_lag(&handle, "n1", "caught up after resume", |l| {
        l.behind == Some(0) && l.time == Some(Duration::ZERO)
    })
    .await;

    primary.stop();
    wait_view(
        &mut rx,
        Duration::from_secs(15),
        "an orphaned standby",
        |v| matches!(standing(v, 1), Some(Replicating::Broken(_))),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_replica_with_its_link_cut_is_broken() {
    if skip_without(&["redis-server"]) {
        return;
    }
    let primary = Redis::start();
    let replica = Redis::replica_of(primary.port);
    replica.wait_replicating();
    let c = config(
        "redis",
        &[primary.address(), replica.address()],
        "healthCheck: {interval: 200ms}\n",
    );
    let (_cfg, handle) = start(c);
    let mut rx = handle.view();
    wait_view(&mut rx, Duration::from_secs(10), "a replica within", |v| {
        v.leader == Some(0) && standing(v, 1) == Some(Replicating::Within)
    })
    .await;
    primary.cli(&["SET", "k", "v"]);
    wait_lag(&handle, "n1", "offsets equal", |l| {
        l.behind == Some(0) && l.time == Some(Duration::ZERO)
    })
    .await;

    let dead = free_port().to_string();
    replica.cli(&["REPLICAOF", "127.0.0.1", &dead]);
    let v = wait_view(&mut rx, Duration::from_secs(10), "the link down", |v| {
        matches!(standing(v, 1), Some(Replicating::Broken(_)))
    })
    .await;
    assert!(v.backends[1].up, "still up: only its replication is broken");

    replica.cli(&["REPLICAOF", "127.0.0.1", &primary.port.to_string()]);
    wait_view(&mut rx, Duration::from_secs(15), "the link restored", |v| {
        standing(v, 1) == Some(Replicating::Within)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_replica_with_replication_stopped_is_broken() {
    if skip_without(&["mariadbd"]) {
        return;
    }
    let primary = Mariadb::primary("probe", PW);
    let replica = Mariadb::replica_of(&primary, 2);
    let c = config(
        "mysql",
        &[primary.address(), replica.address()],
        "healthCheck: {interval: 200ms, credentials: {username: probe, password: pw}}\n",
    );
    let (_cfg, handle) = start(c);
    let mut rx = handle.view();
    wait_view(&mut rx, Duration::from_secs(15), "a replica within", |v| {
        v.leader == Some(0) && standing(v, 1) == Some(Replicating::Within)
    })
    .await;
    let l = wait_lag(&handle, "n1", "seconds behind stated", |l| l.time.is_some()).await;
    assert_eq!(l.behind, None, "MySQL states no bytes");

    replica.sql("STOP SLAVE");
    wait_view(
        &mut rx,
        Duration::from_secs(10),
        "replication stopped",
        |v| matches!(standing(v, 1), Some(Replicating::Broken(_))),
    )
    .await;
    replica.sql("START SLAVE");
    wait_view(
        &mut rx,
        Duration::from_secs(15),
        "replication started",
        |v| standing(v, 1) == Some(Replicating::Within),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_members_are_measured_against_the_raft_leader() {
    if skip_without(&["etcd", "etcdctl"]) {
        return;
    }
    let etcd = Etcd::cluster(3);
    let addresses: Vec<String> = etcd.members.iter().map(|m| m.address()).collect();
    let c = config("etcd", &addresses, "healthCheck: {interval: 200ms}\n");
    let (_cfg, handle) = start(c);
    let mut rx = handle.view();
    let v = wait_view(
        &mut rx,
        Duration::from_secs(15),
        "every member within",
        |v| (0..3).all(|i| standing(v, i) == Some(Replicating::Within)),
    )
    .await;
    let raft_leader = v
        .backends
        .iter()
        .position(|b| b.engine_leader == Some(true))
        .expect("a raft leader");
    etcd.members[0].etcdctl(&["put", "k", "v"]).expect("put");
    for i in 0..3 {
        let l = wait_lag(&handle, &format!("n{i}"), "raft index caught up", |l| {
            l.behind == Some(0)
        })
        .await;
        assert_eq!(l.broken, None);
        if i == raft_leader {
            assert_eq!(l.time, Some(Duration::ZERO), "the reference itself");
        }
    }
}
