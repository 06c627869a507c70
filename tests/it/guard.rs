//! The guard: a version that passes its health check and then fails or slows down its real
//! traffic is caught by what the proxy measures, and traffic goes back to the version before.

use crate::common::spawn_app;

#[tokio::test]
async fn error_every_makes_a_version_that_passes_health_and_fails_every_nth_request() {
    let app = spawn_app().await;
    let bad = app.repo.commit_error_every(3);

    let version = app.deploy(&bad).await;

    let mut statuses = Vec::new();
    for _ in 0..6 {
        let response = app
            .http
            .get(format!("{}/", app.proxy()))
            .send()
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 500).count(),
        2,
        "{statuses:?} of {version}"
    );
    let profile = app
        .http
        .get(format!("{}/profile", app.proxy()))
        .send()
        .await
        .unwrap();
    assert_eq!(profile.status(), 200);
}
