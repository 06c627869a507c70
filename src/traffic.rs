//! Going live: the one place an app's traffic moves. A move is always the same four steps —
//! a last look at the target's health, the switch, the record of what is live (and why),
//! the event — whoever asks for it: a deployment's ValidateService (through the switch
//! endpoint), a rollback, or the recovery after a restart; one at a time per app. Nothing
//! else moves traffic (at start, `switch::control` only tells a fresh proxy process the port
//! the record already calls live). It never starts or stops an instance, and a move that
//! fails at any step before the switch leaves traffic where it was. A deployment's switch
//! opens its guard window here, in the record's transaction, and starts the watch
//! (`guard`), whose switch back comes through here like any other move.

use std::time::Duration;

use std::sync::{Arc, OnceLock};

use crate::apps::{App, Apps};
use crate::config::{GuardConfig, SwitchConfig};
use crate::db::GuardWindow;
use crate::guard;
use crate::metrics::Metrics;
use rusqlite::Connection;
use tokio_util::sync::CancellationToken;

use crate::db::{self, Db, DbError, Instance, Live, Switch};
use crate::domain::{DeploymentId, DeploymentStatus};
use crate::events::{Bus, Event};
use crate::switch::SwitchError;

/// How long the last look before a switch may take. It guards against an instance that
/// died since its health check (refused at once), not a slow one: under a benchmark's load
/// a healthy loopback instance took over 2 s to answer, and the deploy failed for nothing.
pub const LAST_LOOK_TIMEOUT: Duration = Duration::from_secs(5);

/// Why traffic did not move. Traffic stays where it was whenever this is returned, except
/// for `Record`: the switch happened and only its record failed.
#[derive(Debug, thiserror::Error)]
pub enum TrafficError {
    #[error("port {port} is not one of {app}'s ports {ports:?}")]
    NotAPort {
        app: String,
        port: u16,
        ports: [u16; 2],
    },
    #[error("port {port} does not answer {path}; traffic stays where it was")]
    Unhealthy { port: u16, path: String },
    #[error("switch to {port} failed: {source}")]
    Switch { port: u16, source: SwitchError },
    #[error("traffic moved to {port} but could not be recorded: {source}")]
    Record { port: u16, source: DbError },
}

/// A move that happened.
#[derive(Debug)]
pub struct Moved {
    pub live: Live,
    pub from_port: Option<u16>,
}

/// Moves traffic; cheap to clone (the database and the bus are handles).
#[derive(Clone)]
pub struct Traffic {
    db: Db,
    bus: Bus,
    metrics: Metrics,
    /// The apps, for the guard windows' watches (set by [`Traffic::watch`]).
    apps: Arc<OnceLock<Vec<Arc<App>>>>,
}

impl Traffic {
    pub fn new(db: Db, bus: Bus) -> Self {
        Self {
            db,
            bus,
            metrics: Metrics::default(),
            apps: Arc::default(),
        }
    }

    pub(crate) fn db(&self) -> &Db {
        &self.db
    }

    /// Publishes deployment `id` as the record has it now.
    pub(crate) async fn publish_deployment(&self, id: DeploymentId) {
        if let Ok(Some(d)) = self.db.call(move |conn| db::deployment(conn, id)).await {
            self.bus.publish(Event::Deployment {
                id,
                app: d.app.to_string(),
                status: d.status,
                version: d.version.unwrap_or_default(),
            });
        }
    }

    /// What the proxies measured, sampled once a second (see [`Traffic::watch`]).
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Starts sampling what each app's switch measures, until `shutdown`.
    pub fn watch(&self, apps: &Apps, shutdown: CancellationToken) {
        self.metrics.start(apps, self.db.clone(), shutdown);
        let _ = self.apps.set(apps.iter().cloned().collect());
    }

    /// Resumes the guard windows a restart cut short (their deployments are `guarding`);
    /// one whose time is up, or whose app's traffic moved meanwhile, ends at its first look.
    pub async fn resume_guards(&self) {
        let open = match self.db.call(|conn| db::open_guards(conn)).await {
            Ok(open) => open,
            Err(err) => {
                tracing::error!(error = %err, "could not read the open guard windows");
                return;
            }
        };
        for window in open {
            tracing::info!(deployment_id = %window.deployment_id, app = %window.app, "resuming a guard window");
            // What the previous version did before the switch is in the last run's memory.
            self.start_guard(window, guard::Before::default());
        }
    }

