//! Who may open a connection to the proxy: at most `max_connections` open at once across
//! its workers, and at most `max_per_client` of them from one client (an IPv4 address or an
//! IPv6 /64; a trusted proxy in front is not held to it), so one client flooding the front
//! door with slow or idle sockets can take neither the process's file descriptors (each
//! proxied request holds two) nor the other visitors' places. A connection over either
//! limit is closed at once, before anything is read. Counted at accept and close only,
//! never per request.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use crate::domain::{IpRange, client_of};

/// The proxy's connection limits.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub max_per_client: usize,
}

impl ConnectionLimits {
    /// Limits that leave room in `fd_limit` open files for the server beside the proxy:
    /// a quarter of them for client connections (each proxied request holds a second
    /// descriptor upstream), an eighth of those for one client, and at least 16.
    pub fn for_fd_limit(fd_limit: u64) -> Self {
        let max_connections = (fd_limit / 4).clamp(64, 1 << 20) as usize;
        Self {
            max_connections,
            max_per_client: (max_connections / 8).max(16),
        }
    }
}

impl Default for ConnectionLimits {
    /// For the soft limit most hosts start with (1024).
    fn default() -> Self {
        Self::for_fd_limit(1024)
    }
}

/// Why a connection was not admitted.
#[derive(Debug, PartialEq, Eq)]
pub(in crate::switch) enum Refused {
    Full,
    ClientFull,
}

/// The open connections of one proxy, shared by its workers.
pub(in crate::switch) struct Admission {
    limits: ConnectionLimits,
    trusted: Arc<[IpRange]>,
    open: Mutex<Open>,
}

#[derive(Default)]
struct Open {
    total: usize,
    by_client: HashMap<IpAddr, usize>,
}

/// An admitted connection's place; given back when dropped.
pub(in crate::switch) struct Ticket {
    admission: Arc<Admission>,
    /// `None` for a trusted proxy's connection, which counts only in the total.
    client: Option<IpAddr>,
}

impl Admission {
    pub(in crate::switch) fn new(limits: ConnectionLimits, trusted: Arc<[IpRange]>) -> Arc<Self> {
        Arc::new(Self {
            limits,
            trusted,
            open: Mutex::new(Open::default()),
        })
    }

    pub(in crate::switch) fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Ticket, Refused> {
        let ip = ip.to_canonical();
        let client = (!self.trusted.iter().any(|range| range.contains(ip))).then(|| client_of(ip));
        let mut open = self.lock();
        if open.total >= self.limits.max_connections {
            return Err(Refused::Full);
        }
        if let Some(client) = client {
            let count = open.by_client.entry(client).or_insert(0);
            if *count >= self.limits.max_per_client {
                return Err(Refused::ClientFull);
            }
            *count += 1;
        }
        open.total += 1;
        Ok(Ticket {
            admission: Arc::clone(self),
            client,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut open = self.admission.lock();
        open.total = open.total.saturating_sub(1);
        if let Some(client) = self.client
            && let Some(count) = open.by_client.get_mut(&client)
        {
            *count -= 1;
            if *count == 0 {
                open.by_client.remove(&client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limited(max_connections: usize, max_per_client: usize, trusted: &[&str]) -> Arc<Admission> {
        let trusted: Vec<IpRange> = trusted.iter().map(|t| t.parse().unwrap()).collect();
        Admission::new(
            ConnectionLimits {
                max_connections,
                max_per_client,
            },
            trusted.into(),
        )
    }

    #[test]
    fn one_client_cannot_take_every_place_and_places_come_back_on_close() {
        let admission = limited(4, 2, &[]);
        let flood: IpAddr = "203.0.113.9".parse().unwrap();
        let first = admission.admit(flood).unwrap();
        let _second = admission.admit(flood).unwrap();
        assert_eq!(admission.admit(flood).err(), Some(Refused::ClientFull));
        // The same /64, and the v4 address in v6 clothing, are the same client.
        let v6 = limited(4, 1, &[]);
        let _held = v6.admit("2001:db8::1".parse().unwrap()).unwrap();
        assert_eq!(
            v6.admit("2001:db8::2".parse().unwrap()).err(),
            Some(Refused::ClientFull)
        );
        assert_eq!(
            admission.admit("::ffff:203.0.113.9".parse().unwrap()).err(),
            Some(Refused::ClientFull)
        );

        let _other = admission.admit("198.51.100.1".parse().unwrap()).unwrap();
        let _third = admission.admit("198.51.100.2".parse().unwrap()).unwrap();
        assert_eq!(
            admission.admit("198.51.100.3".parse().unwrap()).err(),
            Some(Refused::Full)
        );
        drop(first);
        assert!(
            admission.admit(flood).is_ok(),
            "a closed connection gives its place back"
        );
    }

    #[test]
    fn a_trusted_proxy_in_front_counts_only_in_the_total() {
        let admission = limited(3, 1, &["10.0.0.0/8"]);
        let balancer: IpAddr = "10.1.2.3".parse().unwrap();
        let _a = admission.admit(balancer).unwrap();
        let _b = admission.admit(balancer).unwrap();
        let _c = admission.admit(balancer).unwrap();
        assert_eq!(admission.admit(balancer).err(), Some(Refused::Full));
    }

    #[test]
    fn limits_follow_the_open_file_limit() {
        let small = ConnectionLimits::for_fd_limit(1024);
        assert_eq!((small.max_connections, small.max_per_client), (256, 32));
        let large = ConnectionLimits::for_fd_limit(1 << 20);
        assert_eq!(
            (large.max_connections, large.max_per_client),
            (262_144, 32_768)
        );
    }
}
