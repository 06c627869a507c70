//! One worker's upstream connections: idle keep-alive connections kept by target, a new one
//! opened when none is idle, and the response body that hands its connection back once the
//! body has ended. A worker is one thread, so the pool is a plain `RefCell`, no lock.
//!
//! It must never hand out a connection to a target that is not live any more (the next
//! deploy stops that instance), never pool a connection whose response was not read to its
//! end, and never resend a request the upstream may have seen: only a request that a
//! closed connection gave back unwritten is sent again, on another connection.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tracing::debug;

use super::Target;
use super::meter::UpstreamFailure;

/// Idle upstream connections are closed after one to two of these, so keep-alive traffic
/// skips the TCP handshake while a quiet app is not held open forever.
pub(super) const UPSTREAM_IDLE_SWEEP: Duration = Duration::from_secs(15);

/// Instances listen on loopback, so a connect that takes this long means the app is wedged,
/// not that the network is slow.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Idle connections kept per target and worker; past this a finished connection is closed
/// instead (nginx's `keepalive` is the same cap). High enough for hundreds of concurrent
/// keep-alive clients per worker.
const MAX_IDLE_PER_TARGET: usize = 1024;

/// New connections one request may try when each closes before its request was written
/// (an app that accepts and hangs up at once), before it gives up with a 502.
const MAX_NEW_CONNECTIONS_PER_REQUEST: usize = 3;

type Sender = http1::SendRequest<Incoming>;

#[derive(Debug, thiserror::Error)]
pub(super) enum UpstreamError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("connect: no answer in {UPSTREAM_CONNECT_TIMEOUT:?}")]
    ConnectTimeout,
    #[error("handshake: {0}")]
    Handshake(hyper::Error),
    #[error("request: {0}")]
    Request(hyper::Error),
    #[error(
        "{MAX_NEW_CONNECTIONS_PER_REQUEST} new connections closed before the request was written"
    )]
    Unusable,
}

impl UpstreamError {
    /// The app could not be reached at all, as opposed to failing a request it got.
    pub(super) fn is_unreachable(&self) -> bool {
        matches!(self, Self::Connect(_) | Self::ConnectTimeout)
    }

    /// How the instance failed to answer, as the meter counts it.
    pub(super) fn failure(&self) -> UpstreamFailure {
        match self {
            Self::Connect(err) if err.kind() == std::io::ErrorKind::ConnectionRefused => {
                UpstreamFailure::Refused
            }
            Self::Connect(err) if err.kind() == std::io::ErrorKind::ConnectionReset => {
                UpstreamFailure::Reset
            }
            Self::ConnectTimeout => UpstreamFailure::Timeout,
            // Connections that closed under the request, or mid-response.
            Self::Unusable => UpstreamFailure::Reset,
            Self::Request(err) | Self::Handshake(err)
                if err.is_incomplete_message() || err.is_canceled() || is_reset(err) =>
            {
                UpstreamFailure::Reset
            }
            _ => UpstreamFailure::Other,
        }
    }
}

/// Whether a reset connection is somewhere under `err`.
fn is_reset(err: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
            );
        }
        source = cause.source();
    }
    false
}

pub(super) struct UpstreamPool {
    /// The live target, the same cell the proxy switches: only its connections are kept.
    live: Arc<ArcSwapOption<Target>>,
    by_target: Vec<IdleConnections>,
    /// Advanced by each sweep; an idle connection remembers the sweep it came back after.
    sweep: u64,
}

struct IdleConnections {
    target: Arc<Target>,
    /// Last in, first out: the connections used most recently stay warm, the others age out.
    idle: Vec<Idle>,
    /// Requests connecting anew that take the next connection coming back instead, if it
    /// comes back before their own connect is done (see [`obtain`]).
    waiting: VecDeque<oneshot::Sender<Sender>>,
}

struct Idle {
    sender: Sender,
    sweep: u64,
}

impl UpstreamPool {
    pub(super) fn new(live: Arc<ArcSwapOption<Target>>) -> Self {
        Self {
            live,
            by_target: Vec::new(),
            sweep: 0,
        }
    }

    fn is_live(&self, target: &Arc<Target>) -> bool {
        self.live
            .load()
            .as_ref()
            .is_some_and(|live| Arc::ptr_eq(live, target))
    }

