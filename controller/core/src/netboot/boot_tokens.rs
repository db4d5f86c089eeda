//! Who may get a per-boot join token, sans-IO (time passed in as [`Instant`]).
//!
//! `GET /boot/<mac>.ipxe` mints a token only for a MAC that the controller's own DHCP / proxyDHCP
//! server saw PXE-boot (a PXE or iPXE client's DISCOVER, REQUEST or INFORM,
//! [`super::dhcp::is_boot_sighting`]) on the netboot interface within
//! [`GateConfig::sighting_window`]. Minting is rate-bounded twice: each MAC has at most one
//! outstanding token from this path (a new one replaces the previous, which the shell revokes), and
//! a token bucket ([`GateConfig::burst`], [`GateConfig::refill_every`]) caps the rate over all
//! MACs. Everything is in memory and bounded by [`GateConfig::max_macs`], oldest first out.
//!
//! Tokens the controller mints on its own behalf (a kexec into a new image, bound to a node) do not
//! pass through here.

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

use super::dhcp::Mac;

/// Limits of boot-token minting. Every field has a documented default ([`GateConfig::default`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GateConfig {
    /// How long after a PXE DHCP request from a MAC its boot script may still mint a token; default
    /// 2 minutes (firmware fetches the script seconds after DHCP; UEFI firmware that loads iPXE
    /// over TFTP first asks DHCP again from iPXE).
    pub sighting_window: Duration,
    /// MACs remembered, for sightings and for outstanding tokens each; the oldest goes first.
    /// Default 4096.
    pub max_macs: usize,
    /// Tokens that can be minted at once when the bucket is full; default 64 (a rack of 50 machines
    /// powering on together, with room for a few second fetches).
    pub burst: u32,
    /// The bucket gains one token per this interval, up to `burst`; default 1 s (60 a minute).
    pub refill_every: Duration,
}

impl Default for GateConfig {
    fn default() -> Self {
        Self {
            sighting_window: Duration::from_secs(120),
            max_macs: 4096,
            burst: 64,
            refill_every: Duration::from_secs(1),
        }
    }
}

/// Why no token is minted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The DHCP server saw no PXE request from this MAC within the window.
    #[error("no PXE boot from this machine seen in the last {}", humantime::format_duration(*.0))]
    NotSighted(Duration),
    /// The global rate is spent; the next token is due after this long.
    #[error("too many machines booting at once; retry in {}", humantime::format_duration(*.0))]
    Busy(Duration),
}

/// A map from MAC to value that keeps at most `cap` entries, dropping the least recently inserted.
#[derive(Debug)]
struct Recent<V> {
    cap: usize,
    next: u64,
    by_mac: HashMap<Mac, (u64, V)>,
    order: BTreeMap<u64, Mac>,
}

impl<V> Recent<V> {
    fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            next: 0,
            by_mac: HashMap::new(),
            order: BTreeMap::new(),
        }
    }

    /// Inserts (or refreshes) `mac`; returns the value it replaces.
    fn insert(&mut self, mac: Mac, value: V) -> Option<V> {
        let seq = self.next;
        self.next += 1;
        let old = self.by_mac.insert(mac, (seq, value)).map(|(old_seq, v)| {
            self.order.remove(&old_seq);
            v
        });
        self.order.insert(seq, mac);
        while self.by_mac.len() > self.cap {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            self.by_mac.remove(&oldest);
        }
        old
    }

    fn get(&self, mac: &Mac) -> Option<&V> {
        self.by_mac.get(mac).map(|(_, v)| v)
    }

    /// Drops entries from the oldest while `stale` says so.
    fn drop_oldest_while(&mut self, stale: impl Fn(&V) -> bool) {
        while let Some((&seq, mac)) = self.order.first_key_value() {
            match self.by_mac.get(mac) {
                Some((s, v)) if *s == seq && !stale(v) => break,
                _ => {}
            }
            let mac = *mac;
            self.order.remove(&seq);
            self.by_mac.remove(&mac);
        }
    }

    fn len(&self) -> usize {
        self.by_mac.len()
    }
}

/// A token bucket: `burst` tokens, one more per `every`.
#[derive(Debug)]
struct Bucket {
    burst: u32,
    every: Duration,
    tokens: u32,
    /// When `tokens` was last brought up to date.
    at: Instant,
}

