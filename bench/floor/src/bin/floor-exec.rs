//! The floor with the tokio floor's structure (`src/main.rs`: a future per client, the same
//! idle list and queue of waiting wakers; reads through one buffer per thread and small
//! writes written at once, as the loop floor's) polled by an executor of its own instead of
//! tokio's task scheduler and I/O driver: the sockets are registered with a mio poller of the
//! executor's, whose epoll descriptor is itself registered with tokio (one `AsyncFd`), and
//! one tokio task drains it and polls the futures its events woke. Tokio's timers, channels
//! and the rest keep working inside those futures, and the runtime's cost is paid once per
//! batch of events rather than once per socket event: what the portal's pooled plane would
//! cost if its client tasks ran this way. Not the portal; to count against
//! (`bench/floor/run.py`).
//!
//! A wake from another thread would need a queue of its own and a wake of the outer task
//! (the wakers here push onto this thread's ready list): nothing in the floor wakes across
//! threads.
//!
//! Usage: floor-exec LISTEN_PORT SERVER_PORT PASSWORD POOL_SIZE.

use std::{
    cell::{Cell, RefCell},
    collections::VecDeque,
    future::{poll_fn, Future},
    io::{ErrorKind, Read, Write},
    os::fd::{AsRawFd, RawFd},
    pin::Pin,
    rc::Rc,
    sync::{
        atomic::{AtomicBool, Ordering::Relaxed},
        Arc,
    },
    task::{Context, Poll, Wake, Waker},
    time::Duration,
};

use dbportal_floor::{args, complete, greeting, login, reply_end};
use mio::{
    net::{TcpListener, TcpStream},
    Events, Interest, Token,
};
use tokio::io::unix::AsyncFd;

const LISTENER: Token = Token(usize::MAX);
const EVENTS: usize = 256;

thread_local! {
    /// The tasks woken since their last poll, in order.
    static READY: RefCell<VecDeque<usize>> = const { RefCell::new(VecDeque::new()) };
    /// The executor is polling (a wake then needs no wake of its tokio task).
    static RUNNING: Cell<bool> = const { Cell::new(false) };
    /// The executor's tokio task, while it waits.
    static OUTER: RefCell<Option<Waker>> = const { RefCell::new(None) };
    /// What one read goes into, zeroed once.
    static CHUNK: RefCell<Vec<u8>> = RefCell::new(vec![0; 16 << 10]);
}

/// A task's waker: queues the task once until it is polled.
struct TaskWake {
    id: usize,
    queued: AtomicBool,
}

impl Wake for TaskWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.queued.swap(true, Relaxed) {
            READY.with(|r| r.borrow_mut().push_back(self.id));
            if !RUNNING.get() {
                OUTER.with(|o| {
                    if let Some(w) = o.borrow().as_ref() {
                        w.wake_by_ref();
                    }
                });
            }
        }
    }
}

type Task = Pin<Box<dyn Future<Output = ()>>>;

#[derive(Default)]
struct Exec {
    tasks: Vec<Option<Task>>,
    wakers: Vec<(Arc<TaskWake>, Waker)>,
    free: Vec<usize>,
}

impl Exec {
    fn spawn(&mut self, task: impl Future<Output = ()> + 'static) {
        let id = self.free.pop().unwrap_or_else(|| {
            let id = self.tasks.len();
            let flag = Arc::new(TaskWake {
                id,
                queued: AtomicBool::new(false),
            });
            self.wakers.push((flag.clone(), Waker::from(flag)));
            self.tasks.push(None);
            id
        });
        self.tasks[id] = Some(Box::pin(task));
        self.wakers[id].1.wake_by_ref();
    }

    fn run_ready(&mut self) {
        while let Some(id) = READY.with(|r| r.borrow_mut().pop_front()) {
            let (flag, waker) = &self.wakers[id];
            flag.queued.store(false, Relaxed);
            let Some(task) = self.tasks[id].as_mut() else {
                continue;
            };
            if task
                .as_mut()
                .poll(&mut Context::from_waker(waker))
                .is_ready()
            {
                self.tasks[id] = None;
                self.free.push(id);
            }
        }
    }
}

