//! The live slot of a fleet nonstop does not proxy (CodeDeploy): asked of the app itself
//! through its public URL, as the classic recipe's switch script does — `GET
//! {public_url}/profile` answers the profile of the instance that served it, and the profile
//! names the slot (`real1` → `ports[0]`, `real2` → `ports[1]`). It only reads; it never moves
//! traffic.

use std::time::Duration;

use crate::config::AppConfig;

/// Which slot serves the public URL now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveSlot {
    pub port: u16,
    pub profile: String,
}

/// The slot a `/profile` answer names, if it is one of the app's profiles. Pure.
pub fn slot_of(app: &AppConfig, answer: &str) -> Option<LiveSlot> {
    let profile = answer.trim();
    let index = app.profiles.iter().position(|p| p == profile)?;
    Some(LiveSlot {
        port: app.ports[index],
        profile: profile.to_owned(),
    })
}

/// Why the fleet's live slot could not be told.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("{url}: {source}")]
    Unreachable { url: String, source: reqwest::Error },
    #[error("{url} answered {status}")]
    Status {
        url: String,
        status: reqwest::StatusCode,
    },
    #[error("{url} answered `{shown}`, which is none of the profiles {profiles:?}")]
    UnknownProfile {
        url: String,
        shown: String,
        profiles: [String; 2],
    },
}

/// Asks `public_url` + `/profile` which slot is live; one short request, a one-line error.
pub async fn probe(app: &AppConfig, public_url: &str) -> Result<LiveSlot, FleetError> {
    let url = format!("{}/profile", public_url.trim_end_matches('/'));
    let unreachable = |source| FleetError::Unreachable {
        url: url.clone(),
        source,
    };
    let response = client().get(&url).send().await.map_err(unreachable)?;
    let status = response.status();
    let body = response.text().await.map_err(unreachable)?;
    if !status.is_success() {
        return Err(FleetError::Status { url, status });
    }
    slot_of(app, &body).ok_or_else(|| FleetError::UnknownProfile {
        shown: body.trim().chars().take(40).collect(),
        profiles: app.profiles.clone(),
        url,
    })
}

/// One client for every probe, made on first use.
fn client() -> &'static reqwest::Client {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    CLIENT.get_or_init(|| {
        // A public URL that does not answer in seconds is down, not slow.
        reqwest::Client::builder()
            .timeout(Duration::from_secs(3))
            .build()
            .unwrap_or_default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app() -> AppConfig {
        let text = "[[app]]\nname = \"hello\"\nrepo = \"x\"\nbuild = \"true\"\nartifact = \"hello\"\nrun = \"{artifact} --port {port}\"\n";
        crate::config::Config::parse(text, std::path::Path::new("n.toml"))
            .unwrap()
            .apps
            .remove(0)
    }

    #[test]
    fn the_profile_names_the_slot() {
        let app = app();
        assert_eq!(
            slot_of(&app, "real1\n"),
            Some(LiveSlot {
                port: 8081,
                profile: "real1".into()
            })
        );
        assert_eq!(slot_of(&app, "real2").unwrap().port, 8082);
        assert_eq!(slot_of(&app, "<html>oops</html>"), None);
    }

    #[tokio::test]
    async fn probing_a_public_url_reads_its_profile() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server =
            axum::Router::new().route("/profile", axum::routing::get(|| async { "real2" }));
        let served = tokio::spawn(async move { axum::serve(listener, server).await });
        let app = app();
        let slot = probe(&app, &format!("http://{addr}/")).await.unwrap();
        assert_eq!(
            slot,
            LiveSlot {
                port: 8082,
                profile: "real2".into()
            }
        );

        served.abort();
        let _ = served.await;
        let err = probe(&app, &format!("http://{addr}")).await.unwrap_err();
        assert!(
            err.to_string().contains(&format!("http://{addr}/profile")),
            "{err}"
        );
    }
}
