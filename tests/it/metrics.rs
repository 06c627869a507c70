//! What the proxy measures of each instance: `/metrics` parsed by a Prometheus text-format
//! parser matches what a load loop itself counted, with the proxy in its own process (the
//! counts come over the control socket), and the traffic series adds up to the same.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::common::{Extra, Load, TestApp, spawn_app_with};

/// `/metrics` as samples of the Prometheus text format: (name, labels) → value.
async fn scrape(app: &TestApp) -> Vec<(String, HashMap<String, String>, f64)> {
    let (status, text) = app.get_text("/metrics").await;
    assert_eq!(status, 200, "{text}");
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let parsed = prometheus_parse::Scrape::parse(lines).expect("Prometheus text format");
    parsed
        .samples
        .into_iter()
        .map(|sample| {
            let labels: HashMap<String, String> = sample
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let value = match sample.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                prometheus_parse::Value::Histogram(buckets) => {
                    buckets.last().map_or(0.0, |b| b.count)
                }
                prometheus_parse::Value::Summary(_) => f64::NAN,
            };
            (sample.metric, labels, value)
        })
        .collect()
}

/// The value of `metric` for `version` with the label `key` = `value` (0 when absent).
fn value_of(
    samples: &[(String, HashMap<String, String>, f64)],
    metric: &str,
    version: &str,
    key: &str,
    value: &str,
) -> u64 {
    samples
        .iter()
        .filter(|(name, labels, _)| {
            name == metric
                && labels.get("version").map(String::as_str) == Some(version)
                && (key.is_empty() || labels.get(key).map(String::as_str) == Some(value))
        })
        .map(|(_, _, v)| *v as u64)
        .sum()
}

#[tokio::test]
async fn metrics_count_every_answer_of_each_version_exactly() {
    let app = spawn_app_with(Extra {
        proxy_process: true,
        ..Extra::default()
    })
    .await;
    let version = app.deploy(&app.repo.commit_error_every(3)).await;
    // The sampler's series of the new instance begins at its first reading: before the load.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !instances_of(&app).await.contains(&version) {
        assert!(
            Instant::now() < deadline,
            "the series never listed {version}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = scrape(&app).await;

    let load = Load::start(format!("{}/", app.proxy()), 4, 150, Duration::from_secs(60));
    let report = load.join().await;

    assert_eq!(report.connection_errors, 0, "{:?}", report.failures);
    let ok = report.statuses.get(&200).copied().unwrap_or(0);
    let failed = report.statuses.get(&500).copied().unwrap_or(0);
    assert_eq!(ok + failed, 600, "{:?}", report.statuses);
    assert!(
        failed >= 150,
        "every third request fails: {:?}",
        report.statuses
    );
    let after = scrape(&app).await;
    let grew = |metric: &str, key: &str, value: &str| {
        value_of(&after, metric, &version, key, value)
            - value_of(&before, metric, &version, key, value)
    };
    assert_eq!(grew("nonstop_proxy_requests_total", "code", "2xx"), ok);
    assert_eq!(grew("nonstop_proxy_requests_total", "code", "5xx"), failed);
    assert_eq!(grew("nonstop_proxy_requests_total", "code", "4xx"), 0);
    assert_eq!(
        grew("nonstop_proxy_request_duration_seconds_count", "", ""),
        ok + failed
    );
    assert_eq!(grew("nonstop_proxy_upstream_errors_total", "", ""), 0);
    assert!(grew("nonstop_proxy_response_bytes_total", "", "") > 0);
    let port = after
        .iter()
        .find(|(name, labels, _)| {
            name == "nonstop_proxy_requests_total" && labels.get("version") == Some(&version)
        })
        .and_then(|(_, labels, _)| labels.get("port").cloned());
    assert_eq!(port, Some(app.ports.app[0].to_string()));

    // The per-second series, sampled over the control socket, adds up to the same answers.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, traffic) = app.get_json("/api/apps/hello/traffic").await;
        assert_eq!(status, 200, "{traffic}");
        let seen: u64 = traffic["instances"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|i| i["version"] == version.as_str())
            .flat_map(|i| i["seconds"].as_array().cloned().unwrap_or_default())
            .map(|s| {
                s["codes"]["2xx"].as_u64().unwrap_or(0) + s["codes"]["5xx"].as_u64().unwrap_or(0)
            })
            .sum();
        if seen == ok + failed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the series shows {seen} of {}: {traffic:#}",
            ok + failed
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The versions `/api/apps/hello/traffic` has a series of.
async fn instances_of(app: &TestApp) -> Vec<String> {
    let (_, traffic) = app.get_json("/api/apps/hello/traffic").await;
    traffic["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["version"].as_str().map(str::to_owned))
        .collect()
}
