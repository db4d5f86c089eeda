//! Leadership of a controller cluster, as a state machine with time passed in.
//!
//! The shell holds an etcd lease and campaigns for the leader key with it; this core decides, from
//! what the shell saw and when, whether this controller leads *now*. The rule that keeps a deposed
//! leader from acting: leadership ends on the local clock at the moment etcd could have let the
//! lease expire — the send time of the last keep-alive etcd acknowledged, plus the lease's TTL,
//! minus a safety margin for clock-rate differences — unless a newer acknowledgement arrived. The
//! shell stops the leader's work when [`Leadership::poll`] says so, even if etcd is unreachable and
//! cannot tell it anything: a controller cut off from etcd stops leading within its lease.
//!
//! Writes the leader's work makes also carry the leader key's create revision as a fence (checked
//! by etcd in the same transaction), so even a leader whose process stalls past this deadline
//! cannot write after another controller took over.

use std::time::{Duration, Instant};

/// What this controller is, as far as leading goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Not leading: another controller leads, or nobody does yet.
    Follower,
    /// Leading since the leader key was created at `revision` with this controller's lease.
    Leader {
        /// The leader key's create revision: the fence every leader write carries.
        revision: i64,
    },
}

/// A change the shell acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Start the leader's work, fenced on `revision`.
    StartLeading {
        /// The leader key's create revision.
        revision: i64,
    },
    /// Stop the leader's work at once.
    StopLeading {
        /// Why, for the log and the operator.
        reason: String,
    },
}

/// The lease and the leader role of one controller.
#[derive(Debug)]
pub struct Leadership {
    ttl: Duration,
    margin: Duration,
    /// When the lease may have expired in etcd's eyes, as far as we know (None: no lease).
    lease_deadline: Option<Instant>,
    role: Role,
}

impl Leadership {
    /// A controller without a lease yet. `ttl` is the lease's TTL as etcd granted it; `margin` is
    /// taken off every deadline (clock-rate differences, scheduling delays).
    pub fn new(ttl: Duration, margin: Duration) -> Leadership {
        Leadership {
            ttl,
            margin: margin.min(ttl / 2),
            lease_deadline: None,
            role: Role::Follower,
        }
    }

    /// The current role.
    pub fn role(&self) -> &Role {
        &self.role
    }

    /// Whether this controller leads.
    pub fn is_leader(&self) -> bool {
        matches!(self.role, Role::Leader { .. })
    }

    /// The lease's TTL.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// A lease was granted by a request sent at `sent` with `ttl` (etcd may raise a short TTL to
    /// its minimum).
    pub fn lease_granted(&mut self, sent: Instant, ttl: Duration) {
        self.ttl = ttl;
        self.margin = self.margin.min(ttl / 2);
        self.lease_deadline = Some(sent + ttl);
    }

    /// etcd acknowledged a keep-alive sent at `sent`; `ttl_left` is what it reports (zero: the lease
    /// is gone). Returns a change when leadership ended.
    pub fn keep_alive_acked(
        &mut self,
        sent: Instant,
        ttl_left: Duration,
        now: Instant,
    ) -> Option<Change> {
        if ttl_left.is_zero() {
            self.lease_deadline = None;
            return self.stop("etcd reports the lease expired".into());
        }
        let deadline = sent + ttl_left.min(self.ttl);
        // Acknowledgements can arrive out of order: only a later deadline extends the lease.
        if self.lease_deadline.is_none_or(|d| deadline > d) {
            self.lease_deadline = Some(deadline);
        }
        self.poll(now)
    }

    /// Whether the lease is still ours at `now`, by the conservative local deadline.
    pub fn lease_alive(&self, now: Instant) -> bool {
        self.lease_deadline.is_some_and(|d| now + self.margin < d)
    }

    /// The lease is gone (revoked, or the shell gave up on it): a new one is needed.
    pub fn lease_lost(&mut self, why: &str) -> Option<Change> {
        self.lease_deadline = None;
        self.stop(format!("lost the etcd lease: {why}"))
    }

    /// The campaign won: the leader key was created at `revision` with our lease, by a request
    /// sent at `sent`. Leads only if the lease is still alive.
    pub fn won(&mut self, revision: i64, now: Instant) -> Option<Change> {
        if !self.lease_alive(now) {
            return None;
        }
        match self.role {
            Role::Leader { revision: r } if r == revision => None,
            _ => {
                self.role = Role::Leader { revision };
                Some(Change::StartLeading { revision })
            }
        }
    }

    /// The leader key is not ours (another controller holds it, or it was deleted or recreated).
    pub fn not_leader(&mut self, why: &str) -> Option<Change> {
        self.stop(why.to_owned())
    }

    /// Checks the lease deadline at `now`; ends leadership when it passed.
    pub fn poll(&mut self, now: Instant) -> Option<Change> {
        if self.is_leader() && !self.lease_alive(now) {
            return self.stop(format!(
                "no lease renewal acknowledged by etcd within the lease's {:?}",
                self.ttl
            ));
        }
        None
    }

