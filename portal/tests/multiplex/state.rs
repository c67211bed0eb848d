//! What ends, or outlives, a pinned client's state on its dedicated connection, compared
//! with direct: RESET (the replies before its answer delivered, the client then logged in as
//! any client, the connection cleaned before another client gets it), and a transaction
//! whose EXEC subscribes. Another client works on the shared connections all along.

use super::*;

/// The portal with probe credentials in front of a server that requires a password, and a
/// bystander.
async fn portal_with_password(
    redis: &Redis,
) -> (
    Standalone,
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<(u64, Option<String>)>,
) {
    let p = start_portal(
        &[redis],
        "healthCheck: {interval: 200ms, rise: 1, fall: 1, credentials: {password: server-secret}}\npooling: {mode: multiplex, serverConnections: 1}\n",
    )
    .await;
    p.wait_leader("r0").await;
    let (stop, task) = desync::bystander(p.addr);
    (p, stop, task)
}

/// Every reply up to and including `last`, read within 10 seconds.
async fn replies_until(s: &mut TcpStream, last: &str) -> Vec<String> {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 1 << 16];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut out = Vec::new();
        let mut pos = 0;
        while let Ok(Some(r)) = portal::wire::resp::scan_reply(&buf[pos..]) {
            out.push(
                String::from_utf8_lossy(&buf[pos..pos + r.len])
                    .trim_end()
                    .to_string(),
            );
            pos += r.len;
        }
        if out.last().is_some_and(|r| r == last) {
            return out;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, s.read(&mut chunk))
            .await
            .unwrap_or_else(|_| {
                let tail = &out[out.len().saturating_sub(3)..];
                panic!(
                    "no {last} within 10 s: {} replies, ending {tail:?}",
                    out.len()
                )
            })
            .unwrap();
        assert!(n > 0, "closed after {} replies", out.len());
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// RESET of a pinned client, with commands pipelined behind it: the portal's part of the
/// session ends too (the name), the server's RESET does not log the client's next commands
/// out of the probe's user, and they run on database 0 again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_of_a_pinned_client_ends_its_state_and_keeps_it_logged_in() {
    if skip_without(&["redis-server"]) {
        return;
    }
    let redis = Redis::start_with(&["--requirepass", "server-secret"]);
    let (p, stop, task) = portal_with_password(&redis).await;
    let script = [
        resp(&["CLIENT", "SETNAME", "before"]),
        resp(&["SELECT", "9"]),
        resp(&["SET", "reset-key", "nine"]),
        resp(&["RESET"]),
        resp(&["GET", "reset-key"]),
        resp(&["CLIENT", "GETNAME"]),
        resp(&["SELECT", "9"]),
        resp(&["GET", "reset-key"]),
        resp(&["RESET"]),
        resp(&["ECHO", "end"]),
    ]
    .concat();
    let want = [
        "+OK",
        "+OK",
        "+OK",
        "+RESET",
        "$-1",
        "$-1",
        "+OK",
        "$4\r\nnine",
        "+RESET",
        "$3\r\nend",
    ];
    for round in 0..3 {
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        s.write_all(&script).await.unwrap();
        let got = replies(&mut s, want.len()).await.unwrap();
        assert_eq!(got, want, "round {round}");
        assert_eq!(command(&mut s, &["DEL", "reset-key"]).await.unwrap(), ":0");
    }
    // A CLIENT REPLY SKIP before RESET silences its +RESET, as Redis' RESET keeps a SKIP
    // (`clearClientConnectionState` clears OFF, not SKIP).
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(
        &[
            resp(&["SELECT", "9"]),
            resp(&["CLIENT", "REPLY", "SKIP"]),
            resp(&["RESET"]),
            resp(&["ECHO", "after"]),
        ]
        .concat(),
    )
    .await
    .unwrap();
    assert_eq!(replies(&mut s, 2).await.unwrap(), ["+OK", "$5\r\nafter"]);
    desync::bystander_unharmed(&p, stop, task).await;
}

