//! The floor on tokio: the least a transaction pooler for PostgreSQL costs per transaction
//! when it runs as the portal does (a current-thread runtime, a task per client), to count
//! the portal's own share against (`bench/floor/run.py`). Not the portal and not a pooler
//! anyone should run: a list of idle server connections and a queue of waiting tasks, and
//! nothing else. No client authentication (every startup is answered with AuthenticationOk),
//! no TLS, no pinning, no extended protocol, no timeouts, no cancel, no metrics: a client
//! sends simple Query messages (`pgbench -S -M simple`), each one transaction.
//!
//! Usage: dbportal-floor LISTEN_PORT SERVER_PORT PASSWORD POOL_SIZE (user and database
//! `bench`, the server on 127.0.0.1, SCRAM-SHA-256 with PASSWORD).

use std::{cell::RefCell, collections::VecDeque, rc::Rc, task::Poll, task::Waker};

use dbportal_floor::{args, complete, greeting, login, reply_end};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

struct Pool {
    idle: Vec<Server>,
    waiting: VecDeque<Waker>,
}

struct Server {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// The client's startup (an SSLRequest refused first), answered without authentication.
async fn greet(client: &mut TcpStream) -> std::io::Result<()> {
    loop {
        let len = client.read_u32().await? as usize;
        let mut rest = vec![0; len.saturating_sub(4)];
        client.read_exact(&mut rest).await?;
        if len != 8 {
            break;
        }
        client.write_all(b"N").await?;
    }
    client.write_all(&greeting()).await
}

/// A server connection: an idle one, else after the tasks queued before.
async fn checkout(pool: &RefCell<Pool>) -> Server {
    loop {
        if let Some(s) = pool.borrow_mut().idle.pop() {
            return s;
        }
        let mut queued = false;
        std::future::poll_fn(|cx| {
            if queued {
                return Poll::Ready(());
            }
            queued = true;
            pool.borrow_mut().waiting.push_back(cx.waker().clone());
            Poll::Pending
        })
        .await;
    }
}

async fn client(mut client: TcpStream, pool: Rc<RefCell<Pool>>) -> std::io::Result<()> {
    client.set_nodelay(true)?;
    greet(&mut client).await?;
    let mut input: Vec<u8> = Vec::with_capacity(8192);
    loop {
        let n = loop {
            if let Some(n) = complete(&input) {
                break n;
            }
            if client.read_buf(&mut input).await? == 0 {
                return Ok(());
            }
        };
        if input[0] == b'X' {
            return Ok(());
        }
        let mut server = checkout(&pool).await;
        server.stream.write_all(&input[..n]).await?;
        input.drain(..n);
        let mut from = 0;
        let end = loop {
            match reply_end(&server.buf, from) {
                Ok(end) => break end,
                Err(next) => from = next,
            }
            if server.stream.read_buf(&mut server.buf).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        };
        client.write_all(&server.buf[..end]).await?;
        server.buf.drain(..end);
        let mut p = pool.borrow_mut();
        p.idle.push(server);
        if let Some(w) = p.waiting.pop_front() {
            w.wake();
        }
    }
}

fn main() -> std::io::Result<()> {
    let (listen, server, password, size) = args();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    tokio::task::LocalSet::new().block_on(&runtime, async move {
        let mut idle = Vec::new();
        for _ in 0..size {
            let std = login(server, &password)?;
            std.set_nonblocking(true)?;
            idle.push(Server {
                stream: TcpStream::from_std(std)?,
                buf: Vec::with_capacity(8192),
            });
        }
        let pool = Rc::new(RefCell::new(Pool {
            idle,
            waiting: VecDeque::new(),
        }));
        let listener = TcpListener::bind(("127.0.0.1", listen)).await?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        loop {
            tokio::select! {
                _ = term.recv() => return Ok(()),
                accepted = listener.accept() => {
                    let (c, _) = accepted?;
                    tokio::task::spawn_local(client(c, pool.clone()));
                }
            }
        }
    })
}
