//! The guard window: after a deployment switches traffic, its new version is judged by its
//! own traffic for `guard.secs`. When its 5xx and upstream errors pass `max_error_ratio` of
//! at least `min_requests` requests, or its p99 passes `max_p99_ratio` times the previous
//! version's (when that one had enough traffic to say), traffic goes back at once to the
//! previous instance, which still runs (through `traffic`, the same swap as any switch);
//! the deployment ends `rolled_back` with the reason and the numbers, and the bad instance
//! is stopped the way a failed deployment's is. The window also ends when something else
//! moves on: a rollback, a newer deployment. A window open at a restart is resumed.
//!
//! `traffic` opens a window when a deployment's switch goes through and starts its watch
//! here; the watch never moves traffic except through `traffic`, and never stops the
//! instance that serves.

use std::sync::Arc;
use std::time::Duration;

use crate::apps::App;
use crate::config::GuardConfig;
use crate::db::{self, GuardOutcome, GuardWindow};
use crate::domain::{DeploymentId, DeploymentStatus};
use crate::runner::Interrupted;
use crate::switch::InstanceCounts;
use crate::traffic::Traffic;

/// How often a watch reads the proxy's counts: a bad version is switched back within about
/// this long of crossing its limit.
pub const TICK: Duration = Duration::from_millis(200);

/// The previous version's p99 is taken over this much of its traffic before the switch.
pub const BEFORE_SWITCH: Duration = Duration::from_secs(300);

/// A p99 under this is never judged slow: below it the latency buckets move with the
/// host's load (a build on the same cores), not with the version.
pub const P99_FLOOR: Duration = Duration::from_millis(100);

/// How long the stop of a tripped version waits for its deployment's own hooks to end.
const PIPELINE_END_WAIT: Duration = Duration::from_secs(60);

/// Requests already on the tripped instance when traffic went back (a slow version's take
/// their time) finish before it is stopped. A fixed grace until open connections are
/// counted per instance and drained.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// What the guard knows of the version before the switch.
#[derive(Clone, Copy, Debug, Default)]
pub struct Before {
    /// Its p99 over [`BEFORE_SWITCH`], when it answered at least `min_requests` in it.
    pub p99: Option<Duration>,
}

/// Why the guarded version must go, in words and numbers; `None` while it is within limits.
/// `counts` is what it answered since the switch, `elapsed` how long ago that was.
pub fn verdict(
    config: &GuardConfig,
    counts: &InstanceCounts,
    before: Before,
    elapsed: Duration,
) -> Option<String> {
    let upstream = counts.upstream_errors_total();
    let requests = counts.answered() + upstream;
    if requests < config.min_requests || requests == 0 {
        return None;
    }
    let bad = counts.server_errors() + upstream;
    let ratio = bad as f64 / requests as f64;
    let what = if upstream > 0 {
        "5xx and upstream errors"
    } else {
        "5xx"
    };
    if ratio > config.max_error_ratio {
        return Some(format!(
            "{what} {}% of {requests} requests in {:.1} s after the switch; limit {}%",
            (ratio * 100.0).round(),
            elapsed.as_secs_f64(),
            trim(config.max_error_ratio * 100.0),
        ));
    }
    let (Some(old), Some(new)) = (before.p99, counts.latency_quantile(0.99)) else {
        return None;
    };
    let limit = old.mul_f64(config.max_p99_ratio);
    if new > limit && new > P99_FLOOR {
        return Some(format!(
            "p99 {} ms of {requests} requests in {:.1} s after the switch; limit {} × the previous version's {} ms",
            new.as_millis(),
            elapsed.as_secs_f64(),
            trim(config.max_p99_ratio),
            old.as_millis(),
        ));
    }
    None
}

