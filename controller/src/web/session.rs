//! Web view sessions: the admin token is exchanged once, at the login form, for a random session
//! id kept in a cookie. The controller keeps only each id's SHA-256 (as it keeps only the admin
//! token's), compares digests in constant time, and holds a bounded number of sessions, each with
//! an absolute lifetime. Time is passed in, so the rules are tested without a clock.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use shoal_overlay::pki;

use crate::api::admin::digest_eq;

/// Name of the session cookie.
pub const COOKIE: &str = "shoal_session";

/// How many sessions and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionConfig {
    /// A session ends this long after login, used or not. Default 12 h: a working day, after
    /// which the token is asked for again.
    pub lifetime: Duration,
    /// At most this many live sessions; a login beyond it ends the oldest. Default 64: far more
    /// browsers than one small team uses, and a bound on what logins can make the controller keep.
    pub max_sessions: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            lifetime: Duration::from_secs(12 * 3600),
            max_sessions: 64,
        }
    }
}

#[derive(Debug)]
struct Session {
    digest: [u8; 32],
    expires: Instant,
}

/// The live sessions of one controller (in memory: a restart logs everyone out).
#[derive(Debug)]
pub struct Sessions {
    config: SessionConfig,
    live: Mutex<Vec<Session>>,
}

impl Sessions {
    /// No sessions yet.
    pub fn new(config: SessionConfig) -> Self {
        Self {
            config,
            live: Mutex::new(Vec::new()),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    fn live(&self) -> std::sync::MutexGuard<'_, Vec<Session>> {
        // Every change is a whole push/retain/remove: a panic cannot leave the list half-done.
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a session at `now`; returns the cookie value (256 random bits, hex), which is not
    /// kept. Ends expired sessions, and the oldest one when the bound is reached.
    pub fn create(&self, now: Instant) -> String {
        let id = hex::encode(rand::random::<[u8; 32]>());
        let mut live = self.live();
        live.retain(|s| s.expires > now);
        // Sessions are pushed in login order, so the front is the oldest.
        while live.len() >= self.config.max_sessions.max(1) {
            live.remove(0);
        }
        live.push(Session {
            digest: pki::sha256(id.as_bytes()),
            expires: now + self.config.lifetime,
        });
        id
    }

    /// Whether `presented` is a live session at `now`. Every live session's digest is compared
    /// in constant time, so the answer's timing says nothing about which bytes matched.
    pub fn check(&self, presented: &str, now: Instant) -> bool {
        let digest = pki::sha256(presented.as_bytes());
        let mut live = self.live();
        live.retain(|s| s.expires > now);
        live.iter()
            .fold(false, |found, s| found | digest_eq(&digest, &s.digest))
    }

    /// Ends the session `presented`, if it is one.
    pub fn end(&self, presented: &str) {
        let digest = pki::sha256(presented.as_bytes());
        self.live().retain(|s| !digest_eq(&digest, &s.digest));
    }

    /// Live sessions (expired ones are counted until the next login or check drops them).
    pub fn count(&self) -> usize {
        self.live().len()
    }
}

/// The session cookie's value in a `Cookie` request header, if present.
pub fn cookie_value(header: &str) -> Option<&str> {
    header.split(';').find_map(|pair| {
        let (name, value) = pair.trim().split_once('=')?;
        (name == COOKIE).then_some(value.trim())
    })
}

/// The `Set-Cookie` value for a new session: only over HTTPS (`Secure`), never to scripts
/// (`HttpOnly`), never with a request another site starts (`SameSite=Strict`), only under `/ui`,
/// and gone from the browser when the session ends on the controller.
pub fn set_cookie(id: &str, lifetime: Duration) -> String {
    format!(
        "{COOKIE}={id}; Path=/ui; Max-Age={}; HttpOnly; Secure; SameSite=Strict",
        lifetime.as_secs()
    )
}

/// The `Set-Cookie` value that removes the session cookie.
pub fn clear_cookie() -> String {
    format!("{COOKIE}=; Path=/ui; Max-Age=0; HttpOnly; Secure; SameSite=Strict")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sessions(max: usize) -> Sessions {
        Sessions::new(SessionConfig {
            lifetime: Duration::from_secs(100),
            max_sessions: max,
        })
    }

    #[test]
    fn a_session_lives_for_its_lifetime_and_only_its_id_opens_it() {
        let s = sessions(8);
        let t0 = Instant::now();
        let id = s.create(t0);
        assert_eq!(id.len(), 64);
        assert!(s.check(&id, t0 + Duration::from_secs(99)));
        assert!(!s.check("", t0));
        assert!(!s.check(&id[..63], t0));
        let mut other = id.clone().into_bytes();
        other[0] = if other[0] == b'a' { b'b' } else { b'a' };
        assert!(!s.check(std::str::from_utf8(&other).unwrap(), t0));
        assert!(!s.check(&id, t0 + Duration::from_secs(100)), "expired");
        assert_eq!(s.count(), 0, "the expired session was dropped");
    }

    #[test]
    fn sessions_are_bounded_and_the_oldest_goes_first() {
        let s = sessions(3);
        let t0 = Instant::now();
        let ids: Vec<String> = (0..5)
            .map(|i| s.create(t0 + Duration::from_secs(i)))
            .collect();
        assert_eq!(s.count(), 3);
        let now = t0 + Duration::from_secs(5);
        let open: Vec<bool> = ids.iter().map(|id| s.check(id, now)).collect();
        assert_eq!(open, [false, false, true, true, true]);
        s.end(&ids[3]);
        assert!(!s.check(&ids[3], now), "logged out");
        assert!(s.check(&ids[4], now));
        assert_eq!(s.count(), 2);
    }

    #[test]
    fn the_cookie_is_found_among_others_and_set_with_every_attribute() {
        assert_eq!(cookie_value("a=1; shoal_session=abc ; b=2"), Some("abc"));
        assert_eq!(cookie_value("xshoal_session=abc"), None);
        assert_eq!(cookie_value(""), None);
        let c = set_cookie("abc", Duration::from_secs(60));
        for attr in [
            "Path=/ui",
            "Max-Age=60",
            "HttpOnly",
            "Secure",
            "SameSite=Strict",
        ] {
            assert!(c.contains(attr), "{c}");
        }
        assert!(clear_cookie().contains("Max-Age=0"));
    }
}
