//! An app at run time: its validated config and the backends start-up chose for it (store,
//! runner, traffic switch), built once by `serve` and shared by the queue, the pipeline and
//! the HTTP handlers. Holds no state of its own: what is live is the switch's and the
//! database's to say.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::config::AppConfig;
use crate::runner::Runner;
use crate::store::ArtifactStore;
use crate::switch::TrafficSwitch;

/// One configured app and its backends.
pub struct App {
    pub config: Arc<AppConfig>,
    /// `repo` resolved (a URL, or an absolute local path).
    pub repo: String,
    pub store: Arc<dyn ArtifactStore>,
    pub runner: Arc<dyn Runner>,
    pub switch: Arc<dyn TrafficSwitch>,
    /// Held while traffic moves, so two moves of this app (a hook's switch, a rollback,
    /// the recovery after a restart) never interleave their look, switch and record.
    pub moving: tokio::sync::Mutex<()>,
}

/// Every configured app, by name, in name order.
#[derive(Default)]
pub struct Apps(BTreeMap<String, Arc<App>>);

impl Apps {
    pub fn insert(&mut self, app: App) {
        self.0.insert(app.config.name.to_string(), Arc::new(app));
    }

    pub fn get(&self, name: &str) -> Option<&Arc<App>> {
        self.0.get(name)
    }

    /// The apps in name order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<App>> {
        self.0.values()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }
}
