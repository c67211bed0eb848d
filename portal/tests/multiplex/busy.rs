//! SCRIPT KILL, FUNCTION KILL and SHUTDOWN NOSAVE reaching a server busy with a script on a
//! shared connection, and other clients answered `-BUSY` meanwhile, as direct; a paused write
//! holding only its own client.

use super::*;

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
    /// Clients that sent a command before the script started, spread over the threads.
    idle: Vec<TcpStream>,
}

impl BusyLeader {
    /// Starts a leader (with a replica when `replica`), runs `setup` on it directly, and
    /// sends `start` (the script) through the portal. Returns once the probe sees it busy.
    async fn start(replica: bool, setup: &[&str], start: &[&str]) -> BusyLeader {
        Self::start_with(replica, setup, start, 1, 0).await
    }

    /// [`BusyLeader::start`] with `per_thread` shared connections per data-plane thread, and
    /// `idle` clients that send a PING before the script starts.
    async fn start_with(
        replica: bool,
        setup: &[&str],
        start: &[&str],
        per_thread: usize,
        idle: usize,
    ) -> BusyLeader {
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
            &format!(
                "healthCheck: {{interval: 100ms, rise: 1, fall: 2}}\ntimeouts: {{check: 1s}}\n\
                 pooling: {{mode: multiplex, serverConnections: {}}}\n",
                per_thread * data_plane_threads()
            ),
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
        let mut idle_clients = Vec::new();
        for _ in 0..idle {
            let mut s = TcpStream::connect(portal.addr).await.unwrap();
            assert_eq!(command(&mut s, &["PING"]).await.unwrap(), "+PONG");
            idle_clients.push(s);
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
            idle: idle_clients,
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

/// While a script runs past `busy-reply-threshold`, clients with nothing in flight get
/// `-BUSY`, as direct, whichever shared connection they used before: none waits behind the
/// script on the connection it holds (they go to another one), and the script can be killed
/// once they have their answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_with_nothing_in_flight_get_busy_as_direct() {
    if skip_without(&["redis-server", "redis-cli"]) {
        return;
    }
    let script = "local i = 0 while i < 3e9 do i = i + 1 end return i";
    let mut busy = BusyLeader::start_with(false, &[], &["EVAL", script, "0"], 2, 8).await;
    let mut direct = TcpStream::connect(busy.leader.address()).await.unwrap();
    let want = command(&mut direct, &["PING"]).await.unwrap();
    assert!(want.starts_with("-BUSY"), "{want}");
    for (i, s) in busy.idle.iter_mut().enumerate() {
        let got = tokio::time::timeout(Duration::from_secs(3), command(s, &["PING"]))
            .await
            .unwrap_or_else(|_| panic!("client {i} waits behind the script"))
            .unwrap();
        assert_eq!(got, want, "client {i}");
    }
    let mut user = TcpStream::connect(busy.portal.addr).await.unwrap();
    assert_eq!(
        command(&mut user, &["SCRIPT", "KILL"]).await.unwrap(),
        "+OK"
    );
    let ended = replies(&mut busy.runner, 1).await.unwrap().remove(0);
    assert!(ended.starts_with('-'), "{ended}");
    for s in &mut busy.idle {
        assert_eq!(command(s, &["PING"]).await.unwrap(), "+PONG");
    }
}

/// While a CLIENT PAUSE WRITE sent through the portal lasts, a paused write holds only its own
/// client: other clients' reads are answered at once, as direct, though the write waits on
/// the shared connection they would have used; CLIENT UNPAUSE reaches the server past it and
/// the write is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_write_holds_only_its_own_client() {
    if skip_without(&["redis-server"]) {
        return;
    }
    let redis = Redis::start();
    let p = start_portal(
        &[&redis],
        &format!(
            "pooling: {{mode: multiplex, serverConnections: {}}}\n",
            2 * data_plane_threads()
        ),
    )
    .await;
    p.wait_leader("r0").await;
    let mut admin = TcpStream::connect(p.addr).await.unwrap();
    assert_eq!(
        command(&mut admin, &["CLIENT", "PAUSE", "20000", "WRITE"])
            .await
            .unwrap(),
        "+OK"
    );
    // One write held: the other shared connection of its thread stays free.
    let mut writer = TcpStream::connect(p.addr).await.unwrap();
    writer
        .write_all(&resp(&["SET", "paused", "1"]))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    for i in 0..8 {
        let mut reader = TcpStream::connect(p.addr).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(3), command(&mut reader, &["PING"]))
            .await
            .unwrap_or_else(|_| panic!("reader {i} waits behind a paused write"))
            .unwrap();
        assert_eq!(got, "+PONG", "reader {i}");
    }
    let info = command(&mut admin, &["INFO", "clients"]).await.unwrap();
    assert!(info.contains("blocked_clients:"), "{info}");
    assert_eq!(
        command(&mut admin, &["CLIENT", "UNPAUSE"]).await.unwrap(),
        "+OK"
    );
    assert_eq!(replies(&mut writer, 1).await.unwrap()[0], "+OK");
}
