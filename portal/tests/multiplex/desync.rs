//! What Redis' own test suite (`runtest`) found out of step through the multiplexer, each
//! compared byte for byte with the same bytes sent direct: protocol errors and inline
//! commands read as Redis reads them, HELLO 2 after HELLO 3, UNSUBSCRIBE from a client
//! subscribed to nothing, CLIENT REPLY OFF/SKIP, a replication stream (SYNC), a command
//! larger than the input high-water mark, the client ids the portal gives named in commands.
//! Another client works on the shared connections all along, and none of its replies fails.

use super::*;

/// Sends `bytes` on a new connection to `addr`, then reads everything until the server
/// closes it, or for `wait` after the last byte when it stays open.
async fn exchange(addr: impl tokio::net::ToSocketAddrs, bytes: &[u8], wait: Duration) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let mut chunk = vec![0u8; 1 << 16];
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        match tokio::time::timeout(wait, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => out.extend_from_slice(&chunk[..n]),
        }
    }
    out
}

/// A client that keeps reading and writing through the portal until told to stop; its
/// count of commands, and the first reply that was not the one expected.
pub(super) fn bystander(
    addr: std::net::SocketAddr,
) -> (
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<(u64, Option<String>)>,
) {
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut n = 0u64;
        // Bounded: at most 100,000 rounds, and the test ends it long before.
        while n < 100_000 && !*stopped.borrow_and_update() {
            let value = n.to_string();
            let set = command(&mut s, &["SET", "bystander", &value]).await;
            let get = command(&mut s, &["GET", "bystander"]).await;
            let want = format!("${}\r\n{value}", value.len());
            match (set, get) {
                (Ok(a), Ok(b)) if a == "+OK" && b == want => n += 1,
                other => return (n, Some(format!("{other:?}"))),
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        (n, None)
    });
    (stop, task)
}

pub(super) async fn portal_with_bystander(
    redis: &Redis,
) -> (
    Standalone,
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<(u64, Option<String>)>,
) {
    let p = start_portal(
        &[redis],
        "pooling: {mode: multiplex, serverConnections: 1}\n",
    )
    .await;
    p.wait_leader("r0").await;
    let (stop, task) = bystander(p.addr);
    (p, stop, task)
}

/// The bystander got every reply right, and no reply failed on a shared connection.
pub(super) async fn bystander_unharmed(
    p: &Standalone,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<(u64, Option<String>)>,
) {
    stop.send(true).unwrap();
    let (n, wrong) = task.await.unwrap();
    assert_eq!(wrong, None, "the bystander's reply after {n} good rounds");
    assert!(n > 0, "the bystander made no progress");
    let m = p.metrics().await;
    assert_eq!(sample(&m, "dbportal_multiplex_replies_failed_total"), 0.0);
}

/// Protocol errors get Redis' own error text, then the connection closes; inline commands,
/// quotes and escapes included, and the odd forms Redis accepts (an empty line, a negative
/// count, bytes skipped after a bulk string) work as they do direct.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_are_read_as_redis_reads_them() {
    if skip_without(&["redis-server"]) {
        return;
    }
    let redis = Redis::start();
    let (p, stop, task) = portal_with_bystander(&redis).await;
    let cases: [&[u8]; 12] = [
        b"*1\r\nfoo\r\n",
        b"*3\r\n$3\r\nSET\r\n$1\r\nx\r\nfooz\r\n",
        b"*3000000000\r\n",
        b"*3\r\n$3\r\nSET\r\n$1\r\nx\r\n$-10\r\n",
        b"*3\r\n$3\r\nSET\r\n$1\r\nx\r\n$blabla\r\n",
        b"*03\r\n$4\r\nPING\r\n",
        b"set \"\"\"test-key\"\"\" test-value\r\nping\r\n",
        b"set \"k 1\" 'it\\'s'\r\nget \"k\\x201\"\r\nquit\r\n",
        b"\r\n*-10\r\n*0\r\nping\r\nquit\r\n",
        b"*1\r\n$4\r\nPINGxx\r\nquit\r\n",
        b"unsubscribe \"a b\r\nping\r\n",
        b"get k\"x\r\nping\r\n",
    ];
    for case in cases {
        let wait = Duration::from_millis(300);
        let direct = exchange(redis.address(), case, wait).await;
        let through = exchange(p.addr, case, wait).await;
        assert_eq!(
            String::from_utf8_lossy(&through),
            String::from_utf8_lossy(&direct),
            "{}",
            String::from_utf8_lossy(case)
        );
    }
    bystander_unharmed(&p, stop, task).await;
}

