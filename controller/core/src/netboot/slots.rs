//! Concurrency slots per client address and overall, sans-IO: the TFTP server's transfers and the
//! boot HTTP server's connections each take one, so one client (or a flood from many) cannot hold
//! every transfer or connection the servers allow.

use std::{collections::HashMap, net::IpAddr};

/// How many slots there are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotLimits {
    /// Slots held at once, over all clients.
    pub total: usize,
    /// Slots one client address holds at once.
    pub per_client: usize,
}

/// Why no slot was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SlotRefusal {
    /// Every slot is taken.
    #[error("server busy: all {0} slots are in use")]
    Full(usize),
    /// This client holds its share already.
    #[error("this client already holds its {0} slots")]
    ClientFull(usize),
}

/// Slots in use. Memory is bounded by `limits.total`: a client's entry exists only while it holds a
/// slot.
#[derive(Debug)]
pub struct Slots {
    limits: SlotLimits,
    total: usize,
    by_client: HashMap<IpAddr, usize>,
}

impl Slots {
    /// No slot in use.
    pub fn new(limits: SlotLimits) -> Self {
        Self {
            limits,
            total: 0,
            by_client: HashMap::new(),
        }
    }

    /// Takes a slot for `client`; pair it with [`Slots::release`].
    pub fn acquire(&mut self, client: IpAddr) -> Result<(), SlotRefusal> {
        if self.total >= self.limits.total {
            return Err(SlotRefusal::Full(self.limits.total));
        }
        let held = self.by_client.entry(client).or_insert(0);
        if *held >= self.limits.per_client {
            return Err(SlotRefusal::ClientFull(self.limits.per_client));
        }
        *held += 1;
        self.total += 1;
        Ok(())
    }

    /// Gives back a slot `client` took.
    pub fn release(&mut self, client: IpAddr) {
        if let Some(held) = self.by_client.get_mut(&client) {
            *held -= 1;
            self.total -= 1;
            if *held == 0 {
                self.by_client.remove(&client);
            }
        }
    }

    /// Slots in use.
    pub fn in_use(&self) -> usize {
        self.total
    }

    /// Slots `client` holds.
    pub fn held_by(&self, client: IpAddr) -> usize {
        self.by_client.get(&client).copied().unwrap_or(0)
    }
}

/// [`Slots`] shared by a server's tasks; a [`SlotGuard`] gives its slot back when dropped.
#[derive(Debug, Clone)]
pub struct SharedSlots(std::sync::Arc<std::sync::Mutex<Slots>>);

impl SharedSlots {
    /// No slot in use.
    pub fn new(limits: SlotLimits) -> Self {
        Self(std::sync::Arc::new(std::sync::Mutex::new(Slots::new(
            limits,
        ))))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        // The counters stay consistent whatever panicked while holding the lock.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a slot for `client`, held until the guard drops.
    pub fn acquire(&self, client: IpAddr) -> Result<SlotGuard, SlotRefusal> {
        self.lock().acquire(client)?;
        Ok(SlotGuard {
            slots: self.clone(),
            client,
        })
    }

    /// Slots in use.
    pub fn in_use(&self) -> usize {
        self.lock().in_use()
    }

    /// Slots `client` holds.
    pub fn held_by(&self, client: IpAddr) -> usize {
        self.lock().held_by(client)
    }
}

/// One slot, given back on drop.
#[derive(Debug)]
pub struct SlotGuard {
    slots: SharedSlots,
    client: IpAddr,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.slots.lock().release(self.client);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_gets_its_share_and_others_still_get_slots_until_the_total() {
        let (a, b, c): (IpAddr, IpAddr, IpAddr) = (
            "192.0.2.1".parse().unwrap(),
            "192.0.2.2".parse().unwrap(),
            "192.0.2.3".parse().unwrap(),
        );
        let mut s = Slots::new(SlotLimits {
            total: 5,
            per_client: 2,
        });
        assert_eq!(s.acquire(a), Ok(()));
        assert_eq!(s.acquire(a), Ok(()));
        assert_eq!(s.acquire(a), Err(SlotRefusal::ClientFull(2)));
        assert_eq!(s.acquire(b), Ok(()));
        assert_eq!(s.acquire(b), Ok(()));
        assert_eq!(s.acquire(c), Ok(()));
        assert_eq!(s.acquire(c), Err(SlotRefusal::Full(5)), "total reached");
        s.release(a);
        assert_eq!(s.held_by(a), 1);
        assert_eq!(s.acquire(c), Ok(()), "a released slot is free again");
        // Releasing what was never taken changes nothing.
        s.release("198.51.100.1".parse().unwrap());
        assert_eq!(s.in_use(), 5);
    }

    #[test]
    fn guards_give_their_slot_back_and_entries_do_not_outlive_them() {
        let s = SharedSlots::new(SlotLimits {
            total: 2,
            per_client: 1,
        });
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let g = s.acquire(a).expect("slot");
        assert!(matches!(s.acquire(a), Err(SlotRefusal::ClientFull(1))));
        drop(g);
        assert_eq!(s.in_use(), 0);
        assert!(s.lock().by_client.is_empty());
        let _g = s.acquire(a).expect("slot again");
    }
}
