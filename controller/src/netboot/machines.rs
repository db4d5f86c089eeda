//! Machines seen on the netboot network (before and after they enrol), the admission policy, DHCP
//! leases, per-node image assignments, the IEEE OUI vendor table, and Wake-on-LAN packets.
//!
//! Persisted in sled trees of the controller's store (postcard values):
//!
//! | tree | key | value |
//! |---|---|---|
//! | `netboot_machines` | MAC (6 bytes) | [`MachineRecord`] |
//! | `netboot_leases` | MAC (6 bytes) | [`Lease`] |
//! | `netboot_node_images` | node id | image version (UTF-8) |
//!
//! `netboot_machines` is capped ([`DEFAULT_MAX_MACHINES`], `NetbootConfig::max_machines`): every
//! PXE client's DHCP packet would otherwise add a row, and anyone on the LAN can send them with
//! made-up MACs. At the cap, a MAC not yet in the table is not recorded ([`MachineStore::seen`]
//! returns `None` and counts it); the DHCP server still answers it by the admission policy, so with
//! the default policy a new machine still boots, it is just not listed. An operator's `shoalctl
//! machines admit MAC` always records the machine, cap or not.

use std::{
    collections::HashMap,
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use serde::{Deserialize, Serialize};
use shoal_proto::{NodeId, UnixMillis};

use super::dhcp::{Arch, Lease, Mac};
use crate::store::{RawTable, Store, StoreError};

const MACHINES: &str = "netboot_machines";
const LEASES: &str = "netboot_leases";
const NODE_IMAGES: &str = "netboot_node_images";

/// Default cap of the machine table.
pub const DEFAULT_MAX_MACHINES: usize = 10_000;

/// Debian's `ieee-data` OUI list.
pub const OUI_FILE: &str = "/usr/share/ieee-data/oui.txt";

/// What the controller knows about a machine seen by its DHCP server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineRecord {
    /// Its MAC address.
    pub mac: Mac,
    /// Architecture from DHCP option 93.
    pub arch: Option<Arch>,
    /// Whether it asked as a PXE client.
    pub pxe: bool,
    /// First DHCP packet seen.
    pub first_seen: UnixMillis,
    /// Latest DHCP packet seen.
    pub last_seen: UnixMillis,
    /// Admitted to boot (by policy or by an operator).
    pub admitted: bool,
    /// Latest image version served to it.
    pub last_image: Option<String>,
    /// When it last fetched its boot script.
    pub last_boot: Option<UnixMillis>,
}

/// Whether new PXE clients boot at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AdmissionPolicy {
    /// Every PXE client boots (default).
    #[default]
    AdmitAll,
    /// New PXE clients wait for `shoalctl machines admit MAC`.
    Hold,
}

fn db(e: StoreError) -> StoreError {
    e
}

fn corrupt(tree: &str, e: postcard::Error) -> StoreError {
    StoreError::Corrupt {
        key: tree.to_owned(),
        cause: e.to_string(),
    }
}

/// Whether an update may create the machine's record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Create {
    /// Only below the cap.
    IfRoom,
    /// Always (an operator's decision).
    Always,
}

/// The netboot trees of the controller's store.
#[derive(Debug, Clone)]
pub struct MachineStore {
    store: Store,
    machines: RawTable,
    leases: RawTable,
    node_images: RawTable,
    max_machines: usize,
    /// Rows in `machines`; held while a row may be created, so the cap is exact.
    count: Arc<Mutex<usize>>,
    /// New MACs not recorded because the table was full, since start.
    not_recorded: Arc<AtomicU64>,
}

