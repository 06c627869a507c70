//! Who may read. With `server.public_read = false` (the default) the pages, the API, the
//! event stream and `/metrics` answer only a reader: the admin token (bearer) or a
//! dashboard session; `/metrics` also takes the metrics token. Webhooks, `/healthz`, the
//! login page and the static files are open to anyone. One middleware, applied to the whole
//! router, decides from the route alone before any handler runs, so a read route added
//! later is private unless it is added to `rule`'s open list. It never decides who may
//! *act*: every action, the switch and logout authorize themselves (`session::authorize`,
//! `api::switch`), and it lets every non-GET request through to them.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};

use super::{AppError, AppState, bearer, token_matches};

/// What a request must show before its handler runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    /// Anyone: webhooks (signed by their sender), liveness, the login page, static files.
    Open,
    /// Whatever its handler asks (actions, the switch, logout): every non-GET request.
    Handler,
    /// A reader, or the metrics token.
    Metrics,
    /// A reader; anyone else gets 401 and nonstop's JSON error.
    Api,
    /// A reader; a browser without a login is sent to the login page.
    Page,
}

fn rule(method: &Method, path: &str) -> Rule {
    let open = path.starts_with("/hooks/")
        || path.starts_with("/static/")
        || matches!(path, "/healthz" | "/login" | "/favicon.svg");
    // The switch checks its own callers (hooks on this host), for reads as for moves.
    let hooks_own = path.starts_with("/api/apps/") && path.ends_with("/switch");
    if open {
        Rule::Open
    } else if hooks_own || (method != Method::GET && method != Method::HEAD) {
        Rule::Handler
    } else if path == "/metrics" {
        Rule::Metrics
    } else if path.starts_with("/api/") || path == "/events" {
        Rule::Api
    } else {
        Rule::Page
    }
}

/// Who sent a request, by its bearer token or its session cookie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caller {
    Admin,
    Session,
    /// The metrics token: `/metrics` only.
    Scraper,
    /// A bearer token that is none of the above (the switch token among them).
    WrongToken,
    Anonymous,
}

fn caller(state: &AppState, headers: &HeaderMap) -> Caller {
    let presented = bearer(headers);
    if presented.is_some() {
        return if token_matches(presented, &state.admin_token) {
            Caller::Admin
        } else if state
            .config
            .server
            .metrics_token
            .as_ref()
            .is_some_and(|metrics| token_matches(presented, metrics))
        {
            Caller::Scraper
        } else {
            Caller::WrongToken
        };
    }
    match state
        .sessions
        .current(headers, &state.admin_token, crate::db::now_ms())
    {
        Some(_) => Caller::Session,
        None => Caller::Anonymous,
    }
}

/// Whether the request may read the dashboard's data; handlers that serve everyone but
/// show more to a reader (the favicon's colour) look at it.
#[derive(Debug, Clone, Copy)]
pub struct MayRead(pub bool);

/// Why a request with neither a login nor the admin token was refused, to a script.
pub const NOT_LOGGED_IN: &str =
    "log in on the dashboard or send the admin token (Authorization: Bearer …)";

/// Lets readers through, and open and self-authorizing routes; refuses everyone else.
pub async fn gate(
    State(state): State<Arc<AppState>>,
    mut request: Request,
    next: Next,
) -> Response {
    let rule = rule(request.method(), request.uri().path());
    let caller = caller(&state, request.headers());
    let reader =
        state.config.server.public_read || matches!(caller, Caller::Admin | Caller::Session);
    request.extensions_mut().insert(MayRead(reader));
    let allowed = match rule {
        Rule::Open | Rule::Handler => true,
        Rule::Metrics => reader || caller == Caller::Scraper,
        Rule::Api | Rule::Page => reader,
    };
    if allowed {
        return next.run(request).await;
    }
    match (caller, rule) {
        (Caller::Anonymous, Rule::Page) => to_login(&request),
        (Caller::Scraper, _) => {
            AppError::Forbidden("the metrics token may read /metrics only".into()).into_response()
        }
        (Caller::WrongToken, _) => {
            AppError::Unauthorized("the admin token is not valid".into()).into_response()
        }
        (_, Rule::Metrics) if state.config.server.metrics_token.is_some() => {
            AppError::Unauthorized(
                "send the admin or the metrics token (Authorization: Bearer …)".into(),
            )
            .into_response()
        }
        _ => AppError::Unauthorized(NOT_LOGGED_IN.into()).into_response(),
    }
}

