//! Serving a router with limits on what a client may hold: `axum::serve` sets no
//! header-read deadline, so a client sending headers slowly (or idling on a keep-alive
//! connection) could hold a connection forever. This loop is `axum::serve` with hyper's
//! `header_read_timeout` (which also bounds the wait for the next request on a kept-alive
//! connection) and a cap on the request head's size. HTTP/1.1 only: devices and
//! dashboards speak it, and a connection that sends nothing at all is then also timed
//! out (protocol detection for HTTP/2 would wait for the first bytes forever). Every
//! HTTP listener of the pipeline uses it: ingest, query and the admin ports.
//!
//! It also serves at most `max_connections` connections at once: at the cap the
//! connection accepted waits for a slot in the process, and the next ones in the
//! kernel's listen backlog (their handshake completes there, so a client only sees a
//! slower answer) until one closes. The connection waiting takes the place of the open
//! connection idle longest, if one has had its last answer sent [`IDLE_RECLAIMED`] ago
//! or more and no byte since (kept alive between requests, or opened and silent), as
//! nginx closes idle keep-alive connections when it runs out; while nobody waits,
//! nothing is closed. Until 2026-12-07 an idle connection held its slot until the header deadline,
//! so 1,024 clients that each sent a request every 9 s kept every device out. Each open
//! connection holds about 17 KiB (hyper's read buffer, the request in flight, the task),
//! and an open-loop client does not slow down when the server does: in a 1 s database
//! stall at 3,600 readings/s one ran ingest up to 2,048 connections and 60 MiB
//! (2026-12-01), where it otherwise stays under 35. What the bodies hold is bounded
//! apart, by ingest's `limits::BodyBudget`.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Request;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// What one connection may take.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// A request head (or, between requests, the next one) must arrive within this; and
    /// a client that takes none of an answer's bytes for this long is disconnected
    /// (`WriteStall`).
    pub header_read_timeout: Duration,
    /// Largest request head (request line and headers); at least 8 KiB.
    pub max_header_bytes: usize,
    /// Connections served at once; at least 1.
    pub max_connections: usize,
}

/// How many of a listener's open connections have sent a request whose path starts
/// with a prefix (ingest: `/v1/telemetry`, the connections readings come from; an idle
/// scraper of `/metrics` is not one). Cheap to clone and read.
#[derive(Debug, Clone)]
pub struct OpenConnections {
    prefix: &'static str,
    count: Arc<AtomicUsize>,
}

impl OpenConnections {
    pub fn new(prefix: &'static str) -> Self {
        Self {
            prefix,
            count: Arc::default(),
        }
    }