    /// Starts the watch of an open window.
    fn start_guard(&self, window: GuardWindow, before: guard::Before) {
        let app = self
            .apps
            .get()
            .and_then(|apps| apps.iter().find(|a| a.config.name.as_str() == window.app))
            .cloned();
        let Some(app) = app else {
            tracing::warn!(deployment_id = %window.deployment_id, app = %window.app, "no such app to guard");
            return;
        };
        let Some(config) = app.config.guard.clone() else {
            // Turned off since: the window ends as passed at once.
            let (traffic, id) = (self.clone(), window.deployment_id);
            tokio::spawn(async move {
                let closed = traffic
                    .db
                    .call(move |conn| db::close_guard(conn, id, db::GuardOutcome::Ended, None))
                    .await;
                if let Ok(Some(_)) = closed {
                    traffic.publish_deployment(id).await;
                }
            });
            return;
        };
        let watch = guard::Watch {
            app,
            window,
            config,
            before,
        };
        tokio::spawn(guard::run(self.clone(), watch));
    }

    /// The guard's switch back to `window.from_port`, recorded as a rollback of the guarded
    /// deployment that ends it `rolled_back` because of `reason`.
    pub(crate) async fn guard_switch_back(
        &self,
        app: &App,
        window: &GuardWindow,
        reason: &str,
    ) -> Result<(), TrafficError> {
        let (name, from) = (app.config.name.to_string(), window.from_port);
        let instance = self
            .db
            .call(move |conn| db::instance(conn, &name, from))
            .await
            .map_err(|source| TrafficError::Record { port: from, source })?;
        let Some(instance) = instance else {
            return Err(TrafficError::Unhealthy {
                port: from,
                path: app.config.health.path.clone(),
            });
        };
        let undone = window.deployment_id;
        let reason = reason.to_owned();
        self.switch_back_recording(app, instance, Some(undone), move |conn| {
            db::close_guard(conn, undone, db::GuardOutcome::Tripped, Some(&reason)).map(drop)
        })
        .await
        .map(drop)
    }

    /// The last switch deployment `id` made, if any.
    pub async fn last_switch_of(&self, id: DeploymentId) -> Result<Option<Switch>, DbError> {
        self.db
            .call(move |conn| Ok(db::switches_of(conn, id)?.pop()))
            .await
    }

    /// Points `app`'s traffic at `port` for deployment `by` (`None`: the app's running
    /// one, or none), after a last look that it answers its health path.
    pub async fn go_live(
        &self,
        app: &App,
        port: u16,
        by: Option<DeploymentId>,
    ) -> Result<Moved, TrafficError> {
        let guard = app
            .config
            .guard
            .clone()
            .filter(|_| matches!(app.config.switch, SwitchConfig::Proxy { .. }));
        let name = app.config.name.to_string();
        let (window, moved) = self
            .move_to(app, port, move |conn| {
                let by = match by {
                    Some(id) => Some(id),
                    None => db::running_deployment(conn, &name)?,
                };
                let window = match (guard, by) {
                    (Some(guard), Some(id)) => open_window(conn, &name, id, port, &guard)?,
                    _ => None,
                };
                Ok((window, by))
            })
            .await?;
        if let Some((window, from_version)) = window {
            let before = self.before(app, &window, &from_version);
            self.start_guard(window, before);
        }
        Ok(moved)
    }

    /// Switches back to `instance`, which still runs, recording the rollback as a
    /// deployment of its own that succeeded and undid `undone` (the live one). Returns that
    /// deployment.
    pub async fn switch_back(
        &self,
        app: &App,
        instance: Instance,
        undone: Option<DeploymentId>,
    ) -> Result<DeploymentId, TrafficError> {
        self.switch_back_recording(app, instance, undone, |_| Ok(()))
            .await
    }

    /// [`Traffic::switch_back`], with `also` recorded in the same database call.
    async fn switch_back_recording<F>(
        &self,
        app: &App,
        instance: Instance,
        undone: Option<DeploymentId>,
        also: F,
    ) -> Result<DeploymentId, TrafficError>
    where
        F: FnOnce(&mut Connection) -> rusqlite::Result<()> + Send + 'static,
    {
        let (name, branch) = (app.config.name.to_string(), app.config.branch.clone());
        let port = instance.port;
        let (id, moved) = self
            .move_to(app, port, move |conn| {
                let id = db::record_switch_back(conn, &name, &branch, &instance, undone)?;
                also(conn)?;
                Ok((id, Some(id)))
            })
            .await?;
        let version = moved.live.version.unwrap_or_default();
        // A deployment undone while its own hooks still run (the guard can be that quick)
        // ends when they do, and is announced then, once.
        let undone = match undone {
            Some(undone) => self
                .db
                .call(move |conn| Ok(db::deployment(conn, undone)?.map(|d| d.status)))
                .await
                .ok()
                .flatten()
                .filter(|status| *status == DeploymentStatus::RolledBack)
                .map(|_| undone),
            None => None,
        };
        let ended = [
            (Some(id), DeploymentStatus::Succeeded),
            (undone, DeploymentStatus::RolledBack),
        ];
        for (deployment, status) in ended {
            if let Some(deployment) = deployment {
                self.bus.publish(Event::Deployment {
                    id: deployment,
                    app: app.config.name.to_string(),
                    status,
                    version: version.clone(),
                });
            }
        }
        Ok(id)
    }

