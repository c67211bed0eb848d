//! The pooled sessions' executor: one per data-plane thread, polling the futures spawned onto
//! it ([`spawn`]) when their sockets' events or their wakers say so. Its sockets
//! ([`Socket`]) are registered with a mio poller of its own, whose epoll descriptor is in
//! turn registered with the thread's tokio runtime; one tokio task, the executor's, drains
//! the poller and polls the futures the events woke. Tokio's own costs per socket event (a
//! task's poll through the scheduler, a waker and a readiness check per read and write in the
//! I/O driver) are paid once per batch of events instead: `bench/floor/` counts the same
//! pooler at 1,700–2,000 instructions per transaction this way against 3,600–3,700 with a
//! tokio task per client.
//!
//! Tokio keeps working inside the futures (timers, channels, tasks they spawn, tokio
//! sockets): their wakers are the executor's, which queue the future and wake the executor's
//! task when it waits. A waker called on another thread queues the future through a
//! lock and wakes the executor's task the same way.
//!
//! A [`Socket`] may be read and written from any thread (a pooled server connection moves
//! between clients polled on different threads): its events arrive at the poller it was
//! registered with and wake whichever future waits on it, as a tokio socket's do
//! ([`socket`]).
//!
//! A future that panics is dropped, as a tokio task's would be; the others keep running.
//!
//! May import: nothing of the portal.

mod socket;
#[cfg(test)]
mod tests;

pub use socket::Socket;
use socket::{lock, Poller};

use std::{
    cell::{Cell, RefCell},
    collections::VecDeque,
    future::{poll_fn, Future},
    io,
    os::fd::{AsRawFd, RawFd},
    panic::AssertUnwindSafe,
    pin::Pin,
    rc::Rc,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst},
        Arc, Mutex,
    },
    task::{Context, Poll, Wake, Waker},
    time::Duration,
};

use futures::task::AtomicWaker;
use mio::Events;
use tokio::io::unix::AsyncFd;
use tracing::error;

/// Events taken from the poller at once; a full batch is followed by another without waiting.
const EVENTS: usize = 256;
/// Futures polled before the executor lets the thread's other tokio tasks run.
const POLLS_PER_TURN: usize = 1024;

static NEXT_ID: AtomicUsize = AtomicUsize::new(1);

thread_local! {
    /// The executor running on this thread, while [`run`] runs on it.
    static HERE: RefCell<Option<Rc<Local>>> = const { RefCell::new(None) };
    /// Its id (0: none), for a waker to tell whether it is called on its executor's thread.
    static HERE_ID: Cell<usize> = const { Cell::new(0) };
    /// Its futures woken since their last poll, in order.
    static READY: RefCell<VecDeque<usize>> = const { RefCell::new(VecDeque::new()) };
    /// It is polling its futures (a wake needs no wake of its task then).
    static RUNNING: Cell<bool> = const { Cell::new(false) };
}

/// What other threads reach of an executor: its queue of futures woken there and its
/// task's waker.
struct Shared {
    id: usize,
    remote: Mutex<Vec<usize>>,
    outer: AtomicWaker,
}

type Task = Pin<Box<dyn Future<Output = ()>>>;

/// The executor, on its thread.
struct Local {
    shared: Arc<Shared>,
    poller: Arc<Poller>,
    tasks: RefCell<Vec<Option<Task>>>,
    wakers: RefCell<Vec<(Arc<TaskWake>, Waker)>>,
    free: RefCell<Vec<usize>>,
    /// Futures spawned and not yet given a slot (a spawn from inside a poll lands here).
    incoming: RefCell<Vec<Task>>,
}

/// A future's waker: queues it once until it is polled.
struct TaskWake {
    id: usize,
    queued: AtomicBool,
    executor: Arc<Shared>,
}

impl Wake for TaskWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.queued.swap(true, SeqCst) {
            return;
        }
        if HERE_ID.get() == self.executor.id {
            READY.with_borrow_mut(|r| r.push_back(self.id));
            if !RUNNING.get() {
                self.executor.outer.wake();
            }
        } else {
            lock(&self.executor.remote).push(self.id);
            self.executor.outer.wake();
        }
    }
}

/// The executor's epoll descriptor, as tokio registers it.
struct PollFd(RawFd);

impl AsRawFd for PollFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// Runs an executor on this thread until the future is dropped, which drops the futures
/// spawned on it. Futures [`spawn`]ed on this thread and sockets made with [`Socket::here`]
/// meanwhile are its. Runs on a current-thread tokio runtime, beside its tasks.
pub async fn run() {
    let started = mio::Poll::new().and_then(|poll| {
        let registry = poll.registry().try_clone()?;
        Ok((poll, registry))
    });
    let (poll, registry) = match started {
        Ok(p) => p,
        Err(e) => {
            // Sessions then run as tokio tasks ([`spawn`], [`Socket::here`]).
            error!(error = %e, "no poller for the pooled sessions' executor");
            return std::future::pending().await;
        }
    };
    let local = Rc::new(Local {
        shared: Arc::new(Shared {
            id: NEXT_ID.fetch_add(1, SeqCst),
            remote: Mutex::new(Vec::new()),
            outer: AtomicWaker::new(),
        }),
        poller: Arc::new(Poller::new(registry)),
        tasks: RefCell::new(Vec::new()),
        wakers: RefCell::new(Vec::new()),
        free: RefCell::new(Vec::new()),
        incoming: RefCell::new(Vec::new()),
    });
    HERE_ID.set(local.shared.id);
    HERE.with(|h| *h.borrow_mut() = Some(local.clone()));
    Poller::install(Some(local.poller.clone()));
    let installed = Installed;
    // The executor's own polls are not counted against tokio's cooperative budget (it would
    // run out inside one turn and make every future yield at once); it yields by itself
    // after `POLLS_PER_TURN`.
    tokio::task::unconstrained(drive(local, poll)).await;
    // Its poller failed: its futures end here, and later sessions run as tokio tasks.
    drop(installed);
    std::future::pending().await
}

