//! What the proxy measures of each instance it forwards to: requests by status class, a
//! latency histogram (time to the response head, fixed buckets), response bytes, and
//! upstream errors (refused, reset, timeout: the instance never answered), which are counted
//! apart from the app's own 5xx. An instance is a port and the version that runs there.
//!
//! Each worker thread writes only its own slot of an instance's counters, so the request
//! path takes no lock and shares no cache line with another worker: a plain load and store
//! of a single-writer atomic, no read-modify-write. Readers add the slots up whenever they
//! want ([`InstanceMeter::read`]); what they see may be a request behind, never torn. The
//! meter must never block a worker or allocate on the request path.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Upper bounds of the latency buckets, in seconds (Prometheus's default buckets and a
/// 1 ms one: an instance on loopback answers in well under 5 ms).
pub const LATENCY_BUCKETS_SECONDS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
const LATENCY_BUCKETS_US: [u64; 12] = [
    1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    5_000_000,
];
/// The buckets and the one past the last bound (`+Inf`).
pub const LATENCY_SLOTS: usize = LATENCY_BUCKETS_US.len() + 1;

/// Status classes `1xx` to `5xx`, as `code` labels.
pub const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Why the instance gave no answer, as `kind` labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// The connect was refused: nothing listens on the port.
    Refused,
    /// The connection broke (reset, or closed before the response was complete).
    Reset,
    /// The connect took longer than the proxy waits.
    Timeout,
    /// Anything else (a failed handshake, a malformed response).
    Other,
}

impl UpstreamFailure {
    pub const ALL: [UpstreamFailure; 4] = [Self::Refused, Self::Reset, Self::Timeout, Self::Other];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Refused => "refused",
            Self::Reset => "reset",
            Self::Timeout => "timeout",
            Self::Other => "other",
        }
    }
}

/// Meters kept per proxy beyond the live one's: older ones are dropped from the readings
/// (their requests are history), so a long-lived proxy does not list every version ever.
const KEPT_INSTANCES: usize = 8;