/// 303 to the login page, which sends the browser back here once it is logged in.
fn to_login(request: &Request) -> Response {
    let asked = request.uri().path_and_query().map_or("/", |p| p.as_str());
    match local_path(asked) {
        Some(path) if path != "/" => {
            let next: String = url::form_urlencoded::byte_serialize(path.as_bytes()).collect();
            Redirect::to(&format!("/login?next={next}")).into_response()
        }
        _ => Redirect::to("/login").into_response(),
    }
}

/// The longest return path the login page carries along.
const MAX_RETURN_PATH: usize = 2048;

/// `path`, if it is a place on this server a login may send the browser back to: it starts
/// with one `/` (`//host` and `/\host` are other sites to a browser), holds only printable
/// ASCII (so it is a valid `Location` as it is) and is not the login page itself.
pub fn local_path(path: &str) -> Option<&str> {
    let bytes = path.as_bytes();
    let local = bytes.first() == Some(&b'/')
        && !matches!(bytes.get(1), Some(b'/' | b'\\'))
        && path.len() <= MAX_RETURN_PATH
        && bytes.iter().all(|b| b.is_ascii_graphic())
        && path != "/login"
        && !path.starts_with("/login?");
    local.then_some(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_webhooks_liveness_login_and_static_files_are_open_and_every_read_is_private() {
        let get = Method::GET;
        for open in [
            "/hooks/github",
            "/hooks/travis",
            "/healthz",
            "/login",
            "/favicon.svg",
            "/static/live.js",
        ] {
            assert_eq!(rule(&get, open), Rule::Open, "{open}");
        }
        assert_eq!(rule(&Method::POST, "/hooks/github"), Rule::Open);
        assert_eq!(rule(&Method::POST, "/login"), Rule::Open);
        for page in [
            "/",
            "/deployments",
            "/deployments/1",
            "/deployments/1/stages/Build/log",
            "/deliveries",
            "/no-such-page",
        ] {
            assert_eq!(rule(&get, page), Rule::Page, "{page}");
            assert_eq!(rule(&Method::HEAD, page), Rule::Page, "HEAD {page}");
        }
        for api in [
            "/api/apps",
            "/api/apps/hello/live",
            "/api/deployments",
            "/api/deployments/1",
            "/api/deliveries",
            "/events",
        ] {
            assert_eq!(rule(&get, api), Rule::Api, "{api}");
        }
        assert_eq!(rule(&get, "/metrics"), Rule::Metrics);
        for action in [
            "/api/apps/hello/deploy",
            "/api/apps/hello/lock",
            "/api/apps/hello/unlock",
            "/api/apps/hello/cancel",
            "/api/apps/hello/switch",
            "/logout",
        ] {
            assert_eq!(rule(&Method::POST, action), Rule::Handler, "{action}");
        }
    }

    #[test]
    fn a_login_returns_only_to_a_path_on_this_server() {
        for ok in ["/", "/deployments/7", "/deployments?app=hello&page=2"] {
            assert_eq!(local_path(ok), Some(ok));
        }
        for bad in [
            "",
            "deployments",
            "//evil.example/",
            "/\\evil.example",
            "https://evil.example/",
            "/deployments\r\nSet-Cookie: x=1",
            "/a b",
            "/d\u{e9}ploiements",
            "/login",
            "/login?next=/",
        ] {
            assert_eq!(local_path(bad), None, "{bad:?}");
        }
        assert_eq!(
            local_path(&format!("/{}", "a".repeat(MAX_RETURN_PATH))),
            None
        );
    }
}