    /// The next instant [`Leadership::poll`] must run at to stop in time (None: nothing to check).
    pub fn next_deadline(&self) -> Option<Instant> {
        if !self.is_leader() {
            return None;
        }
        self.lease_deadline
            .map(|d| d.checked_sub(self.margin).unwrap_or(d))
    }

    fn stop(&mut self, reason: String) -> Option<Change> {
        match self.role {
            Role::Leader { .. } => {
                self.role = Role::Follower;
                Some(Change::StopLeading { reason })
            }
            Role::Follower => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(2);
    const MARGIN: Duration = Duration::from_millis(250);

    fn leader(now: Instant) -> Leadership {
        let mut l = Leadership::new(TTL, MARGIN);
        l.lease_granted(now, TTL);
        assert_eq!(l.won(7, now), Some(Change::StartLeading { revision: 7 }));
        l
    }

    #[test]
    fn a_leader_whose_keep_alives_go_unanswered_stops_before_the_lease_can_expire() {
        let t0 = Instant::now();
        let mut l = leader(t0);
        // Keep-alives acknowledged for a while: still leading.
        for i in 1..=4 {
            let sent = t0 + Duration::from_millis(500 * i);
            assert_eq!(
                l.keep_alive_acked(sent, TTL, sent + Duration::from_millis(5)),
                None
            );
        }
        let last_ack_sent = t0 + Duration::from_millis(2000);
        // Then etcd goes silent. Just before the deadline minus the margin: leading.
        assert_eq!(
            l.poll(last_ack_sent + TTL - MARGIN - Duration::from_millis(1)),
            None
        );
        assert!(l.is_leader());
        // At it: stopped, well before etcd's own expiry at last_ack_sent + TTL.
        let change = l.poll(last_ack_sent + TTL - MARGIN);
        assert!(
            matches!(change, Some(Change::StopLeading { .. })),
            "{change:?}"
        );
        assert!(!l.is_leader());
        assert_eq!(l.poll(last_ack_sent + TTL * 3), None, "stops once");
    }

    #[test]
    fn the_deadline_counts_from_when_the_keep_alive_was_sent_not_answered() {
        let t0 = Instant::now();
        let mut l = leader(t0);
        // A slow answer (1.5 s in flight) extends the lease only to send time + TTL.
        let sent = t0 + Duration::from_millis(500);
        assert_eq!(
            l.keep_alive_acked(sent, TTL, sent + Duration::from_millis(1500)),
            None
        );
        assert_eq!(l.next_deadline(), Some(sent + TTL - MARGIN));
    }

    #[test]
    fn an_older_acknowledgement_does_not_shorten_the_lease() {
        let t0 = Instant::now();
        let mut l = leader(t0);
        let newer = t0 + Duration::from_millis(1000);
        l.keep_alive_acked(newer, TTL, newer);
        l.keep_alive_acked(t0 + Duration::from_millis(500), TTL, newer);
        assert_eq!(l.next_deadline(), Some(newer + TTL - MARGIN));
    }

    #[test]
    fn etcd_saying_the_lease_expired_ends_leadership_at_once() {
        let t0 = Instant::now();
        let mut l = leader(t0);
        let change = l.keep_alive_acked(t0, Duration::ZERO, t0);
        assert!(matches!(change, Some(Change::StopLeading { .. })));
        assert!(!l.lease_alive(t0));
        assert_eq!(l.won(8, t0), None, "no leading without a lease");
    }

    #[test]
    fn a_campaign_won_on_a_lapsed_lease_does_not_lead() {
        let t0 = Instant::now();
        let mut l = Leadership::new(TTL, MARGIN);
        l.lease_granted(t0, TTL);
        assert_eq!(l.won(3, t0 + TTL), None);
        assert!(!l.is_leader());
    }

    #[test]
    fn losing_the_key_or_the_lease_stops_leading_and_a_new_term_has_a_new_fence() {
        let t0 = Instant::now();
        let mut l = leader(t0);
        assert!(matches!(
            l.not_leader("the leader key belongs to c2"),
            Some(Change::StopLeading { .. })
        ));
        assert_eq!(l.not_leader("again"), None);
        assert_eq!(l.won(9, t0), Some(Change::StartLeading { revision: 9 }));
        assert_eq!(l.won(9, t0), None, "the same term is not started twice");
        assert!(matches!(
            l.lease_lost("revoked"),
            Some(Change::StopLeading { .. })
        ));
        assert_eq!(l.role(), &Role::Follower);
    }

    #[test]
    fn the_margin_never_exceeds_half_the_ttl() {
        let t0 = Instant::now();
        let mut l = Leadership::new(Duration::from_secs(1), Duration::from_secs(5));
        l.lease_granted(t0, Duration::from_secs(1));
        assert!(l.lease_alive(t0 + Duration::from_millis(400)));
        assert!(!l.lease_alive(t0 + Duration::from_millis(500)));
    }
}
