//! Which controller the agent dials next, as a state machine with time passed in.
//!
//! The agent knows its configured controllers (`--controller`, repeatable) and the set the
//! controller it is on announces (protocol 7), which it keeps in its state dir. A round tries each
//! known controller once: the one that last worked first, then the others in order (configured,
//! then announced), those that failed recently last. A failed connect or a lost session moves on
//! to the next controller at once ([`Pace::Now`]); only a round in which every controller failed
//! asks for the reconnect backoff ([`Pace::Backoff`]), so a dead controller costs one connect
//! attempt and a lone one is never dialled in a storm. A controller that drops out of the
//! announced set is forgotten; configured ones are always kept.
//!
//! A configured controller may be a DNS name ([`ControllerAddr::Name`]): the shell resolves it
//! before every attempt and hands the book the addresses ([`ControllerBook::set_configured`]), so
//! a controller that moves is found at the next reconnect. TLS does not depend on the name: the
//! agent checks the controller's certificate against the fleet CA under the fixed
//! [`shoal_overlay::pki::CONTROLLER_SERVER_NAME`], whatever address it dialled.

use std::{
    net::SocketAddr,
    str::FromStr,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use shoal_proto::{limits, ControllerEndpoint, ControllerSet};

/// How long a failure counts against a controller when ordering a round.
pub const FAILURE_MEMORY: Duration = Duration::from_secs(60);

/// When to dial the next controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    /// Another controller is left in this round: dial it now.
    Now,
    /// Every known controller failed in this round: wait for the reconnect backoff.
    Backoff,
}

/// A configured controller (`--controller`): an IP address and port, or a DNS name and port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControllerAddr {
    /// `IP:PORT` (`[IPV6]:PORT`).
    Ip(SocketAddr),
    /// `NAME:PORT`, resolved before every connection attempt.
    Name {
        /// The DNS name (letters, digits, `-` and `.`).
        host: String,
        /// The UDP port.
        port: u16,
    },
}

impl From<SocketAddr> for ControllerAddr {
    fn from(addr: SocketAddr) -> Self {
        ControllerAddr::Ip(addr)
    }
}

impl std::fmt::Display for ControllerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ControllerAddr::Ip(a) => a.fmt(f),
            ControllerAddr::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// Why a `--controller` value is not an address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a controller address: expected IP:PORT, [IPV6]:PORT or NAME:PORT")]
pub struct BadControllerAddr(String);

impl FromStr for ControllerAddr {
    type Err = BadControllerAddr;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(ControllerAddr::Ip(addr));
        }
        let bad = || BadControllerAddr(s.to_owned());
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        if port == 0 {
            return Err(bad());
        }
        let host = shoal_cmdline::dns_name(host).ok_or_else(bad)?;
        Ok(ControllerAddr::Name { host, port })
    }
}

/// What the agent keeps across restarts (`controllers.json` in the state dir).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptControllers {
    /// The controller set last announced, bounded by [`limits::check_controller_set`].
    pub announced: Vec<ControllerEndpoint>,
    /// The controller the last session was up on.
    pub last_good: Option<SocketAddr>,
}

/// Why an announced set was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SetError {
    /// The set is over a bound.
    #[error("controller set refused: {0}")]
    Limit(#[from] limits::LimitError),
    /// The set is empty (a controller never announces one).
    #[error("controller set refused: it is empty")]
    Empty,
}

/// The known controllers and the state of the current round.
#[derive(Debug, Clone)]
pub struct ControllerBook {
    configured: Vec<SocketAddr>,
    announced: Vec<ControllerEndpoint>,
    last_good: Option<SocketAddr>,
    /// When each controller last failed.
    failed: Vec<(SocketAddr, Instant)>,
    /// The controllers that failed in this round.
    tried: Vec<SocketAddr>,
    /// Whether the agent's socket is IPv6 (an IPv4 socket cannot reach IPv6 controllers).
    ipv6: bool,
}

impl ControllerBook {
    /// A book of the configured controllers (at least one) and what was kept from earlier runs.
    pub fn new(configured: Vec<SocketAddr>, kept: KeptControllers, ipv6: bool) -> Self {
        let mut book = Self {
            configured,
            announced: Vec::new(),
            last_good: None,
            failed: Vec::new(),
            tried: Vec::new(),
            ipv6,
        };
        book.announced = kept
            .announced
            .into_iter()
            .filter(|c| book.reachable(c.addr))
            .collect();
        book.last_good = kept.last_good.filter(|a| book.is_known(*a));
        book
    }