impl MachineStore {
    /// Opens the trees in `store`; the machine table holds at most `max_machines` rows.
    pub fn open(store: &Store, max_machines: usize) -> Result<MachineStore, StoreError> {
        let machines = store.table(MACHINES);
        let count = machines.len();
        Ok(MachineStore {
            store: store.clone(),
            machines,
            leases: store.table(LEASES),
            node_images: store.table(NODE_IMAGES),
            max_machines,
            count: Arc::new(Mutex::new(count)),
            not_recorded: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Rows in the machine table.
    pub fn count(&self) -> usize {
        *self.count.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// New MACs not recorded since start because the table was full.
    pub fn not_recorded(&self) -> u64 {
        self.not_recorded.load(Ordering::Relaxed)
    }

    /// The cap of the machine table.
    pub fn max_machines(&self) -> usize {
        self.max_machines
    }

    /// One machine.
    pub fn machine(&self, mac: &Mac) -> Result<Option<MachineRecord>, StoreError> {
        match self.machines.get(mac.0).map_err(db)? {
            Some(v) => Ok(Some(
                postcard::from_bytes(&v).map_err(|e| corrupt(MACHINES, e))?,
            )),
            None => Ok(None),
        }
    }

    /// All machines, by MAC.
    pub fn machines(&self) -> Result<Vec<MachineRecord>, StoreError> {
        self.machines
            .iter()
            .map(|item| {
                let (_, v) = item.map_err(db)?;
                postcard::from_bytes(&v).map_err(|e| corrupt(MACHINES, e))
            })
            .collect()
    }

    /// Records a DHCP packet from `mac`; creates the record (admitted per `policy`) on first sight.
    /// `None` when `mac` is new and the table is full: nothing is recorded (and it is counted in
    /// [`MachineStore::not_recorded`]).
    pub fn seen(
        &self,
        mac: Mac,
        arch: Option<Arch>,
        pxe: bool,
        policy: AdmissionPolicy,
        now: UnixMillis,
    ) -> Result<Option<MachineRecord>, StoreError> {
        self.update(mac, now, policy, Create::IfRoom, |m| {
            m.last_seen = now;
            if arch.is_some() {
                m.arch = arch;
            }
            m.pxe |= pxe;
        })
    }

    /// Admits a machine (creating its record if it was never seen, even at the cap: an operator
    /// asked).
    pub fn admit(&self, mac: Mac, now: UnixMillis) -> Result<MachineRecord, StoreError> {
        self.update(mac, now, AdmissionPolicy::AdmitAll, Create::Always, |m| {
            m.admitted = true
        })?
        .ok_or_else(|| StoreError::Db("machine record not written".into()))
    }

    /// Notes that `mac` fetched a boot script for `image`; `None` when it is new and the table is
    /// full.
    pub fn booted(
        &self,
        mac: Mac,
        image: &str,
        now: UnixMillis,
    ) -> Result<Option<MachineRecord>, StoreError> {
        self.update(mac, now, AdmissionPolicy::AdmitAll, Create::IfRoom, |m| {
            m.last_image = Some(image.to_owned());
            m.last_boot = Some(now);
        })
    }

    fn update(
        &self,
        mac: Mac,
        now: UnixMillis,
        policy: AdmissionPolicy,
        create: Create,
        f: impl Fn(&mut MachineRecord),
    ) -> Result<Option<MachineRecord>, StoreError> {
        self.store.check_space()?;
        let mut count = self.count.lock().unwrap_or_else(|p| p.into_inner());
        let exists = self.machines.contains_key(mac.0).map_err(db)?;
        if !exists && create == Create::IfRoom && *count >= self.max_machines {
            self.not_recorded.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        }
        // Writers of this table hold `count`; the transaction keeps the read and write together.
        let out = self.store.transaction::<_, StoreError>(&[MACHINES], |tx| {
            let machines = tx.table(MACHINES);
            let old = machines.get(mac.0)?;
            let mut m = old
                .and_then(|b| postcard::from_bytes::<MachineRecord>(&b).ok())
                .unwrap_or(MachineRecord {
                    mac,
                    arch: None,
                    pxe: false,
                    first_seen: now,
                    last_seen: now,
                    admitted: policy == AdmissionPolicy::AdmitAll,
                    last_image: None,
                    last_boot: None,
                });
            f(&mut m);
            match postcard::to_allocvec(&m) {
                Ok(bytes) => {
                    machines.insert(mac.0, bytes)?;
                    Ok(Some(m))
                }
                Err(_) => Ok(None),
            }
        })?;
        if !exists {
            *count += 1;
        }
        out.map(Some)
            .ok_or_else(|| StoreError::Db("cannot encode machine record".into()))
    }

    /// All persisted leases.
    pub fn leases(&self) -> Result<Vec<Lease>, StoreError> {
        self.leases
            .iter()
            .map(|item| {
                let (_, v) = item.map_err(db)?;
                postcard::from_bytes(&v).map_err(|e| corrupt(LEASES, e))
            })
            .collect()
    }

    /// Stores a lease; on disk when this returns.
    pub fn put_lease(&self, lease: &Lease) -> Result<(), StoreError> {
        self.store.check_space()?;
        let bytes = postcard::to_allocvec(lease).map_err(|e| StoreError::Db(e.to_string()))?;
        self.leases.insert(lease.mac.0, bytes).map_err(db)?;
        self.leases.flush()?;
        Ok(())
    }

    /// Deletes a lease.
    pub fn delete_lease(&self, mac: &Mac) -> Result<(), StoreError> {
        self.leases.remove(mac.0).map_err(db)?;
        self.leases.flush()?;
        Ok(())
    }

    /// The image assigned to a node.
    pub fn node_image(&self, node: &NodeId) -> Result<Option<String>, StoreError> {
        Ok(self
            .node_images
            .get(node.0.as_bytes())
            .map_err(db)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Assigns an image to a node.
    pub fn set_node_image(&self, node: &NodeId, version: &str) -> Result<(), StoreError> {
        self.store.check_space()?;
        self.node_images
            .insert(node.0.as_bytes(), version.as_bytes())
            .map_err(db)?;
        self.node_images.flush()?;
        Ok(())
    }

    /// Removes a node's image assignment.
    pub fn clear_node_image(&self, node: &NodeId) -> Result<(), StoreError> {
        self.node_images.remove(node.0.as_bytes()).map_err(db)?;
        self.node_images.flush()?;
        Ok(())
    }
}

/// Vendor names by OUI (the first three bytes of a MAC).
#[derive(Debug, Default)]
pub struct OuiTable {
    vendors: HashMap<[u8; 3], String>,
}

impl OuiTable {
    /// Loads `oui.txt` (lines `00-00-0C (hex)\t\tCisco Systems, Inc`); an empty table if
    /// unreadable.
    pub fn load(path: &Path) -> OuiTable {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text),
            Err(e) => {
                tracing::warn!(path = %path.display(), cause = %e, "no OUI list: vendors will not be shown (install ieee-data)");
                OuiTable::default()
            }
        }
    }

    /// Parses the text of `oui.txt`.
    pub fn parse(text: &str) -> OuiTable {
        let mut vendors = HashMap::new();
        for line in text.lines() {
            let Some((prefix, rest)) = line.split_once("(hex)") else {
                continue;
            };
            let hex: String = prefix.trim().chars().filter(|c| *c != '-').collect();
            let Ok(bytes) = hex::decode(&hex) else {
                continue;
            };
            let Ok(key) = <[u8; 3]>::try_from(bytes.as_slice()) else {
                continue;
            };
            vendors.insert(key, rest.trim().to_owned());
        }
        OuiTable { vendors }
    }

    /// The vendor of a MAC; locally administered addresses (like QEMU's 52:54:00) have none.
    pub fn vendor(&self, mac: &Mac) -> Option<&str> {
        if mac.0[0] & 0x02 != 0 {
            return None;
        }
        self.vendors
            .get(&[mac.0[0], mac.0[1], mac.0[2]])
            .map(String::as_str)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.vendors.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.vendors.is_empty()
    }
}

/// A Wake-on-LAN magic packet: six 0xff bytes, then the MAC sixteen times.
pub fn magic_packet(mac: &Mac) -> [u8; 102] {
    let mut p = [0xffu8; 102];
    for i in 0..16 {
        p[6 + i * 6..12 + i * 6].copy_from_slice(&mac.0);
    }
    p
}

#[cfg(test)]
mod tests {
    use shoal_testkit::{require, Missing};

    use super::*;

    #[test]
    fn oui_lines_parse_and_local_macs_have_no_vendor() {
        let t = OuiTable::parse("OUI/MA-L\t\tOrganization\n00-00-0C   (hex)\t\tCisco Systems, Inc\n00000C     (base 16)\t\tCisco Systems, Inc\n\nbroken (hex)\n");
        assert_eq!(t.len(), 1);
        assert_eq!(
            t.vendor(&Mac([0, 0, 0x0c, 1, 2, 3])),
            Some("Cisco Systems, Inc")
        );
        assert_eq!(t.vendor(&Mac([0x52, 0x54, 0, 1, 2, 3])), None);
    }

    #[test]
    fn debian_oui_list_knows_intel_when_installed() {
        let installed = Path::new(OUI_FILE).exists();
        require!(Missing::check((!installed).then(|| format!(
            "{OUI_FILE} is missing (Debian package ieee-data); run scripts/deps"
        ))));
        let t = OuiTable::load(Path::new(OUI_FILE));
        assert!(t
            .vendor(&Mac([0x00, 0x1b, 0x21, 0, 0, 1]))
            .is_some_and(|v| v.contains("Intel")));
    }

    #[test]
    fn magic_packet_layout() {
        let mac = Mac([1, 2, 3, 4, 5, 6]);
        let p = magic_packet(&mac);
        assert_eq!(&p[..6], &[0xff; 6]);
        assert!(p[6..].chunks(6).all(|c| c == mac.0));
    }

    #[test]
    fn machines_and_leases_persist() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mac = Mac([2, 0, 0, 0, 0, 1]);
        {
            let store = Store::open(dir.path()).expect("store");
            let ms = MachineStore::open(&store, DEFAULT_MAX_MACHINES).expect("trees");
            let m = ms
                .seen(
                    mac,
                    Some(Arch::Bios),
                    true,
                    AdmissionPolicy::Hold,
                    UnixMillis(5),
                )
                .expect("seen")
                .expect("recorded");
            assert!(!m.admitted);
            let m = ms
                .seen(mac, None, false, AdmissionPolicy::AdmitAll, UnixMillis(9))
                .expect("seen")
                .expect("recorded");
            assert!(!m.admitted, "policy applies only at first sight");
            assert_eq!(
                (m.first_seen, m.last_seen, m.arch),
                (UnixMillis(5), UnixMillis(9), Some(Arch::Bios))
            );
            ms.admit(mac, UnixMillis(10)).expect("admit");
            ms.put_lease(&Lease {
                mac,
                ip: "192.0.2.10".parse().expect("ip"),
                expires: UnixMillis(99),
            })
            .expect("lease");
            store.flush().expect("flush");
        }
        let store = Store::open(dir.path()).expect("store");
        let ms = MachineStore::open(&store, DEFAULT_MAX_MACHINES).expect("trees");
        assert!(ms.machine(&mac).expect("get").expect("present").admitted);
        assert_eq!(ms.leases().expect("leases").len(), 1);
        assert_eq!(ms.count(), 1, "the row count is loaded at open");
    }

    #[test]
    fn the_machine_table_is_capped_but_known_and_admitted_machines_are_still_recorded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let ms = MachineStore::open(&store, 3).expect("trees");
        for i in 0..3 {
            assert!(ms
                .seen(
                    Mac([2, 0, 0, 0, 0, i]),
                    None,
                    true,
                    AdmissionPolicy::AdmitAll,
                    UnixMillis(1)
                )
                .expect("seen")
                .is_some());
        }
        let new = Mac([2, 0, 0, 0, 0, 9]);
        assert_eq!(
            ms.seen(new, None, true, AdmissionPolicy::AdmitAll, UnixMillis(2))
                .expect("seen"),
            None,
            "table full"
        );
        assert_eq!(ms.booted(new, "v1", UnixMillis(2)).expect("booted"), None);
        assert_eq!(ms.not_recorded(), 2);
        assert_eq!((ms.machines().expect("list").len(), ms.count()), (3, 3));
        // A known machine is still updated.
        let known = ms
            .seen(
                Mac([2, 0, 0, 0, 0, 1]),
                Some(Arch::UefiX64),
                true,
                AdmissionPolicy::AdmitAll,
                UnixMillis(3),
            )
            .expect("seen")
            .expect("known");
        assert_eq!(
            (known.last_seen, known.arch),
            (UnixMillis(3), Some(Arch::UefiX64))
        );
        // An operator's admit goes past the cap.
        assert!(ms.admit(new, UnixMillis(4)).expect("admit").admitted);
        assert_eq!(ms.count(), 4);
        // Reopened, the count is the table's.
        drop(ms);
        let ms = MachineStore::open(&store, 3).expect("trees");
        assert_eq!(ms.count(), 4);
        assert_eq!(
            ms.seen(
                Mac([2, 0, 0, 0, 0, 10]),
                None,
                true,
                AdmissionPolicy::AdmitAll,
                UnixMillis(5)
            )
            .expect("seen"),
            None
        );
    }
}
