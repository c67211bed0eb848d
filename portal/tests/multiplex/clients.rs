//! Real clients through the multiplexer: redis-py and redis-cli/redis-benchmark compared
//! with direct, 5,000 clients on four server connections, a slow consumer and a malformed
//! client.

use super::*;

/// redis-py's pipelines, MULTI/EXEC, WATCH with a conflict, pub/sub, blocking pops, SELECT
/// and CLIENT SETNAME/GETNAME give through the portal exactly what they give direct; and the
/// pins they took are counted, and released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_library_sees_the_same_as_direct() {
    if skip_without(&["redis-server", "redis-cli"]) {
        return;
    }
    let Some(python) = python() else { return };
    let redis = Redis::start();
    let p = start_portal(&[&redis], MUX).await;
    p.wait_leader("r0").await;
    let run = |addr: String| {
        let python = python.clone();
        async move { run(python.to_str().unwrap(), &[script(), addr], &[]).await }
    };
    let (ok, direct, err) = run(redis.address()).await;
    assert!(ok, "direct run failed: {err}");
    let (ok, through, err) = run(p.addr.to_string()).await;
    assert!(ok, "run through the portal failed: {err}");
    assert_eq!(through, direct, "through the portal vs direct");
    assert!(
        direct.contains("\"watch_conflict\": \"WatchError\""),
        "{direct}"
    );

    let m = p.metrics().await;
    for reason in ["multi", "watch", "subscribe", "blocking", "select"] {
        let pins = sample(
            &m,
            &format!("dbportal_multiplex_pins_total{{reason=\"{reason}\"}}"),
        );
        assert!(pins >= 1.0, "no pin counted for {reason}");
    }
    // Every state ended: nobody is pinned any more (the clients closed).
    let s = p.status().await;
    let pinned: i64 = s["multiplex"]["pinned"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_i64().unwrap())
        .sum();
    assert_eq!(pinned, 0, "{s:#}");
    assert!(sample(&m, "dbportal_multiplex_dedicated_reused_total") >= 1.0);
}

/// redis-cli and redis-benchmark (pipelined and not) through the portal: every request
/// answered, none with an error, on at most four shared server connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cli_and_redis_benchmark_work_through_the_portal() {
    if skip_without(&["redis-server", "redis-cli", "redis-benchmark"]) {
        return;
    }
    let redis = Redis::start();
    let p = start_portal(&[&redis], MUX).await;
    p.wait_leader("r0").await;
    let port = p.addr.port();
    let cli = |args: &[&str]| {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            redis_cli(port, &args).await
        }
    };
    assert_eq!(cli(&["SET", "a", "1"]).await.1, "OK");
    assert_eq!(cli(&["GET", "a"]).await.1, "1");
    assert_eq!(cli(&["CLIENT", "SETNAME", "x"]).await.1, "OK");
    let id: u64 = cli(&["CLIENT", "ID"]).await.1.parse().unwrap();
    assert!(id > 0);
    assert_eq!(cli(&["SELECT", "0"]).await.1, "OK");

    for pipeline in ["1", "16"] {
        let (ok, out, err) = run(
            "redis-benchmark",
            &[
                "-p",
                &port.to_string(),
                "-t",
                "set,get,incr,lpush,lpop,mset",
                "-n",
                "20000",
                "-c",
                "50",
                "-P",
                pipeline,
                "--csv",
            ],
            &[],
        )
        .await;
        assert!(ok, "redis-benchmark -P {pipeline}: {err}");
        assert_eq!(out.lines().count(), 7, "{out}");
        assert!(!out.contains("ERR"), "{out}");
    }
    assert_eq!(redis.cli(&["LLEN", "mylist"]), "0");
    let shared = server_clients(&redis)
        .iter()
        .filter(|l| !l.contains("cmd=ping") && !l.contains("cmd=info"))
        .count();
    assert!(shared <= 4, "{:#?}", server_clients(&redis));
    let m = p.metrics().await;
    assert!(sample(&m, "dbportal_multiplex_commands_total") >= 240_000.0);
    // Pipelining clients keep their pipelines: batches hold many commands.
    let batches = sample(&m, "dbportal_multiplex_batch_size_count");
    assert!(
        sample(&m, "dbportal_multiplex_commands_total") / batches > 2.0,
        "{m}"
    );
}

