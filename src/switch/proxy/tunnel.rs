//! Protocol upgrades (WebSocket, and every other HTTP/1.1 `Upgrade`): the request goes to
//! the app on a connection of its own, and once the app answers `101 Switching Protocols`
//! the client's connection and that one are spliced byte for byte until either side closes.
//! A tunnel stays on the instance it opened on, whatever switches happen meanwhile; each
//! worker counts the tunnels open per target ([`Tunnels`]) so that a switch can say who is
//! still on the old instance. A tunnel must never run on a pooled connection (the pool
//! would hand a socket that now speaks another protocol to the next request), and an app
//! that refuses the upgrade is answered like any request, never left hanging.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tracing::debug;

use super::Target;
use super::headers;
use super::pool::{self, UpstreamBody, UpstreamError};
use super::worker::ProxyBody;

/// The tunnels one worker has open, by target. Few targets are ever in it (the live one and
/// those a switch left behind), so a list beats a map.
#[derive(Default)]
pub(super) struct Tunnels {
    open: RefCell<Vec<(Arc<Target>, usize)>>,
}

impl Tunnels {
    /// How many tunnels of this worker are open on `target`.
    pub(super) fn open_on(&self, target: &Arc<Target>) -> usize {
        self.open
            .borrow()
            .iter()
            .find(|(open_on, _)| Arc::ptr_eq(open_on, target))
            .map_or(0, |(_, count)| *count)
    }

    fn opened(self: &Rc<Self>, target: &Arc<Target>) -> OpenTunnel {
        let mut open = self.open.borrow_mut();
        match open
            .iter_mut()
            .find(|(open_on, _)| Arc::ptr_eq(open_on, target))
        {
            Some((_, count)) => *count += 1,
            None => open.push((Arc::clone(target), 1)),
        }
        OpenTunnel {
            tunnels: Rc::clone(self),
            target: Arc::clone(target),
        }
    }
}

/// One open tunnel, counted in [`Tunnels`] until it is dropped.
struct OpenTunnel {
    tunnels: Rc<Tunnels>,
    target: Arc<Target>,
}

impl Drop for OpenTunnel {
    fn drop(&mut self) {
        let mut open = self.tunnels.open.borrow_mut();
        if let Some(at) = open
            .iter()
            .position(|(open_on, _)| Arc::ptr_eq(open_on, &self.target))
        {
            open[at].1 -= 1;
            if open[at].1 == 0 {
                open.swap_remove(at);
            }
        }
    }
}

/// Sends an upgrade request (headers already prepared) to `target` on a new connection.
/// On `101` the client gets the app's handshake and a task of this worker splices the two
/// connections, holding `client` (the client connection's place under the limits) until
/// the tunnel closes; any other answer is forwarded as it is.
pub(super) async fn open<C: 'static>(
    tunnels: &Rc<Tunnels>,
    target: &Arc<Target>,
    client: Rc<C>,
    mut req: Request<Incoming>,
) -> Result<Response<ProxyBody>, UpstreamError> {
    let client_side = hyper::upgrade::on(&mut req);
    let mut sender = pool::connect_for_upgrade(target).await?;
    let mut response = sender
        .send_request(req)
        .await
        .map_err(UpstreamError::Request)?;
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        let (mut parts, body) = response.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers);
        return Ok(Response::from_parts(
            parts,
            Either::Left(UpstreamBody::unpooled(body)),
        ));
    }
    let upstream_side = hyper::upgrade::on(&mut response);
    let (mut parts, _) = response.into_parts();
    headers::strip_hop_by_hop_but_upgrade(&mut parts.headers);

    let open = tunnels.opened(target);
    let port = target.port();
    debug!(port, open_here = tunnels.open_on(target), "tunnel opened");
    let tunnels = Rc::clone(tunnels);
    tokio::task::spawn_local(async move {
        // Both resolve once hyper has written the 101 to the client and read it upstream.
        match tokio::try_join!(client_side, upstream_side) {
            Ok((client_io, upstream_io)) => {
                let (mut client_io, mut upstream_io) =
                    (TokioIo::new(client_io), TokioIo::new(upstream_io));
                match tokio::io::copy_bidirectional(&mut client_io, &mut upstream_io).await {
                    Ok((up, down)) => debug!(port, up, down, "tunnel closed"),
                    Err(err) => debug!(port, error = %err, "tunnel ended with an error"),
                }
            }
            Err(err) => debug!(port, error = %err, "upgrade failed after 101"),
        }
        let target = Arc::clone(&open.target);
        drop(open);
        drop(client);
        debug!(port, open_here = tunnels.open_on(&target), "tunnel gone");
    });
    Ok(Response::from_parts(
        parts,
        Either::Right(Full::new(Bytes::new())),
    ))
}