struct Sock {
    stream: TcpStream,
    readable: bool,
    reader: Option<Waker>,
}

struct Reactor {
    poll: mio::Poll,
    socks: Vec<Option<Sock>>,
    free: Vec<usize>,
}

/// A socket of the reactor's, for one future at a time.
struct PTcp {
    reactor: Rc<RefCell<Reactor>>,
    idx: usize,
}

impl PTcp {
    fn new(reactor: &Rc<RefCell<Reactor>>, mut stream: TcpStream) -> std::io::Result<PTcp> {
        let mut r = reactor.borrow_mut();
        let idx = r.free.pop().unwrap_or_else(|| {
            r.socks.push(None);
            r.socks.len() - 1
        });
        r.poll
            .registry()
            .register(&mut stream, Token(idx), Interest::READABLE)?;
        r.socks[idx] = Some(Sock {
            stream,
            readable: true,
            reader: None,
        });
        Ok(PTcp {
            reactor: reactor.clone(),
            idx,
        })
    }

    /// Reads what the socket has onto `buf`: 0 at the end of the stream. A read that fills
    /// less than it was given drained the socket, as in the other floors.
    async fn read_onto(&self, buf: &mut Vec<u8>) -> std::io::Result<usize> {
        poll_fn(|cx| {
            let mut r = self.reactor.borrow_mut();
            let sock = r.socks[self.idx].as_mut().expect("registered");
            loop {
                if !sock.readable {
                    match &sock.reader {
                        Some(w) if w.will_wake(cx.waker()) => {}
                        _ => sock.reader = Some(cx.waker().clone()),
                    }
                    return Poll::Pending;
                }
                let read: std::io::Result<usize> = CHUNK.with(|chunk| {
                    let chunk = &mut chunk.borrow_mut()[..];
                    let k = sock.stream.read(chunk)?;
                    if k < chunk.len() {
                        sock.readable = false;
                    }
                    buf.extend_from_slice(&chunk[..k]);
                    Ok(k)
                });
                match read {
                    Ok(k) => return Poll::Ready(Ok(k)),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => sock.readable = false,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
        })
        .await
    }

    /// Writes all of `bytes` (small messages: the socket takes them at once; it spins if not,
    /// as the loop floor does).
    fn write_all(&self, mut bytes: &[u8]) -> std::io::Result<()> {
        let mut r = self.reactor.borrow_mut();
        let sock = r.socks[self.idx].as_mut().expect("registered");
        while !bytes.is_empty() {
            match sock.stream.write(bytes) {
                Ok(k) => bytes = &bytes[k..],
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl Drop for PTcp {
    fn drop(&mut self) {
        let mut r = self.reactor.borrow_mut();
        if let Some(mut sock) = r.socks[self.idx].take() {
            let _ = r.poll.registry().deregister(&mut sock.stream);
            r.free.push(self.idx);
        }
    }
}

struct Pool {
    idle: Vec<Server>,
    waiting: VecDeque<Waker>,
}

struct Server {
    stream: PTcp,
    buf: Vec<u8>,
}

/// A server connection: an idle one, else after the tasks queued before.
async fn checkout(pool: &RefCell<Pool>) -> Server {
    loop {
        if let Some(s) = pool.borrow_mut().idle.pop() {
            return s;
        }
        let mut queued = false;
        poll_fn(|cx| {
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

async fn client(client: PTcp, pool: Rc<RefCell<Pool>>) -> std::io::Result<()> {
    let mut input: Vec<u8> = Vec::with_capacity(8192);
    // The startup (an SSLRequest refused first), answered without authentication.
    loop {
        while input.len() < 4
            || input.len() < u32::from_be_bytes([input[0], input[1], input[2], input[3]]) as usize
        {
            if client.read_onto(&mut input).await? == 0 {
                return Ok(());
            }
        }
        let len = u32::from_be_bytes([input[0], input[1], input[2], input[3]]) as usize;
        input.drain(..len);
        if len != 8 {
            break;
        }
        client.write_all(b"N")?;
    }
    client.write_all(&greeting())?;
    loop {
        let n = loop {
            if let Some(n) = complete(&input) {
                break n;
            }
            if client.read_onto(&mut input).await? == 0 {
                return Ok(());
            }
        };
        if input[0] == b'X' {
            return Ok(());
        }
        let mut server = checkout(&pool).await;
        server.stream.write_all(&input[..n])?;
        input.drain(..n);
        let mut from = 0;
        let end = loop {
            match reply_end(&server.buf, from) {
                Ok(end) => break end,
                Err(next) => from = next,
            }
            if server.stream.read_onto(&mut server.buf).await? == 0 {
                return Err(ErrorKind::UnexpectedEof.into());
            }
        };
        client.write_all(&server.buf[..end])?;
        server.buf.drain(..end);
        let mut p = pool.borrow_mut();
        p.idle.push(server);
        if let Some(w) = p.waiting.pop_front() {
            w.wake();
        }
    }
}

/// The poller's epoll descriptor, as tokio registers it.
struct PollFd(RawFd);

impl AsRawFd for PollFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

fn main() -> std::io::Result<()> {
    let (listen, server, password, size) = args();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let reactor = Rc::new(RefCell::new(Reactor {
            poll: mio::Poll::new()?,
            socks: Vec::new(),
            free: Vec::new(),
        }));
        // The safe constructor (deprecated in favour of an `unsafe` one that says who owns
        // the descriptor): the poller owns it, and `fd`, declared after it, is dropped first.
        #[allow(deprecated)]
        let fd = AsyncFd::with_interest(
            PollFd(reactor.borrow().poll.as_raw_fd()),
            tokio::io::Interest::READABLE,
        )?;
        let mut idle = Vec::new();
        for _ in 0..size {
            let std = login(server, &password)?;
            std.set_nonblocking(true)?;
            idle.push(Server {
                stream: PTcp::new(&reactor, TcpStream::from_std(std))?,
                buf: Vec::with_capacity(8192),
            });
        }
        let pool = Rc::new(RefCell::new(Pool {
            idle,
            waiting: VecDeque::new(),
        }));
        let mut listener = TcpListener::bind(([127, 0, 0, 1], listen).into())?;
        reactor
            .borrow()
            .poll
            .registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let mut exec = Exec::default();
        let mut events = Events::with_capacity(EVENTS);
        // Runs until SIGTERM's default action ends the process.
        loop {
            let mut guard = poll_fn(|cx| {
                OUTER.with(|o| *o.borrow_mut() = Some(cx.waker().clone()));
                fd.poll_read_ready(cx)
            })
            .await?;
            RUNNING.set(true);
            if let Err(e) = reactor
                .borrow_mut()
                .poll
                .poll(&mut events, Some(Duration::ZERO))
            {
                if e.kind() != ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            let mut n = 0;
            for event in events.iter() {
                n += 1;
                match event.token() {
                    LISTENER => loop {
                        let stream = match listener.accept() {
                            Ok((s, _)) => s,
                            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                            Err(e) => return Err(e),
                        };
                        stream.set_nodelay(true)?;
                        let c = PTcp::new(&reactor, stream)?;
                        let pool = pool.clone();
                        exec.spawn(async move {
                            let _ = client(c, pool).await;
                        });
                    },
                    Token(i) => {
                        let mut r = reactor.borrow_mut();
                        if let Some(sock) = r.socks[i].as_mut() {
                            sock.readable = true;
                            if let Some(w) = &sock.reader {
                                w.wake_by_ref();
                            }
                        }
                    }
                }
            }
            exec.run_ready();
            RUNNING.set(false);
            if n < EVENTS {
                guard.clear_ready();
            }
        }
    })
}
