//! Per-key counters in one-minute windows, in fixed memory, for what unauthenticated peers
//! can trigger: sign-in attempts, new connections, refusal log lines.
//!
//! A map keyed by attacker-chosen names grows with every name and needs scans to trim. Here
//! keys are hashed into a small count-min sketch: two rows of packed (window, count) cells,
//! updated lock-free. Memory and the cost of a call are fixed whatever peers send. Two keys
//! that share a cell in both rows share a count, which only makes a limit stricter, and the
//! hash keys are random per process, so a peer cannot aim at another key's cells.

use std::{
    hash::{BuildHasher, Hash, RandomState},
    net::IpAddr,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::Instant,
};

/// The count of one key in the current window, and what the previous window of its cells
/// had reached when this call opened a new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hit {
    /// Events counted for the key in this window, this one included (an upper bound).
    pub count: u32,
    /// When this call was the key's first in a new window: the count its last window ended
    /// with (0 if none).
    pub previous: u32,
}

/// Counts events per key in fixed one-minute windows.
pub struct WindowCounter {
    rows: [(RandomState, Box<[AtomicU64]>); 2],
    start: Instant,
}

impl WindowCounter {
    /// A counter with `width` cells per row (rounded up to a power of two).
    pub fn new(width: usize) -> Self {
        let width = width.next_power_of_two();
        let row = || {
            (
                RandomState::new(),
                (0..width).map(|_| AtomicU64::new(0)).collect(),
            )
        };
        Self {
            rows: [row(), row()],
            start: Instant::now(),
        }
    }

    /// Counts one event for `key`.
    pub fn hit(&self, key: &impl Hash) -> Hit {
        let window = self.window();
        let mut hit = Hit {
            count: u32::MAX,
            previous: u32::MAX,
        };
        for (hasher, cells) in &self.rows {
            let cell = &cells[hasher.hash_one(key) as usize & (cells.len() - 1)];
            let (mut count, mut previous) = (1, 0);
            // The closure never returns None, so the update always succeeds.
            let _ = cell.fetch_update(Relaxed, Relaxed, |v| {
                let (w, n) = unpack(v);
                (count, previous) = if w == window {
                    (n.saturating_add(1), 0)
                } else {
                    (1, n)
                };
                Some(pack(window, count))
            });
            hit.count = hit.count.min(count);
            hit.previous = hit.previous.min(previous);
        }
        hit
    }

    /// The count of `key` in this window, without counting.
    pub fn peek(&self, key: &impl Hash) -> u32 {
        let window = self.window();
        self.rows
            .iter()
            .map(|(hasher, cells)| {
                let (w, n) =
                    unpack(cells[hasher.hash_one(key) as usize & (cells.len() - 1)].load(Relaxed));
                if w == window { n } else { 0 }
            })
            .min()
            .unwrap_or(0)
    }

    fn window(&self) -> u32 {
        // Window 0 marks a cell never used.
        (self.start.elapsed().as_secs() / 60) as u32 + 1
    }
}

/// The gateway's rate limits, each in a sketch of its own (so a flood of one kind of key
/// cannot raise the counts of another), keyed by source address with IPv6 taken per /64
/// (what one host usually holds).
pub struct RateLimiter {
    /// New connections per source: counted for every Initial, spoofed ones included, so the
    /// widest sketch (2.6 million keys a minute leave a fresh key far below the limit).
    connections: WindowCounter,
    /// Sign-in and enrolment attempts per source (only after a completed handshake).
    attempts: WindowCounter,
    /// Failed sign-ins and enrolments per user and source.
    failures: WindowCounter,
}

impl Default for RateLimiter {
    fn default() -> Self {
        Self {
            connections: WindowCounter::new(1 << 18),
            attempts: WindowCounter::new(1 << 16),
            failures: WindowCounter::new(1 << 16),
        }
    }
}

impl RateLimiter {
    /// Counts a new connection from `ip`; false when over `per_minute`.
    pub fn connection(&self, ip: IpAddr, per_minute: u32) -> bool {
        self.connections.hit(&source(ip)).count <= per_minute
    }

