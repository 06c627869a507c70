//! What is still open on each target, and closing it: every request in flight (a streamed
//! response such as server-sent events among them) and every tunnel is counted on its
//! [`Target`] in atomics, so any thread can read "N connections still on 8081" without
//! asking the workers, and a request pays two uncontended-by-design atomic adds, no lock.
//! A cut (`Proxy::cut`, at the end of a drain) marks the target's counts as cut and wakes
//! each worker once; the worker wakes, on its own thread, the streams and tunnels of that
//! target that are waiting, and they end. This module never decides when to cut: draining
//! is the caller's, it only counts and closes.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::Notify;

use super::Target;
use super::pool::UpstreamBody;

/// A target's open requests and tunnels; shared by every worker through the `Target`.
#[derive(Debug, Default)]
pub(super) struct OpenCounts {
    requests: AtomicUsize,
    tunnels: AtomicUsize,
    /// Set once by a cut: what is still open on this target ends, and stays counted only
    /// until it has.
    cut: AtomicBool,
}

impl OpenCounts {
    pub(super) fn requests(&self) -> usize {
        self.requests.load(Ordering::Relaxed)
    }

    pub(super) fn tunnels(&self) -> usize {
        self.tunnels.load(Ordering::Relaxed)
    }

    pub(super) fn is_cut(&self) -> bool {
        self.cut.load(Ordering::Acquire)
    }

    /// Marks the target cut; returns how much was open at that moment.
    pub(super) fn cut(&self) -> usize {
        self.cut.store(true, Ordering::Release);
        self.requests() + self.tunnels()
    }
}

/// One request in flight on a target, counted until it is dropped (with its response body,
/// once the body has been sent, or at once when the request failed).
pub(super) struct OpenRequest {
    target: Arc<Target>,
}

impl OpenRequest {
    pub(super) fn new(target: &Arc<Target>) -> Self {
        target.open.requests.fetch_add(1, Ordering::Relaxed);
        Self {
            target: Arc::clone(target),
        }
    }
}

impl Drop for OpenRequest {
    fn drop(&mut self) {
        self.target.open.requests.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One open tunnel on a target, counted until it is dropped.
pub(super) struct OpenTunnel {
    target: Arc<Target>,
}

impl OpenTunnel {
    pub(super) fn new(target: &Arc<Target>) -> Self {
        target.open.tunnels.fetch_add(1, Ordering::Relaxed);
        Self {
            target: Arc::clone(target),
        }
    }
}

impl Drop for OpenTunnel {
    fn drop(&mut self) {
        self.target.open.tunnels.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One worker's streams and tunnels that wait on their upstream, with their wakers, so a
/// cut can wake those of its target. A stream registers only once it has to wait (most
/// responses never do), and only on its own worker: a plain `RefCell`, no lock.
#[derive(Default)]
pub(super) struct Cuts {
    next_key: Cell<u64>,
    waiting: RefCell<HashMap<u64, (Arc<Target>, Waker)>>,
}

impl Cuts {
    /// Wakes everything of this worker waiting on a target that was cut: each sees the cut
    /// when it is polled, and ends.
    fn wake_cut(&self) {
        let woken: Vec<Waker> = self
            .waiting
            .borrow()
            .values()
            .filter(|(target, _)| target.open.is_cut())
            .map(|(_, waker)| waker.clone())
            .collect();
        for waker in woken {
            waker.wake();
        }
    }

    /// `Ready` when `target` was cut; else keeps `cx`'s waker under `key` for the cut.
    fn poll_cut(&self, key: &mut Option<u64>, target: &Arc<Target>, cx: &Context<'_>) -> Poll<()> {
        if target.open.is_cut() {
            return Poll::Ready(());
        }
        let mut waiting = self.waiting.borrow_mut();
        match key {
            Some(key) => {
                if let Some((_, waker)) = waiting.get_mut(key)
                    && !waker.will_wake(cx.waker())
                {
                    *waker = cx.waker().clone();
                }
            }
            None => {
                let next = self.next_key.get();
                self.next_key.set(next + 1);
                waiting.insert(next, (Arc::clone(target), cx.waker().clone()));
                *key = Some(next);
            }
        }
        Poll::Pending
    }

    fn forget(&self, key: Option<u64>) {
        if let Some(key) = key {
            self.waiting.borrow_mut().remove(&key);
        }
    }
}

/// Runs on each worker for its life: a cut anywhere wakes it, and it wakes what waits on a
/// cut target here. The `Notify` keeps a wake-up that comes while this task is busy.
pub(super) async fn wake_on_cut(cuts: Rc<Cuts>, signal: Arc<Notify>) {
    loop {
        signal.notified().await;
        cuts.wake_cut();
    }
}

/// Resolves once the tunnel's target is cut.
pub(super) struct CutOff {
    cuts: Rc<Cuts>,
    target: Arc<Target>,
    key: Option<u64>,
}

impl CutOff {
    pub(super) fn new(cuts: &Rc<Cuts>, target: &Arc<Target>) -> Self {
        Self {
            cuts: Rc::clone(cuts),
            target: Arc::clone(target),
            key: None,
        }
    }
}

impl Future for CutOff {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        this.cuts.poll_cut(&mut this.key, &this.target, cx)
    }
}

impl Drop for CutOff {
    fn drop(&mut self) {
        self.cuts.forget(self.key);
    }
}

/// An upstream response body on its way to the client: its request stays counted until
/// the body is gone, and a cut ends it where it is (a chunked stream ends as if the app
/// had ended it, so an `EventSource` reconnects, to the live instance; the upstream
/// connection, left mid-body, is closed).
pub(in crate::switch) struct CountedBody {
    body: Option<UpstreamBody>,
    open: OpenRequest,
    cuts: Rc<Cuts>,
    key: Option<u64>,
}

impl CountedBody {
    pub(super) fn new(body: UpstreamBody, open: OpenRequest, cuts: &Rc<Cuts>) -> Self {
        Self {
            body: Some(body),
            open,
            cuts: Rc::clone(cuts),
            key: None,
        }
    }

    fn end(&mut self) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        self.body = None;
        self.cuts.forget(self.key.take());
        Poll::Ready(None)
    }
}

impl Body for CountedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let Some(body) = this.body.as_mut() else {
            return Poll::Ready(None);
        };
        if this.open.target.open.is_cut() {
            return this.end();
        }
        match Pin::new(body).poll_frame(cx) {
            Poll::Pending => {}
            ready => return ready,
        }
        // Waiting on the app: from here on a cut must be able to wake it.
        if this
            .cuts
            .poll_cut(&mut this.key, &this.open.target, cx)
            .is_ready()
        {
            return this.end();
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(|body| body.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.body
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |body| body.size_hint())
    }
}

impl Drop for CountedBody {
    fn drop(&mut self) {
        self.cuts.forget(self.key);
    }
}
