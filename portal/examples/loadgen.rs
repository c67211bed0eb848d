//! Load generator for `bench/dataplane.sh`: a sink server, a bulk sender, and a holder of idle
//! connections. Not part of the portal.
//!
//! ```text
//! loadgen sink PORT                      accept, read and discard; hold idle connections
//! loadgen bulk ADDR SECONDS STREAMS      send as fast as possible, print Gbit/s
//! loadgen idle ADDR COUNT FROM_IP...     open COUNT connections (spread over the source
//!                                        addresses), print "ready N", hold until stdin closes
//! ```

use std::{net::SocketAddr, time::Instant};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream},
};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    match args.first().map(String::as_str) {
        Some("sink") => rt.block_on(sink(args[1].parse().unwrap())),
        Some("bulk") => rt.block_on(bulk(
            args[1].parse().unwrap(),
            args[2].parse().unwrap(),
            args[3].parse().unwrap(),
        )),
        Some("idle") => rt.block_on(idle(
            args[1].parse().unwrap(),
            args[2].parse().unwrap(),
            &args[3..],
        )),
        _ => eprintln!(
            "usage: loadgen sink PORT | bulk ADDR SECONDS STREAMS | idle ADDR COUNT FROM_IP..."
        ),
    }
}

async fn sink(port: u16) {
    let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    println!("ready");
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        tokio::spawn(async move {
            let mut buf = vec![0u8; 256 * 1024];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        });
    }
}

async fn bulk(addr: SocketAddr, seconds: f64, streams: usize) {
    let start = Instant::now();
    let tasks: Vec<_> = (0..streams)
        .map(|_| {
            tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.unwrap();
                let buf = vec![0x5au8; 256 * 1024];
                let mut sent = 0u64;
                while start.elapsed().as_secs_f64() < seconds {
                    s.write_all(&buf).await.unwrap();
                    sent += buf.len() as u64;
                }
                s.shutdown().await.unwrap();
                // The sink closes after reading everything: then all bytes went through.
                let mut rest = [0u8; 16];
                let _ = s.read(&mut rest).await;
                sent
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    println!("{:.3}", total as f64 * 8.0 / secs / 1e9);
}

async fn idle(addr: SocketAddr, count: usize, from: &[String]) {
    let mut held = Vec::with_capacity(count);
    for i in 0..count {
        let ip = from[i % from.len()].parse().unwrap();
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(ip, 0)).unwrap();
        match socket.connect(addr).await {
            Ok(s) => held.push(s),
            Err(e) => {
                eprintln!("connect {i}: {e}");
                break;
            }
        }
    }
    // Let the proxy finish its backend connects, then check the connections are still open.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let mut open = 0;
    for s in &held {
        let mut b = [0u8; 1];
        match s.try_read(&mut b) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => open += 1,
            _ => {}
        }
    }
    println!("ready {open}");
    let _ = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)
    })
    .await;
    drop(held);
}