    /// An idle connection to `target` that is still open, if there is one.
    fn checkout(&mut self, target: &Arc<Target>) -> Option<Sender> {
        // A switch happened since the last request: what the old targets kept is dropped
        // (closing those connections) before the next deploy stops their instance.
        if self
            .by_target
            .iter()
            .any(|set| !Arc::ptr_eq(&set.target, target))
        {
            self.by_target
                .retain(|set| Arc::ptr_eq(&set.target, target));
        }
        let set = self.by_target.first_mut()?;
        while let Some(idle) = set.idle.pop() {
            if !idle.sender.is_closed() {
                return Some(idle.sender);
            }
        }
        None
    }

    fn set_of(&mut self, target: &Arc<Target>) -> &mut IdleConnections {
        let at = match self
            .by_target
            .iter()
            .position(|set| Arc::ptr_eq(&set.target, target))
        {
            Some(at) => at,
            None => {
                self.by_target.push(IdleConnections {
                    target: Arc::clone(target),
                    idle: Vec::new(),
                    waiting: VecDeque::new(),
                });
                self.by_target.len() - 1
            }
        };
        &mut self.by_target[at]
    }

    /// Takes back a connection whose response ended, or that was just opened; kept only
    /// while its target is live. A request waiting for one gets it first.
    fn checkin(&mut self, target: Arc<Target>, mut sender: Sender) {
        if sender.is_closed() || !self.is_live(&target) {
            return;
        }
        let sweep = self.sweep;
        let set = self.set_of(&target);
        while let Some(waiter) = set.waiting.pop_front() {
            match waiter.send(sender) {
                Ok(()) => return,
                // That request got its own connection meanwhile, or went away.
                Err(back) => sender = back,
            }
        }
        if set.idle.len() < MAX_IDLE_PER_TARGET {
            set.idle.push(Idle { sender, sweep });
        }
    }

    fn wait_for_checkin(&mut self, target: &Arc<Target>, waiter: oneshot::Sender<Sender>) {
        self.set_of(target).waiting.push_back(waiter);
    }

    /// Closes connections idle since before the previous sweep, those the app closed, and
    /// everything kept for targets that are not live. Called every [`UPSTREAM_IDLE_SWEEP`].
    pub(super) fn sweep(&mut self) {
        self.sweep += 1;
        let oldest_kept = self.sweep - 1;
        let live = self.live.load_full();
        self.by_target.retain_mut(|set| {
            if !live.as_ref().is_some_and(|t| Arc::ptr_eq(t, &set.target)) {
                return false;
            }
            set.idle
                .retain(|idle| idle.sweep >= oldest_kept && !idle.sender.is_closed());
            set.waiting.retain(|waiter| !waiter.is_closed());
            !set.idle.is_empty() || !set.waiting.is_empty()
        });
    }
}

/// Sends `req` to `target` on an idle connection of `pool`, or a new one. A pooled
/// connection that the app had closed gives the request back unwritten; it then goes on
/// the next idle connection or a new one. A request the upstream may have seen is never
/// sent twice: that failure is the caller's 502.
pub(super) async fn send(
    pool: &Rc<RefCell<UpstreamPool>>,
    target: &Arc<Target>,
    mut req: Request<Incoming>,
) -> Result<Response<UpstreamBody>, UpstreamError> {
    let mut new_connections = 0;
    loop {
        // The borrow ends with this statement: nothing holds the pool across an await.
        let pooled = pool.borrow_mut().checkout(target);
        let mut sender = match pooled {
            Some(sender) => sender,
            None if new_connections == MAX_NEW_CONNECTIONS_PER_REQUEST => {
                return Err(UpstreamError::Unusable);
            }
            None => {
                new_connections += 1;
                obtain(pool, target).await?
            }
        };
        // Usually ready at once; a connection whose last response just ended may need its
        // task to run once more first.
        if !sender.is_ready() && sender.ready().await.is_err() {
            continue;
        }
        match sender.try_send_request(req).await {
            Ok(response) => return Ok(lease(pool, target, sender, response)),
            Err(mut err) => match err.take_message() {
                Some(unsent) => {
                    debug!(port = target.port, error = %err.error(), "upstream connection was closed; request not written, sending it on another");
                    req = unsent;
                }
                None => return Err(UpstreamError::Request(err.into_error())),
            },
        }
    }
}

