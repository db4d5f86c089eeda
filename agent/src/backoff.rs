//! Jittered exponential backoff for reconnects, with the randomness passed in.

use std::time::Duration;

/// Reconnect delays: doubling from `base` up to `max`, each drawn uniformly from its upper half
/// ("equal jitter"), so a fleet that lost its controller at once does not return in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// A backoff from `base` to `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            attempt: 0,
        }
    }

    /// The next delay; `unit` is a random number in `[0, 1)`.
    pub fn next_delay(&mut self, unit: f64) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = ceiling / 2;
        half + half.mul_f64(unit.clamp(0.0, 1.0))
    }

    /// Back to the shortest delay after a healthy session.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_with_jitter_then_resets() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        assert_eq!(b.next_delay(0.0), Duration::from_millis(250));
        assert!(b.next_delay(0.999).as_millis() < 1000);
        for _ in 0..20 {
            let d = b.next_delay(0.5);
            assert!(d <= Duration::from_secs(30));
        }
        assert_eq!(b.next_delay(0.0), Duration::from_secs(15));
        b.reset();
        assert_eq!(b.next_delay(1.0), Duration::from_millis(500));
    }
}
