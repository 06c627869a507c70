//! Ports for what the tests start that must bind the port it is told (app instances, nginx,
//! moto), where port 0 cannot do. Each is below the kernel's ephemeral range, so no port-0
//! bind and no outgoing connection on this host is ever handed it, and it comes from one
//! counter, so no two tests of this process get the same one. The counter starts at a point
//! derived from the process id, so test runs side by side start far apart.

use std::net::TcpListener;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// Below this, ports are privileged or belong to well-known services.
const LOWEST: u32 = 10_000;
/// Where the kernel's ephemeral range starts when `/proc` does not say.
const EPHEMERAL_START: u32 = 32_768;

/// Ports handed out so far, by this process.
static HANDED_OUT: AtomicU32 = AtomicU32::new(0);

/// The ports this process hands out, `LOWEST..` the ephemeral range, and where it starts.
struct Range {
    span: u32,
    start: u32,
}

fn range() -> &'static Range {
    static RANGE: OnceLock<Range> = OnceLock::new();
    RANGE.get_or_init(|| {
        let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|text| text.split_whitespace().next()?.parse::<u32>().ok())
            .unwrap_or(EPHEMERAL_START);
        assert!(
            ephemeral > LOWEST + 1_000,
            "the ephemeral port range starts at {ephemeral}: too low to keep test ports below it"
        );
        let span = ephemeral - LOWEST;
        // Knuth's multiplicative hash, so neighbouring process ids start far apart.
        let start = std::process::id().wrapping_mul(2_654_435_761) % span;
        Range { span, start }
    })
}

/// A loopback port that nothing binds now and that nobody else will be handed: for a process
/// the test starts and tells to listen there.
pub fn unique_port() -> u16 {
    let range = range();
    for _ in 0..range.span {
        let n = HANDED_OUT.fetch_add(1, Ordering::Relaxed);
        let port = LOWEST + (range.start + n) % range.span;
        let port = u16::try_from(port).expect("the ephemeral range ends below 65536");
        // Something outside the tests may hold it (another test run, a service of this host).
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no bindable port left in {LOWEST}..{}", LOWEST + range.span);
}
