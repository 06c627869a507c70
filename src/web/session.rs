//! Who may act: the admin token (bearer, for scripts) or a dashboard login session (a signed
//! cookie) plus its CSRF token. Sessions are signed with a key derived from the admin token
//! and kept server-side (in SQLite, by a hash of their nonce), so logging out ends one for
//! good and a changed token ends them all. Wrong logins are throttled per client.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use axum::http::{HeaderMap, header};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use super::access::NOT_LOGGED_IN;
use super::{AppError, AppState, bearer, token_matches};
use crate::config::Secret;
use crate::db::{self, Db, DbError};

pub const COOKIE: &str = "nonstop_session";

/// Who took an action, as the why log, a lock and a cancel name them: `admin` for the admin
/// token, `dashboard` for a login with it, or a `[[user]]`'s name for their token or login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor(String);

impl Actor {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The admin token's name as an actor.
pub const ADMIN: &str = "admin";
/// A dashboard login with the admin token, as an actor.
pub const DASHBOARD: &str = "dashboard";

/// A login lasts a working week.
const SESSION_MS: i64 = 7 * 24 * 3600 * 1000;

fn key(admin_token: &Secret) -> Vec<u8> {
    mac(admin_token.expose().as_bytes(), b"nonstop session key v1")
}

fn mac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

/// A fresh session cookie value: `<expires>.<nonce>.<signature>`.
fn new_session(admin_token: &Secret, now_ms: i64) -> String {
    let mut nonce = [0u8; 16];
    getrandom::fill(&mut nonce).expect("the OS random source is available");
    let body = format!("{}.{}", now_ms + SESSION_MS, hex::encode(nonce));
    let signature = hex::encode(mac(&key(admin_token), body.as_bytes()));
    format!("{body}.{signature}")
}

/// What the server keeps of a session: the sha256 of its cookie value, so the database
/// holds nothing a cookie could be made from.
fn id_of(value: &str) -> String {
    hex::encode(Sha256::digest(value.as_bytes()))
}

/// The `Set-Cookie` header value for a session (or, with `None`, one that ends it).
/// `secure`: the dashboard is reached over https, so the cookie never travels in the clear.
fn set_cookie(value: Option<&str>, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    match value {
        Some(value) => format!(
            "{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
            SESSION_MS / 1000
        ),
        None => format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{secure}"),
    }
}

/// The request's session cookie, if it is one nonstop signed and it has not expired.
fn signed_session(headers: &HeaderMap, admin_token: &Secret, now_ms: i64) -> Option<String> {
    let value = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().strip_prefix(COOKIE)?.strip_prefix('='))
        .next()?;
    let (body, signature) = value.rsplit_once('.')?;
    let expected = mac(&key(admin_token), body.as_bytes());
    let presented = hex::decode(signature).ok()?;
    use subtle::ConstantTimeEq;
    if !bool::from(presented.ct_eq(&expected)) {
        return None;
    }
    let expires: i64 = body.split('.').next()?.parse().ok()?;
    (expires > now_ms).then(|| value.to_owned())
}

/// The logged-in sessions: in memory for every request, in SQLite across restarts.
pub struct Sessions {
    db: Db,
    /// By id: when it expires and who logged in.
    live: Mutex<HashMap<String, (i64, String)>>,
    secure: bool,
    throttle: Throttle,
}

impl Sessions {
    /// The sessions still valid at start. `secure`: cookies get the `Secure` flag.
    pub async fn load(db: Db, secure: bool) -> Result<Self, DbError> {
        let live = db.call(|conn| db::sessions(conn, db::now_ms())).await?;
        Ok(Self {
            db,
            live: Mutex::new(
                (live.into_iter())
                    .map(|(id, expires, actor)| (id, (expires, actor)))
                    .collect(),
            ),
            secure,
            throttle: Throttle::default(),
        })
    }

    /// Starts a session for `actor`; returns its `Set-Cookie` value.
    pub async fn start(
        &self,
        admin_token: &Secret,
        actor: &str,
        now_ms: i64,
    ) -> Result<String, DbError> {
        let value = new_session(admin_token, now_ms);
        let (id, expires) = (id_of(&value), now_ms + SESSION_MS);
        {
            let (id, actor) = (id.clone(), actor.to_owned());
            self.db
                .call(move |conn| db::add_session(conn, &id, expires, &actor))
                .await?;
        }
        self.lock().insert(id, (expires, actor.to_owned()));
        Ok(set_cookie(Some(&value), self.secure))
    }

