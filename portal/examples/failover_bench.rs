//! Failover benchmark: a Redis primary and replica behind a proxy (the portal with default
//! settings, then HAProxy with the KeyDB documentation's tcp-check), a client writing through
//! the proxy every 10 ms on a fresh connection, and per round:
//!
//! 1. the primary crashes (SIGKILL);
//! 2. one second later the replica is promoted (`REPLICAOF NO ONE`): failover time is from
//!    here to the first write the proxy gets accepted;
//! 3. two seconds later the old primary comes back as an empty master (a node restarted before
//!    anything reconfigured it) and stays so for three seconds; writes it accepts in that time
//!    are writes to the demoted node, lost when it is made a replica of the new primary.
//!
//! Run with `bench/failover.sh` (release build). Prints median and max failover times and the
//! writes accepted by the demoted node.

#[path = "../tests/common/harness.rs"]
mod harness;
#[path = "../tests/common/servers.rs"]
mod servers;

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::PathBuf,
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use harness::{free_port, wait_until, Proc, TempDir};
use servers::Redis;

const ROUNDS: usize = 10;
const RETRY: Duration = Duration::from_millis(10);

/// Successful writes through the proxy, with when they were acknowledged.
type Log = Arc<Mutex<Vec<Instant>>>;

fn main() {
    let rounds = std::env::var("ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(ROUNDS);
    let portal = std::env::var("PORTAL_BIN").unwrap_or_else(|_| "target/release/portal".into());
    let haproxy = std::env::var("HAPROXY_BIN").unwrap_or_else(|_| "/usr/sbin/haproxy".into());

    let mut results = Vec::new();
    results.push((
        "portal (defaults)",
        run("portal", rounds, |dir, listen, a, b| {
            start_portal(&portal, dir, listen, a, b)
        }),
    ));
    if std::path::Path::new(&haproxy).exists() {
        results.push((
            "haproxy (tcp-check, inter 1s)",
            run("haproxy", rounds, |dir, listen, a, b| {
                start_haproxy(&haproxy, dir, listen, a, b)
            }),
        ));
    } else {
        eprintln!("{haproxy} not found; HAProxy skipped");
    }

    println!();
    println!("| proxy | failovers | median | max | writes accepted by the demoted node |");
    println!("|---|---|---|---|---|");
    for (name, r) in &results {
        println!(
            "| {name} | {} | {} | {} | {} |",
            r.times.len(),
            fmt(median(&r.times)),
            fmt(r.times.iter().max().copied()),
            r.stale_writes
        );
    }
}

struct Outcome {
    times: Vec<Duration>,
    stale_writes: u64,
}

fn fmt(d: Option<Duration>) -> String {
    d.map(|d| format!("{:.3} s", d.as_secs_f64()))
        .unwrap_or_else(|| "-".into())
}

fn median(v: &[Duration]) -> Option<Duration> {
    let mut v = v.to_vec();
    v.sort();
    match v.len() {
        0 => None,
        n if n % 2 == 1 => Some(v[n / 2]),
        n => Some((v[n / 2 - 1] + v[n / 2]) / 2),
    }
}

fn run(
    name: &str,
    rounds: usize,
    start_proxy: impl Fn(&TempDir, u16, u16, u16) -> Proc,
) -> Outcome {
    let dir = TempDir::new("bench");
    let mut nodes = [Redis::start(), Redis::start()];
    let leader_port = nodes[0].port;
    nodes[1].restart_with(&["--replicaof", "127.0.0.1", &leader_port.to_string()]);
    nodes[1].wait_replicating();
    let listen = free_port();
    let _proxy = start_proxy(&dir, listen, nodes[0].port, nodes[1].port);
    wait_until("proxy", Duration::from_secs(10), || {
        write(listen, "warmup", 0)
    });
    std::thread::sleep(Duration::from_secs(3));

    let stop = Arc::new(AtomicBool::new(false));
    let log: Log = Arc::default();
    let writer = {
        let (stop, log) = (stop.clone(), log.clone());
        std::thread::spawn(move || {
            let mut seq = 0u64;
            // Bounded: ends when told, or after an hour at the latest.
            let end = Instant::now() + Duration::from_secs(3600);
            while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                seq += 1;
                if write(listen, "bench", seq) {
                    log.lock().unwrap().push(Instant::now());
                }
                std::thread::sleep(RETRY);
            }
        })
    };

    let mut outcome = Outcome {
        times: Vec::new(),
        stale_writes: 0,
    };
    let (mut leader, mut replica) = (0usize, 1usize);
    for round in 1..=rounds {
        std::thread::sleep(Duration::from_secs(1));
        nodes[leader].kill();
        std::thread::sleep(Duration::from_secs(1));
        let promoted = Instant::now();
        nodes[replica].cli(&["REPLICAOF", "NO", "ONE"]);
        std::thread::sleep(Duration::from_secs(2));
        // The old primary returns as an empty master before anything reconfigures it.
        let old = leader;
        nodes[old].restart_with(&[]);
        std::thread::sleep(Duration::from_secs(3));
        let stale: u64 = nodes[old]
            .cli(&["EVAL", "return #redis.call('KEYS', 'bench:*')", "0"])
            .parse()
            .unwrap_or(0);
        let new_port = nodes[replica].port;
        nodes[old].cli(&["REPLICAOF", "127.0.0.1", &new_port.to_string()]);
        nodes[old].wait_replicating();

        let first = log.lock().unwrap().iter().find(|t| **t > promoted).copied();
        let took = first.map(|t| t - promoted);
        eprintln!(
            "{name} round {round}: first write {} after the promotion; {stale} writes accepted by the demoted node",
            fmt(took)
        );
        if let Some(t) = took {
            outcome.times.push(t);
        }
        outcome.stale_writes += stale;
        std::mem::swap(&mut leader, &mut replica);
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    outcome
}

/// One write on a fresh connection: `SET key:seq`, true when the proxy got `+OK`.
fn write(port: u16, key: &str, seq: u64) -> bool {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
    let k = format!("{key}:{seq}");
    let cmd = format!("*3\r\n$3\r\nSET\r\n${}\r\n{k}\r\n$1\r\n1\r\n", k.len());
    if s.write_all(cmd.as_bytes()).is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    let mut got = Vec::new();
    while !got.ends_with(b"\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    got.starts_with(b"+OK")
}

fn start_portal(bin: &str, dir: &TempDir, listen: u16, a: u16, b: u16) -> Proc {
    let path: PathBuf = dir.path().join("portal.yaml");
    let admin = free_port();
    std::fs::write(
        &path,
        format!(
            "engine: redis\nlisten: 127.0.0.1:{listen}\nadmin: 127.0.0.1:{admin}\ntls: {{mode: disabled}}\n\
             backends:\n  - {{name: r1, address: \"127.0.0.1:{a}\"}}\n  - {{name: r2, address: \"127.0.0.1:{b}\"}}\n"
        ),
    )
    .unwrap();
    let mut cmd = Command::new(bin);
    cmd.arg("--config").arg(&path);
    cmd.env("RUST_LOG", "warn");
    Proc::spawn(cmd, "TERM")
}

fn start_haproxy(bin: &str, dir: &TempDir, listen: u16, a: u16, b: u16) -> Proc {
    let path = dir.path().join("haproxy.cfg");
    std::fs::write(
        &path,
        format!(
            r"global
    maxconn 1024
defaults
    mode tcp
    timeout connect 3s
    timeout client 1m
    timeout server 1m
frontend redis
    bind 127.0.0.1:{listen}
    default_backend redis_backend
backend redis_backend
    option tcp-check
    tcp-check connect
    tcp-check send PING\r\n
    tcp-check expect string +PONG
    tcp-check send info\ replication\r\n
    tcp-check expect string role:master
    tcp-check send QUIT\r\n
    tcp-check expect string +OK
    server r1 127.0.0.1:{a} check inter 1s
    server r2 127.0.0.1:{b} check inter 1s
"
        ),
    )
    .unwrap();
    let mut cmd = Command::new(bin);
    cmd.arg("-f").arg(&path).arg("-db");
    Proc::spawn(cmd, "TERM")
}
