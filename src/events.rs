//! The in-process event bus: every change the database records is also published here, so
//! the dashboard (SSE) and notifiers see it as it happens. Publishing never blocks and never
//! fails a deploy: a subscriber that falls behind loses old events, not the pipeline's time.

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::domain::{DeploymentId, DeploymentStatus, Stage, StageStatus};
use crate::output::Output;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    Deployment {
        id: DeploymentId,
        app: String,
        status: DeploymentStatus,
        version: String,
    },
    Stage {
        deployment_id: DeploymentId,
        app: String,
        stage: Stage,
        status: StageStatus,
    },
    Live {
        app: String,
        port: u16,
        profile: String,
        version: Option<String>,
        from_port: Option<u16>,
    },
}

#[derive(Clone)]
pub struct Bus {
    events: broadcast::Sender<Event>,
    /// The running deployments' consoles: lines are too many for the event stream.
    output: Output,
}

impl Bus {
    pub fn new() -> Self {
        Self {
            // Enough for a burst of stage changes of several apps; a slow reader skips ahead.
            events: broadcast::channel(1024).0,
            output: Output::new(),
        }
    }

    pub fn publish(&self, event: Event) {
        // No subscriber is fine: the database already holds the change.
        let _ = self.events.send(event);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    pub fn output(&self) -> &Output {
        &self.output
    }
}

impl Default for Bus {
    fn default() -> Self {
        Self::new()
    }
}
