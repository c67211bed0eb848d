//! The floor on one event loop: the same transaction pooler as the tokio floor
//! (`src/main.rs`: no authentication, no TLS, no features, simple Query messages only), as
//! PgBouncer is built: one thread waiting on epoll (mio) and calling each socket's handler,
//! no tasks, no wakers. Not the portal; to count what the portal's runtime costs against
//! (`bench/floor/run.py`).
//!
//! Usage: floor-loop LISTEN_PORT SERVER_PORT PASSWORD POOL_SIZE.

use std::{
    collections::VecDeque,
    io::{ErrorKind, Read, Write},
};

use dbportal_floor::{args, complete, greeting, login, reply_end};
use mio::{
    net::{TcpListener, TcpStream},
    Events, Interest, Poll, Token,
};

const LISTENER: Token = Token(usize::MAX);
/// Server connections' tokens start here; clients' are their index below it.
const SERVERS: usize = 1 << 20;

struct Client {
    stream: TcpStream,
    input: Vec<u8>,
    /// The startup packet is answered.
    ready: bool,
    server: Option<usize>,
    queued: bool,
}

struct Server {
    stream: TcpStream,
    buf: Vec<u8>,
    client: Option<usize>,
}

struct Floor {
    poll: Poll,
    clients: Vec<Option<Client>>,
    free: Vec<usize>,
    servers: Vec<Server>,
    idle: Vec<usize>,
    waiting: VecDeque<usize>,
    chunk: Vec<u8>,
}

/// Reads what `stream` has onto `buf` through `chunk` (zeroed once, not per read):
/// `Ok(false)` at the end of the stream. A read that fills less than it was given drained
/// the socket (as tokio assumes too): no read to see `WouldBlock`.
fn read_onto(stream: &mut TcpStream, chunk: &mut [u8], buf: &mut Vec<u8>) -> std::io::Result<bool> {
    loop {
        match stream.read(chunk) {
            Ok(0) => return Ok(false),
            Ok(k) => {
                buf.extend_from_slice(&chunk[..k]);
                if k < chunk.len() {
                    return Ok(true);
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(true),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Writes all of `bytes` (small messages: the socket takes them at once; it spins if not).
fn send(stream: &mut TcpStream, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        match stream.write(bytes) {
            Ok(k) => bytes = &bytes[k..],
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Floor {
    fn accept(&mut self, listener: &TcpListener) -> std::io::Result<()> {
        loop {
            let (mut stream, _) = match listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            };
            stream.set_nodelay(true)?;
            let c = self.free.pop().unwrap_or_else(|| {
                self.clients.push(None);
                self.clients.len() - 1
            });
            self.poll
                .registry()
                .register(&mut stream, Token(c), Interest::READABLE)?;
            self.clients[c] = Some(Client {
                stream,
                input: Vec::new(),
                ready: false,
                server: None,
                queued: false,
            });
        }
    }

    /// Closes a client; a server connection it held answers no one (its reply is dropped and
    /// the connection given back).
    fn close(&mut self, c: usize) {
        if let Some(mut client) = self.clients[c].take() {
            if let Some(s) = client.server {
                self.servers[s].client = None;
            }
            let _ = self.poll.registry().deregister(&mut client.stream);
            self.waiting.retain(|&w| w != c);
            self.free.push(c);
        }
    }

    fn client_readable(&mut self, c: usize) {
        let Some(client) = self.clients[c].as_mut() else {
            return;
        };
        match read_onto(&mut client.stream, &mut self.chunk, &mut client.input) {
            Ok(true) => self.client_input(c),
            _ => self.close(c),
        }
    }

    /// What the client sent: its startup, or a query to give a server connection.
    fn client_input(&mut self, c: usize) {
        let Some(client) = self.clients[c].as_mut() else {
            return;
        };
        while !client.ready && client.input.len() >= 4 {
            let len = u32::from_be_bytes([
                client.input[0],
                client.input[1],
                client.input[2],
                client.input[3],
            ]) as usize;
            if client.input.len() < len {
                return;
            }
            client.input.drain(..len);
            let answer = if len == 8 { b"N".to_vec() } else { greeting() };
            client.ready = len != 8;
            if send(&mut client.stream, &answer).is_err() {
                return self.close(c);
            }
        }
        if !client.ready || client.server.is_some() || client.queued {
            return;
        }
        let Some(n) = complete(&client.input) else {
            return;
        };
        if client.input[0] == b'X' {
            return self.close(c);
        }
        match self.idle.pop() {
            Some(s) => self.assign(c, s, n),
            None => {
                client.queued = true;
                self.waiting.push_back(c);
            }
        }
    }

    /// Server connection `s` is the client's for its query of `n` bytes.
    fn assign(&mut self, c: usize, s: usize, n: usize) {
        let Some(client) = self.clients[c].as_mut() else {
            return self.idle.push(s);
        };
        let server = &mut self.servers[s];
        if send(&mut server.stream, &client.input[..n]).is_err() {
            panic!("a server connection failed");
        }
        client.input.drain(..n);
        client.server = Some(s);
        server.client = Some(c);
    }

    fn server_readable(&mut self, s: usize) {
        let server = &mut self.servers[s];
        if !matches!(
            read_onto(&mut server.stream, &mut self.chunk, &mut server.buf),
            Ok(true)
        ) {
            panic!("a server connection was closed");
        }
        let Ok(end) = reply_end(&server.buf, 0) else {
            return;
        };
        let c = server.client.take();
        let mut failed = false;
        if let Some(client) = c.and_then(|c| self.clients[c].as_mut()) {
            client.server = None;
            failed = send(&mut client.stream, &server.buf[..end]).is_err();
        }
        server.buf.drain(..end);
        self.give_back(s);
        match c {
            Some(c) if failed => self.close(c),
            Some(c) => self.client_input(c),
            None => {}
        }
    }

    /// To the first waiting client, else idle.
    fn give_back(&mut self, s: usize) {
        while let Some(w) = self.waiting.pop_front() {
            let Some(client) = self.clients[w].as_mut() else {
                continue;
            };
            client.queued = false;
            if let Some(n) = complete(&client.input) {
                return self.assign(w, s, n);
            }
        }
        self.idle.push(s);
    }
}

fn main() -> std::io::Result<()> {
    let (listen, server, password, size) = args();
    let poll = Poll::new()?;
    let mut servers = Vec::new();
    for i in 0..size {
        let std = login(server, &password)?;
        std.set_nonblocking(true)?;
        let mut stream = TcpStream::from_std(std);
        poll.registry()
            .register(&mut stream, Token(SERVERS + i), Interest::READABLE)?;
        servers.push(Server {
            stream,
            buf: Vec::with_capacity(8192),
            client: None,
        });
    }
    let mut listener = TcpListener::bind(([127, 0, 0, 1], listen).into())?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    let mut floor = Floor {
        poll,
        clients: Vec::new(),
        free: Vec::new(),
        servers,
        idle: (0..size).collect(),
        waiting: VecDeque::new(),
        chunk: vec![0; 16 << 10],
    };
    let mut events = Events::with_capacity(256);
    // Runs until SIGTERM's default action ends the process.
    loop {
        if let Err(e) = floor.poll.poll(&mut events, None) {
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        for event in events.iter() {
            match event.token() {
                LISTENER => floor.accept(&listener)?,
                Token(t) if t >= SERVERS => floor.server_readable(t - SERVERS),
                Token(c) => floor.client_readable(c),
            }
        }
    }
}
