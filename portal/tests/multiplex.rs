//! Redis multiplexing (`pooling.mode: multiplex`) through the standalone portal in front of
//! real redis-server processes on loopback, with real clients: redis-cli, redis-benchmark and
//! redis-py (Debian's python3-redis) compared with the same calls made direct; thousands of
//! clients on four server connections; a slow consumer; a malformed client; failover with idle
//! and busy clients; AUTH with ACL users; SCRIPT KILL, FUNCTION KILL and SHUTDOWN NOSAVE
//! reaching a server busy with a script on a shared connection.

mod common;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use common::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// The standalone portal in front of `backends` (r0, r1, ...) with `extra` YAML (`$DIR` in it
/// names a private directory), room for thousands of clients and a fast health check unless
/// `extra` sets one.
async fn start_portal(backends: &[&Redis], extra: &str) -> Standalone {
    let dir = TempDir::new("mux-portal");
    let mut yaml = "engine: redis\nlisten: 127.0.0.1:0\nadmin: 127.0.0.1:0\ntls: {mode: disabled}\nlimits: {maxConnections: 12000, maxNegotiating: 12000, maxNegotiatingPerClient: 0}\nbackends:\n".to_string();
    if !extra.contains("healthCheck:") {
        yaml.insert_str(0, "healthCheck: {interval: 200ms, rise: 1, fall: 1}\n");
    }
    for (i, b) in backends.iter().enumerate() {
        yaml.push_str(&format!(
            "  - {{name: r{i}, address: \"{}\"}}\n",
            b.address()
        ));
    }
    yaml.push_str(&extra.replace("$DIR", &dir.path().display().to_string()));
    PortalBuilder::new(&yaml).in_dir(dir).standalone().await
}

/// Reads until `n` complete replies are in (simple parser for the tests' replies).
async fn replies(s: &mut TcpStream, n: usize) -> std::io::Result<Vec<String>> {
    let mut buf = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut out = Vec::new();
        let mut pos = 0;
        while out.len() < n {
            match portal::wire::resp::scan_reply(&buf[pos..]) {
                Ok(Some(r)) => {
                    out.push(
                        String::from_utf8_lossy(&buf[pos..pos + r.len])
                            .trim_end()
                            .to_string(),
                    );
                    pos += r.len;
                }
                _ => break,
            }
        }
        if out.len() == n {
            return Ok(out);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let mut chunk = vec![0u8; 65536];
        let read = tokio::time::timeout(left, s.read(&mut chunk))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no reply"))??;
        if read == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("closed after {}", String::from_utf8_lossy(&buf)),
            ));
        }
        buf.extend_from_slice(&chunk[..read]);
    }
}

async fn command(s: &mut TcpStream, args: &[&str]) -> std::io::Result<String> {
    s.write_all(&resp(args)).await?;
    Ok(replies(s, 1).await?.remove(0))
}

/// The server's clients other than the one asking (CLIENT LIST through redis-cli).
fn server_clients(redis: &Redis) -> Vec<String> {
    redis
        .cli(&["CLIENT", "LIST"])
        .lines()
        .filter(|l| !l.contains("cmd=client|list"))
        .map(str::to_string)
        .collect()
}

fn python() -> Option<PathBuf> {
    let ok = std::process::Command::new("/usr/bin/python3")
        .args(["-c", "import redis"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("skipped: /usr/bin/python3 with python3-redis not installed");
    }
    ok.then(|| PathBuf::from("/usr/bin/python3"))
}

fn script() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/multiplex/client.py").to_string()
}

const MUX: &str = "pooling: {mode: multiplex, serverConnections: 4}\n";

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
        (
            &b"*1\r\n$99999999999\r\n"[..],
            "invalid bulk length 99999999999",
        ),
        (b"*2\r\n:1\r\n", "expected '$' at byte 4"),
        (b"*1\r\n$3\r\nGETxx\r\n", "does not end with CRLF"),
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