/// 5,000 clients on 4 server connections: CLIENT LIST on the server sees the four (and the
/// probe), each client gets its own replies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_clients_share_four_server_connections() {
    if skip_without(&["redis-server", "redis-cli"]) {
        return;
    }
    let redis = Redis::start_with(&["--maxclients", "100"]);
    let p = start_portal(&[&redis], MUX).await;
    p.wait_leader("r0").await;
    const N: usize = 5000;
    let mut clients = Vec::with_capacity(N);
    let started = Instant::now();
    for _ in 0..N {
        clients.push(TcpStream::connect(p.addr).await.unwrap());
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "connecting took too long"
        );
    }
    // Each client writes its key then reads it back, all at once.
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut s)| {
            tokio::spawn(async move {
                let key = format!("c:{i}");
                let value = format!("v{i}");
                s.write_all(&[resp(&["SET", &key, &value]), resp(&["GET", &key])].concat())
                    .await
                    .unwrap();
                let got = replies(&mut s, 2).await.unwrap();
                assert_eq!(
                    got,
                    ["+OK".to_string(), format!("${}\r\n{value}", value.len())]
                );
                s
            })
        })
        .collect();
    let mut open = Vec::with_capacity(N);
    for t in tasks {
        open.push(t.await.unwrap());
    }
    assert_eq!(redis.cli(&["DBSIZE"]), N.to_string());
    let on_server = server_clients(&redis);
    let s = p.status().await;
    assert_eq!(s["multiplex"]["clients"], N as i64, "{s:#}");
    eprintln!(
        "{N} clients: {} connections on the server: {on_server:#?}",
        on_server.len()
    );
    // Four shared connections and the health checker's probe connections (one per probe,
    // closed after it).
    let shared: Vec<_> = on_server
        .iter()
        .filter(|l| l.contains("cmd=get") || l.contains("cmd=set"))
        .collect();
    assert!(shared.len() <= 4, "{on_server:#?}");
    assert!(on_server.len() <= 6, "{on_server:#?}");
    drop(open);
}