/// `5` for 5.0, `2.5` for 2.5: a limit as people write it.
fn trim(value: f64) -> String {
    let text = format!("{value:.2}");
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// One open window being watched.
pub struct Watch {
    pub app: Arc<App>,
    pub window: GuardWindow,
    pub config: GuardConfig,
    pub before: Before,
}

/// What ended a window.
enum End {
    Passed,
    Tripped(String),
    /// Traffic or the deployment moved on without the guard.
    Ended(&'static str),
}

/// Watches `watch`'s window to its end, then records it (and switches back when tripped).
pub async fn run(traffic: Traffic, watch: Watch) {
    let Watch {
        app,
        window,
        config,
        before,
    } = watch;
    let id = window.deployment_id;
    let name = app.config.name.to_string();
    // When the switch was, on this process's clock (a resumed window started before it).
    let ago = Duration::from_millis(u64::try_from(db::now_ms() - window.started_at).unwrap_or(0));
    let started = std::time::Instant::now()
        .checked_sub(ago)
        .unwrap_or_else(std::time::Instant::now);
    let mut baseline: Option<InstanceCounts> = None;
    // What the new version answered since the base, at the last reading.
    let mut last_seen: Option<InstanceCounts> = None;
    tracing::info!(deployment_id = %id, app = %name, port = window.to_port, secs_left = (window.ends_at - db::now_ms()) / 1000, "guarding the new version");
    let end = loop {
        tokio::time::sleep(TICK).await;
        if db::now_ms() >= window.ends_at {
            break End::Passed;
        }
        if app.switch.live() != Some(window.to_port) {
            break End::Ended("traffic moved away");
        }
        if let Some(reason) = moved_on(&traffic, &name, id).await {
            break End::Ended(reason);
        }
        let counts = match crate::metrics::read_now(&app, traffic.db()).await {
            Ok(counts) => counts,
            Err(err) => {
                tracing::debug!(deployment_id = %id, error = %err, "guard could not read the proxy's counts");
                continue;
            }
        };
        let Some(now) = counts
            .into_iter()
            .find(|c| c.port == window.to_port && c.version == window.version)
        else {
            continue;
        };
        // The first reading is the base: the few requests before it are not judged.
        let Some(base) = &baseline else {
            baseline = Some(now);
            continue;
        };
        let since = now.since(base);
        let verdict = verdict(&config, &since, before, started.elapsed());
        last_seen = Some(since);
        if let Some(reason) = verdict {
            break End::Tripped(reason);
        }
    };
    keep_chart(&traffic, &app, &window, last_seen.as_ref()).await;
    match end {
        End::Passed => close(&traffic, &app, id, GuardOutcome::Passed, None).await,
        End::Ended(why) => {
            tracing::info!(deployment_id = %id, app = %name, why, "guard window ended early");
            close(&traffic, &app, id, GuardOutcome::Ended, None).await;
        }
        End::Tripped(reason) => trip(&traffic, &app, &window, reason).await,
    }
}

/// How far before the switch the kept chart starts.
const CHART_BEFORE_SECS: i64 = 60;

/// The traffic chart around the switch, for the window's traffic chart
/// on the deployment page: both versions, from a minute before the switch to now.
pub fn chart_of(traffic: &Traffic, window: &GuardWindow) -> crate::metrics::TrafficChart {
    let switch_at = window.started_at / 1000;
    traffic.metrics().chart(
        &window.app,
        [window.from_port, window.to_port],
        switch_at,
        switch_at - CHART_BEFORE_SECS,
        chrono::Utc::now().timestamp(),
    )
}

/// Keeps the chart as the guard saw it when the window ended (a rolled-back deployment's
/// page keeps the picture that decided it).
async fn keep_chart(
    traffic: &Traffic,
    app: &App,
    window: &GuardWindow,
    last_seen: Option<&InstanceCounts>,
) {
    let mut chart = chart_of(traffic, window);
    // A decision within the first second comes before the sampler saw the new version:
    // what the guard judged is its one point.
    let sampled = chart
        .lines
        .iter()
        .any(|l| l.port == window.to_port && l.version == window.version);
    if let (false, Some(seen)) = (sampled, last_seen) {
        let bad = seen.server_errors() + seen.upstream_errors_total();
        chart.lines.push(crate::metrics::ChartLine {
            port: window.to_port,
            version: window.version.clone(),
            points: vec![(
                chrono::Utc::now().timestamp(),
                seen.answered() - seen.server_errors(),
                bad,
            )],
        });
    }
    let Ok(chart) = serde_json::to_string(&chart) else {
        return;
    };
    let id = window.deployment_id;
    if let Err(err) = traffic
        .db()
        .call(move |conn| db::set_guard_chart(conn, id, &chart))
        .await
    {
        tracing::warn!(deployment_id = %id, app = %app.config.name, error = %err, "could not keep the guard's chart");
    }
}

/// Whether the deployment's window is no longer the guard's to judge: it was rolled back or
/// ended otherwise, or a newer deployment of the app started.
async fn moved_on(traffic: &Traffic, app: &str, id: DeploymentId) -> Option<&'static str> {
    let app = app.to_owned();
    let state = traffic
        .db()
        .call(move |conn| {
            let status = db::deployment(conn, id)?.map(|d| d.status);
            let newer = db::running_deployment(conn, &app)?.filter(|r| *r > id);
            let closed = db::guard_of(conn, id)?.is_none_or(|g| g.outcome.is_some());
            Ok((status, newer, closed))
        })
        .await
        .ok()?;
    match state {
        (_, _, true) => Some("the window was closed"),
        (_, Some(_), _) => Some("a newer deployment started"),
        (Some(DeploymentStatus::Running | DeploymentStatus::Guarding), None, false) => None,
        _ => Some("the deployment ended otherwise"),
    }
}

async fn close(
    traffic: &Traffic,
    app: &App,
    id: DeploymentId,
    outcome: GuardOutcome,
    reason: Option<String>,
) {
    let closed = traffic
        .db()
        .call(move |conn| db::close_guard(conn, id, outcome, reason.as_deref()))
        .await;
    match closed {
        Ok(Some(status)) => {
            tracing::info!(deployment_id = %id, app = %app.config.name, outcome = ?outcome, status = %status, "guard window closed");
            traffic.publish_deployment(id).await;
        }
        Ok(None) => {}
        Err(err) => {
            tracing::error!(deployment_id = %id, error = %err, "could not record the end of a guard window")
        }
    }
}

/// Switches back to the previous instance, ends the deployment `rolled_back` with `reason`,
/// then stops the bad instance once the deployment's own hooks are done.
async fn trip(traffic: &Traffic, app: &App, window: &GuardWindow, reason: String) {
    let id = window.deployment_id;
    tracing::warn!(deployment_id = %id, app = %app.config.name, reason = %reason, "guard tripped: switching back");
    match traffic.guard_switch_back(app, window, &reason).await {
        Ok(()) => {}
        Err(err) => {
            // Traffic stays on the new version: the window is closed with what happened,
            // so nobody waits for it.
            tracing::error!(deployment_id = %id, error = %err, "guard could not switch back");
            let reason = format!("{reason}; the switch back failed: {err}");
            close(traffic, app, id, GuardOutcome::Ended, Some(reason)).await;
            return;
        }
    }
    stop_bad_instance(traffic, app, id).await;
}

/// Stops what deployment `id` started (now on the idle port), as a failed deployment's new
/// instance is: the host script's AfterInstall, run with traffic back on the old port.
async fn stop_bad_instance(traffic: &Traffic, app: &App, id: DeploymentId) {
    let deadline = tokio::time::Instant::now() + PIPELINE_END_WAIT;
    let deployment = loop {
        let read = traffic
            .db()
            .call(move |conn| db::deployment(conn, id))
            .await;
        match read {
            Ok(Some(d)) if d.status != DeploymentStatus::Running => break d,
            Ok(Some(_)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(TICK).await;
            }
            other => {
                tracing::warn!(deployment_id = %id, found = ?other.map(|d| d.map(|d| d.status)), "guard did not stop the tripped instance");
                return;
            }
        }
    };
    let Some(job) = crate::pipeline::stored_job(&deployment, &app.config, Default::default())
    else {
        return;
    };
    tokio::time::sleep(STOP_GRACE).await;
    let record = Interrupted {
        started_instances: true,
        runner_ref: None,
    };
    match app.runner.clean_up_interrupted(&job, record).await {
        Ok(log) => {
            tracing::info!(deployment_id = %id, output = %log.trim(), "stopped the version the guard switched away from")
        }
        Err(err) => {
            tracing::warn!(deployment_id = %id, error = %err, "could not stop the version the guard switched away from")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::switch::proxy::meter::LATENCY_SLOTS;

    fn answered(ok: u64, errors: u64, bucket: usize) -> InstanceCounts {
        let mut latency = vec![0; LATENCY_SLOTS];
        latency[bucket] = ok + errors;
        InstanceCounts {
            requests: [0, ok, 0, 0, errors],
            latency,
            ..InstanceCounts::default()
        }
    }

    #[test]
    fn too_many_errors_over_enough_requests_trip_with_the_numbers() {
        let config = GuardConfig::default();
        let after = Duration::from_millis(4200);
        assert_eq!(
            verdict(&config, &answered(146, 66, 0), Before::default(), after).as_deref(),
            Some("5xx 31% of 212 requests in 4.2 s after the switch; limit 5%")
        );
        assert_eq!(
            verdict(&config, &answered(5, 10, 0), Before::default(), after),
            None,
            "fewer than min_requests say nothing yet"
        );
        assert_eq!(
            verdict(&config, &answered(200, 10, 0), Before::default(), after),
            None,
            "4.8% is within 5%"
        );
        let mut refused = answered(100, 0, 0);
        refused.upstream_errors = [10, 0, 0, 0];
        let reason = verdict(&config, &refused, Before::default(), after).unwrap();
        assert!(
            reason.starts_with("5xx and upstream errors 9% of 110"),
            "{reason}"
        );
    }

    #[test]
    fn a_slow_version_trips_only_against_a_previous_p99_and_above_the_floor() {
        let config = GuardConfig::default();
        let after = Duration::from_secs(3);
        let old = Before {
            p99: Some(Duration::from_millis(1)),
        };
        // Bucket 8 is 500 ms.
        let reason = verdict(&config, &answered(100, 0, 8), old, after).unwrap();
        assert_eq!(
            reason,
            "p99 500 ms of 100 requests in 3.0 s after the switch; limit 3 × the previous version's 1 ms"
        );
        assert_eq!(
            verdict(&config, &answered(100, 0, 8), Before::default(), after),
            None
        );
        // Bucket 4 is 25 ms: 25 times slower, but under the floor.
        assert_eq!(verdict(&config, &answered(100, 0, 4), old, after), None);
    }
}