    /// Who logged in with `session` (a value `current` answered).
    pub fn actor_of(&self, session: &str) -> Option<String> {
        self.lock()
            .get(&id_of(session))
            .map(|(_, actor)| actor.clone())
    }

    /// The request's session, if it is signed, unexpired and not logged out.
    pub fn current(
        &self,
        headers: &HeaderMap,
        admin_token: &Secret,
        now_ms: i64,
    ) -> Option<String> {
        let value = signed_session(headers, admin_token, now_ms)?;
        self.lock().contains_key(&id_of(&value)).then_some(value)
    }

    /// Ends `session` for good; returns the `Set-Cookie` value that clears the cookie.
    pub async fn end(&self, session: Option<&str>) -> Result<String, DbError> {
        if let Some(session) = session {
            let id = id_of(session);
            self.lock().remove(&id);
            self.db.call(move |conn| db::end_session(conn, &id)).await?;
        }
        Ok(set_cookie(None, self.secure))
    }

    pub fn throttle(&self) -> &Throttle {
        &self.throttle
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (i64, String)>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Wrong logins per client: the first few are free, then each further try must wait twice
/// as long as the last, up to a quarter of an hour. A client is an IPv4 address or an IPv6
/// /64, since one host usually holds a whole /64.
#[derive(Default)]
pub struct Throttle(Mutex<HashMap<IpAddr, Failures>>);

#[derive(Clone, Copy)]
struct Failures {
    count: u32,
    /// Until when (ms) the client must wait.
    until: i64,
}

const FREE_FAILURES: u32 = 5;
const MAX_WAIT_MS: i64 = 15 * 60 * 1000;
/// At most this many clients are remembered: past it, those not waiting are forgotten,
/// then the one whose wait ends first.
const MAX_CLIENTS: usize = 10_000;

impl Throttle {
    /// `Err(wait)` while `ip` must wait before it may try again.
    pub fn check(&self, ip: IpAddr, now_ms: i64) -> Result<(), Duration> {
        let failures = self.lock().get(&crate::domain::client_of(ip)).copied();
        match failures {
            Some(f) if f.until > now_ms => Err(Duration::from_millis((f.until - now_ms) as u64)),
            _ => Ok(()),
        }
    }

    pub fn failed(&self, ip: IpAddr, now_ms: i64) {
        let client = crate::domain::client_of(ip);
        let mut clients = self.lock();
        if clients.len() >= MAX_CLIENTS && !clients.contains_key(&client) {
            clients.retain(|_, f| f.until > now_ms);
        }
        if clients.len() >= MAX_CLIENTS && !clients.contains_key(&client) {
            // Still full of clients that wait: forget the one whose wait ends first.
            let soonest = clients
                .iter()
                .min_by_key(|(_, f)| f.until)
                .map(|(ip, _)| *ip);
            if let Some(ip) = soonest {
                clients.remove(&ip);
            }
        }
        let entry = clients
            .entry(client)
            .or_insert(Failures { count: 0, until: 0 });
        entry.count += 1;
        if entry.count > FREE_FAILURES {
            let doublings = (entry.count - FREE_FAILURES - 1).min(20);
            entry.until = now_ms + (1000i64 << doublings).min(MAX_WAIT_MS);
        }
    }

    pub fn succeeded(&self, ip: IpAddr) {
        self.lock().remove(&crate::domain::client_of(ip));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Failures>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The CSRF token that goes with a session: every dashboard form carries it.
pub fn csrf_token(admin_token: &Secret, session: &str) -> String {
    hex::encode(&mac(&key(admin_token), format!("csrf.{session}").as_bytes())[..16])
}

/// Allows an action to the admin token, or to a session whose CSRF token came along (as
/// the `X-CSRF-Token` header or the form field `csrf`).
pub fn authorize(
    state: &AppState,
    headers: &HeaderMap,
    form_csrf: Option<&str>,
) -> Result<Actor, AppError> {
    if let Some(owner) = state.token_owner(bearer(headers)) {
        return Ok(Actor(owner));
    }
    if bearer(headers).is_some() {
        return Err(AppError::Unauthorized(
            "the admin token is not valid".into(),
        ));
    }
    let Some(session) = state
        .sessions
        .current(headers, &state.admin_token, crate::db::now_ms())
    else {
        return Err(AppError::Unauthorized(NOT_LOGGED_IN.into()));
    };
    let presented = headers
        .get("x-csrf-token")
        .and_then(|v| v.to_str().ok())
        .or(form_csrf);
    let expected = Secret::new(csrf_token(&state.admin_token, &session));
    if token_matches(presented, &expected) {
        let actor = state.sessions.actor_of(&session);
        Ok(Actor(actor.unwrap_or_else(|| DASHBOARD.to_owned())))
    } else {
        Err(AppError::Forbidden("missing or wrong CSRF token".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn with_cookie(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("theme=dark; {COOKIE}={value}")).unwrap(),
        );
        headers
    }

    #[test]
    fn a_signed_session_is_accepted_until_it_expires() {
        let token = Secret::new("admin".into());
        let value = new_session(&token, 1_000);
        assert_eq!(
            signed_session(&with_cookie(&value), &token, 2_000).as_deref(),
            Some(value.as_str())
        );
        assert_eq!(
            signed_session(&with_cookie(&value), &token, 1_000 + SESSION_MS + 1),
            None
        );
    }

    #[tokio::test]
    async fn a_session_ended_by_logout_is_refused_even_with_its_valid_signature() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("n.db")).await.unwrap();
        let token = Secret::new("admin".into());
        let sessions = Sessions::load(db.clone(), true).await.unwrap();
        let cookie = sessions.start(&token, "ada", db::now_ms()).await.unwrap();
        assert!(cookie.ends_with("; Secure"), "{cookie}");
        let value = cookie
            .split(';')
            .next()
            .unwrap()
            .strip_prefix("nonstop_session=")
            .unwrap();
        let headers = with_cookie(value);
        assert!(sessions.current(&headers, &token, db::now_ms()).is_some());
        let reloaded = Sessions::load(db.clone(), true).await.unwrap();
        let session = reloaded.current(&headers, &token, db::now_ms());
        assert!(session.is_some(), "kept across a restart");
        assert_eq!(
            reloaded.actor_of(&session.unwrap()).as_deref(),
            Some("ada"),
            "with who logged in"
        );

        sessions.end(Some(value)).await.unwrap();

        assert_eq!(sessions.current(&headers, &token, db::now_ms()), None);
        let reloaded = Sessions::load(db, true).await.unwrap();
        assert_eq!(reloaded.current(&headers, &token, db::now_ms()), None);
    }

    #[test]
    fn wrong_logins_make_a_client_wait_longer_and_longer_but_not_its_neighbours() {
        let throttle = Throttle::default();
        let ip: IpAddr = "203.0.113.9".parse().unwrap();
        for _ in 0..FREE_FAILURES {
            assert!(throttle.check(ip, 0).is_ok());
            throttle.failed(ip, 0);
        }
        assert!(throttle.check(ip, 0).is_ok(), "the free tries are free");
        throttle.failed(ip, 0);
        assert_eq!(throttle.check(ip, 0), Err(Duration::from_secs(1)));
        throttle.failed(ip, 1_000);
        assert_eq!(throttle.check(ip, 1_000), Err(Duration::from_secs(2)));
        assert!(
            throttle
                .check("203.0.113.10".parse().unwrap(), 1_000)
                .is_ok()
        );
        // The same /64 is the same client; a mapped v4 address is the v4 one.
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        for _ in 0..=FREE_FAILURES {
            throttle.failed(v6, 0);
        }
        assert!(
            throttle
                .check("2001:db8::ffff".parse().unwrap(), 0)
                .is_err()
        );
        assert!(
            throttle
                .check("::ffff:203.0.113.9".parse().unwrap(), 1_000)
                .is_err()
        );
        throttle.succeeded(ip);
        assert!(throttle.check(ip, 1_000).is_ok());
    }

    #[test]
    fn forged_or_foreign_sessions_are_refused() {
        let token = Secret::new("admin".into());
        let value = new_session(&token, 1_000);
        let other = Secret::new("another token".into());
        assert_eq!(
            signed_session(&with_cookie(&value), &other, 2_000),
            None,
            "signed with another key"
        );
        let (body, _) = value.rsplit_once('.').unwrap();
        let forged = format!("{}9.{}", body, "00".repeat(32));
        assert_eq!(signed_session(&with_cookie(&forged), &token, 2_000), None);
        assert_eq!(signed_session(&HeaderMap::new(), &token, 2_000), None);
    }

    #[test]
    fn csrf_tokens_belong_to_their_session() {
        let token = Secret::new("admin".into());
        let one = new_session(&token, 0);
        let two = new_session(&token, 0);
        assert_eq!(csrf_token(&token, &one), csrf_token(&token, &one));
        assert_ne!(csrf_token(&token, &one), csrf_token(&token, &two));
        assert!(set_cookie(Some(&one), false).contains("HttpOnly; SameSite=Strict"));
    }
}