    pub fn get(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// Counts one connection by hand until the returned guard is dropped, as a
    /// connection that sent a request under the prefix is counted until it closes.
    pub fn hold(&self) -> CountedConnection {
        let connection = self.connection();
        connection.saw(self.prefix);
        connection
    }

    fn connection(&self) -> CountedConnection {
        CountedConnection {
            prefix: self.prefix,
            count: self.count.clone(),
            counted: AtomicBool::new(false),
        }
    }
}

/// One connection of [`OpenConnections`]: counted from its first request under the
/// prefix until it is dropped.
#[derive(Debug)]
pub struct CountedConnection {
    prefix: &'static str,
    count: Arc<AtomicUsize>,
    counted: AtomicBool,
}

impl CountedConnection {
    fn saw(&self, path: &str) {
        if path.starts_with(self.prefix) && !self.counted.swap(true, Ordering::Relaxed) {
            self.count.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for CountedConnection {
    fn drop(&mut self) {
        if *self.counted.get_mut() {
            self.count.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Serves `router` until `shutdown`, then lets the requests in flight finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) {
    serve_counted(listener, router, limits, None, shutdown).await;
}

/// [`serve`], keeping `open` up to date when given.
///
/// At `shutdown` it stops in a way that cuts off no request a client already sent:
/// - the connection accepted and waiting for a slot at the cap, and those the kernel
///   already completed (in the listen backlog, each perhaps with a request on the
///   wire), are taken and served like the others, and only then
///   is the listener closed, so that a later connection is refused (the client knows
///   nothing was sent) rather than reset when the process exits;
/// - every answer from then on says `Connection: close`, so a client does not send its
///   next request over a connection that is about to close;
/// - a connection goes on for [`SHUTDOWN_LINGER`] before it is told to shut down (it
///   then finishes the request in progress, or closes if idle): a request already on
///   its way over an idle keep-alive connection is read and answered instead of being
///   met by a close (which the client sees as a reset, or an incomplete message). A
///   connection reclaimed at the cap (`free_slot`) goes the same way.
pub async fn serve_counted(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    open: Option<OpenConnections>,
    shutdown: CancellationToken,
) {
    let connections = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let served = Served {
        router,
        limits,
        open,
        shutdown: shutdown.clone(),
        stopping: Arc::new(AtomicBool::new(false)),
        registry: Arc::default(),
    };
    // The connection accepted and waiting for a slot when the shutdown came.
    let mut waiting = None;
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of file descriptors and the like: pause rather than spin.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // At the cap this one waits for a slot, and the next ones in the listen backlog.
        let slot = tokio::select! {
            _ = shutdown.cancelled() => None,
            // The semaphore is never closed.
            slot = free_slot(&slots, &served.registry) => slot.ok(),
        };
        let Some(slot) = slot else {
            waiting = Some(stream);
            break;
        };
        served.spawn(&connections, stream, Some(slot));
    }
    served.stopping.store(true, Ordering::Relaxed);
    for stream in waiting
        .into_iter()
        .chain(backlog(listener, limits.max_connections))
    {
        served.spawn(&connections, stream, None);
    }
    connections.close();
    connections.wait().await;
}

/// How long a connection must have had no request in flight, and sent nothing, to give
/// its place up to one waiting at the cap. Not at once: a client that just got its
/// answer may be sending its next request, which a close would meet.
pub const IDLE_RECLAIMED: Duration = Duration::from_secs(1);

/// How often a connection waiting at the cap looks again for one idle long enough.
const RECLAIM_RETRY: Duration = Duration::from_millis(250);

/// A slot for a connection accepted. At the cap, closes the open connection idle
/// longest ([`Registry::reclaim_one`]), looking again every [`RECLAIM_RETRY`] until a
/// slot frees.
async fn free_slot(
    slots: &Arc<Semaphore>,
    registry: &Registry,
) -> Result<OwnedSemaphorePermit, AcquireError> {
    if let Ok(slot) = slots.clone().try_acquire_owned() {
        return Ok(slot);
    }
    loop {
        registry.reclaim_one();
        tokio::select! {
            slot = slots.clone().acquire_owned() => return slot,
            () = tokio::time::sleep(RECLAIM_RETRY) => {}
        }
    }
}

/// The open connections of a listener, each with its [`Activity`] and its own shutdown
/// token (a child of the listener's): touched when a connection opens or ends and at
/// the cap, never per request.
#[derive(Debug, Default)]
struct Registry {
    open: Mutex<Open>,
}

#[derive(Debug, Default)]
struct Open {
    next_id: u64,
    connections: std::collections::HashMap<u64, Registered>,
}

#[derive(Debug)]
struct Registered {
    activity: Arc<Activity>,
    /// Cancelled to tell the connection to close, as a shutdown does.
    close: CancellationToken,
}

impl Registry {
    /// Registers a connection; it stays registered until the guard is dropped.
    fn register(
        self: &Arc<Self>,
        activity: Arc<Activity>,
        close: CancellationToken,
    ) -> Option<RegisteredGuard> {
        let mut open = self.open.lock().ok()?;
        let id = open.next_id;
        open.next_id += 1;
        open.connections.insert(id, Registered { activity, close });
        Some(RegisteredGuard {
            registry: self.clone(),
            id,
        })
    }

    /// Tells the connection idle longest, if one is [`Activity::reclaimable`], to close.
    fn reclaim_one(&self) {
        let Ok(open) = self.open.lock() else {
            return;
        };
        let now_ms = Activity::now_ms();
        let idlest = open
            .connections
            .values()
            .filter(|registered| {
                !registered.close.is_cancelled() && registered.activity.reclaimable(now_ms)
            })
            .min_by_key(|registered| registered.activity.idle_since_ms.load(Ordering::Relaxed));
        if let Some(registered) = idlest {
            registered.close.cancel();
        }
    }
}

/// Removes its connection from the [`Registry`] when dropped.
#[derive(Debug)]
struct RegisteredGuard {
    registry: Arc<Registry>,
    id: u64,
}

impl Drop for RegisteredGuard {
    fn drop(&mut self) {
        if let Ok(mut open) = self.registry.open.lock() {
            open.connections.remove(&self.id);
        }
    }
}

/// Whether a connection has a request in flight or bytes of one coming, and since when
/// it has had neither. Only its own task writes it.
#[derive(Debug)]
struct Activity {
    in_flight: AtomicUsize,
    /// Bytes arrived since the last answer (or since the connection was accepted): the
    /// next request's head on its way.
    read_since_answer: AtomicBool,
    /// When the last request in flight got its answer (or the connection was accepted),
    /// in ms since [`Activity::epoch`].
    idle_since_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            read_since_answer: AtomicBool::new(false),
            idle_since_ms: AtomicU64::new(Self::now_ms()),
        }
    }

    fn epoch() -> Instant {
        static EPOCH: OnceLock<Instant> = OnceLock::new();
        *EPOCH.get_or_init(Instant::now)
    }

    fn now_ms() -> u64 {
        u64::try_from(Self::epoch().elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn request(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// An answer was sent whole (or given up with its connection): [`AnswerEnd`].
    fn answered(&self) {
        self.idle_since_ms.store(Self::now_ms(), Ordering::Relaxed);
        self.read_since_answer.store(false, Ordering::Relaxed);
        // Release: a reclaim that sees the count fall sees the time and the flag above.
        self.in_flight.fetch_sub(1, Ordering::Release);
    }

    fn read(&self) {
        self.read_since_answer.store(true, Ordering::Relaxed);
    }

    /// No request in flight, none coming, for [`IDLE_RECLAIMED`] or more at `now_ms`.
    fn reclaimable(&self, now_ms: u64) -> bool {
        if self.in_flight.load(Ordering::Acquire) != 0 {
            return false;
        }
        let idle_since = self.idle_since_ms.load(Ordering::Relaxed);
        !self.read_since_answer.load(Ordering::Relaxed)
            && now_ms.saturating_sub(idle_since) >= IDLE_RECLAIMED.as_millis() as u64
    }
}

/// An answer's body that tells its connection's [`Activity`] when hyper is done with
/// it: dropped once its last frame was written (or with the connection). Counted when
/// the handler returned, an answer still being written to a slow client would count as
/// idle, and a pipelined request behind it be lost with a reclaim.
struct AnswerEnd {
    body: Body,
    activity: Arc<Activity>,
}

impl hyper::body::Body for AnswerEnd {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

impl Drop for AnswerEnd {
    fn drop(&mut self) {
        self.activity.answered();
    }
}

/// Takes the connections waiting in `listener`'s backlog, then closes it. They are
/// served without a slot (as is the one accepted and waiting for a slot at the stop):
/// the backlog holds at most `max_connections` and one more
/// (`bootstrap::listen` asks for that many, and Linux lets one more in).
///
/// `accept(2)` is asked directly: the runtime learns of a connection the kernel completed
/// only at its next look at the events, which a busy worker makes milliseconds after the
/// stop, so `TcpListener::accept` would find nothing where the kernel holds connections
/// (the close would then reset them, requests and all).
fn backlog(listener: TcpListener, max_connections: usize) -> Vec<tokio::net::TcpStream> {
    let listener = match listener.into_std() {
        Ok(listener) => listener,
        Err(error) => {
            tracing::warn!(%error, "listen backlog not taken");
            return Vec::new();
        }
    };
    let mut waiting = Vec::new();
    for _ in 0..=max_connections.max(1) {
        // Still non-blocking, as the runtime made it: `WouldBlock` once the backlog is empty.
        let (stream, _) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(error) => match error.kind() {
                io::ErrorKind::WouldBlock => break,
                // One connection's trouble (gone before it was taken): on to the next.
                io::ErrorKind::Interrupted
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::ConnectionReset => continue,
                _ => {
                    tracing::warn!(%error, "listen backlog not taken");
                    break;
                }
            },
        };
        let registered = stream
            .set_nonblocking(true)
            .and_then(|()| tokio::net::TcpStream::from_std(stream));
        match registered {
            Ok(stream) => waiting.push(stream),
            Err(error) => tracing::warn!(%error, "a connection of the listen backlog not served"),
        }
    }
    waiting
}

/// How long a connection goes on serving after a shutdown began before it is told to
/// shut down: long enough for a request already sent to arrive and be read.
pub const SHUTDOWN_LINGER: Duration = Duration::from_millis(100);

/// What each connection of [`serve_counted`] is served with.
struct Served {
    router: Router,
    limits: ConnectionLimits,
    open: Option<OpenConnections>,
    shutdown: CancellationToken,
    /// Set once the shutdown began: answers then say `Connection: close`. A flag of its
    /// own because asking the token locks a mutex all connections share, at every answer
    /// (~85k a second on /stats); the flag is one load.
    stopping: Arc<AtomicBool>,
    /// The open connections, for the reclaim at the cap ([`free_slot`]).
    registry: Arc<Registry>,
}

impl Served {
    fn spawn(
        &self,
        connections: &TaskTracker,
        stream: tokio::net::TcpStream,
        slot: Option<OwnedSemaphorePermit>,
    ) {
        let _ = stream.set_nodelay(true);
        // The service, and with it this connection's place in the count, lives as long
        // as the connection.
        let seen = self.open.as_ref().map(|open| Arc::new(open.connection()));
        let stopping = self.stopping.clone();
        let activity = Arc::new(Activity::new());
        let (requested, answered) = (activity.clone(), activity.clone());
        let service = TowerToHyperService::new(
            self.router
                .clone()
                .map_request(move |request: Request<Incoming>| {
                    requested.request();
                    if let Some(seen) = &seen {
                        seen.saw(request.uri().path());
                    }
                    request.map(Body::new)
                })
                .map_response(move |mut response: axum::response::Response| {
                    if stopping.load(Ordering::Relaxed) {
                        response.headers_mut().insert(
                            axum::http::header::CONNECTION,
                            axum::http::HeaderValue::from_static("close"),
                        );
                    }
                    let activity = answered.clone();
                    response.map(|body| AnswerEnd { body, activity })
                }),
        );
        // Its own token: cancelled with the listener's, or alone by a reclaim at the cap.
        // Waiting on it locks only this connection's node, not the listener's token.
        let shutdown = self.shutdown.child_token();
        let registered = self.registry.register(activity.clone(), shutdown.clone());
        let limits = self.limits;
        connections.spawn(async move {
            let _registered = registered;
            let _slot = slot;
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .max_buf_size(limits.max_header_bytes.max(8192));
            let stream = WriteStall::new(stream, limits.header_read_timeout, activity);
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            let ended = tokio::select! {
                // The connection first: a request that arrived as the linger ended is
                // read before the connection is told to shut down, which would close it
                // as idle (the client's request met by a reset).
                biased;
                result = connection.as_mut() => Some(result),
                _ = async {
                    shutdown.cancelled().await;
                    tokio::time::sleep(SHUTDOWN_LINGER).await;
                } => None,
            };
            let result = match ended {
                Some(result) => result,
                None => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = result {
                tracing::debug!(%error, "connection ended with an error");
            }
        });
    }
}

/// A connection's socket whose writes fail once the client has taken none of an answer's
/// bytes for `limit`.
///
/// hyper times the arrival of a request head, not the sending of an answer: a client
/// that sends requests and never reads the answers (its receive window full) would hold
/// its connection, and one of the `max_connections` slots, forever, and a shutdown would
/// wait for that answer forever. A write that stays pending for `limit` now fails, and
/// hyper closes the connection. A client that reads, however slowly, makes progress and
/// is not cut.
///
/// It also notes, in the connection's [`Activity`], that bytes arrived.
struct WriteStall {
    stream: tokio::net::TcpStream,
    limit: Duration,
    /// Armed when a write first found the socket full; dropped at the next progress.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
    activity: Arc<Activity>,
}

impl WriteStall {
    fn new(stream: tokio::net::TcpStream, limit: Duration, activity: Arc<Activity>) -> Self {
        Self {
            stream,
            limit,
            stalled: None,
            activity,
        }
    }

    /// What a write that `progress`ed or not answers: its own result when it made
    /// progress (or failed), pending while the stall is shorter than `limit`, an error
    /// once it is not.
    fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        progress: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if progress.is_ready() {
            self.stalled = None;
            return progress;
        }
        let limit = self.limit;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match stalled.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client took none of the answer within the header read timeout",
            ))),
        }
    }
}

impl AsyncRead for WriteStall {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = Pin::new(&mut this.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.read();
        }
        read
    }
}

impl AsyncWrite for WriteStall {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let progress = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.watch(cx, progress)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let progress = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.watch(cx, progress)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let progress = Pin::new(&mut this.stream).poll_flush(cx);
        this.watch(cx, progress)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let progress = Pin::new(&mut this.stream).poll_shutdown(cx);
        this.watch(cx, progress)
    }
}