/// RESET of a subscribed client while messages stream in: every message the server sent
/// before its `+RESET` reaches the client, none after; the connection, cleaned, serves the
/// next pinned clients without a stray reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_of_a_subscriber_delivers_the_messages_before_it() {
    if skip_without(&["redis-server"]) {
        return;
    }
    let redis = Redis::start_with(&["--requirepass", "server-secret"]);
    let (p, stop, task) = portal_with_password(&redis).await;
    for round in 0..3 {
        let mut sub = TcpStream::connect(p.addr).await.unwrap();
        let subscribed = command(&mut sub, &["SUBSCRIBE", "storm"]).await.unwrap();
        assert!(subscribed.contains("subscribe"), "{subscribed}");
        // The publisher sends its PUBLISHes in one write; RESET goes while they run.
        let mut publisher = TcpStream::connect(p.addr).await.unwrap();
        let publishes: Vec<u8> = (0..500)
            .flat_map(|i| resp(&["PUBLISH", "storm", &i.to_string()]))
            .collect();
        publisher.write_all(&publishes).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
        sub.write_all(&[resp(&["RESET"]), resp(&["PING"])].concat())
            .await
            .unwrap();
        let published = replies(&mut publisher, 500).await.unwrap();
        let delivered = published.iter().filter(|r| *r == ":1").count();
        // Everything up to +RESET and the PING's +PONG after it, kept whole.
        let all = replies_until(&mut sub, "+PONG").await;
        let at = all.iter().position(|r| r == "+RESET").expect("+RESET");
        assert_eq!(all[at + 1..], ["+PONG"], "round {round}");
        let got = &all[..at];
        assert_eq!(
            got.len(),
            delivered,
            "round {round}: every message sent before +RESET"
        );
        for (i, m) in got.iter().enumerate() {
            assert!(m.contains("message"), "round {round}: {m}");
            assert!(
                m.ends_with(&format!("\r\n{i}")),
                "round {round}: in order: {m}"
            );
        }
        assert_eq!(
            command(&mut publisher, &["PUBLISH", "storm", "late"])
                .await
                .unwrap(),
            ":0",
            "round {round}: unsubscribed"
        );
        // Other clients take the dedicated connections in turn: none sees a stray reply.
        for i in 0..4 {
            let mut next = TcpStream::connect(p.addr).await.unwrap();
            let db = (i % 3 + 1).to_string();
            let got = [
                command(&mut next, &["SELECT", &db]).await.unwrap(),
                command(&mut next, &["ECHO", &db]).await.unwrap(),
                command(&mut next, &["CLIENT", "INFO"]).await.unwrap(),
            ];
            assert_eq!(got[..2], ["+OK".to_string(), format!("$1\r\n{db}")]);
            assert!(got[2].contains(&format!(" db={db} ")), "{}", got[2]);
            assert!(got[2].contains(" sub=0 psub=0 "), "{}", got[2]);
        }
    }
    desync::bystander_unharmed(&p, stop, task).await;
}

/// MULTI, SUBSCRIBE, EXEC: the client is subscribed once EXEC has run, as direct, and stays
/// so (its connection is not given back behind it); a PUBLISH reaches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_that_subscribes_leaves_the_client_subscribed() {
    if skip_without(&["redis-server"]) {
        return;
    }
    let redis = Redis::start();
    let (p, stop, task) = desync::portal_with_bystander(&redis).await;
    for addr in [redis.address(), p.addr.to_string()] {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        s.write_all(
            &[
                resp(&["MULTI"]),
                resp(&["SUBSCRIBE", "in-exec"]),
                resp(&["EXEC"]),
            ]
            .concat(),
        )
        .await
        .unwrap();
        let got = replies(&mut s, 3).await.unwrap();
        assert_eq!(
            got,
            [
                "+OK",
                "+QUEUED",
                "*1\r\n*3\r\n$9\r\nsubscribe\r\n$7\r\nin-exec\r\n:1"
            ],
            "{addr}"
        );
        // Time for a connection given back to be cleaned (unsubscribed) behind the client.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut publisher = TcpStream::connect(&addr).await.unwrap();
        assert_eq!(
            command(&mut publisher, &["PUBLISH", "in-exec", "hi"])
                .await
                .unwrap(),
            ":1",
            "{addr}"
        );
        assert_eq!(
            replies(&mut s, 1).await.unwrap()[0],
            "*3\r\n$7\r\nmessage\r\n$7\r\nin-exec\r\n$2\r\nhi",
            "{addr}"
        );
        s.write_all(&resp(&["UNSUBSCRIBE"])).await.unwrap();
        assert_eq!(
            replies(&mut s, 1).await.unwrap()[0],
            "*3\r\n$11\r\nunsubscribe\r\n$7\r\nin-exec\r\n:0",
            "{addr}"
        );
    }
    desync::bystander_unharmed(&p, stop, task).await;
}