/// AUTH and HELLO are answered by the portal against `pooling.auth.usersFile` (the default
/// user and ACL users); the server connections log in with the probe credentials, and no
/// client password ever reaches the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_with_acl_users_is_answered_by_the_portal() {
    if skip_without(&["redis-server", "redis-cli"]) {
        return;
    }
    let redis = Redis::start_with(&["--requirepass", "server-secret"]);
    let users = TempDir::new("mux-users");
    let file = users.path().join("users.yaml");
    std::fs::write(&file, "default: pw-default\nalice: pw-alice\n").unwrap();
    let extra = format!(
        "healthCheck: {{interval: 200ms, rise: 1, fall: 1, credentials: {{password: server-secret}}}}\npooling: {{mode: multiplex, auth: {{usersFile: {}}}}}\n",
        file.display()
    );
    let p = start_portal(&[&redis], &extra).await;
    p.wait_leader("r0").await;

    let mut s = TcpStream::connect(p.addr).await.unwrap();
    assert_eq!(
        command(&mut s, &["GET", "a"]).await.unwrap(),
        "-NOAUTH Authentication required."
    );
    assert!(command(&mut s, &["AUTH", "server-secret"])
        .await
        .unwrap()
        .starts_with("-WRONGPASS"));
    assert!(command(&mut s, &["AUTH", "alice", "pw-default"])
        .await
        .unwrap()
        .starts_with("-WRONGPASS"));
    assert_eq!(
        command(&mut s, &["AUTH", "alice", "pw-alice"])
            .await
            .unwrap(),
        "+OK"
    );
    assert_eq!(command(&mut s, &["SET", "a", "1"]).await.unwrap(), "+OK");

    let mut d = TcpStream::connect(p.addr).await.unwrap();
    assert_eq!(
        command(&mut d, &["AUTH", "pw-default"]).await.unwrap(),
        "+OK"
    );
    assert_eq!(command(&mut d, &["GET", "a"]).await.unwrap(), "$1\r\n1");
    let mut h = TcpStream::connect(p.addr).await.unwrap();
    let hello = command(
        &mut h,
        &["HELLO", "2", "AUTH", "alice", "pw-alice", "SETNAME", "h"],
    )
    .await
    .unwrap();
    assert!(hello.contains("proto\r\n:2"), "{hello}");
    assert_eq!(
        command(&mut h, &["CLIENT", "GETNAME"]).await.unwrap(),
        "$1\r\nh"
    );
    assert_eq!(command(&mut h, &["PING"]).await.unwrap(), "+PONG");

    // redis-cli with a user and a password, and a pipeline through redis-py.
    let (_, out, _) = redis_cli(
        p.addr.port(),
        &[
            "--user",
            "alice",
            "--pass",
            "pw-alice",
            "--no-auth-warning",
            "GET",
            "a",
        ],
    )
    .await;
    assert_eq!(out, "1");
    if let Some(python) = python() {
        let (ok, out, err) = run(
            python.to_str().unwrap(),
            &[
                script(),
                p.addr.to_string(),
                "alice".into(),
                "pw-alice".into(),
            ],
            &[],
        )
        .await;
        assert!(ok, "{err}");
        assert!(out.contains("\"watch_conflict\": \"WatchError\""), "{out}");
    }

    // The server never saw a client's password: every connection it has is the portal's
    // (logged in with the probe's credentials, as user default).
    let (_, list, _) = redis_cli(
        redis.port,
        &["-a", "server-secret", "--no-auth-warning", "CLIENT", "LIST"],
    )
    .await;
    assert!(list.lines().all(|l| l.contains("user=default")), "{list}");
    assert!(!list.contains("alice"), "{list}");
}

