//! etcd: three members. Every member replicates the raft log and serves reads; the one the main
//! listener leads with takes none on the read-only listener. etcd has no read-only member that
//! refuses writes (a follower forwards them to the raft leader), so no write is refused here.

use super::*;

/// The member id of the etcd member a new HTTP client through `addr` reaches.
async fn member_id(addr: SocketAddr) -> String {
    let (code, body) = http(addr, "POST", "/v3/maintenance/status", None, "{}").await;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["header"]["member_id"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| v["header"]["member_id"].to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_reads_go_to_the_members_the_main_listener_does_not_lead_with() {
    if skip_without(&["etcd", "etcdctl"]) {
        return;
    }
    let mut etcd = tokio::task::spawn_blocking(|| Etcd::cluster(3))
        .await
        .unwrap();
    let addrs: Vec<SocketAddr> = etcd
        .members
        .iter()
        .map(|m| loopback(m.client_port))
        .collect();
    let mut ids = Vec::new();
    for a in &addrs {
        ids.push(member_id(*a).await);
    }
    let ids_of = |i: &[usize]| -> BTreeSet<String> { i.iter().map(|&i| ids[i].clone()).collect() };
    let backends = [("e0", addrs[0]), ("e1", addrs[1]), ("e2", addrs[2])];
    let portal = ReadPortal::start("etcd", &backends, "maxLag: 5s", "").await;
    // The main listener leads with one member (the first to answer); the others serve reads.
    let s = portal
        .wait_status("a leader", Duration::from_secs(10), |s| {
            s["leader"].is_string()
        })
        .await;
    let name = |i: usize| backends[i].0;
    let lead = (0..3).find(|&i| s["leader"] == name(i)).expect("a member");
    let (x, y) = match lead {
        0 => (1, 2),
        1 => (0, 2),
        _ => (0, 1),
    };
    portal
        .wait_serving(&[name(x), name(y)], Duration::from_secs(15))
        .await;
    let ro = portal.reads;

    // Reads spread over the two members the main listener does not use.
    assert_eq!(answers(8, || member_id(ro)).await, ids_of(&[x, y]));
    assert_eq!(member_id(portal.addr).await, ids[lead]);
    let s = portal.status().await;
    assert_eq!(s["backends"][x]["replication"]["state"], "within", "{s:#}");
    let m = portal.metrics().await;
    let gauge = format!(
        "dbportal_backend_replication_lag_seconds{{backend=\"{}\"}}",
        name(y)
    );
    assert!(metric(&m, &gauge).is_some(), "{m}");

    // A member that stops leaves the set; restarted, it rejoins the cluster and the set.
    etcd.members[y].stop();
    portal
        .wait_serving(&[name(x)], Duration::from_secs(10))
        .await;
    assert_eq!(answers(4, || member_id(ro)).await, ids_of(&[x]));
    tokio::task::block_in_place(|| etcd.members[y].restart());
    portal
        .wait_serving(&[name(x), name(y)], Duration::from_secs(20))
        .await;

    // The member the main listener uses stops: the first other one leads and leaves the set;
    // the former one, back, joins the set.
    etcd.members[lead].stop();
    portal.wait_leader(name(x)).await;
    portal
        .wait_serving(&[name(y)], Duration::from_secs(10))
        .await;
    assert_eq!(member_id(portal.addr).await, ids[x]);
    assert_eq!(answers(4, || member_id(ro)).await, ids_of(&[y]));
    tokio::task::block_in_place(|| etcd.members[lead].restart());
    let mut both = [name(lead), name(y)];
    both.sort();
    portal.wait_serving(&both, Duration::from_secs(20)).await;
    assert_eq!(
        portal.status().await["leader"],
        name(x),
        "the main listener stays"
    );

    // A portal over x and y only: with the one it does not lead with stopped, no replica is
    // left (the cluster keeps its quorum with the third). With the fallback the leader serves
    // reads; without (a reload), HTTP 503; back, the member serves reads again.
    let pair = [backends[x], backends[y]];
    let two = ReadPortal::start("etcd", &pair, "", "").await;
    let s = two
        .wait_status("a leader", Duration::from_secs(10), |s| {
            s["leader"].is_string()
        })
        .await;
    let (l2, r2) = if s["leader"] == name(x) {
        (x, y)
    } else {
        (y, x)
    };
    two.wait_serving(&[name(r2)], Duration::from_secs(15)).await;
    etcd.members[r2].stop();
    two.wait_serving(&[name(l2)], Duration::from_secs(10)).await;
    assert_eq!(answers(2, || member_id(two.reads)).await, ids_of(&[l2]));
    rewrite_config(&two.path, |yaml| {
        yaml.replace("readOnly: {", "readOnly: {fallbackToLeader: false, ")
    });
    two.wait_status("the reload", Duration::from_secs(10), |s| {
        s["readOnly"]["fallbackToLeader"] == false
    })
    .await;
    two.wait_serving(&[], Duration::from_secs(10)).await;
    let (code, body) = http(two.reads, "POST", "/v3/maintenance/status", None, "{}").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("readOnly.maxLag"), "{body}");
    tokio::task::block_in_place(|| etcd.members[r2].restart());
    two.wait_serving(&[name(r2)], Duration::from_secs(20)).await;
    assert_eq!(member_id(two.reads).await, ids[r2]);
}
