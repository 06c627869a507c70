//! What the proxies measured, for people and for the guard. Once a second the sampler asks
//! every app's switch what each instance answered (in this process, or over the proxy
//! process's control socket) and keeps the per-second differences for the last ten minutes:
//! `/api/apps/{app}/traffic` shows them, the guard judges a version by them. `/metrics`
//! renders fresh counts (Prometheus text, through `prometheus-client`), the deployment
//! counts beside them. This module only reads: it never moves traffic or stops anything.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::apps::{App, Apps};
use crate::db::{self, Db};
use crate::switch::InstanceCounts;
use crate::switch::proxy::meter::{LATENCY_BUCKETS_SECONDS, STATUS_CLASSES, UpstreamFailure};

/// How often the sampler reads the switches: the resolution of the traffic series.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
/// Seconds of traffic kept per instance: ten minutes, enough to see a switch and the
/// minutes before it.
pub const KEPT_SECONDS: usize = 600;

/// One second of one instance's traffic.
#[derive(Clone, Debug, Serialize)]
pub struct Second {
    /// Unix seconds at the end of this second's sample.
    pub at: i64,
    pub counts: InstanceCounts,
}

/// One instance's recent traffic.
#[derive(Clone, Debug)]
struct Series {
    port: u16,
    version: String,
    /// The counts at the last sample, to take the next one's difference from.
    last: InstanceCounts,
    seconds: VecDeque<Second>,
}

/// The sampler's record, shared by everyone who reads it; cheap to clone.
#[derive(Clone, Default)]
pub struct Metrics {
    by_app: Arc<Mutex<HashMap<String, Vec<Series>>>>,
}