/// Failover: the leader is switched over. Idle clients stay connected and their next command
/// runs on the new leader; busy clients get errors only for the commands in flight at the
/// change; nothing is written to the demoted node afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_keeps_idle_clients_and_writes_nothing_to_the_demoted_node() {
    if skip_without(&["redis-server", "redis-cli"]) {
        return;
    }
    let a = Redis::start();
    let b = Redis::replica_of(a.port);
    b.wait_replicating();
    let p = start_portal(&[&a, &b], MUX).await;
    p.wait_leader("r0").await;

    let mut idle = Vec::new();
    for i in 0..100 {
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        let key = format!("idle:{i}");
        assert_eq!(command(&mut s, &["SET", &key, "a"]).await.unwrap(), "+OK");
        idle.push(s);
    }
    // Busy clients: pipelines of INCR until told to stop, counting replies by kind.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let busy: Vec<_> = (0..8)
        .map(|i| {
            let stop = stop.clone();
            let addr = p.addr;
            tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.unwrap();
                let key = format!("busy:{i}");
                let (mut ok, mut errors, mut other) = (0u64, Vec::new(), Vec::new());
                let batch: Vec<u8> = (0..16).flat_map(|_| resp(&["INCR", &key])).collect();
                let started = Instant::now();
                while !stop.load(std::sync::atomic::Ordering::Relaxed)
                    && started.elapsed() < Duration::from_secs(30)
                {
                    s.write_all(&batch).await.unwrap();
                    for r in replies(&mut s, 16).await.unwrap() {
                        if r.starts_with(':') {
                            ok += 1;
                        } else if r.starts_with('-') {
                            errors.push(r);
                        } else {
                            other.push(r);
                        }
                    }
                }
                (ok, errors, other)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Switchover: b is promoted, a is demoted (to a replica of nothing, so that its keyspace
    // stays as it is: any write reaching it would show).
    b.cli(&["REPLICAOF", "NO", "ONE"]);
    a.cli(&["REPLICAOF", "127.0.0.1", &free_port().to_string()]);
    p.wait_leader("r1").await;
    let keys_on_a = a.cli(&["DBSIZE"]);
    let busy_on_a: Vec<String> = (0..8)
        .map(|i| a.cli(&["GET", &format!("busy:{i}")]))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total_ok = 0;
    for t in busy {
        let (ok, errors, other) = t.await.unwrap();
        total_ok += ok;
        assert!(other.is_empty(), "{other:?}");
        for e in &errors {
            // Only commands in flight at the change: TRYAGAIN, or READONLY from the demoted
            // node before the probe saw it demoted.
            assert!(
                e.starts_with("-TRYAGAIN") || e.starts_with("-READONLY"),
                "{e}"
            );
        }
    }
    assert!(total_ok > 0);

    // Idle clients: still connected, their next command runs on the new leader.
    for (i, s) in idle.iter_mut().enumerate() {
        let key = format!("idle:{i}");
        assert_eq!(
            command(s, &["SET", &key, "b"]).await.unwrap(),
            "+OK",
            "idle client {i}"
        );
    }
    assert_eq!(b.cli(&["GET", "idle:7"]), "b");
    // Nothing reached the demoted node after the change was seen.
    assert_eq!(a.cli(&["DBSIZE"]), keys_on_a);
    for (i, before) in busy_on_a.iter().enumerate() {
        assert_eq!(&a.cli(&["GET", &format!("busy:{i}")]), before);
    }
    assert_eq!(a.cli(&["GET", "idle:7"]), "a");
    let m = p.metrics().await;
    assert_eq!(
        sample(&m, "dbportal_sessions_closed_total{reason=\"backend\"}"),
        0.0,
        "no client was cut"
    );
}

/// Without a leader a command waits up to `timeouts.connect` and then gets an error reply;
/// the client stays connected, and its next command runs once a leader is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_leader_commands_get_an_error_and_the_client_stays() {
    if skip_without(&["redis-server", "redis-cli"]) {
        return;
    }
    let mut redis = Redis::start();
    let p = start_portal(
        &[&redis],
        "timeouts: {connect: 1s}\npooling: {mode: multiplex}\n",
    )
    .await;
    p.wait_leader("r0").await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    assert_eq!(command(&mut s, &["SET", "a", "1"]).await.unwrap(), "+OK");

    redis.kill();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = p.status().await;
        if st["leader"].is_null() {
            break;
        }
        assert!(Instant::now() < deadline, "the leader stayed: {st:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reply = command(&mut s, &["GET", "a"]).await.unwrap();
    assert!(reply.starts_with("-ERR no backend available"), "{reply}");

    redis.restart();
    p.wait_leader("r0").await;
    assert_eq!(command(&mut s, &["SET", "b", "2"]).await.unwrap(), "+OK");
    assert_eq!(redis.cli(&["GET", "b"]), "2");
}

/// The portal's data-plane threads, as it counts them: sessions are spread over them in turn,
/// and each has shared server connections of its own.
fn data_plane_threads() -> usize {
    std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// A leader whose one shared server connection (per data-plane thread) runs a script past
/// `busy-reply-threshold`: Redis reads nothing more from that connection until the script
/// ends.
struct BusyLeader {
    leader: Redis,
    _replica: Option<Redis>,
    portal: Standalone,
    /// The client whose script runs; its reply comes when the script ends.
    runner: TcpStream,
    /// Clients that only move the next one onto the runner's data-plane thread.
    _others: Vec<TcpStream>,
}

impl BusyLeader {
    /// Starts a leader (with a replica when `replica`), runs `setup` on it directly, and
    /// sends `start` (the script) through the portal. Returns once the probe sees it busy.
    async fn start(replica: bool, setup: &[&str], start: &[&str]) -> BusyLeader {
        let leader = Redis::start_with(&["--busy-reply-threshold", "100"]);
        let replica = replica.then(|| Redis::replica_of(leader.port));
        if let Some(r) = &replica {
            r.wait_replicating();
        }
        if !setup.is_empty() {
            leader.cli(setup);
        }
        let mut backends = vec![&leader];
        backends.extend(replica.as_ref());
        let portal = start_portal(
            &backends,
            "healthCheck: {interval: 100ms, rise: 1, fall: 2}\ntimeouts: {check: 1s}\n\
             pooling: {mode: multiplex, serverConnections: 1}\n",
        )
        .await;
        portal.wait_leader("r0").await;
        // Sessions go to the data-plane threads in turn: after the runner, one client on each
        // other thread, so that the next client shares the runner's thread and its one shared
        // connection, the one the script will hold.
        let mut runner = TcpStream::connect(portal.addr).await.unwrap();
        assert_eq!(command(&mut runner, &["PING"]).await.unwrap(), "+PONG");
        let mut others = Vec::new();
        for _ in 1..data_plane_threads() {
            let mut s = TcpStream::connect(portal.addr).await.unwrap();
            assert_eq!(command(&mut s, &["PING"]).await.unwrap(), "+PONG");
            others.push(s);
        }
        // Bounded (tens of seconds at most) in case the kill never arrives.
        runner.write_all(&resp(start)).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = portal.status().await;
            if s["backends"][0]["state"] == "busy" {
                assert_eq!(s["leader"], "r0", "a busy leader stays the leader: {s:#}");
                break;
            }
            assert!(Instant::now() < deadline, "r0 not busy: {s:#}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        BusyLeader {
            leader,
            _replica: replica,
            portal,
            runner,
            _others: others,
        }
    }
}

/// A new client's `kill` (SCRIPT KILL, FUNCTION KILL) through the portal reaches the busy
/// leader, although the shared connection it would use waits behind the script: the script
/// ends with its error, the shared connection serves again, and the leader never changed.
async fn busy_script_is_killed_through_the_portal(setup: &[&str], start: &[&str], kill: &[&str]) {
    let mut busy = BusyLeader::start(true, setup, start).await;
    let p = &busy.portal;
    let mut user = TcpStream::connect(p.addr).await.unwrap();
    let r = command(&mut user, kill).await.unwrap();
    assert_eq!(r, "+OK", "{kill:?} through the portal");
    let ended = replies(&mut busy.runner, 1).await.unwrap().remove(0);
    assert!(
        ended.starts_with('-') && ended.to_lowercase().contains("kill"),
        "the script ends, killed: {ended}"
    );
    // The shared connection the script held serves both clients again.
    assert_eq!(
        command(&mut user, &["SET", "after", "1"]).await.unwrap(),
        "+OK"
    );
    assert_eq!(
        command(&mut busy.runner, &["GET", "after"]).await.unwrap(),
        "$1\r\n1"
    );
    let m = p.metrics().await;
    assert_eq!(sample(&m, "dbportal_multiplex_out_of_band_total"), 1.0);
    let deadline = Instant::now() + Duration::from_secs(5);
    let s = loop {
        let s = p.status().await;
        if s["backends"][0]["state"] == "up" {
            break s;
        }
        assert!(Instant::now() < deadline, "r0 still busy: {s:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(s["leader"], "r0");
    assert_eq!(s["leaderChanges"], 0, "no leader change while busy: {s:#}");
    assert_eq!(s["failovers"], 0, "{s:#}");
    assert_eq!(s["multiplex"]["outOfBand"], 1, "{s:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_kill_reaches_a_leader_busy_on_a_shared_connection() {
    if skip_without(&["redis-server", "redis-cli"]) {
        return;
    }
    busy_script_is_killed_through_the_portal(
        &[],
        &[
            "EVAL",
            "local i = 0 while i < 3e9 do i = i + 1 end return i",
            "0",
        ],
        &["SCRIPT", "KILL"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn function_kill_reaches_a_leader_busy_on_a_shared_connection() {
    if skip_without(&["redis-server", "redis-cli"]) {
        return;
    }
    // Functions came with Redis 7.
    let probe = Redis::start();
    let mut direct = TcpStream::connect(probe.address()).await.unwrap();
    let list = command(&mut direct, &["FUNCTION", "LIST"]).await.unwrap();
    if list.starts_with('-') {
        eprintln!("skipped: this redis-server has no functions ({list})");
        return;
    }
    drop(probe);
    let library = "#!lua name=spinlib\nredis.register_function{function_name='spin', \
                   callback=function() local i = 0 while i < 3e9 do i = i + 1 end return i end, \
                   flags={'no-writes'}}";
    busy_script_is_killed_through_the_portal(
        &["FUNCTION", "LOAD", library],
        &["FCALL", "spin", "0"],
        &["FUNCTION", "KILL"],
    )
    .await;
}

/// SHUTDOWN NOSAVE, the other command a server busy with a script accepts, reaches it too:
/// the server exits, and the client that sent it is closed, as Redis would close it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_nosave_reaches_a_busy_server() {
    if skip_without(&["redis-server", "redis-cli"]) {
        return;
    }
    let mut busy = BusyLeader::start(
        false,
        &[],
        &[
            "EVAL",
            "local i = 0 while i < 3e9 do i = i + 1 end return i",
            "0",
        ],
    )
    .await;
    let mut user = TcpStream::connect(busy.portal.addr).await.unwrap();
    let closed = command(&mut user, &["SHUTDOWN", "NOSAVE"]).await;
    assert!(
        closed
            .as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::UnexpectedEof),
        "the client is closed without a reply: {closed:?}"
    );
    let lost = replies(&mut busy.runner, 1).await.unwrap().remove(0);
    assert!(lost.starts_with("-ERR"), "{lost}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while TcpStream::connect(busy.leader.address()).await.is_ok() {
        assert!(Instant::now() < deadline, "the server did not shut down");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the portal has closed `s` (EOF or reset, after any replies still on the way).
async fn closed_within(s: &mut TcpStream, what: &str) {
    let mut rest = Vec::new();
    match tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await {
        Ok(_) => {}
        Err(_) => panic!("{what}: still open after 10 s"),
    }
}

/// Multiplexed clients are in the session registry: narrowing `allowedCIDRs` closes the
/// clients it excludes and keeps the others; `POST /sessions/close` by client closes that
/// address's clients and says how many; by backend, the clients pinned to one of its
/// connections (MULTI), not those on the shared connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_list_changes_and_admin_closes_reach_multiplexed_clients() {
    if skip_without(&["redis-server", "redis-cli"]) {
        return;
    }
    const TOKEN: &str = "mux-admin-token-0123456789";
    let redis = Redis::start();
    let extra = format!("{MUX}adminTokenFile: $DIR/token\nallowedCIDRs: [\"127.0.0.0/8\"]\n");
    let p = start_portal(&[&redis], &extra).await;
    std::fs::write(p.dir().join("token"), TOKEN).unwrap();
    p.wait_leader("r0").await;
    let mut kept = Vec::new();
    let mut cut = Vec::new();
    for _ in 0..2 {
        kept.push(connect_from("127.0.0.2", p.addr).await.unwrap());
        cut.push(connect_from("127.0.0.3", p.addr).await.unwrap());
    }
    for s in kept.iter_mut().chain(cut.iter_mut()) {
        assert_eq!(command(s, &["PING"]).await.unwrap(), "+PONG");
    }
    rewrite_config(&p.dir().join("portal.yaml"), |yaml| {
        yaml.replace(
            "allowedCIDRs: [\"127.0.0.0/8\"]",
            "allowedCIDRs: [\"127.0.0.2/32\", \"127.0.0.4/32\"]",
        )
    });
    for s in &mut cut {
        closed_within(s, "a client of an excluded address").await;
    }
    for s in &mut kept {
        assert_eq!(command(s, &["PING"]).await.unwrap(), "+PONG");
    }
    let close = |body: &'static str| {
        let admin = p.admin;
        async move {
            let (code, body) = http(admin, "POST", "/sessions/close", Some(TOKEN), body).await;
            assert_eq!(code, 200, "{body}");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            v["closed"].as_u64().unwrap()
        }
    };
    assert_eq!(close(r#"{"client": "127.0.0.2"}"#).await, 2);
    for s in &mut kept {
        closed_within(s, "a client closed by address").await;
    }
    // By backend: only the client pinned to r0's dedicated connection (inside MULTI).
    let mut pinned = connect_from("127.0.0.4", p.addr).await.unwrap();
    let mut shared = connect_from("127.0.0.4", p.addr).await.unwrap();
    assert_eq!(command(&mut pinned, &["MULTI"]).await.unwrap(), "+OK");
    assert_eq!(command(&mut shared, &["PING"]).await.unwrap(), "+PONG");
    assert_eq!(close(r#"{"backend": "r0"}"#).await, 1);
    closed_within(&mut pinned, "a client pinned to the backend").await;
    assert_eq!(command(&mut shared, &["PING"]).await.unwrap(), "+PONG");
    // The queued transaction was not left on a connection another client gets.
    let mut next = connect_from("127.0.0.4", p.addr).await.unwrap();
    assert_eq!(command(&mut next, &["MULTI"]).await.unwrap(), "+OK");
    assert_eq!(command(&mut next, &["EXEC"]).await.unwrap(), "*0");
}
