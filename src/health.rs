//! Asking an instance on this host whether it is healthy: one GET of its health path on
//! loopback, bounded by a short timeout. Used before a switch-back and by the dashboard.

use std::time::Duration;

/// True when `http://127.0.0.1:{port}{path}` answers 2xx within `timeout`.
pub async fn answers(port: u16, path: &str, timeout: Duration) -> bool {
    let url = format!("http://127.0.0.1:{port}{path}");
    let client = reqwest::Client::builder().timeout(timeout).build();
    match client {
        Ok(client) => client
            .get(url)
            .send()
            .await
            .is_ok_and(|response| response.status().is_success()),
        Err(_) => false,
    }
}