impl Metrics {
    /// Samples every app's switch each [`SAMPLE_INTERVAL`] until `shutdown`.
    pub fn start(&self, apps: &Apps, db: Db, shutdown: CancellationToken) {
        let apps: Vec<Arc<App>> = apps.iter().cloned().collect();
        let metrics = self.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(SAMPLE_INTERVAL);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = every.tick() => {}
                    () = shutdown.cancelled() => return,
                }
                for app in &apps {
                    match read_now(app, &db).await {
                        Ok(counts) => metrics.record(
                            app.config.name.as_str(),
                            chrono::Utc::now().timestamp(),
                            counts,
                        ),
                        Err(err) => {
                            tracing::debug!(app = %app.config.name, error = %err, "could not read what the proxy measured")
                        }
                    }
                }
            }
        });
    }

    /// Keeps one sample of `app`'s instances, taken at `at` (Unix seconds).
    pub fn record(&self, app: &str, at: i64, counts: Vec<InstanceCounts>) {
        let mut by_app = self
            .by_app
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let series = by_app.entry(app.to_owned()).or_default();
        for now in counts {
            let at_index = series
                .iter()
                .position(|s| s.port == now.port && s.version == now.version);
            let one = match at_index {
                Some(i) => &mut series[i],
                None => {
                    // First seen: what it counted before this sampler ran is not one second's.
                    series.push(Series {
                        port: now.port,
                        version: now.version.clone(),
                        last: now.clone(),
                        seconds: VecDeque::new(),
                    });
                    continue;
                }
            };
            let delta = now.since(&one.last);
            one.last = now;
            one.seconds.push_back(Second { at, counts: delta });
            while one.seconds.len() > KEPT_SECONDS {
                one.seconds.pop_front();
            }
        }
        // Instances the switch no longer reports, once their seconds have all aged out.
        series.retain(|s| {
            s.seconds
                .back()
                .is_none_or(|last| at - last.at < KEPT_SECONDS as i64)
        });
    }

    /// `app`'s kept seconds, per instance.
    pub fn traffic(&self, app: &str) -> Vec<InstanceTraffic> {
        let by_app = self
            .by_app
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        by_app
            .get(app)
            .map(|series| {
                series
                    .iter()
                    .map(|s| InstanceTraffic {
                        port: s.port,
                        version: s.version.clone(),
                        seconds: s.seconds.iter().map(TrafficSecond::of).collect(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// What `port` running `version` answered in the seconds sampled from `from` to `to`
    /// (Unix seconds, both included).
    pub fn window(
        &self,
        app: &str,
        port: u16,
        version: &str,
        from: i64,
        to: i64,
    ) -> InstanceCounts {
        let by_app = self
            .by_app
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut total = InstanceCounts {
            port,
            version: version.to_owned(),
            ..InstanceCounts::default()
        };
        let series = by_app
            .get(app)
            .into_iter()
            .flatten()
            .filter(|s| s.port == port && s.version == version);
        for s in series {
            for second in s.seconds.iter().filter(|s| (from..=to).contains(&s.at)) {
                total.add(&second.counts);
            }
        }
        total
    }
}

/// Requests per second of the instances on some ports, around a switch: what the
/// deployment page draws.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct TrafficChart {
    /// Unix seconds of the switch.
    pub switch_at: i64,
    pub lines: Vec<ChartLine>,
}

#[derive(Clone, Debug, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct ChartLine {
    pub port: u16,
    pub version: String,
    /// (Unix second, answers that were no 5xx, 5xx and upstream errors).
    pub points: Vec<(i64, u64, u64)>,
}

impl Metrics {
    /// `app`'s instances on `ports`, from `from` to `to` (Unix seconds), around a switch
    /// at `switch_at`.
    pub fn chart(
        &self,
        app: &str,
        ports: [u16; 2],
        switch_at: i64,
        from: i64,
        to: i64,
    ) -> TrafficChart {
        let by_app = self
            .by_app
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let lines = by_app
            .get(app)
            .into_iter()
            .flatten()
            .filter(|s| ports.contains(&s.port))
            .map(|s| ChartLine {
                port: s.port,
                version: s.version.clone(),
                points: s
                    .seconds
                    .iter()
                    .filter(|second| (from..=to).contains(&second.at))
                    .map(|second| {
                        let c = &second.counts;
                        let bad = c.server_errors() + c.upstream_errors_total();
                        (second.at, c.answered() - c.server_errors(), bad)
                    })
                    .collect(),
            })
            .filter(|line| line.points.iter().any(|(_, ok, bad)| ok + bad > 0))
            .collect();
        TrafficChart { switch_at, lines }
    }
}

/// What `app`'s switch counted so far, each instance named by its version (the record's,
/// for one the switch was not told).
pub async fn read_now(
    app: &App,
    db: &Db,
) -> Result<Vec<InstanceCounts>, crate::switch::SwitchError> {
    let mut counts = app.switch.measured().await?;
    if counts.iter().any(|c| c.version.is_empty()) {
        let name = app.config.name.to_string();
        let ports: Vec<u16> = counts
            .iter()
            .filter(|c| c.version.is_empty())
            .map(|c| c.port)
            .collect();
        let versions = db
            .call(move |conn| {
                ports
                    .into_iter()
                    .map(|port| Ok((port, db::instance(conn, &name, port)?.map(|i| i.version))))
                    .collect::<rusqlite::Result<HashMap<_, _>>>()
            })
            .await
            .unwrap_or_default();
        for c in counts.iter_mut().filter(|c| c.version.is_empty()) {
            if let Some(Some(version)) = versions.get(&c.port) {
                c.version.clone_from(version);
            }
        }
    }
    Ok(counts)
}

/// One instance's recent traffic, as the API shows it.
#[derive(Debug, Serialize)]
pub struct InstanceTraffic {
    pub port: u16,
    pub version: String,
    pub seconds: Vec<TrafficSecond>,
}

#[derive(Debug, Serialize)]
pub struct TrafficSecond {
    pub at: i64,
    /// Answered requests by status class.
    pub codes: HashMap<&'static str, u64>,
    /// Requests the instance never answered (the client got the proxy's 502).
    pub upstream_errors: u64,
    /// Milliseconds under which 99% of the second's answers came (a bucket's bound).
    pub p99_ms: Option<f64>,
    pub response_bytes: u64,
}

impl TrafficSecond {
    fn of(second: &Second) -> Self {
        let c = &second.counts;
        Self {
            at: second.at,
            codes: STATUS_CLASSES
                .iter()
                .zip(c.requests)
                .filter(|(_, n)| *n > 0)
                .map(|(class, n)| (*class, n))
                .collect(),
            upstream_errors: c.upstream_errors_total(),
            p99_ms: c.latency_quantile(0.99).map(|d| d.as_secs_f64() * 1000.0),
            response_bytes: c.response_bytes,
        }
    }
}

/// Everything `/metrics` shows, read at one scrape.
#[derive(Debug, Default)]
pub struct Scrape {
    /// Deployments by app and status.
    pub deployments: Vec<(String, String, i64)>,
    /// Each app's live port.
    pub live: Vec<(String, u16)>,
    /// What each app's instances answered.
    pub instances: Vec<(String, InstanceCounts)>,
}

impl prometheus_client::collector::Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "nonstop_deployments",
            "Deployments by app and status.",
            None,
            MetricType::Counter,
        )?;
        for (app, status, count) in &self.deployments {
            let labels = [("app", app.as_str()), ("status", status.as_str())];
            ConstCounter::new(u64::try_from(*count).unwrap_or(0))
                .encode(family.encode_family(&labels)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "nonstop_live_port",
            "The port each app's traffic goes to.",
            None,
            MetricType::Gauge,
        )?;
        for (app, port) in &self.live {
            ConstGauge::new(i64::from(*port))
                .encode(family.encode_family(&[("app", app.as_str())])?)?;
        }

        let mut family = encoder.encode_descriptor(
            "nonstop_proxy_requests",
            "Responses of each instance through the proxy, by status class.",
            None,
            MetricType::Counter,
        )?;
        for (app, c) in &self.instances {
            let port = c.port.to_string();
            for (code, count) in STATUS_CLASSES.iter().zip(c.requests) {
                let labels = [
                    ("app", app.as_str()),
                    ("version", c.version.as_str()),
                    ("port", port.as_str()),
                    ("code", code),
                ];
                ConstCounter::new(count).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "nonstop_proxy_request_duration_seconds",
            "Time from a request's arrival to its response head from the instance.",
            None,
            MetricType::Histogram,
        )?;
        for (app, c) in &self.instances {
            let port = c.port.to_string();
            let labels = [
                ("app", app.as_str()),
                ("version", c.version.as_str()),
                ("port", port.as_str()),
            ];
            let buckets: Vec<(f64, u64)> = LATENCY_BUCKETS_SECONDS
                .iter()
                .copied()
                .chain([f64::INFINITY])
                .zip(c.latency.iter().copied())
                .collect();
            family
                .encode_family(&labels)?
                .encode_histogram::<NoLabelSet>(
                    c.latency_sum_us as f64 / 1e6,
                    c.answered(),
                    &buckets,
                    None,
                )?;
        }
        let mut family = encoder.encode_descriptor(
            "nonstop_proxy_upstream_errors",
            "Requests an instance never answered (the client got the proxy's 502), by kind.",
            None,
            MetricType::Counter,
        )?;
        for (app, c) in &self.instances {
            let port = c.port.to_string();
            for (kind, count) in UpstreamFailure::ALL.iter().zip(c.upstream_errors) {
                let labels = [
                    ("app", app.as_str()),
                    ("version", c.version.as_str()),
                    ("port", port.as_str()),
                    ("kind", kind.as_str()),
                ];
                ConstCounter::new(count).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "nonstop_proxy_response_bytes",
            "Bytes of response bodies passed from each instance to clients.",
            None,
            MetricType::Counter,
        )?;
        for (app, c) in &self.instances {
            let port = c.port.to_string();
            let labels = [
                ("app", app.as_str()),
                ("version", c.version.as_str()),
                ("port", port.as_str()),
            ];
            ConstCounter::new(c.response_bytes).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

impl Scrape {
    /// The Prometheus text format (0.0.4) of this scrape.
    pub fn render(self) -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(self));
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut text, &registry);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(port: u16, version: &str, ok: u64, errors: u64) -> InstanceCounts {
        let mut latency = vec![0; LATENCY_BUCKETS_SECONDS.len() + 1];
        latency[0] = ok + errors;
        InstanceCounts {
            port,
            version: version.into(),
            requests: [0, ok, 0, 0, errors],
            latency,
            latency_sum_us: 500 * (ok + errors),
            ..InstanceCounts::default()
        }
    }

    #[test]
    fn the_series_keeps_per_second_differences_and_a_window_adds_them_up() {
        let metrics = Metrics::default();
        metrics.record("hello", 100, vec![counts(8081, "v1", 10, 0)]);
        metrics.record("hello", 101, vec![counts(8081, "v1", 15, 1)]);
        metrics.record(
            "hello",
            102,
            vec![counts(8081, "v1", 15, 1), counts(8082, "v2", 3, 3)],
        );
        metrics.record(
            "hello",
            103,
            vec![counts(8081, "v1", 15, 1), counts(8082, "v2", 5, 7)],
        );

        let traffic = metrics.traffic("hello");
        assert_eq!(traffic.len(), 2);
        assert_eq!(traffic[0].seconds.len(), 3, "the first sample is the base");
        assert_eq!(traffic[0].seconds[0].codes.get("2xx"), Some(&5));
        let old = metrics.window("hello", 8081, "v1", 0, 200);
        assert_eq!(old.requests, [0, 5, 0, 0, 1]);
        let new = metrics.window("hello", 8082, "v2", 103, 103);
        assert_eq!(new.requests, [0, 2, 0, 0, 4]);
        assert!(metrics.traffic("other").is_empty());
    }

    #[test]
    fn a_scrape_renders_prometheus_text() {
        let scrape = Scrape {
            deployments: vec![("hello".into(), "failed".into(), 1)],
            live: vec![("hello".into(), 8081)],
            instances: vec![("hello".into(), counts(8081, "v1", 4, 2))],
        };

        let text = scrape.render();

        for line in [
            "nonstop_deployments_total{app=\"hello\",status=\"failed\"} 1",
            "nonstop_live_port{app=\"hello\"} 8081",
            "nonstop_proxy_requests_total{app=\"hello\",version=\"v1\",port=\"8081\",code=\"5xx\"} 2",
            "nonstop_proxy_request_duration_seconds_bucket{app=\"hello\",version=\"v1\",port=\"8081\",le=\"0.001\"} 6",
            "nonstop_proxy_request_duration_seconds_count{app=\"hello\",version=\"v1\",port=\"8081\"} 6",
            "# TYPE nonstop_proxy_request_duration_seconds histogram",
            "nonstop_proxy_upstream_errors_total{app=\"hello\",version=\"v1\",port=\"8081\",kind=\"refused\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
    }
}
