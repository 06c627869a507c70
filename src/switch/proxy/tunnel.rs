//! Protocol upgrades (WebSocket, and every other HTTP/1.1 `Upgrade`): the request goes to
//! the app on a connection of its own, and once the app answers `101 Switching Protocols`
//! the client's connection and that one are spliced byte for byte until either side closes.
//! A tunnel stays on the instance it opened on, whatever switches happen meanwhile; it is
//! counted on its target (`open::OpenTunnel`) so that a switch can say who is still on the
//! old instance, and a cut of that target (the end of a drain) closes it. A tunnel must
//! never run on a pooled connection (the pool would hand a socket that now speaks another
//! protocol to the next request), and an app that refuses the upgrade is answered like any request, never left hanging.

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
use super::open::{CountedBody, CutOff, Cuts, OpenRequest, OpenTunnel};
use super::pool::{self, UpstreamBody, UpstreamError};
use super::worker::ProxyBody;

/// Sends an upgrade request (headers already prepared) to `target` on a new connection.
/// On `101` the client gets the app's handshake and a task of this worker splices the two
/// connections, holding `client` (the client connection's place under the limits) until
/// the tunnel closes; any other answer is forwarded as it is.
pub(super) async fn open<C: 'static>(
    tasks: &tokio_util::task::TaskTracker,
    cuts: &Rc<Cuts>,
    target: &Arc<Target>,
    request: OpenRequest,
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
            Either::Left(CountedBody::new(
                UpstreamBody::unpooled(body),
                request,
                cuts,
            )),
        ));
    }
    let upstream_side = hyper::upgrade::on(&mut response);
    let (mut parts, _) = response.into_parts();
    headers::strip_hop_by_hop_but_upgrade(&mut parts.headers);

    let open = OpenTunnel::new(target);
    drop(request);
    let port = target.port();
    let cut_off = CutOff::new(cuts, target);
    debug!(port, "tunnel opened");
    tasks.spawn_local(async move {
        let splice = async {
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
        };
        tokio::select! {
            () = splice => {}
            // Dropping both sides closes both connections.
            () = cut_off => debug!(port, "tunnel cut"),
        }
        drop(open);
        drop(client);
    });
    Ok(Response::from_parts(
        parts,
        Either::Right(Full::new(Bytes::new())),
    ))
}