/// Uninstalls this thread's executor when [`run`] ends, dropping its futures there (on the
/// runtime's thread, inside it), not when the thread's locals are destroyed.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        HERE_ID.set(0);
        RUNNING.set(false);
        READY.with_borrow_mut(|r| r.clear());
        Poller::install(None);
        let local = HERE.with(|h| h.borrow_mut().take());
        if let Some(local) = local {
            let tasks = std::mem::take(&mut *local.tasks.borrow_mut());
            let incoming = std::mem::take(&mut *local.incoming.borrow_mut());
            drop(tasks);
            drop(incoming);
        }
    }
}

/// Whether this thread has an executor.
pub fn is_here() -> bool {
    HERE_ID.get() != 0
}

/// Runs `future` on this thread's executor, or as a tokio task where there is none.
pub fn spawn<F>(future: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    let here = HERE.with(|h| h.borrow().clone());
    match here {
        Some(local) => {
            local.incoming.borrow_mut().push(Box::pin(future));
            if !RUNNING.get() {
                local.shared.outer.wake();
            }
        }
        None => {
            tokio::spawn(future);
        }
    }
}

impl Local {
    fn has_work(&self) -> bool {
        !READY.with_borrow(|r| r.is_empty())
            || !self.incoming.borrow().is_empty()
            || !lock(&self.shared.remote).is_empty()
    }

    /// Gives the spawned futures a slot each, queued for their first poll.
    fn admit(&self) {
        let incoming = std::mem::take(&mut *self.incoming.borrow_mut());
        for task in incoming {
            let id = match self.free.borrow_mut().pop() {
                Some(id) => id,
                None => {
                    let id = self.tasks.borrow().len();
                    let wake = Arc::new(TaskWake {
                        id,
                        queued: AtomicBool::new(false),
                        executor: self.shared.clone(),
                    });
                    self.wakers
                        .borrow_mut()
                        .push((wake.clone(), Waker::from(wake)));
                    self.tasks.borrow_mut().push(None);
                    id
                }
            };
            self.tasks.borrow_mut()[id] = Some(task);
            self.wakers.borrow()[id].0.queued.store(true, SeqCst);
            READY.with_borrow_mut(|r| r.push_back(id));
        }
    }

    /// Polls queued futures, at most `budget` of them: the number polled. A poll may spawn
    /// (onto `incoming`) and wake (onto `ready`), never admit: the slots stay borrowed.
    fn run_ready(&self, budget: usize) -> usize {
        let wakers = self.wakers.borrow();
        let mut tasks = self.tasks.borrow_mut();
        let mut polled = 0;
        while polled < budget {
            let Some(id) = READY.with_borrow_mut(|r| r.pop_front()) else {
                break;
            };
            let (wake, waker) = &wakers[id];
            wake.queued.store(false, SeqCst);
            let Some(task) = tasks[id].as_mut() else {
                continue;
            };
            polled += 1;
            let mut cx = Context::from_waker(waker);
            match std::panic::catch_unwind(AssertUnwindSafe(|| task.as_mut().poll(&mut cx))) {
                Ok(Poll::Pending) => {}
                Ok(Poll::Ready(())) => {
                    tasks[id] = None;
                    self.free.borrow_mut().push(id);
                }
                Err(_) => {
                    error!("a session panicked and was dropped");
                    tasks[id] = None;
                    self.free.borrow_mut().push(id);
                }
            }
        }
        polled
    }
}

/// The executor's task: waits for the poller's descriptor or for woken futures, then drains
/// the poller and polls them.
async fn drive(local: Rc<Local>, mut poll: mio::Poll) {
    // The safe constructor (deprecated in favour of an `unsafe` one that says who owns the
    // descriptor): `poll` owns it and outlives `fd`, which is declared after it.
    #[allow(deprecated)]
    let fd = match AsyncFd::with_interest(PollFd(poll.as_raw_fd()), tokio::io::Interest::READABLE) {
        Ok(fd) => fd,
        Err(e) => {
            error!(error = %e, "the pooled sessions' poller could not be registered");
            return;
        }
    };
    let mut events = Events::with_capacity(EVENTS);
    loop {
        let ready = poll_fn(|cx| {
            local.shared.outer.register(cx.waker());
            match fd.poll_read_ready(cx) {
                Poll::Ready(r) => Poll::Ready(Some(r)),
                Poll::Pending if local.has_work() => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            }
        })
        .await;
        let guard = match ready {
            Some(Ok(guard)) => Some(guard),
            Some(Err(e)) => {
                error!(error = %e, "the pooled sessions' poller failed");
                return;
            }
            None => None,
        };
        RUNNING.set(true);
        if let Some(mut guard) = guard {
            events.clear();
            match poll.poll(&mut events, Some(Duration::ZERO)) {
                Ok(()) => local.poller.dispatch(&events),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => error!(error = %e, "the pooled sessions' poller failed"),
            }
            if events.iter().count() < EVENTS {
                guard.clear_ready();
            }
        }
        let remote = std::mem::take(&mut *lock(&local.shared.remote));
        READY.with_borrow_mut(|r| r.extend(remote));
        local.admit();
        let polled = local.run_ready(POLLS_PER_TURN);
        RUNNING.set(false);
        if polled == POLLS_PER_TURN && local.has_work() {
            tokio::task::yield_now().await;
        }
    }
}
