//! Draining an instance before it is stopped: traffic already goes elsewhere (the port is
//! not live), so what is open there can only close; wait until it has, up to the app's
//! `drain_timeout_secs`, then cut what is left. This is the one place that wait happens;
//! `deploy.sh` asks for it (through the server's drain endpoint) before it stops any
//! instance. It never stops an instance and never moves traffic.

use std::time::{Duration, Instant};

use super::{SwitchError, TrafficSwitch};

/// How often the open count is read while draining: a control-socket round trip at most.
const DRAIN_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// What a drain did.
#[derive(Clone, Debug, PartialEq)]
pub struct Drained {
    pub port: u16,
    /// Open connections that closed by themselves.
    pub drained: usize,
    /// How long the wait took, in seconds.
    pub seconds: f64,
    /// Connections still open at the deadline, closed by nonstop.
    pub closed: usize,
}

impl Drained {
    /// The stage log's line.
    pub fn line(&self) -> String {
        format!(
            "port {}: drained {} in {:.1} s, closed {} at the deadline",
            self.port, self.drained, self.seconds, self.closed
        )
    }
}

/// Waits until nothing is open on `port` any more, at most `timeout`, then cuts what is
/// left. Refused when `port` is live: draining it would never end, since new requests keep
/// coming.
pub async fn drain(
    switch: &dyn TrafficSwitch,
    port: u16,
    timeout: Duration,
) -> Result<Drained, SwitchError> {
    if switch.live() == Some(port) {
        return Err(SwitchError::Rejected(format!(
            "port {port} is live: only an instance traffic has left can be drained"
        )));
    }
    let started = Instant::now();
    let open_on = |open: Vec<super::OpenOn>| {
        open.iter()
            .find(|on| on.port == port)
            .map_or(0, |on| on.total())
    };
    let first = open_on(switch.open_connections().await?);
    let mut open = first;
    while open > 0 && started.elapsed() < timeout {
        tokio::time::sleep(DRAIN_POLL_INTERVAL.min(timeout.saturating_sub(started.elapsed())))
            .await;
        open = open_on(switch.open_connections().await?);
    }
    let seconds = started.elapsed().as_secs_f64();
    let closed = if open > 0 { switch.cut(port).await? } else { 0 };
    let drained = Drained {
        port,
        drained: first.saturating_sub(closed),
        seconds,
        closed,
    };
    tracing::info!(port, drained = drained.drained, seconds, closed, "drained");
    Ok(drained)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use async_trait::async_trait;

    use super::*;
    use crate::switch::OpenOn;

    /// A switch whose open count on 8081 drops by one at each read, down to `floor`.
    struct Closing {
        open: Mutex<usize>,
        floor: usize,
        cut: Mutex<Option<u16>>,
    }

    #[async_trait]
    impl TrafficSwitch for Closing {
        fn live(&self) -> Option<u16> {
            Some(8082)
        }
        async fn switch_to(&self, _: u16) -> Result<(), SwitchError> {
            Ok(())
        }
        async fn open_connections(&self) -> Result<Vec<OpenOn>, SwitchError> {
            let mut open = self.open.lock().unwrap();
            let now = *open;
            *open = now.saturating_sub(1).max(self.floor);
            Ok(vec![
                OpenOn::none(8082),
                OpenOn {
                    tunnels: now,
                    ..OpenOn::none(8081)
                },
            ])
        }
        async fn cut(&self, port: u16) -> Result<usize, SwitchError> {
            *self.cut.lock().unwrap() = Some(port);
            Ok(*self.open.lock().unwrap())
        }
    }

    fn closing(open: usize, floor: usize) -> Closing {
        Closing {
            open: Mutex::new(open),
            floor,
            cut: Mutex::new(None),
        }
    }

    #[tokio::test]
    async fn connections_that_close_in_time_are_drained_and_nothing_is_cut() {
        let switch = closing(3, 0);
        let done = drain(&switch, 8081, Duration::from_secs(10)).await.unwrap();
        assert_eq!((done.drained, done.closed), (3, 0));
        assert_eq!(*switch.cut.lock().unwrap(), None);
        assert!(
            done.line().starts_with("port 8081: drained 3 in "),
            "{}",
            done.line()
        );
        assert!(
            done.line().ends_with(" s, closed 0 at the deadline"),
            "{}",
            done.line()
        );
    }

    #[tokio::test]
    async fn what_is_still_open_at_the_deadline_is_cut() {
        let switch = closing(5, 2);
        let done = drain(&switch, 8081, Duration::from_millis(500))
            .await
            .unwrap();
        assert_eq!((done.drained, done.closed), (3, 2));
        assert!(done.seconds >= 0.5, "{done:?}");
        assert_eq!(*switch.cut.lock().unwrap(), Some(8081));
    }

    #[tokio::test]
    async fn the_live_port_is_never_drained() {
        let switch = closing(5, 0);
        let err = drain(&switch, 8082, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("is live"), "{err}");
        assert_eq!(*switch.cut.lock().unwrap(), None);
    }
}