impl Bucket {
    fn new(burst: u32, every: Duration, now: Instant) -> Self {
        Self {
            burst,
            every: every.max(Duration::from_millis(1)),
            tokens: burst,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        if self.tokens >= self.burst {
            self.at = now;
            return;
        }
        let elapsed = now.saturating_duration_since(self.at);
        let gained =
            (elapsed.as_nanos() / self.every.as_nanos()).min(u128::from(self.burst)) as u32;
        if gained > 0 {
            self.tokens = (self.tokens + gained).min(self.burst);
            self.at = if self.tokens >= self.burst {
                now
            } else {
                self.at + self.every * gained
            };
        }
    }

    /// Takes a token, or says how long until the next one.
    fn take(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens == 0 {
            return Err((self.at + self.every).saturating_duration_since(now));
        }
        self.tokens -= 1;
        Ok(())
    }
}

/// Counts of what the gate decided, for logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GateStats {
    /// Tokens minted.
    pub minted: u64,
    /// Scripts refused: no sighting.
    pub refused_unsighted: u64,
    /// Scripts refused: rate spent.
    pub refused_busy: u64,
}

/// The sightings, the outstanding tokens and the rate of minting.
#[derive(Debug)]
pub struct BootTokenGate {
    config: GateConfig,
    sightings: Recent<Instant>,
    outstanding: Recent<String>,
    bucket: Bucket,
    stats: GateStats,
}

