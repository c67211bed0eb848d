//! The executor with real sockets on loopback: futures it runs, wakes from other threads, a
//! socket read on a thread other than its poller's, readiness after short reads and full
//! writes, a panicking future, and its stop.

use std::{
    io::{Read as _, Write as _},
    sync::{
        atomic::{AtomicBool, Ordering::SeqCst},
        Arc,
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::oneshot,
    time::timeout,
};

use super::{is_here, run, spawn, Socket};

/// Runs `body` on a current-thread runtime beside an executor (started first), within 60 s.
fn with_executor<F: std::future::Future<Output = ()>>(body: F) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        tokio::select! {
            biased;
            _ = run() => unreachable!("the executor returned"),
            r = timeout(Duration::from_secs(60), body) => r.expect("the test timed out"),
        }
    });
}

/// A connected pair on loopback: the accepted end (nonblocking, std) and the peer.
fn pair() -> (std::net::TcpStream, std::net::TcpStream) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let peer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (accepted, _) = listener.accept().unwrap();
    accepted.set_nonblocking(true).unwrap();
    peer.set_nodelay(true).unwrap();
    (accepted, peer)
}

fn tokio_peer(peer: std::net::TcpStream) -> tokio::net::TcpStream {
    peer.set_nonblocking(true).unwrap();
    tokio::net::TcpStream::from_std(peer).unwrap()
}

#[test]
fn a_spawned_future_serves_its_socket_until_the_peer_leaves() {
    with_executor(async {
        let (accepted, peer) = pair();
        let mut peer = tokio_peer(peer);
        let socket = Socket::here(accepted).expect("an executor on this thread");
        let (done, echoed) = oneshot::channel();
        spawn(async move {
            let mut socket = socket;
            let mut buf = [0u8; 64];
            let mut total = 0;
            loop {
                let n = socket.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                socket.write_all(&buf[..n]).await.unwrap();
                total += n;
            }
            done.send(total).unwrap();
        });
        for i in 0..2_000u32 {
            peer.write_all(&i.to_be_bytes()).await.unwrap();
            let mut back = [0u8; 4];
            peer.read_exact(&mut back).await.unwrap();
            assert_eq!(back, i.to_be_bytes());
        }
        drop(peer);
        assert_eq!(echoed.await.unwrap(), 8_000);
    });
}

#[test]
fn a_wake_from_another_thread_polls_the_future() {
    with_executor(async {
        let (tx, rx) = oneshot::channel::<u32>();
        let (done, answer) = oneshot::channel();
        spawn(async move {
            let v = rx.await.unwrap();
            done.send(v + 1).unwrap();
        });
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            tx.send(41).unwrap();
        });
        assert_eq!(answer.await.unwrap(), 42);
        sender.join().unwrap();
    });
}

/// A pooled server connection moves between clients on different threads: its events come to
/// the poller it was made on, which must wake a reader on another thread.
#[test]
fn a_socket_read_on_another_thread_is_woken_by_its_poller() {
    with_executor(async {
        let (accepted, peer) = pair();
        let mut peer = tokio_peer(peer);
        let socket = Socket::here(accepted).unwrap();
        let reader = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                assert!(!is_here());
                let mut socket = socket;
                let mut got = Vec::new();
                loop {
                    let mut b = [0u8; 16];
                    let n = timeout(Duration::from_secs(10), socket.read(&mut b))
                        .await
                        .expect("no wake-up from the socket's poller")
                        .unwrap();
                    if n == 0 {
                        return got;
                    }
                    got.extend_from_slice(&b[..n]);
                }
            })
        });
        for part in [&b"one"[..], b"two", b"six"] {
            peer.write_all(part).await.unwrap();
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        drop(peer);
        let got = tokio::task::spawn_blocking(move || reader.join().unwrap())
            .await
            .unwrap();
        assert_eq!(got, b"onetwosix");
    });
}