    /// Counts a sign-in or enrolment attempt from `ip`; false when over `per_minute`.
    pub fn attempt(&self, ip: IpAddr, per_minute: u32) -> bool {
        self.attempts.hit(&source(ip)).count <= per_minute
    }

    /// Counts a failed sign-in or enrolment of `user` from `ip`.
    pub fn failure(&self, user: &str, ip: IpAddr) {
        self.failures.hit(&(user, source(ip)));
    }

    /// Whether `user` has failed `per_minute` times from `ip` in this window.
    pub fn failures_reached(&self, user: &str, ip: IpAddr, per_minute: u32) -> bool {
        self.failures.peek(&(user, source(ip))) >= per_minute
    }
}

/// The source an address counts as: itself for IPv4, its /64 for IPv6 (an IPv4 address
/// mapped into IPv6 counts as the IPv4 one).
pub fn source(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

fn pack(window: u32, count: u32) -> u64 {
    (u64::from(window) << 32) | u64::from(count)
}

fn unpack(v: u64) -> (u32, u32) {
    ((v >> 32) as u32, v as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_key_is_counted_on_its_own() {
        let c = WindowCounter::new(1 << 12);
        for i in 1..=5 {
            assert_eq!(c.hit(&"alice").count, i);
        }
        assert_eq!(c.hit(&"bob").count, 1);
        assert_eq!(c.peek(&"alice"), 5);
        assert_eq!(c.peek(&"carol"), 0);
    }

    #[test]
    fn a_hundred_and_fifty_thousand_names_take_fixed_memory_and_stay_fast() {
        let c = WindowCounter::new(1 << 16);
        let started = Instant::now();
        for i in 0..150_000u32 {
            let name = format!("user-{i}@{}", "x".repeat(200));
            c.hit(&name);
        }
        // No allocation per key: the sketch is the same two rows it started with, and every
        // call is two hashes and two atomic updates. Far below a second on any machine;
        // stated only to catch a scan per call, not as a speed target.
        assert!(started.elapsed().as_secs() < 5, "{:?}", started.elapsed());
        assert_eq!(c.rows[0].1.len(), 1 << 16);
        // A key never seen shares cells with a few of them (about 2.3 keys a cell here), so
        // its count stays far below any limit in use (the default is 20 a minute).
        let worst = (0..1000)
            .map(|i| c.peek(&format!("fresh-{i}")))
            .max()
            .unwrap_or_default();
        assert!(worst < 12, "a fresh key starts at {worst}");
    }

    #[test]
    fn a_flood_of_spoofed_sources_does_not_stop_a_fresh_sign_in() {
        let l = RateLimiter::default();
        for i in 0..2_000_000u32 {
            l.connection(
                IpAddr::V4(std::net::Ipv4Addr::from(i.wrapping_mul(2_654_435_761))),
                600,
            );
        }
        let fresh = (0..1000u32)
            .filter(|i| {
                let ip = IpAddr::V4(std::net::Ipv4Addr::new(198, 51, (i / 256) as u8, *i as u8));
                l.connection(ip, 600) && l.attempt(ip, 20) && !l.failures_reached("alice", ip, 20)
            })
            .count();
        assert_eq!(fresh, 1000);
    }

    #[test]
    fn ipv6_sources_count_per_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().expect("ip");
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().expect("ip");
        let c: IpAddr = "2001:db8:1:3::1".parse().expect("ip");
        assert_eq!(source(a), source(b));
        assert_ne!(source(a), source(c));
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().expect("ip");
        assert_eq!(source(mapped), "192.0.2.1".parse::<IpAddr>().expect("ip"));
    }

    #[test]
    fn a_new_window_reports_what_the_last_one_reached() {
        let mut c = WindowCounter::new(64);
        for _ in 0..7 {
            c.hit(&"x");
        }
        // Move the start back a minute: the next call opens a new window.
        c.start -= std::time::Duration::from_secs(61);
        let h = c.hit(&"x");
        assert_eq!(
            h,
            Hit {
                count: 1,
                previous: 7
            }
        );
        assert_eq!(
            c.hit(&"x"),
            Hit {
                count: 2,
                previous: 0
            }
        );
    }
}