    /// What the guard compares the new version with: the previous one's p99 over
    /// [`guard::BEFORE_SWITCH`], when it answered enough requests in it.
    fn before(&self, app: &App, window: &GuardWindow, from_version: &str) -> guard::Before {
        let Some(config) = &app.config.guard else {
            return guard::Before::default();
        };
        let now = chrono::Utc::now().timestamp();
        let from = now - guard::BEFORE_SWITCH.as_secs() as i64;
        let old = self.metrics.window(
            app.config.name.as_str(),
            window.from_port,
            from_version,
            from,
            now,
        );
        let enough = old.answered() >= config.min_requests;
        guard::Before {
            p99: old.latency_quantile(0.99).filter(|_| enough),
        }
    }

    /// The steps every move takes. `record` runs in the same database call as the live
    /// row's update, once the switch is done, and says which deployment moved traffic.
    async fn move_to<T, F>(
        &self,
        app: &App,
        port: u16,
        record: F,
    ) -> Result<(T, Moved), TrafficError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> rusqlite::Result<(T, Option<DeploymentId>)> + Send + 'static,
    {
        let _one_move_at_a_time = app.moving.lock().await;
        let config = &app.config;
        let profile = config
            .profile_of(port)
            .ok_or_else(|| TrafficError::NotAPort {
                app: config.name.to_string(),
                port,
                ports: config.ports,
            })?
            .to_owned();
        // An instance that died after its health check must not receive traffic: the live
        // one still runs and keeps it.
        if !crate::health::answers(port, &config.health.path, LAST_LOOK_TIMEOUT).await {
            return Err(TrafficError::Unhealthy {
                port,
                path: config.health.path.clone(),
            });
        }
        // The version is named so the proxy counts its traffic as that version's.
        let (name, version_of) = (config.name.to_string(), port);
        let version = self
            .db
            .call(move |conn| Ok(db::instance(conn, &name, version_of)?.map(|i| i.version)))
            .await
            .ok()
            .flatten();
        let switched = match &version {
            Some(version) => app.switch.switch_to_version(port, version).await,
            None => app.switch.switch_to(port).await,
        };
        switched.map_err(|source| TrafficError::Switch { port, source })?;
        let name = config.name.to_string();
        let recorded = self
            .db
            .call(move |conn| {
                let (value, by) = record(conn)?;
                let (live, previous) = db::set_live(conn, &name, port, &profile, by)?;
                let from_port = previous.map(|p| p.port);
                Ok((value, Moved { live, from_port }))
            })
            .await;
        let (value, moved) = recorded.map_err(|source| {
            tracing::error!(app = %config.name, port, error = %source, "traffic moved but the record failed");
            TrafficError::Record { port, source }
        })?;
        tracing::info!(
            app = %config.name,
            port,
            from_port = moved.from_port,
            version = moved.live.version.as_deref(),
            "traffic switched"
        );
        self.bus.publish(Event::Live {
            app: config.name.to_string(),
            port,
            profile: moved.live.profile.clone(),
            version: moved.live.version.clone(),
            from_port: moved.from_port,
        });
        Ok((value, moved))
    }
}

/// Opens a guard window for deployment `id`'s switch to `port`, when it is a deployment's
/// first switch of a new version away from a previous live instance (not a rollback's).
/// Returns it with the previous version's name.
fn open_window(
    conn: &mut Connection,
    app: &str,
    id: DeploymentId,
    port: u16,
    guard: &GuardConfig,
) -> rusqlite::Result<Option<(GuardWindow, String)>> {
    let Some(deployment) = db::deployment(conn, id)? else {
        return Ok(None);
    };
    if deployment.status != DeploymentStatus::Running || deployment.rollback_of.is_some() {
        return Ok(None);
    }
    let Some(previous) = db::live(conn, app)?.filter(|l| l.port != port) else {
        return Ok(None);
    };
    let Some(instance) = db::instance(conn, app, port)? else {
        return Ok(None);
    };
    let window = db::open_guard(
        conn,
        id,
        app,
        (previous.port, port),
        &instance.version,
        guard.secs,
    )?;
    Ok(Some((window, previous.version.unwrap_or_default())))
}