    fn reachable(&self, addr: SocketAddr) -> bool {
        self.ipv6 || addr.is_ipv4()
    }

    fn is_known(&self, addr: SocketAddr) -> bool {
        self.configured.contains(&addr) || self.announced.iter().any(|c| c.addr == addr)
    }

    /// The configured controllers' addresses as resolved now (names resolve to several or to
    /// others over time); an empty list keeps the ones the book has. Failures and the round's
    /// progress are kept for addresses that stay.
    pub fn set_configured(&mut self, addrs: Vec<SocketAddr>) {
        let mut configured: Vec<SocketAddr> = Vec::new();
        for a in addrs {
            if self.reachable(a) && !configured.contains(&a) {
                configured.push(a);
            }
        }
        if configured.is_empty() || configured == self.configured {
            return;
        }
        self.configured = configured;
        let candidates = self.candidates();
        self.failed.retain(|(a, _)| candidates.contains(a));
        self.tried.retain(|a| candidates.contains(a));
    }

    /// Every known controller, configured ones first, each once.
    pub fn candidates(&self) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = Vec::new();
        for a in self
            .configured
            .iter()
            .copied()
            .chain(self.announced.iter().map(|c| c.addr))
        {
            if !out.contains(&a) {
                out.push(a);
            }
        }
        out
    }

    /// What to keep in the state dir.
    pub fn kept(&self) -> KeptControllers {
        KeptControllers {
            announced: self.announced.clone(),
            last_good: self.last_good,
        }
    }

    /// The controller the last session was up on.
    pub fn last_good(&self) -> Option<SocketAddr> {
        self.last_good
    }

    fn recent_failure(&self, addr: SocketAddr, now: Instant) -> Option<Instant> {
        self.failed
            .iter()
            .find(|(a, _)| *a == addr)
            .map(|(_, t)| *t)
            .filter(|t| now.saturating_duration_since(*t) < FAILURE_MEMORY)
    }

    /// The controller to dial now: the first of this round's order not yet tried in it.
    pub fn next(&mut self, now: Instant) -> SocketAddr {
        let candidates = self.candidates();
        let mut order: Vec<(bool, Option<Instant>, usize, SocketAddr)> = candidates
            .iter()
            .enumerate()
            .filter(|(_, a)| !self.tried.contains(a))
            .map(|(i, a)| {
                let failed = self.recent_failure(*a, now);
                // Among controllers that did not fail recently the last good one leads.
                let rank = if failed.is_none() && Some(*a) == self.last_good {
                    0
                } else {
                    i + 1
                };
                (failed.is_some(), failed, rank, *a)
            })
            .collect();
        order.sort();
        match order.first() {
            Some(&(.., addr)) => addr,
            None => {
                // Every one was tried (the set changed under the round): start a new round.
                self.tried.clear();
                self.last_good
                    .or_else(|| candidates.first().copied())
                    .unwrap_or_else(|| self.configured[0])
            }
        }
    }

    /// A session came up on `addr` (its Welcome arrived): it leads the next round. Returns whether
    /// what the agent keeps changed.
    pub fn up(&mut self, addr: SocketAddr) -> bool {
        self.tried.clear();
        self.failed.retain(|(a, _)| *a != addr);
        let changed = self.last_good != Some(addr);
        self.last_good = Some(addr);
        changed
    }

    /// A connect to `addr` failed, or its session ended: move on, or back off after a full round.
    pub fn failed(&mut self, addr: SocketAddr, now: Instant) -> Pace {
        self.failed
            .retain(|(a, t)| *a != addr && now.saturating_duration_since(*t) < FAILURE_MEMORY);
        self.failed.push((addr, now));
        if !self.tried.contains(&addr) {
            self.tried.push(addr);
        }
        if self.candidates().iter().all(|a| self.tried.contains(a)) {
            self.tried.clear();
            Pace::Backoff
        } else {
            Pace::Now
        }
    }

    /// A controller announced the fleet's controller set: it replaces the one kept; controllers no
    /// longer in it are forgotten (configured ones stay). Returns whether what the agent keeps
    /// changed.
    pub fn announced(&mut self, set: ControllerSet) -> Result<bool, SetError> {
        limits::check_controller_set(&set)?;
        if set.controllers.is_empty() {
            return Err(SetError::Empty);
        }
        let mut announced: Vec<ControllerEndpoint> = Vec::new();
        for c in set.controllers {
            if self.reachable(c.addr) && !announced.iter().any(|k| k.addr == c.addr) {
                announced.push(c);
            }
        }
        if announced == self.announced {
            return Ok(false);
        }
        self.announced = announced;
        let candidates = self.candidates();
        self.failed.retain(|(a, _)| candidates.contains(a));
        self.tried.retain(|a| candidates.contains(a));
        if self.last_good.is_some_and(|a| !candidates.contains(&a)) {
            self.last_good = None;
        }
        Ok(true)
    }

    /// The id the announced set gives `addr`, for logs.
    pub fn id_of(&self, addr: SocketAddr) -> Option<&str> {
        self.announced
            .iter()
            .find(|c| c.addr == addr)
            .map(|c| c.id.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controller_addresses_are_ips_or_dns_names_with_a_port() {
        let ip: ControllerAddr = "192.0.2.1:7440".parse().expect("ip");
        assert_eq!(ip, ControllerAddr::Ip(addr(7440)));
        let v6: ControllerAddr = "[2001:db8::1]:7440".parse().expect("v6");
        assert!(matches!(v6, ControllerAddr::Ip(a) if a.is_ipv6()));
        let name: ControllerAddr = "Ctl-1.Example.org.:7440".parse().expect("name");
        assert_eq!(
            name,
            ControllerAddr::Name {
                host: "ctl-1.example.org".into(),
                port: 7440
            }
        );
        assert_eq!(name.to_string(), "ctl-1.example.org:7440");
        for bad in [
            "ctl.example.org",
            "ctl:0",
            "ctl:70000",
            ":7440",
            "-ctl:7440",
            "c tl:7440",
            "a..b:7440",
            "192.0.2.300:7440",
            "2001:db8::1:7440",
        ] {
            let err = bad.parse::<ControllerAddr>().expect_err(bad);
            assert!(err.to_string().contains("IP:PORT"), "{err}");
        }
    }

    #[test]
    fn re_resolved_configured_addresses_replace_the_old_and_keep_the_round() {
        let mut b = ControllerBook::new(vec![addr(1)], KeptControllers::default(), false);
        let now = Instant::now();
        assert_eq!(b.next(now), addr(1));
        assert_eq!(b.failed(addr(1), now), Pace::Backoff);
        // The name now resolves to two addresses (one of them IPv6, which this socket cannot
        // reach): the new one is dialled next.
        let v6 = SocketAddr::from(([0x2001, 0xdb8, 0, 0, 0, 0, 0, 1], 2));
        b.set_configured(vec![addr(2), v6, addr(2)]);
        assert_eq!(b.candidates(), vec![addr(2)]);
        assert_eq!(b.next(now), addr(2));
        // A lookup that found nothing keeps what the book had.
        b.set_configured(vec![]);
        assert_eq!(b.candidates(), vec![addr(2)]);
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], port))
    }

    fn set(ports: &[u16]) -> ControllerSet {
        ControllerSet {
            controllers: ports
                .iter()
                .map(|p| ControllerEndpoint {
                    id: format!("c{p}"),
                    addr: addr(*p),
                })
                .collect(),
        }
    }

    fn book(configured: &[u16]) -> ControllerBook {
        ControllerBook::new(
            configured.iter().map(|p| addr(*p)).collect(),
            KeptControllers::default(),
            false,
        )
    }

    #[test]
    fn a_failed_controller_moves_on_at_once_and_backoff_comes_after_a_full_round() {
        let t = Instant::now();
        let mut b = book(&[1, 2, 3]);
        assert_eq!(b.next(t), addr(1));
        assert_eq!(b.failed(addr(1), t), Pace::Now);
        assert_eq!(b.next(t), addr(2));
        assert_eq!(b.failed(addr(2), t), Pace::Now);
        assert_eq!(b.next(t), addr(3));
        assert_eq!(
            b.failed(addr(3), t),
            Pace::Backoff,
            "the whole round failed"
        );
        // The next round starts over, oldest failure first.
        assert_eq!(b.next(t + Duration::from_secs(1)), addr(1));
    }

    #[test]
    fn the_last_good_controller_leads_and_a_lost_session_fails_over() {
        let t = Instant::now();
        let mut b = book(&[1, 2]);
        let first = b.next(t);
        assert_eq!(b.failed(first, t), Pace::Now);
        assert_eq!(b.next(t), addr(2));
        assert!(b.up(addr(2)), "a new last good controller is kept");
        assert!(!b.up(addr(2)));
        assert_eq!(
            b.next(t),
            addr(2),
            "reconnects (after an enrolment) go back to it"
        );
        // Its session is lost (the controller was killed): the other one, at once.
        let t1 = t + Duration::from_secs(30);
        assert_eq!(b.failed(addr(2), t1), Pace::Now);
        assert_eq!(b.next(t1), addr(1));
        // That one is dead too: the round is over, back off.
        assert_eq!(b.failed(addr(1), t1), Pace::Backoff);
        // A lone controller backs off after every failure: no storm against it.
        let mut lone = book(&[7]);
        let only = lone.next(t);
        assert_eq!(lone.failed(only, t), Pace::Backoff);
        assert_eq!(lone.next(t), addr(7));
        assert_eq!(lone.failed(addr(7), t), Pace::Backoff);
    }

    #[test]
    fn recently_failed_controllers_go_last_until_their_failure_is_old() {
        let t = Instant::now();
        let mut b = book(&[1, 2, 3]);
        b.up(addr(1));
        assert_eq!(b.failed(addr(1), t), Pace::Now);
        assert_eq!(b.failed(addr(2), t + Duration::from_secs(1)), Pace::Now);
        assert_eq!(b.next(t), addr(3));
        assert_eq!(b.failed(addr(3), t + Duration::from_secs(2)), Pace::Backoff);
        // All failed recently: oldest failure first.
        let t3 = t + Duration::from_secs(3);
        assert_eq!(b.next(t3), addr(1));
        // 1 fails again, so 2 (older failure) then 3.
        assert_eq!(b.failed(addr(1), t3), Pace::Now);
        assert_eq!(b.next(t3), addr(2));
        // Long after, failures no longer count: the last good one leads again.
        let later = t3 + FAILURE_MEMORY + Duration::from_secs(1);
        let mut fresh = b.clone();
        fresh.tried.clear();
        assert_eq!(fresh.next(later), addr(1));
    }

    #[test]
    fn announced_controllers_are_used_kept_and_forgotten_when_gone_but_configured_ones_stay() {
        let t = Instant::now();
        let mut b = book(&[1]);
        assert_eq!(b.announced(set(&[1, 5, 6])), Ok(true));
        assert_eq!(
            b.announced(set(&[1, 5, 6])),
            Ok(false),
            "the same set again"
        );
        assert_eq!(b.candidates(), vec![addr(1), addr(5), addr(6)]);
        assert_eq!(b.id_of(addr(5)), Some("c5"));
        // The configured one is dead: the announced ones take over, never configured.
        let first = b.next(t);
        assert_eq!((first, b.failed(first, t)), (addr(1), Pace::Now));
        assert_eq!(b.next(t), addr(5));
        b.up(addr(5));
        // A restart keeps what was announced and where the agent was.
        let again = ControllerBook::new(vec![addr(1)], b.kept(), false);
        assert_eq!(again.candidates(), b.candidates());
        assert_eq!(again.clone().next(t), addr(5));
        // 5 leaves the set: it is forgotten, with its failures; 1 stays though not announced.
        b.failed(addr(6), t);
        assert_eq!(b.announced(set(&[6])), Ok(true));
        assert_eq!(b.candidates(), vec![addr(1), addr(6)]);
        assert_eq!(b.last_good(), None);
        assert_eq!(b.kept().announced, set(&[6]).controllers);
        // Bounds and emptiness are refused, and change nothing.
        let over: Vec<u16> = (0..=limits::MAX_CONTROLLERS as u16).collect();
        assert!(matches!(b.announced(set(&over)), Err(SetError::Limit(_))));
        assert_eq!(b.announced(set(&[])), Err(SetError::Empty));
        assert_eq!(b.candidates(), vec![addr(1), addr(6)]);
    }

    #[test]
    fn an_ipv4_socket_ignores_ipv6_controllers() {
        let mut b = book(&[1]);
        let mut s = set(&[2]);
        s.controllers.push(ControllerEndpoint {
            id: "v6".into(),
            addr: "[2001:db8::1]:7440".parse().expect("addr"),
        });
        assert_eq!(b.announced(s), Ok(true));
        assert_eq!(b.candidates(), vec![addr(1), addr(2)]);
    }
}