/// A connection for a request that found none idle: a new one, or the first that another
/// request hands back while this one is connecting, whichever comes first. Right after a
/// switch every request of a busy worker needs one at once; a burst of connects can
/// overflow a freshly started app's accept queue, and a connect whose SYN was dropped
/// waits a second or more for its retry. Taking a connection that came back meanwhile (as
/// hyper_util's pool does) keeps that wait off the request; the connect still finishes, in
/// the background, and its connection joins the pool.
async fn obtain(
    pool: &Rc<RefCell<UpstreamPool>>,
    target: &Arc<Target>,
) -> Result<Sender, UpstreamError> {
    let (waiter, mut handed_back) = oneshot::channel();
    pool.borrow_mut().wait_for_checkin(target, waiter);
    let mut connecting = Box::pin(connect(Arc::clone(target)));
    tokio::select! {
        biased;
        connected = &mut connecting => connected,
        // An `Err` here means the pool dropped the wait (a switch): the connect decides.
        Ok(sender) = &mut handed_back => {
            let (pool, target) = (Rc::clone(pool), Arc::clone(target));
            tokio::task::spawn_local(async move {
                if let Ok(sender) = connecting.await {
                    pool.borrow_mut().checkin(target, sender);
                }
            });
            Ok(sender)
        }
    }
}

fn lease(
    pool: &Rc<RefCell<UpstreamPool>>,
    target: &Arc<Target>,
    sender: Sender,
    response: Response<Incoming>,
) -> Response<UpstreamBody> {
    response.map(|body| UpstreamBody {
        body,
        lease: Some(Lease {
            pool: Rc::clone(pool),
            target: Arc::clone(target),
            sender,
        }),
    })
}

/// A new connection to `target`, driven by a task of this worker.
async fn connect(target: Arc<Target>) -> Result<Sender, UpstreamError> {
    let (sender, connection) = handshake(&target).await?;
    let port = target.port;
    tokio::task::spawn_local(async move {
        if let Err(err) = connection.await {
            debug!(port, error = %err, "upstream connection ended with an error");
        }
    });
    Ok(sender)
}

/// A new connection to `target` for one request that asks for a protocol upgrade: never
/// pooled, and able to hand its socket over once the app answers `101`.
pub(super) async fn connect_for_upgrade(target: &Target) -> Result<Sender, UpstreamError> {
    let (sender, connection) = handshake(target).await?;
    let port = target.port;
    tokio::task::spawn_local(async move {
        if let Err(err) = connection.with_upgrades().await {
            debug!(port, error = %err, "upstream connection ended with an error");
        }
    });
    Ok(sender)
}

async fn handshake(
    target: &Target,
) -> Result<(Sender, http1::Connection<TokioIo<TcpStream>, Incoming>), UpstreamError> {
    let stream = tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, TcpStream::connect(target.address))
        .await
        .map_err(|_| UpstreamError::ConnectTimeout)?
        .map_err(UpstreamError::Connect)?;
    if let Err(err) = stream.set_nodelay(true) {
        debug!(port = target.port, error = %err, "could not set TCP_NODELAY upstream");
    }
    http1::handshake(TokioIo::new(stream))
        .await
        .map_err(UpstreamError::Handshake)
}

/// The connection a response came on, until its body has been read to the end.
struct Lease {
    pool: Rc<RefCell<UpstreamPool>>,
    target: Arc<Target>,
    sender: Sender,
}

/// The upstream's response body, streamed through; its connection goes back to the pool
/// when the body ends, and is closed if the body is dropped before that (a client that
/// went away mid-response leaves bytes on it that no next request may read).
pub(in crate::switch) struct UpstreamBody {
    body: Incoming,
    lease: Option<Lease>,
}

impl UpstreamBody {
    /// A body whose connection is not the pool's (an upgrade the app refused): it closes
    /// once this body is done.
    pub(super) fn unpooled(body: Incoming) -> Self {
        Self { body, lease: None }
    }

    fn release(&mut self) {
        if let Some(Lease {
            pool,
            target,
            sender,
        }) = self.lease.take()
        {
            pool.borrow_mut().checkin(target, sender);
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.body).poll_frame(cx));
        if let (Some(Ok(frame)), Some(lease)) = (&frame, &this.lease)
            && let Some(data) = frame.data_ref()
        {
            lease.target.meter.sent(data.len());
        }
        match &frame {
            None => this.release(),
            Some(Ok(_)) if this.body.is_end_stream() => this.release(),
            // The connection is in an unknown state: dropping the lease closes it.
            Some(Err(_)) => this.lease = None,
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // hyper does not poll a body that says it is empty (HEAD, 204, 304, length 0).
        if self.body.is_end_stream() {
            self.release();
        }
    }
}