/// HELLO 3 then HELLO 2: the server speaks RESP2 again, as direct; and the portal's own
/// answers (CLIENT ID) wait for a RESP3 reply in flight before them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_2_after_hello_3_speaks_resp2_again() {
    if skip_without(&["redis-server"]) {
        return;
    }
    let redis = Redis::start();
    let (p, stop, task) = portal_with_bystander(&redis).await;
    let mut setup = TcpStream::connect(redis.address()).await.unwrap();
    command(&mut setup, &["HSET", "h", "f", "v"]).await.unwrap();
    let body = [
        resp(&["HGETALL", "h"]),
        resp(&["HELLO", "2"]),
        resp(&["HGETALL", "h"]),
        resp(&["HELLO", "3"]),
        resp(&["BLPOP", "nothing", "0.3"]),
        resp(&["CLIENT", "ID"]),
        resp(&["HGETALL", "h"]),
    ]
    .concat();
    for addr in [redis.address(), p.addr.to_string()] {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        s.write_all(&[resp(&["HELLO", "3"]), body.clone()].concat())
            .await
            .unwrap();
        let r = replies(&mut s, 8).await.unwrap();
        assert!(r[0].starts_with('%'), "{addr}: {r:?}");
        assert_eq!(r[1], "%1\r\n$1\r\nf\r\n$1\r\nv", "{addr}: RESP3 map");
        assert!(r[2].starts_with('*'), "{addr}: {r:?}");
        assert_eq!(r[3], "*2\r\n$1\r\nf\r\n$1\r\nv", "{addr}: RESP2 again");
        assert!(r[4].starts_with('%'), "{addr}: {r:?}");
        assert_eq!(r[5], "_", "{addr}: the BLPOP's RESP3 null first");
        assert!(r[6].starts_with(':'), "{addr}: then CLIENT ID: {r:?}");
        assert_eq!(r[7], "%1\r\n$1\r\nf\r\n$1\r\nv", "{addr}");
    }
    bystander_unharmed(&p, stop, task).await;
}

/// UNSUBSCRIBE from a client subscribed to nothing answers once per channel, as Redis does,
/// without a reply too many on the shared connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_when_subscribed_to_nothing_answers_each_channel() {
    if skip_without(&["redis-server"]) {
        return;
    }
    let redis = Redis::start();
    let (p, stop, task) = portal_with_bystander(&redis).await;
    let bytes = [
        resp(&["UNSUBSCRIBE", "a", "b", "c"]),
        resp(&["PUNSUBSCRIBE"]),
        resp(&["SUNSUBSCRIBE", "s"]),
        resp(&["PING"]),
    ]
    .concat();
    for _ in 0..3 {
        let wait = Duration::from_millis(300);
        let direct = exchange(redis.address(), &bytes, wait).await;
        let through = exchange(p.addr, &bytes, wait).await;
        assert_eq!(
            String::from_utf8_lossy(&through),
            String::from_utf8_lossy(&direct)
        );
    }
    bystander_unharmed(&p, stop, task).await;
}

/// CLIENT REPLY OFF and SKIP silence the server's replies and the portal's own (CLIENT ID),
/// exactly as direct.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reply_off_and_skip_silence_replies_as_direct() {
    if skip_without(&["redis-server"]) {
        return;
    }
    let redis = Redis::start();
    let (p, stop, task) = portal_with_bystander(&redis).await;
    let bytes = [
        resp(&["CLIENT", "REPLY", "OFF"]),
        resp(&["SET", "r", "1"]),
        resp(&["CLIENT", "ID"]),
        resp(&["CLIENT", "REPLY", "ON"]),
        resp(&["GET", "r"]),
        resp(&["CLIENT", "REPLY", "SKIP"]),
        resp(&["CLIENT", "GETNAME"]),
        resp(&["GET", "r"]),
        resp(&["CLIENT", "REPLY", "SKIP"]),
        resp(&["GET", "r"]),
        resp(&["ECHO", "end"]),
    ]
    .concat();
    let wait = Duration::from_millis(300);
    let direct = exchange(redis.address(), &bytes, wait).await;
    assert_eq!(direct, b"+OK\r\n$1\r\n1\r\n$1\r\n1\r\n$3\r\nend\r\n");
    let through = exchange(p.addr, &bytes, wait).await;
    assert_eq!(
        String::from_utf8_lossy(&through),
        String::from_utf8_lossy(&direct)
    );
    // The same commands one write at a time, by a client on the shared connection: the
    // SKIP still silences the command after it, sent later.
    for addr in [redis.address(), p.addr.to_string()] {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        for cmd in [
            &["CLIENT", "REPLY", "SKIP"][..],
            &["PING", "pong"],
            &["PING", "pong2"],
        ] {
            s.write_all(&resp(cmd)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(replies(&mut s, 1).await.unwrap(), ["$5\r\npong2"], "{addr}");
    }
    bystander_unharmed(&p, stop, task).await;
}

/// SYNC makes the client a replica: its dedicated connection carries the RDB payload and the
/// replication stream untouched, while the shared connection serves the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_gets_the_replication_stream() {
    if skip_without(&["redis-server"]) {
        return;
    }
    let redis = Redis::start_with(&["--repl-diskless-sync-delay", "0"]);
    let (p, stop, task) = portal_with_bystander(&redis).await;
    let mut replica = TcpStream::connect(p.addr).await.unwrap();
    replica.write_all(b"SYNC\r\n").await.unwrap();
    let mut got = Vec::new();
    let mut chunk = vec![0u8; 1 << 16];
    let mut writer = TcpStream::connect(p.addr).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut written = false;
    while !String::from_utf8_lossy(&got).contains("from-the-writer") {
        assert!(
            Instant::now() < deadline,
            "no replication stream: {}",
            String::from_utf8_lossy(&got)
        );
        if !written && got.windows(5).any(|w| w == b"REDIS") {
            // The RDB payload is in: what is written now follows in the stream.
            assert_eq!(
                command(&mut writer, &["SET", "k", "from-the-writer"])
                    .await
                    .unwrap(),
                "+OK"
            );
            written = true;
        }
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(200), replica.read(&mut chunk)).await
        {
            assert!(n > 0, "the replica's connection closed");
            got.extend_from_slice(&chunk[..n]);
        }
    }
    assert!(
        got.starts_with(b"$") || got.starts_with(b"\n"),
        "{:?}",
        &got[..got.len().min(20)]
    );
    bystander_unharmed(&p, stop, task).await;
}

