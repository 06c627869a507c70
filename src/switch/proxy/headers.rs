//! The header rewrite between a client and an instance: hop-by-hop headers go, the
//! forwarding headers (`X-Forwarded-*`, `X-Real-IP`, `Forwarded`) say who the client is.
//! Pure functions over a `HeaderMap`, no I/O. It must never let a client decide what the
//! app believes about the client: `Connection` cannot remove headers that matter end to end,
//! and forwarding headers a client wrote are replaced unless its peer address is a trusted
//! proxy. On the common path it allocates nothing: the values that depend on the peer are
//! built once per client connection ([`ClientPeer`]). A protocol upgrade (`Connection:
//! upgrade` with `Upgrade`) keeps exactly those two hop-by-hop headers, so the handshake
//! reaches the app and its `101` reaches the client; every other rule stays.

use std::net::IpAddr;

use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::domain::IpRange;

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus the
/// legacy `Proxy-Connection`. They are never forwarded in either direction.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

pub(super) const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(super) const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(super) const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub(super) const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// Headers a `Connection` header may not name: removing them would change what the
/// message means to the app (who is logged in, which host, who the client is, how long
/// the body is). RFC 9110 lets a sender list any field there; a proxy that obeyed blindly
/// would let a client strip its own `Authorization` check or the proxy's `X-Forwarded-For`.
const END_TO_END: [HeaderName; 17] = [
    header::HOST,
    header::AUTHORIZATION,
    header::COOKIE,
    header::SET_COOKIE,
    header::CONTENT_LENGTH,
    header::CONTENT_TYPE,
    header::CONTENT_ENCODING,
    header::CACHE_CONTROL,
    header::LOCATION,
    header::ORIGIN,
    header::REFERER,
    header::FORWARDED,
    X_FORWARDED_FOR,
    X_FORWARDED_PROTO,
    X_FORWARDED_HOST,
    X_REAL_IP,
    // The edge's mark on requests to nonstop's own router: a client must not strip it.
    crate::switch::THROUGH_EDGE,
];

/// What `Connection` says on an upgrade we pass on: nothing else of the client's.
const CONNECTION_UPGRADE: HeaderValue = HeaderValue::from_static("upgrade");

/// `X-Forwarded-Proto` when the client's connection is plain, and when TLS ended here.
const PROTO_HTTP: HeaderValue = HeaderValue::from_static("http");
const PROTO_HTTPS: HeaderValue = HeaderValue::from_static("https");

/// What the rewrite needs to know about the client's end of one connection, built when the
/// connection is accepted so that each request only clones these values.
#[derive(Debug)]
pub(in crate::switch) struct ClientPeer {
    /// The peer is a proxy we trust, so the forwarding headers it sent are kept and extended.
    trusted: bool,
    /// The peer's address as apps expect it (`a.b.c.d`, also for `::ffff:a.b.c.d`).
    address: HeaderValue,
    /// Our own `Forwarded` element for this peer (RFC 7239 §4).
    forwarded: HeaderValue,
    /// `http`, or `https` when the edge terminated TLS for this connection.
    proto: HeaderValue,
}

impl ClientPeer {
    pub(super) fn new(ip: IpAddr, trusted_proxies: &[IpRange]) -> Self {
        Self::with_scheme(ip, trusted_proxies, false)
    }

    /// A peer whose connection is TLS (`tls`) or plain.
    pub(in crate::switch) fn with_scheme(
        ip: IpAddr,
        trusted_proxies: &[IpRange],
        tls: bool,
    ) -> Self {
        let proto = if tls { "https" } else { "http" };
        let ip = ip.to_canonical();
        let trusted = trusted_proxies.iter().any(|range| range.contains(ip));
        let address =
            HeaderValue::from_str(&ip.to_string()).unwrap_or(HeaderValue::from_static("unknown"));
        // IPv6 addresses must be quoted and bracketed in `Forwarded`.
        let forwarded = match ip {
            IpAddr::V4(ip) => format!("for={ip};proto={proto}"),
            IpAddr::V6(ip) => format!("for=\"[{ip}]\";proto={proto}"),
        };
        let forwarded =
            HeaderValue::from_str(&forwarded).unwrap_or(HeaderValue::from_static("for=unknown"));
        Self {
            trusted,
            address,
            forwarded,
            proto: if tls { PROTO_HTTPS } else { PROTO_HTTP },
        }
    }
}