thread_local! {
    /// This thread's slot in every meter of its proxy; `None` on threads that are not a
    /// proxy worker, which count nothing (no second writer may touch a slot).
    static WORKER_SLOT: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Makes the current thread the writer of slot `index` (called once by each worker).
pub(super) fn become_worker(index: usize) {
    WORKER_SLOT.with(|slot| slot.set(Some(index)));
}

/// A counter that one thread writes and any thread reads.
#[derive(Default)]
struct Single(AtomicU64);

impl Single {
    fn add(&self, n: u64) {
        // One writer per slot: a load and a store, not the locked add a shared counter needs.
        self.0.store(
            self.0.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// One worker's counts of one instance, on cache lines of its own.
#[derive(Default)]
#[repr(align(128))]
struct Slot {
    requests: [Single; 5],
    latency: [Single; LATENCY_SLOTS],
    latency_sum_us: Single,
    response_bytes: Single,
    upstream_errors: [Single; 4],
}

/// The counters of one instance (a port and its version), one slot per worker.
pub struct InstanceMeter {
    port: u16,
    version: String,
    slots: Box<[Slot]>,
}

impl std::fmt::Debug for InstanceMeter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstanceMeter")
            .field("port", &self.port)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl InstanceMeter {
    fn new(port: u16, version: &str, workers: usize) -> Self {
        Self {
            port,
            version: version.to_owned(),
            slots: (0..workers.max(1)).map(|_| Slot::default()).collect(),
        }
    }

    fn slot(&self) -> Option<&Slot> {
        WORKER_SLOT.with(Cell::get).and_then(|i| self.slots.get(i))
    }

    /// A response head from the instance, `latency` after the request arrived.
    pub(super) fn answered(&self, status: u16, latency: Duration) {
        let Some(slot) = self.slot() else { return };
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        slot.requests[class].add(1);
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let bucket = LATENCY_BUCKETS_US
            .iter()
            .position(|bound| us <= *bound)
            .unwrap_or(LATENCY_BUCKETS_US.len());
        slot.latency[bucket].add(1);
        slot.latency_sum_us.add(us);
    }

    /// The instance gave no answer.
    pub(super) fn failed(&self, failure: UpstreamFailure) {
        let Some(slot) = self.slot() else { return };
        let at = UpstreamFailure::ALL
            .iter()
            .position(|f| *f == failure)
            .unwrap_or(3);
        slot.upstream_errors[at].add(1);
    }

    /// Bytes of a response body passed on to the client.
    pub(super) fn sent(&self, bytes: usize) {
        if let Some(slot) = self.slot() {
            slot.response_bytes.add(bytes as u64);
        }
    }

    /// The counts so far, every worker's added up.
    pub fn read(&self) -> InstanceCounts {
        let mut counts = InstanceCounts {
            port: self.port,
            version: self.version.clone(),
            latency: vec![0; LATENCY_SLOTS],
            ..InstanceCounts::default()
        };
        for slot in &self.slots {
            for (sum, one) in counts.requests.iter_mut().zip(&slot.requests) {
                *sum += one.get();
            }
            for (sum, one) in counts.latency.iter_mut().zip(&slot.latency) {
                *sum += one.get();
            }
            for (sum, one) in counts.upstream_errors.iter_mut().zip(&slot.upstream_errors) {
                *sum += one.get();
            }
            counts.latency_sum_us += slot.latency_sum_us.get();
            counts.response_bytes += slot.response_bytes.get();
        }
        counts
    }
}

/// A proxy's meters, one per instance it was pointed at; touched at a switch and when read,
/// never by a request.
pub(super) struct Meters {
    workers: usize,
    /// Oldest first; the last is the newest switch's.
    instances: Mutex<Vec<Arc<InstanceMeter>>>,
}

impl Meters {
    pub(super) fn new(workers: usize) -> Self {
        Self {
            workers,
            instances: Mutex::new(Vec::new()),
        }
    }

    /// The meter of `port` running `version` (`None`: whatever version was last named for
    /// the port), made when new; the same one again for a switch back.
    pub(super) fn instance(&self, port: u16, version: Option<&str>) -> Arc<InstanceMeter> {
        // A poisoned lock only means a reader panicked; the list itself is always whole.
        let mut instances = self
            .instances
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let at = instances
            .iter()
            .rposition(|meter| meter.port == port && version.is_none_or(|v| meter.version == v));
        let meter = match at {
            Some(at) => instances.remove(at),
            None => Arc::new(InstanceMeter::new(
                port,
                version.unwrap_or_default(),
                self.workers,
            )),
        };
        instances.push(Arc::clone(&meter));
        if instances.len() > KEPT_INSTANCES {
            instances.remove(0);
        }
        meter
    }

    pub(super) fn read(&self) -> Vec<InstanceCounts> {
        let instances = self
            .instances
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        instances.iter().map(|meter| meter.read()).collect()
    }
}

/// What was counted of one instance since its meter was made (counters only grow).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceCounts {
    pub port: u16,
    /// Empty when the switch was not told (a proxy that restarted onto a saved port).
    pub version: String,
    /// Responses by status class, `1xx` first.
    pub requests: [u64; 5],
    /// Responses per latency bucket ([`LATENCY_BUCKETS_SECONDS`], then `+Inf`), not
    /// cumulative.
    pub latency: Vec<u64>,
    pub latency_sum_us: u64,
    pub response_bytes: u64,
    /// Requests the instance never answered, by [`UpstreamFailure::ALL`].
    pub upstream_errors: [u64; 4],
}

impl InstanceCounts {
    /// Responses from the instance, whatever their status.
    pub fn answered(&self) -> u64 {
        self.requests.iter().sum()
    }

    pub fn server_errors(&self) -> u64 {
        self.requests[4]
    }

    pub fn upstream_errors_total(&self) -> u64 {
        self.upstream_errors.iter().sum()
    }

    /// What was counted after `earlier` (the same instance's counts read before).
    pub fn since(&self, earlier: &InstanceCounts) -> InstanceCounts {
        let minus = |a: &[u64], b: &[u64]| -> Vec<u64> {
            a.iter()
                .zip(b.iter().chain(std::iter::repeat(&0)))
                .map(|(a, b)| a.saturating_sub(*b))
                .collect()
        };
        let mut requests = [0; 5];
        requests.copy_from_slice(&minus(&self.requests, &earlier.requests));
        let mut upstream_errors = [0; 4];
        upstream_errors.copy_from_slice(&minus(&self.upstream_errors, &earlier.upstream_errors));
        InstanceCounts {
            port: self.port,
            version: self.version.clone(),
            requests,
            latency: minus(&self.latency, &earlier.latency),
            latency_sum_us: self.latency_sum_us.saturating_sub(earlier.latency_sum_us),
            response_bytes: self.response_bytes.saturating_sub(earlier.response_bytes),
            upstream_errors,
        }
    }

    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: &InstanceCounts) {
        for (a, b) in self.requests.iter_mut().zip(other.requests) {
            *a += b;
        }
        for (a, b) in self.upstream_errors.iter_mut().zip(other.upstream_errors) {
            *a += b;
        }
        if self.latency.len() < other.latency.len() {
            self.latency.resize(other.latency.len(), 0);
        }
        for (a, b) in self.latency.iter_mut().zip(&other.latency) {
            *a += b;
        }
        self.latency_sum_us += other.latency_sum_us;
        self.response_bytes += other.response_bytes;
    }

    /// The latency under which `quantile` of the answered requests came, as the upper bound
    /// of the bucket it falls in (`None`: no request, or it falls past the last bound).
    pub fn latency_quantile(&self, quantile: f64) -> Option<Duration> {
        let total: u64 = self.latency.iter().sum();
        if total == 0 {
            return None;
        }
        // The rank of the request at `quantile`, counted from 1.
        let rank = ((total as f64) * quantile).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (at, count) in self.latency.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return LATENCY_BUCKETS_US
                    .get(at)
                    .map(|us| Duration::from_micros(*us));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_worker_counts_in_its_own_slot_and_a_read_adds_them_up() {
        let meter = Arc::new(InstanceMeter::new(8081, "v1", 2));
        meter.answered(200, Duration::from_micros(400));
        let other = Arc::clone(&meter);
        std::thread::spawn(move || {
            become_worker(1);
            other.answered(500, Duration::from_millis(30));
            other.answered(204, Duration::from_secs(9));
            other.failed(UpstreamFailure::Refused);
            other.sent(12);
        })
        .join()
        .unwrap();
        assert_eq!(
            meter.read().answered(),
            2,
            "worker 1 counted; the test thread, no worker yet, did not"
        );

        become_worker(0);
        meter.answered(200, Duration::from_micros(400));
        let counts = meter.read();

        assert_eq!(counts.requests, [0, 2, 0, 0, 1]);
        assert_eq!(counts.upstream_errors, [1, 0, 0, 0]);
        assert_eq!(counts.response_bytes, 12);
        assert_eq!(counts.latency[0], 1, "400 µs is under 1 ms");
        assert_eq!(counts.latency[5], 1, "30 ms is under 50 ms");
        assert_eq!(
            counts.latency[LATENCY_SLOTS - 1],
            1,
            "9 s is past every bound"
        );
        assert_eq!(counts.latency_sum_us, 400 + 30_000 + 9_000_000);
    }

    #[test]
    fn a_quantile_is_the_bound_of_its_bucket() {
        let mut counts = InstanceCounts {
            latency: vec![0; LATENCY_SLOTS],
            ..InstanceCounts::default()
        };
        assert_eq!(counts.latency_quantile(0.99), None);
        counts.latency[0] = 98;
        counts.latency[6] = 2;
        assert_eq!(
            counts.latency_quantile(0.98),
            Some(Duration::from_millis(1))
        );
        assert_eq!(
            counts.latency_quantile(0.99),
            Some(Duration::from_millis(100))
        );
    }

    #[test]
    fn a_switch_back_finds_the_same_meter_and_old_ones_age_out() {
        let meters = Meters::new(1);
        let first = meters.instance(8081, Some("v1"));
        meters.instance(8082, Some("v2"));
        assert!(Arc::ptr_eq(&first, &meters.instance(8081, Some("v1"))));
        assert!(Arc::ptr_eq(&first, &meters.instance(8081, None)));
        assert!(!Arc::ptr_eq(&first, &meters.instance(8081, Some("v3"))));
        for n in 0..KEPT_INSTANCES {
            meters.instance(9000 + n as u16, Some("x"));
        }
        assert_eq!(meters.read().len(), KEPT_INSTANCES);
        assert!(meters.read().iter().all(|c| c.port >= 9000));
    }

    #[test]
    fn counts_since_an_earlier_reading_are_the_difference() {
        let earlier = InstanceCounts {
            requests: [0, 10, 0, 0, 1],
            latency: vec![11; LATENCY_SLOTS],
            ..InstanceCounts::default()
        };
        let now = InstanceCounts {
            requests: [0, 15, 0, 0, 4],
            latency: vec![19; LATENCY_SLOTS],
            upstream_errors: [0, 2, 0, 0],
            ..InstanceCounts::default()
        };
        let delta = now.since(&earlier);
        assert_eq!(delta.requests, [0, 5, 0, 0, 3]);
        assert_eq!(delta.latency, vec![8; LATENCY_SLOTS]);
        assert_eq!(delta.upstream_errors_total(), 2);
    }
}