/// A command far larger than the input the portal buffers before handling it (1 MiB) is read
/// whole and answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_four_megabyte_command_goes_through() {
    if skip_without(&["redis-server"]) {
        return;
    }
    let redis = Redis::start();
    let (p, stop, task) = portal_with_bystander(&redis).await;
    let big = "abcd".repeat(1 << 20);
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    assert_eq!(command(&mut s, &["SET", "big", &big]).await.unwrap(), "+OK");
    assert_eq!(
        command(&mut s, &["STRLEN", "big"]).await.unwrap(),
        format!(":{}", big.len())
    );
    bystander_unharmed(&p, stop, task).await;
}

/// The ids CLIENT ID gives through the portal name that client in the commands that name
/// one: tracking redirected to a subscribed client reaches it (and CLIENT GETREDIR and CLIENT
/// TRACKINGINFO name it by that id), CLIENT UNBLOCK frees a blocked one, CLIENT LIST ID shows
/// its connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ids_name_the_clients_the_portal_gave_them_to() {
    if skip_without(&["redis-server"]) {
        return;
    }
    let redis = Redis::start();
    let (p, stop, task) = portal_with_bystander(&redis).await;
    let id = |reply: String| reply.trim_start_matches(':').to_string();

    let mut target = TcpStream::connect(p.addr).await.unwrap();
    let target_id = id(command(&mut target, &["CLIENT", "ID"]).await.unwrap());
    let sub = command(&mut target, &["SUBSCRIBE", "__redis__:invalidate"]).await;
    assert!(sub.unwrap().contains("subscribe"));
    let mut tracker = TcpStream::connect(p.addr).await.unwrap();
    assert_eq!(
        command(
            &mut tracker,
            &["CLIENT", "TRACKING", "on", "REDIRECT", &target_id]
        )
        .await
        .unwrap(),
        "+OK"
    );
    // Asked back, the redirect target is the id the client named.
    assert_eq!(
        command(&mut tracker, &["CLIENT", "GETREDIR"])
            .await
            .unwrap(),
        format!(":{target_id}")
    );
    let info = command(&mut tracker, &["CLIENT", "TRACKINGINFO"])
        .await
        .unwrap();
    assert!(
        info.contains(&format!("$8\r\nredirect\r\n:{target_id}\r\n")),
        "{info}"
    );
    command(&mut tracker, &["GET", "tracked"]).await.unwrap();
    let mut writer = TcpStream::connect(p.addr).await.unwrap();
    command(&mut writer, &["SET", "tracked", "1"])
        .await
        .unwrap();
    let invalidation = replies(&mut target, 1).await.unwrap().remove(0);
    assert!(
        invalidation.contains("invalidate") && invalidation.contains("tracked"),
        "{invalidation}"
    );

    let mut blocked = TcpStream::connect(p.addr).await.unwrap();
    let blocked_id = id(command(&mut blocked, &["CLIENT", "ID"]).await.unwrap());
    blocked
        .write_all(&resp(&["BLPOP", "nothing", "0"]))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let list = command(&mut writer, &["CLIENT", "LIST", "ID", &blocked_id])
            .await
            .unwrap();
        if list.contains("flags=b") {
            break;
        }
        assert!(Instant::now() < deadline, "never blocked: {list}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        command(&mut writer, &["CLIENT", "UNBLOCK", &blocked_id])
            .await
            .unwrap(),
        ":1"
    );
    assert_eq!(replies(&mut blocked, 1).await.unwrap()[0], "*-1");
    // A client with no dedicated connection stands for none, and the rest of the command is
    // checked as direct.
    let mut direct = TcpStream::connect(redis.address()).await.unwrap();
    for cmd in [
        &["CLIENT", "UNBLOCK", "999999"][..],
        &["CLIENT", "KILL", "ID", "999999"],
        &["CLIENT", "KILL", "ID", "999999", "wrong_arg"],
        &["CLIENT", "KILL", "ID", "0"],
        &["CLIENT", "TRACKING", "on", "REDIRECT", "999999"],
        &["CLIENT", "LIST", "ID", "999999"],
    ] {
        assert_eq!(
            command(&mut writer, cmd).await.unwrap(),
            command(&mut direct, cmd).await.unwrap(),
            "{cmd:?}"
        );
    }
    bystander_unharmed(&p, stop, task).await;
}
