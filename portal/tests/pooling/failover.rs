//! Failover: a promoted streaming standby (the old primary demoted to its standby) while
//! pooled clients sit idle, one holds a transaction open and others write in a loop.

use super::*;

/// What one writer saw: the values whose COMMIT was acknowledged, before and after the
/// failover, and the errors it was given.
#[derive(Default)]
struct Writes {
    acked: Vec<String>,
    acked_after: usize,
    errors: Vec<String>,
}

/// A client writing one row per transaction (BEGIN, INSERT, a short sleep, COMMIT) until
/// `stop`, at most 3,000 transactions or 60 s.
async fn writer(
    c: tokio_postgres::Client,
    w: usize,
    failed_over: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (tokio_postgres::Client, Writes) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut out = Writes::default();
    let deadline = Instant::now() + Duration::from_secs(60);
    for i in 0..3000 {
        if stop.load(Relaxed) || Instant::now() > deadline {
            break;
        }
        let after = failed_over.load(Relaxed);
        let v = format!("w{w}-{i}");
        let r = async {
            c.simple_query("BEGIN").await?;
            c.simple_query(&format!("INSERT INTO t (v) VALUES ('{v}')"))
                .await?;
            c.simple_query("SELECT pg_sleep(0.005)").await?;
            c.simple_query("COMMIT").await
        }
        .await;
        match r {
            Ok(_) => {
                out.acked.push(v);
                out.acked_after += after as usize;
            }
            Err(e) => out.errors.push(db_text(&e)),
        }
    }
    (c, out)
}

/// The failover a cluster manager runs: the old primary stops (fast), the streaming standby is
/// promoted, and the old primary comes back as a standby of the new one. Through it: 200
/// pooled clients sit idle and all stay connected; one client holds an open transaction and
/// is told it was lost; six clients write in a loop, only their transactions in flight fail,
/// each acknowledged write is on the new leader, and the demoted node gets no connection
/// from the portal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_keeps_idle_pooled_clients_and_fails_the_transaction_in_flight() {
    use std::sync::{atomic::AtomicBool, atomic::Ordering::Relaxed, Arc};
    if !have_postgres() {
        return;
    }
    let mut primary = Postgres::primary(PW);
    with_app_user(&primary);
    let standby = Postgres::standby_of(&primary);
    let portal = Portal::start(
        &[&primary, &standby],
        "mode: transaction, poolSize: 5, queueTimeout: 20s",
        "timeouts: {connect: 20s}\n",
    )
    .await;
    const IDLE: usize = 200;
    let mut clients = Vec::with_capacity(IDLE);
    for i in 0..IDLE {
        let c = portal
            .client("app", "apppw")
            .await
            .unwrap_or_else(|e| panic!("client {i}: {e}"));
        if i % 20 == 0 {
            c.simple_query("INSERT INTO t (v) VALUES ('before')")
                .await
                .unwrap();
        }
        clients.push(c);
    }
    // One client is inside a transaction when the leader goes.
    let busy = portal.client("app", "apppw").await.unwrap();
    busy.simple_query("BEGIN").await.unwrap();
    busy.simple_query("INSERT INTO t (v) VALUES ('in flight')")
        .await
        .unwrap();
    assert!(backends_of(&primary, "app") <= 5);
    // Six more write all through the failover (the pool of five is shared with them).
    let failed_over = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..6 {
        let c = portal.client("app", "apppw").await.unwrap();
        writers.push(tokio::spawn(writer(
            c,
            w,
            failed_over.clone(),
            stop.clone(),
        )));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    primary.stop();
    standby.promote();
    portal.wait_leader("pg1").await;
    failed_over.store(true, Relaxed);
    primary.restart_as_standby_of(&standby);
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, Relaxed);

    // The transaction in flight fails with an ErrorResponse, and its client stays usable.
    let e = busy.simple_query("COMMIT").await.unwrap_err();
    assert!(db_text(&e).contains("the transaction was lost"), "{e:?}");
    assert_eq!(query_one(&busy, "SELECT 1").await, "1");
    // Every idle client's next transaction runs on the new leader, with no error and no
    // reconnect.
    let mut ok = 0;
    for c in &clients {
        assert!(!c.is_closed());
        c.simple_query("INSERT INTO t (v) VALUES ('after')")
            .await
            .unwrap();
        ok += 1;
    }
    assert_eq!(ok, IDLE);
    assert_eq!(
        query_one(&clients[0], "SELECT pg_is_in_recovery()::text").await,
        "false"
    );
    assert_eq!(
        standby.psql("SELECT count(*) FROM t WHERE v = 'after'"),
        IDLE.to_string()
    );
    assert_eq!(
        standby.psql("SELECT count(*) FROM t WHERE v = 'in flight'"),
        "0"
    );
    // The writers: still connected, each wrote on the new leader after the failover, only
    // transactions in flight on a server connection the old primary closed failed (none for
    // want of a connection while the leader changed; under load a writer may be caught in
    // flight more than once while the old primary's backends are being terminated), and
    // every write whose COMMIT was acknowledged, before the failover or after, is on the new
    // leader.
    let mut acked = Vec::new();
    let mut errors = Vec::new();
    for (w, h) in writers.into_iter().enumerate() {
        let (c, out) = h.await.unwrap();
        assert!(!c.is_closed(), "writer {w} was disconnected");
        assert!(
            out.acked_after > 0,
            "writer {w} wrote nothing after the failover: {:?}",
            out.errors
        );
        for e in &out.errors {
            assert!(
                e.contains("the transaction in flight") || e.contains("the transaction was lost"),
                "writer {w} failed other than in flight: {e}"
            );
        }
        acked.extend(out.acked);
        errors.extend(out.errors);
    }
    println!("writers: {} acknowledged, errors: {errors:?}", acked.len());
    let on_leader = standby.psql("SELECT string_agg(v, ',') FROM t WHERE v LIKE 'w%'");
    let on_leader: std::collections::HashSet<&str> = on_leader.split(',').collect();
    let lost: Vec<_> = acked
        .iter()
        .filter(|v| !on_leader.contains(v.as_str()))
        .collect();
    assert!(lost.is_empty(), "acknowledged, not on the leader: {lost:?}");
    // The demoted node is a standby that follows the new leader, the portal sees it as
    // such and holds no connection to it.
    assert_eq!(primary.psql("SELECT pg_is_in_recovery()::text"), "true");
    let status = portal.status().await;
    assert_eq!(status["leader"], "pg1", "{status:#}");
    assert_eq!(backends_of(&primary, "app"), 0);
    let count = "SELECT count(*) FROM t";
    wait_until(
        "the demoted node replays the new leader's writes",
        Duration::from_secs(20),
        || primary.try_psql("postgres", PW, count) == standby.try_psql("postgres", PW, count),
    );
    assert!(backends_of(&standby, "app") <= 5);
    let m = portal.metrics().await;
    assert_eq!(
        sample(&m, "dbportal_pool_failed_in_flight_total"),
        1.0 + errors.len() as f64
    );
    let _ = portal.dir();
}
