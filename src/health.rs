//! Asking an instance on this host whether it is healthy: one GET of its health path on
//! loopback, bounded by a short timeout. Used before a switch and by the dashboard.

use std::sync::OnceLock;
use std::time::Duration;

/// One client for every probe: building one loads TLS roots, too slow for each page view.
/// No pooled connections: each probe asks on a fresh one, as a new client would, so a
/// connection left from an instance that died since can never answer for it.
fn client() -> &'static reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap_or_default()
    })
}

/// True when `http://127.0.0.1:{port}{path}` answers 2xx within `timeout`.
pub async fn answers(port: u16, path: &str, timeout: Duration) -> bool {
    client()
        .get(format!("http://127.0.0.1:{port}{path}"))
        .timeout(timeout)
        .send()
        .await
        .is_ok_and(|response| response.status().is_success())
}