/// Many clients pipelining plain commands mixed with ones the portal answers itself (CLIENT
/// SETNAME / GETNAME) get every reply in order, with `maxInFlight` at its default and at 1 (a
/// single command in flight on the one shared connection: every other client waits its
/// turn). Replies to plain clients may be written to their sockets by the shared
/// connection's reader; the portal's own answers must never be overtaken by them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_stay_in_order_around_local_answers_and_under_max_in_flight() {
    if skip_without(&["redis-server"]) {
        return;
    }
    let redis = Redis::start();
    for extra in ["", ", maxInFlight: 1"] {
        let p = start_portal(
            &[&redis],
            &format!("pooling: {{mode: multiplex, serverConnections: 1{extra}}}\n"),
        )
        .await;
        p.wait_leader("r0").await;
        const CLIENTS: usize = 24;
        const ROUNDS: usize = 40;
        let tasks: Vec<_> = (0..CLIENTS)
            .map(|c| {
                let addr = p.addr;
                tokio::spawn(async move {
                    let mut s = TcpStream::connect(addr).await.unwrap();
                    let key = format!("order:{c}");
                    let mut batch = Vec::new();
                    let mut want = Vec::new();
                    for r in 0..ROUNDS {
                        let value = format!("{c}-{r}");
                        let name = format!("n{c}x{r}");
                        for cmd in [
                            vec!["SET", key.as_str(), value.as_str()],
                            vec!["GET", key.as_str()],
                            vec!["CLIENT", "SETNAME", name.as_str()],
                            vec!["INCR", "order:count"],
                            vec!["CLIENT", "GETNAME"],
                            vec!["ECHO", value.as_str()],
                        ] {
                            batch.extend_from_slice(&resp(&cmd));
                        }
                        want.push("+OK".to_string());
                        want.push(format!("${}\r\n{value}", value.len()));
                        want.push("+OK".to_string());
                        want.push(String::new()); // INCR: any integer
                        want.push(format!("${}\r\n{name}", name.len()));
                        want.push(format!("${}\r\n{value}", value.len()));
                    }
                    // Written in pieces, so that the portal sees the pipeline in several reads.
                    for piece in batch.chunks(977) {
                        s.write_all(piece).await.unwrap();
                    }
                    let got = replies(&mut s, want.len()).await.unwrap();
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        if w.is_empty() {
                            assert!(g.starts_with(':'), "client {c}, reply {i}: {g:?}");
                        } else {
                            assert_eq!(g, w, "client {c}, reply {i}");
                        }
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(
            redis.cli(&["GET", "order:count"]),
            (CLIENTS * ROUNDS * if extra.is_empty() { 1 } else { 2 }).to_string(),
            "maxInFlight{extra}"
        );
    }
}

/// A client that stops reading is cut at clientOutputLimit; another client's replies on the
/// same shared connection keep coming meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_cut_without_stalling_others() {
    if skip_without(&["redis-server", "redis-cli"]) {
        return;
    }
    let redis = Redis::start();
    let p = start_portal(
        &[&redis],
        "pooling: {mode: multiplex, serverConnections: 1, clientOutputLimit: 256Ki}\n",
    )
    .await;
    p.wait_leader("r0").await;
    let big = "x".repeat(64 * 1024);
    redis.cli(&["SET", "big", &big]);

    let mut slow = TcpStream::connect(p.addr).await.unwrap();
    let mut fast = TcpStream::connect(p.addr).await.unwrap();
    assert_eq!(command(&mut fast, &["PING"]).await.unwrap(), "+PONG");
    // 200 GETs of 64 KiB: 12.8 MiB of replies the slow client never reads.
    let mut burst = Vec::new();
    for _ in 0..200 {
        burst.extend_from_slice(&resp(&["GET", "big"]));
    }
    slow.write_all(&burst).await.unwrap();
    for i in 0..50 {
        let key = format!("f{i}");
        assert_eq!(
            command(&mut fast, &["SET", &key, "1"]).await.unwrap(),
            "+OK"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = p.metrics().await;
        if sample(&m, "dbportal_multiplex_slow_consumers_cut_total") >= 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the slow client was not cut: {m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The slow client's connection is closed: reading drains what was sent, then EOF.
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0;
        loop {
            match slow.read(&mut buf).await {
                Ok(0) | Err(_) => return total,
                Ok(n) => total += n,
            }
        }
    })
    .await
    .expect("the slow client stayed open");
    assert!(
        closed < 200 * big.len(),
        "the slow client got every reply ({closed} bytes)"
    );
    assert_eq!(
        command(&mut fast, &["GET", "f49"]).await.unwrap(),
        "$1\r\n1"
    );
}

/// A malformed or too large command closes that client with a RESP error; the server
/// connection and the other clients go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_client_gets_an_error_and_others_go_on() {
    if skip_without(&["redis-server", "redis-cli"]) {
        return;
    }
    let redis = Redis::start();
    let p = start_portal(&[&redis], MUX).await;
    p.wait_leader("r0").await;
    let mut good = TcpStream::connect(p.addr).await.unwrap();
    assert_eq!(command(&mut good, &["SET", "a", "1"]).await.unwrap(), "+OK");
    for (bad, needle) in [
        (&b"*1\r\n$99999999999\r\n"[..], "invalid bulk length"),
        (b"*2\r\n:1\r\n", "expected '$', got ':'"),
        (b"*1\r\n$-1\r\n", "invalid bulk length"),
    ] {
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        // A valid command first: its reply comes before the error.
        s.write_all(&[resp(&["GET", "a"]), bad.to_vec()].concat())
            .await
            .unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
            .await
            .expect("the malformed client stayed open")
            .unwrap();
        let out = String::from_utf8_lossy(&out);
        assert!(out.starts_with("$1\r\n1\r\n-ERR Protocol error: "), "{out}");
        assert!(out.contains(needle), "{out}");
        assert_eq!(command(&mut good, &["GET", "a"]).await.unwrap(), "$1\r\n1");
    }
    let m = p.metrics().await;
    assert_eq!(sample(&m, "dbportal_multiplex_protocol_errors_total"), 3.0);
    assert_eq!(sample(&m, "dbportal_multiplex_replies_failed_total"), 0.0);
}
