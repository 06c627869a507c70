//! Who may act: the admin token (bearer, for scripts) or a dashboard login session (a signed
//! cookie) plus its CSRF token. Sessions are signed with a key derived from the admin token,
//! so they survive a restart and end when the token changes. Pure functions over headers.

use axum::http::{HeaderMap, header};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::{AppError, AppState, bearer, token_matches};
use crate::config::Secret;

pub const COOKIE: &str = "nonstop_session";
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
pub fn new_session(admin_token: &Secret, now_ms: i64) -> String {
    let mut nonce = [0u8; 16];
    getrandom::fill(&mut nonce).expect("the OS random source is available");
    let body = format!("{}.{}", now_ms + SESSION_MS, hex::encode(nonce));
    let signature = hex::encode(mac(&key(admin_token), body.as_bytes()));
    format!("{body}.{signature}")
}

/// The `Set-Cookie` header value for a session (or, with `None`, one that ends it).
pub fn set_cookie(value: Option<&str>) -> String {
    match value {
        Some(value) => format!(
            "{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
            SESSION_MS / 1000
        ),
        None => format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    }
}

/// The request's session cookie, if it is one nonstop signed and it has not expired.
pub fn session(headers: &HeaderMap, admin_token: &Secret, now_ms: i64) -> Option<String> {
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
) -> Result<(), AppError> {
    if token_matches(bearer(headers), &state.admin_token) {
        return Ok(());
    }
    if bearer(headers).is_some() {
        return Err(AppError::Unauthorized(
            "the admin token is not valid".into(),
        ));
    }
    let Some(session) = session(headers, &state.admin_token, crate::db::now_ms()) else {
        return Err(AppError::Unauthorized(
            "log in on the dashboard or send the admin token (Authorization: Bearer …)".into(),
        ));
    };
    let presented = headers
        .get("x-csrf-token")
        .and_then(|v| v.to_str().ok())
        .or(form_csrf);
    let expected = Secret::new(csrf_token(&state.admin_token, &session));
    if token_matches(presented, &expected) {
        Ok(())
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
            session(&with_cookie(&value), &token, 2_000).as_deref(),
            Some(value.as_str())
        );
        assert_eq!(
            session(&with_cookie(&value), &token, 1_000 + SESSION_MS + 1),
            None
        );
    }

    #[test]
    fn forged_or_foreign_sessions_are_refused() {
        let token = Secret::new("admin".into());
        let value = new_session(&token, 1_000);
        let other = Secret::new("another token".into());
        assert_eq!(
            session(&with_cookie(&value), &other, 2_000),
            None,
            "signed with another key"
        );
        let (body, _) = value.rsplit_once('.').unwrap();
        let forged = format!("{}9.{}", body, "00".repeat(32));
        assert_eq!(session(&with_cookie(&forged), &token, 2_000), None);
        assert_eq!(session(&HeaderMap::new(), &token, 2_000), None);
    }

    #[test]
    fn csrf_tokens_belong_to_their_session() {
        let token = Secret::new("admin".into());
        let one = new_session(&token, 0);
        let two = new_session(&token, 0);
        assert_eq!(csrf_token(&token, &one), csrf_token(&token, &one));
        assert_ne!(csrf_token(&token, &one), csrf_token(&token, &two));
        assert!(set_cookie(Some(&one)).contains("HttpOnly; SameSite=Strict"));
    }
}