/// An app on real parts for unit tests of going live and of rollback: a temp SQLite file,
/// the built-in proxy on a free loopback port, and one instance port that answers its
/// health path while the other has nothing behind it.
#[cfg(test)]
pub(crate) mod fixture {
    use std::sync::Arc;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use crate::apps::App;
    use crate::config::{Config, Secret};
    use crate::db::Db;
    use crate::events::Bus;
    use crate::runner::local::LocalRunner;
    use crate::store::local::LocalStore;
    use crate::switch::proxy::Proxy;

    use super::Traffic;

    pub struct Fixture {
        pub app: App,
        pub proxy: Arc<Proxy>,
        pub db: Db,
        pub bus: Bus,
        pub traffic: Traffic,
        /// Answers `GET /profile` with 200.
        pub healthy: u16,
        /// Nothing listens here.
        pub gone: u16,
        _dir: tempfile::TempDir,
    }

    /// A port with an HTTP server that answers 200 to anything, for as long as the test runs.
    async fn healthy_port() -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut head = [0u8; 1024];
                    let _ = stream.read(&mut head).await;
                    let _ = stream
                        .write_all(
                            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                        )
                        .await;
                });
            }
        });
        port
    }

    pub async fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let healthy = healthy_port().await;
        let gone = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let text = format!(
            r#"
[[app]]
name = "hello"
repo = "examples/hello"
build = "true"
artifact = "hello"
run = "{{artifact}} --port {{port}}"
ports = [{healthy}, {gone}]
"#
        );
        let config = Config::parse(&text, std::path::Path::new("n.toml")).unwrap();
        let app_config = Arc::new(config.apps[0].clone());
        let db = Db::open(&dir.path().join("nonstop.db")).await.unwrap();
        let bus = Bus::new();
        let proxy = Proxy::start("127.0.0.1:0".parse().unwrap(), None)
            .await
            .unwrap();
        let store = Arc::new(LocalStore::new(dir.path().join("artifacts"), 10));
        let runner = Arc::new(LocalRunner::new(
            dir.path().join("apps/hello"),
            "local".into(),
            store.clone(),
            proxy.clone(),
            "http://127.0.0.1:9".into(),
            Secret::new("switch".into()),
        ));
        let app = App {
            config: app_config,
            repo: "examples/hello".into(),
            store,
            runner,
            switch: proxy.clone(),
            moving: Default::default(),
        };
        let traffic = Traffic::new(db.clone(), bus.clone());
        Fixture {
            app,
            proxy,
            db,
            bus,
            traffic,
            healthy,
            gone,
            _dir: dir,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixture::fixture;
    use super::*;
    use crate::switch::TrafficSwitch;

    #[tokio::test]
    async fn going_live_switches_records_and_publishes() {
        let f = fixture().await;
        let mut events = f.bus.subscribe();

        let moved = f.traffic.go_live(&f.app, f.healthy, None).await.unwrap();

        assert_eq!(f.proxy.live(), Some(f.healthy));
        assert_eq!((moved.live.port, moved.from_port), (f.healthy, None));
        assert_eq!(moved.live.profile, "real1");
        let recorded = f.db.call(|conn| db::live(conn, "hello")).await.unwrap();
        assert_eq!(recorded.map(|l| l.port), Some(f.healthy));
        match events.try_recv() {
            Ok(Event::Live { port, .. }) => assert_eq!(port, f.healthy),
            other => panic!("expected a Live event, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_target_that_does_not_answer_gets_no_traffic_and_nothing_is_recorded() {
        let f = fixture().await;
        f.traffic.go_live(&f.app, f.healthy, None).await.unwrap();

        let err = f.traffic.go_live(&f.app, f.gone, None).await.unwrap_err();

        assert!(
            matches!(err, TrafficError::Unhealthy { port, .. } if port == f.gone),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            format!(
                "port {} does not answer /profile; traffic stays where it was",
                f.gone
            )
        );
        assert_eq!(f.proxy.live(), Some(f.healthy));
        let recorded = f.db.call(|conn| db::live(conn, "hello")).await.unwrap();
        assert_eq!(recorded.map(|l| l.port), Some(f.healthy));
    }

    #[tokio::test]
    async fn a_port_that_is_not_the_apps_is_refused_before_any_probe() {
        let f = fixture().await;

        let err = f.traffic.go_live(&f.app, 1, None).await.unwrap_err();

        assert!(
            matches!(err, TrafficError::NotAPort { port: 1, .. }),
            "{err}"
        );
        assert_eq!(f.proxy.live(), None);
    }
}