/// Turns the client's request headers into the upstream's. The client's `Host` is kept
/// (like nginx's `proxy_set_header Host $host`) so that apps build links and pick virtual
/// hosts from the public name; `fallback_host` (the upstream's address) fills it in for
/// clients that sent none. Returns whether the request asks for a protocol upgrade, whose
/// `Connection: upgrade` and `Upgrade` are then kept (see [`strip_hop_by_hop_but_upgrade`]).
pub(super) fn prepare_request(
    headers: &mut HeaderMap,
    peer: &ClientPeer,
    fallback_host: &HeaderValue,
) -> bool {
    let upgrade = strip_hop_by_hop_but_upgrade(headers);
    // hyper already answered `100 Continue` on the client's hop when the body was first
    // read; forwarding the expectation would only make the upstream answer it again.
    headers.remove(header::EXPECT);

    let host = match headers.get(header::HOST) {
        Some(host) => host.clone(),
        None => {
            headers.insert(header::HOST, fallback_host.clone());
            fallback_host.clone()
        }
    };
    if peer.trusted {
        extend_forwarding(headers, peer, host);
    } else {
        // `insert` replaces every value the client sent under the same name.
        headers.insert(X_FORWARDED_FOR, peer.address.clone());
        headers.insert(X_REAL_IP, peer.address.clone());
        headers.insert(X_FORWARDED_PROTO, peer.proto.clone());
        headers.insert(X_FORWARDED_HOST, host);
        headers.insert(header::FORWARDED, peer.forwarded.clone());
    }
    upgrade
}

/// A trusted proxy in front of us already said who the client is: keep what it wrote, add
/// this hop to the lists, fill in what it left out.
fn extend_forwarding(headers: &mut HeaderMap, peer: &ClientPeer, host: HeaderValue) {
    let forwarded_for = appended(headers, &X_FORWARDED_FOR, &peer.address);
    headers.insert(X_FORWARDED_FOR, forwarded_for);
    let forwarded = appended(headers, &header::FORWARDED, &peer.forwarded);
    headers.insert(header::FORWARDED, forwarded);
    if !headers.contains_key(&X_REAL_IP) {
        headers.insert(X_REAL_IP, peer.address.clone());
    }
    if !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO, peer.proto.clone());
    }
    if !headers.contains_key(&X_FORWARDED_HOST) {
        headers.insert(X_FORWARDED_HOST, host);
    }
}

/// Every value of `name` joined by `, `, with `ours` last.
fn appended(headers: &HeaderMap, name: &HeaderName, ours: &HeaderValue) -> HeaderValue {
    let mut value: Vec<u8> = Vec::new();
    for prior in headers.get_all(name) {
        value.extend_from_slice(prior.as_bytes());
        value.extend_from_slice(b", ");
    }
    value.extend_from_slice(ours.as_bytes());
    // Prior values were valid header values, so the join is too; should that ever change,
    // this hop's own value is still the one fact worth passing on.
    HeaderValue::from_bytes(&value).unwrap_or_else(|_| ours.clone())
}

/// Removes the hop-by-hop headers, including those the `Connection` header names, except
/// those that matter end to end ([`END_TO_END`]).
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names instead of seven lookups.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    strip_named_and_hop_by_hop(headers);
}

/// [`strip_hop_by_hop`], except that a message announcing a protocol upgrade (`Connection`
/// naming `upgrade`, and an `Upgrade` header) keeps `Connection: upgrade` and its first
/// `Upgrade` value, and nothing else `Connection` named. Returns whether it was one.
pub(super) fn strip_hop_by_hop_but_upgrade(headers: &mut HeaderMap) -> bool {
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return false;
    }
    match strip_named_and_hop_by_hop(headers) {
        Some(protocol) => {
            headers.insert(header::CONNECTION, CONNECTION_UPGRADE);
            headers.insert(header::UPGRADE, protocol);
            true
        }
        None => false,
    }
}

/// Takes back what [`strip_hop_by_hop_but_upgrade`] kept, for a request that will not be
/// upgraded after all.
pub(super) fn forget_upgrade(headers: &mut HeaderMap) {
    headers.remove(header::CONNECTION);
    headers.remove(header::UPGRADE);
}