impl BootTokenGate {
    /// An empty gate with a full bucket.
    pub fn new(config: GateConfig, now: Instant) -> Self {
        Self {
            sightings: Recent::new(config.max_macs),
            outstanding: Recent::new(config.max_macs),
            bucket: Bucket::new(config.burst, config.refill_every, now),
            config,
            stats: GateStats::default(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &GateConfig {
        &self.config
    }

    /// The DHCP server saw `mac` PXE-boot at `now`.
    pub fn saw_pxe_boot(&mut self, mac: Mac, now: Instant) {
        let window = self.config.sighting_window;
        self.sightings
            .drop_oldest_while(|at| now.saturating_duration_since(*at) > window);
        self.sightings.insert(mac, now);
    }

    /// Whether `mac` PXE-booted within the window before `now`.
    pub fn sighted(&self, mac: &Mac, now: Instant) -> bool {
        self.sightings
            .get(mac)
            .is_some_and(|at| now.saturating_duration_since(*at) <= self.config.sighting_window)
    }

    /// Decides whether a token may be minted for `mac` now; on `Ok` the rate is charged, and the
    /// shell mints and then calls [`BootTokenGate::minted`].
    pub fn admit(&mut self, mac: &Mac, now: Instant) -> Result<(), Refusal> {
        if !self.sighted(mac, now) {
            self.stats.refused_unsighted += 1;
            return Err(Refusal::NotSighted(self.config.sighting_window));
        }
        self.bucket.take(now).map_err(|wait| {
            self.stats.refused_busy += 1;
            Refusal::Busy(wait)
        })
    }

    /// Records the token minted for `mac`; returns the one it replaces (the shell revokes it if
    /// unused).
    pub fn minted(&mut self, mac: Mac, token_id: String) -> Option<String> {
        self.stats.minted += 1;
        self.outstanding.insert(mac, token_id)
    }

    /// The token last minted for `mac` through this gate, if remembered.
    pub fn outstanding(&self, mac: &Mac) -> Option<&str> {
        self.outstanding.get(mac).map(String::as_str)
    }

    /// MACs with a sighting remembered (some may be older than the window).
    pub fn sightings(&self) -> usize {
        self.sightings.len()
    }

    /// MACs with an outstanding token remembered.
    pub fn outstanding_len(&self) -> usize {
        self.outstanding.len()
    }

    /// What the gate decided so far.
    pub fn stats(&self) -> GateStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(n: u16) -> Mac {
        let [a, b] = n.to_be_bytes();
        Mac([0x02, 0, 0, 0, a, b])
    }

    fn gate(config: GateConfig) -> (BootTokenGate, Instant) {
        let t0 = Instant::now();
        (BootTokenGate::new(config, t0), t0)
    }

    #[test]
    fn no_sighting_no_token_and_a_sighting_lasts_only_the_window() {
        let (mut g, t0) = gate(GateConfig::default());
        assert_eq!(
            g.admit(&mac(1), t0),
            Err(Refusal::NotSighted(Duration::from_secs(120)))
        );
        g.saw_pxe_boot(mac(1), t0);
        assert_eq!(
            g.admit(&mac(2), t0),
            Err(Refusal::NotSighted(Duration::from_secs(120))),
            "another MAC's sighting does not count"
        );
        assert_eq!(g.admit(&mac(1), t0 + Duration::from_secs(120)), Ok(()));
        assert!(
            matches!(
                g.admit(&mac(1), t0 + Duration::from_secs(121)),
                Err(Refusal::NotSighted(_))
            ),
            "too late"
        );
        g.saw_pxe_boot(mac(1), t0 + Duration::from_secs(200));
        assert_eq!(
            g.admit(&mac(1), t0 + Duration::from_secs(201)),
            Ok(()),
            "a new PXE request renews it"
        );
        assert_eq!(g.stats().refused_unsighted, 3);
    }

    #[test]
    fn a_second_mint_replaces_the_first() {
        let (mut g, t0) = gate(GateConfig::default());
        g.saw_pxe_boot(mac(1), t0);
        g.admit(&mac(1), t0).expect("first");
        assert_eq!(g.minted(mac(1), "a".into()), None);
        g.admit(&mac(1), t0).expect("second");
        assert_eq!(
            g.minted(mac(1), "b".into()),
            Some("a".into()),
            "the first is handed back for revoking"
        );
        assert_eq!(g.outstanding(&mac(1)), Some("b"));
        assert_eq!(g.outstanding_len(), 1);
    }

    #[test]
    fn the_bucket_lets_a_rack_boot_at_once_then_refills_at_its_rate() {
        let (mut g, t0) = gate(GateConfig::default());
        for i in 0..64 {
            g.saw_pxe_boot(mac(i), t0);
            assert_eq!(g.admit(&mac(i), t0), Ok(()), "machine {i} of the burst");
        }
        g.saw_pxe_boot(mac(64), t0);
        assert_eq!(
            g.admit(&mac(64), t0),
            Err(Refusal::Busy(Duration::from_secs(1)))
        );
        assert_eq!(
            g.admit(&mac(64), t0 + Duration::from_millis(400)),
            Err(Refusal::Busy(Duration::from_millis(600)))
        );
        assert_eq!(
            g.admit(&mac(64), t0 + Duration::from_secs(1)),
            Ok(()),
            "one token a second"
        );
        assert!(matches!(
            g.admit(&mac(64), t0 + Duration::from_millis(1500)),
            Err(Refusal::Busy(_))
        ));
        // Ten seconds later, ten more (and no more than that).
        let t = t0 + Duration::from_secs(11);
        let granted = (0..20).filter(|_| g.admit(&mac(64), t).is_ok()).count();
        assert_eq!(granted, 10);
        assert_eq!(g.stats().refused_busy, 3 + 10);
        // A long quiet time refills to the burst, not beyond.
        let later = t0 + Duration::from_secs(3600);
        g.saw_pxe_boot(mac(64), later);
        assert_eq!(
            (0..100)
                .filter(|_| g.admit(&mac(64), later).is_ok())
                .count(),
            64
        );
    }

    #[test]
    fn memory_is_bounded_oldest_first() {
        let config = GateConfig {
            max_macs: 8,
            burst: 1000,
            ..GateConfig::default()
        };
        let (mut g, t0) = gate(config);
        for i in 0..100 {
            g.saw_pxe_boot(mac(i), t0);
            g.minted(mac(i), format!("t{i}"));
        }
        assert_eq!((g.sightings(), g.outstanding_len()), (8, 8));
        assert!(g.sighted(&mac(99), t0) && g.sighted(&mac(92), t0));
        assert!(!g.sighted(&mac(91), t0), "the oldest went first");
        assert_eq!(g.outstanding(&mac(91)), None);
        // Refreshing a MAC makes it the newest.
        g.saw_pxe_boot(mac(92), t0);
        g.saw_pxe_boot(mac(100), t0);
        assert!(g.sighted(&mac(92), t0) && !g.sighted(&mac(93), t0));
        // Sightings older than the window are dropped as new ones arrive.
        let later = t0 + Duration::from_secs(121);
        g.saw_pxe_boot(mac(200), later);
        assert_eq!(g.sightings(), 1);
    }
}
