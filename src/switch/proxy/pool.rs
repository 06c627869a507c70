//! One worker's upstream connections: idle keep-alive connections kept by target, a new one
//! opened when none is idle, and the response body that hands its connection back once the
//! body has ended. A worker is one thread, so the pool is a plain `RefCell`, no lock.
//!
//! It must never hand out a connection to a target that is not live any more (the next
//! deploy stops that instance), never pool a connection whose response was not read to its
//! end, and never resend a request the upstream may have seen: only a request that a
//! closed connection gave back unwritten is sent again, on another connection.

use std::cell::RefCell;
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
use tracing::debug;

use super::Target;

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
}

impl UpstreamError {
    /// The app could not be reached at all, as opposed to failing a request it got.
    pub(super) fn is_unreachable(&self) -> bool {
        matches!(self, Self::Connect(_) | Self::ConnectTimeout)
    }
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

    /// Takes back a connection whose response ended; kept only while its target is live.
    fn checkin(&mut self, target: Arc<Target>, sender: Sender) {
        if sender.is_closed() || !self.is_live(&target) {
            return;
        }
        let sweep = self.sweep;
        let idle = Idle { sender, sweep };
        match self
            .by_target
            .iter_mut()
            .find(|set| Arc::ptr_eq(&set.target, &target))
        {
            Some(set) if set.idle.len() < MAX_IDLE_PER_TARGET => set.idle.push(idle),
            Some(_) => {}
            None => self.by_target.push(IdleConnections {
                target,
                idle: vec![idle],
            }),
        }
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
            !set.idle.is_empty()
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
    loop {
        // The borrow ends with this statement: nothing holds the pool across an await.
        let pooled = pool.borrow_mut().checkout(target);
        let Some(mut sender) = pooled else { break };
        // Usually ready at once; a connection whose last response just ended may need its
        // task to run once more first.
        if !sender.is_ready() && sender.ready().await.is_err() {
            continue;
        }
        match sender.try_send_request(req).await {
            Ok(response) => return Ok(lease(pool, target, sender, response)),
            Err(mut err) => match err.take_message() {
                Some(unsent) => {
                    debug!(port = target.port, error = %err.error(), "pooled upstream connection was closed; request not written, sending it on another");
                    req = unsent;
                }
                None => return Err(UpstreamError::Request(err.into_error())),
            },
        }
    }
    let mut sender = connect(target).await?;
    match sender.try_send_request(req).await {
        Ok(response) => Ok(lease(pool, target, sender, response)),
        Err(err) => Err(UpstreamError::Request(err.into_error())),
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
async fn connect(target: &Target) -> Result<Sender, UpstreamError> {
    let stream = tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, TcpStream::connect(target.address))
        .await
        .map_err(|_| UpstreamError::ConnectTimeout)?
        .map_err(UpstreamError::Connect)?;
    if let Err(err) = stream.set_nodelay(true) {
        debug!(port = target.port, error = %err, "could not set TCP_NODELAY upstream");
    }
    let (sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(UpstreamError::Handshake)?;
    let port = target.port;
    tokio::task::spawn_local(async move {
        if let Err(err) = connection.await {
            debug!(port, error = %err, "upstream connection ended with an error");
        }
    });
    Ok(sender)
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
pub(super) struct UpstreamBody {
    body: Incoming,
    lease: Option<Lease>,
}

impl UpstreamBody {
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