/// Removes the hop-by-hop headers and those `Connection` names; returns the `Upgrade` value
/// when `Connection` named `upgrade` (the same pass over its tokens, so ordinary messages
/// pay nothing more for upgrades).
fn strip_named_and_hop_by_hop(headers: &mut HeaderMap) -> Option<HeaderValue> {
    let mut upgrade = None;
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
            .filter(|name| !END_TO_END.contains(name))
            .collect();
        for name in &named {
            match headers.remove(name) {
                Some(protocol) if name == header::UPGRADE => upgrade = Some(protocol),
                _ => {}
            }
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    upgrade
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(ip: &str, trusted: &[&str]) -> ClientPeer {
        let trusted: Vec<IpRange> = trusted.iter().map(|r| r.parse().expect("range")).collect();
        ClientPeer::new(ip.parse().expect("ip"), &trusted)
    }

    fn get<'a>(headers: &'a HeaderMap, name: &str) -> Vec<&'a str> {
        headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().expect("ascii"))
            .collect()
    }

    fn fallback() -> HeaderValue {
        HeaderValue::from_static("127.0.0.1:8081")
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert("connection", HeaderValue::from_static("close, X-Trace"));
        headers.insert("x-trace", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        headers.insert("upgrade", HeaderValue::from_static("websocket"));
        headers.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        headers.insert("te", HeaderValue::from_static("trailers"));
        headers.insert("trailer", HeaderValue::from_static("x-checksum"));
        headers.insert("content-type", HeaderValue::from_static("text/plain"));

        strip_hop_by_hop(&mut headers);

        let left: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["content-type"]);
    }

    #[test]
    fn an_upgrade_keeps_connection_upgrade_and_upgrade_and_nothing_else_hop_by_hop() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "connection",
            HeaderValue::from_static("keep-alive, Upgrade, X-Trace, Authorization"),
        );
        headers.insert("upgrade", HeaderValue::from_static("websocket"));
        headers.insert("x-trace", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("te", HeaderValue::from_static("trailers"));
        headers.insert("authorization", HeaderValue::from_static("Bearer t"));
        headers.insert("sec-websocket-key", HeaderValue::from_static("k"));

        assert!(strip_hop_by_hop_but_upgrade(&mut headers));

        assert_eq!(get(&headers, "connection"), ["upgrade"]);
        assert_eq!(get(&headers, "upgrade"), ["websocket"]);
        let mut left: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(
            left,
            [
                "authorization",
                "connection",
                "sec-websocket-key",
                "upgrade"
            ]
        );
    }

    #[test]
    fn upgrade_without_connection_upgrade_is_no_upgrade_and_is_stripped() {
        for connection in [None, Some("keep-alive"), Some("upgrades")] {
            let mut headers = HeaderMap::new();
            if let Some(connection) = connection {
                headers.insert("connection", HeaderValue::from_str(connection).expect("v"));
            }
            headers.insert("upgrade", HeaderValue::from_static("websocket"));

            assert!(
                !strip_hop_by_hop_but_upgrade(&mut headers),
                "{connection:?}"
            );
            assert!(headers.is_empty(), "{connection:?}: {headers:?}");
        }
        let mut headers = HeaderMap::new();
        headers.insert("connection", HeaderValue::from_static("upgrade"));
        assert!(
            !strip_hop_by_hop_but_upgrade(&mut headers),
            "no Upgrade header"
        );
        assert!(headers.is_empty());
    }

    #[test]
    fn connection_cannot_name_headers_that_matter_end_to_end() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "connection",
            HeaderValue::from_static("Authorization, Host, X-Forwarded-For, Cookie, x-real-ip"),
        );
        headers.insert("authorization", HeaderValue::from_static("Bearer t"));
        headers.insert("host", HeaderValue::from_static("app.test"));
        headers.insert("cookie", HeaderValue::from_static("session=1"));
        headers.insert("x-forwarded-for", HeaderValue::from_static("198.51.100.9"));
        headers.insert("x-real-ip", HeaderValue::from_static("198.51.100.9"));

        strip_hop_by_hop(&mut headers);

        let mut left: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(
            left,
            [
                "authorization",
                "cookie",
                "host",
                "x-forwarded-for",
                "x-real-ip"
            ]
        );
    }

    #[test]
    fn an_untrusted_client_cannot_say_who_it_is() {
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("app.test"));
        headers.append("x-forwarded-for", HeaderValue::from_static("203.0.113.7"));
        headers.append("x-forwarded-for", HeaderValue::from_static("198.51.100.2"));
        headers.insert("x-real-ip", HeaderValue::from_static("203.0.113.7"));
        headers.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        headers.insert("x-forwarded-host", HeaderValue::from_static("bank.test"));
        headers.insert("forwarded", HeaderValue::from_static("for=203.0.113.7"));

        prepare_request(&mut headers, &peer("10.0.0.1", &[]), &fallback());

        assert_eq!(get(&headers, "x-forwarded-for"), ["10.0.0.1"]);
        assert_eq!(get(&headers, "x-real-ip"), ["10.0.0.1"]);
        assert_eq!(get(&headers, "x-forwarded-proto"), ["http"]);
        assert_eq!(get(&headers, "x-forwarded-host"), ["app.test"]);
        assert_eq!(get(&headers, "forwarded"), ["for=10.0.0.1;proto=http"]);
    }

    #[test]
    fn a_trusted_proxy_extends_the_forwarding_headers_it_sent() {
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("app.test"));
        headers.append("x-forwarded-for", HeaderValue::from_static("203.0.113.7"));
        headers.append("x-forwarded-for", HeaderValue::from_static("198.51.100.2"));
        headers.insert("x-real-ip", HeaderValue::from_static("203.0.113.7"));
        headers.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        headers.insert("forwarded", HeaderValue::from_static("for=203.0.113.7"));
        let mapped = "::ffff:10.0.0.1";

        prepare_request(&mut headers, &peer(mapped, &["10.0.0.0/8"]), &fallback());

        assert_eq!(
            get(&headers, "x-forwarded-for"),
            ["203.0.113.7, 198.51.100.2, 10.0.0.1"]
        );
        assert_eq!(get(&headers, "x-real-ip"), ["203.0.113.7"]);
        assert_eq!(get(&headers, "x-forwarded-proto"), ["https"]);
        assert_eq!(get(&headers, "x-forwarded-host"), ["app.test"]);
        assert_eq!(
            get(&headers, "forwarded"),
            ["for=203.0.113.7, for=10.0.0.1;proto=http"]
        );
    }

    #[test]
    fn tls_ended_at_the_edge_is_https_to_the_app_and_a_client_cannot_say_otherwise() {
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("app.test"));
        headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
        let peer = ClientPeer::with_scheme("10.0.0.1".parse().unwrap(), &[], true);

        prepare_request(&mut headers, &peer, &fallback());

        assert_eq!(get(&headers, "x-forwarded-proto"), ["https"]);
        assert_eq!(get(&headers, "forwarded"), ["for=10.0.0.1;proto=https"]);
    }

    #[test]
    fn a_request_without_host_gets_the_upstream_address_and_ipv6_is_quoted() {
        let mut headers = HeaderMap::new();

        prepare_request(&mut headers, &peer("::1", &[]), &fallback());

        assert_eq!(get(&headers, "host"), ["127.0.0.1:8081"]);
        assert_eq!(get(&headers, "x-forwarded-host"), ["127.0.0.1:8081"]);
        assert_eq!(get(&headers, "x-forwarded-for"), ["::1"]);
        assert_eq!(get(&headers, "forwarded"), ["for=\"[::1]\";proto=http"]);
    }

    #[test]
    fn ip_ranges_parse_and_match() {
        let range: IpRange = "10.1.0.0/16".parse().expect("range");
        assert!(range.contains("10.1.200.3".parse().expect("ip")));
        assert!(range.contains("::ffff:10.1.0.9".parse().expect("ip")));
        assert!(!range.contains("10.2.0.1".parse().expect("ip")));
        assert!(!range.contains("::1".parse().expect("ip")));

        let one: IpRange = "192.0.2.7".parse().expect("single address");
        assert!(one.contains("192.0.2.7".parse().expect("ip")));
        assert!(!one.contains("192.0.2.8".parse().expect("ip")));

        let all: IpRange = "0.0.0.0/0".parse().expect("everything");
        assert!(all.contains("203.0.113.1".parse().expect("ip")));
        let v6: IpRange = "fd00::/8".parse().expect("v6 range");
        assert!(v6.contains("fd12::1".parse().expect("ip")));

        for bad in ["10.0.0.0/33", "::/129", "nope", "10.0.0.0/x", ""] {
            assert!(bad.parse::<IpRange>().is_err(), "{bad}");
        }
    }
}