#[test]
fn a_short_read_waits_for_an_event_instead_of_reading_again() {
    with_executor(async {
        let (accepted, mut peer) = pair();
        let mut socket = Socket::here(accepted).unwrap();
        let mut buf = [0u8; 64];
        peer.write_all(b"0123456789").unwrap();
        let n = timeout(Duration::from_secs(10), socket.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        // A fresh socket reads at once; it may find the bytes not all there yet.
        let mut got = buf[..n].to_vec();
        while got.len() < 10 {
            let n = socket.read(&mut buf).await.unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, b"0123456789");
        let reads = socket.reads;
        // Drained by a short read: the next poll waits without a system call.
        let pending = std::future::poll_fn(|cx| {
            let mut rb = tokio::io::ReadBuf::new(&mut buf);
            std::task::Poll::Ready(
                tokio::io::AsyncRead::poll_read(std::pin::Pin::new(&mut socket), cx, &mut rb)
                    .is_pending(),
            )
        })
        .await;
        assert!(pending, "a read after a short read found data");
        assert_eq!(socket.reads, reads, "a read after a short read");
        // New data, then the end of the stream, wake the reader.
        peer.write_all(b"last").unwrap();
        peer.shutdown(std::net::Shutdown::Write).unwrap();
        let mut tail = Vec::new();
        loop {
            let n = timeout(Duration::from_secs(10), socket.read(&mut buf))
                .await
                .expect("no wake-up after new data or FIN")
                .unwrap();
            if n == 0 {
                break;
            }
            tail.extend_from_slice(&buf[..n]);
        }
        assert_eq!(tail, b"last");
    });
}

/// Writes that fill the kernel's buffer wait for the peer to read, then go on: nothing lost,
/// nothing reordered.
#[test]
fn a_full_send_buffer_waits_for_the_peer_and_loses_nothing() {
    with_executor(async {
        let (accepted, mut peer) = pair();
        let socket = Socket::here(accepted).unwrap();
        let data: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
        let expected = data.clone();
        let (done, written) = oneshot::channel();
        spawn(async move {
            let mut socket = socket;
            socket.write_all(&data).await.unwrap();
            socket.shutdown().await.unwrap();
            done.send(()).unwrap();
        });
        let reader = std::thread::spawn(move || {
            // Slow at first, so that the writer finds the buffer full.
            std::thread::sleep(Duration::from_millis(200));
            let mut got = Vec::new();
            peer.read_to_end(&mut got).unwrap();
            got
        });
        written.await.unwrap();
        let got = tokio::task::spawn_blocking(move || reader.join().unwrap())
            .await
            .unwrap();
        assert!(
            got == expected,
            "{} bytes of {} came, or out of order",
            got.len(),
            expected.len()
        );
    });
}

/// Ping-pong with a peer on another thread, many rounds: a lost wake-up stops it.
#[test]
fn many_rounds_lose_no_wake_up() {
    with_executor(async {
        let (accepted, mut peer) = pair();
        let socket = Socket::here(accepted).unwrap();
        let (done, rounds) = oneshot::channel();
        spawn(async move {
            let mut socket = socket;
            let mut b = [0u8; 8];
            let mut n = 0u64;
            while socket.read_exact(&mut b).await.is_ok() {
                socket.write_all(&b).await.unwrap();
                n += 1;
            }
            done.send(n).unwrap();
        });
        let pinger = std::thread::spawn(move || {
            peer.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            for i in 0..20_000u64 {
                peer.write_all(&i.to_le_bytes()).unwrap();
                let mut b = [0u8; 8];
                peer.read_exact(&mut b).expect("no answer: a lost wake-up");
                assert_eq!(u64::from_le_bytes(b), i);
            }
        });
        tokio::task::spawn_blocking(move || pinger.join().unwrap())
            .await
            .unwrap();
        assert_eq!(rounds.await.unwrap(), 20_000);
    });
}

#[test]
fn a_future_that_panics_is_dropped_and_the_others_run() {
    with_executor(async {
        let (tx, rx) = oneshot::channel::<()>();
        let (done, finished) = oneshot::channel();
        spawn(async move {
            let _tx = tx;
            panic!("a session panics on purpose");
        });
        spawn(async move {
            // The panicking future's sender was dropped with it.
            assert!(rx.await.is_err());
            tokio::task::yield_now().await;
            done.send(()).unwrap();
        });
        finished.await.unwrap();
    });
}

#[test]
fn stopping_the_executor_drops_its_futures_and_its_sockets() {
    struct Flag(Arc<AtomicBool>);
    impl Drop for Flag {
        fn drop(&mut self) {
            self.0.store(true, SeqCst);
        }
    }
    let dropped = Arc::new(AtomicBool::new(false));
    let (accepted, mut peer) = pair();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let flag = Flag(dropped.clone());
    rt.block_on(async move {
        let body = async move {
            let socket = Socket::here(accepted).unwrap();
            spawn(async move {
                let _flag = flag;
                let _socket = socket;
                std::future::pending::<()>().await
            });
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        tokio::select! {
            biased;
            _ = run() => unreachable!(),
            _ = body => {}
        }
    });
    assert!(dropped.load(SeqCst), "the future outlived its executor");
    assert!(!is_here());
    // Its socket was closed with it: the peer reads the end of the stream.
    peer.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut b = [0u8; 1];
    assert_eq!(peer.read(&mut b).unwrap(), 0);
}

#[test]
fn without_an_executor_futures_run_as_tokio_tasks_and_sockets_stay_tokio_s() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        assert!(!is_here());
        let (accepted, _peer) = pair();
        assert!(Socket::here(accepted).is_err());
        let (done, ran) = oneshot::channel();
        spawn(async move { done.send(()).unwrap() });
        ran.await.unwrap();
    });
}
