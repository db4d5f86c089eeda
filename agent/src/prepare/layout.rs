//! Sans-IO: names (of disks, labels, UUIDs) and where shoal's one partition goes.

/// The GPT partition name that marks a partition as shoal's.
pub const PARTITION_NAME: &str = "shoal";

pub(super) const MIB: u64 = 1 << 20;

/// A kernel block device name that names a node directly in `/dev`: ASCII letters, digits, `-`, `_`
/// and `.`, not starting with `.`.
pub fn valid_disk_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// The filesystem label: `shoal-` and the last 6 letters and digits of the serial number, or of the
/// filesystem UUID for a drive without one. At most 12 characters, XFS's limit.
pub fn fs_label(serial: Option<&str>, fs_uuid: &str) -> String {
    fn last6(s: &str) -> String {
        let alnum: Vec<char> = s.chars().filter(char::is_ascii_alphanumeric).collect();
        alnum[alnum.len().saturating_sub(6)..].iter().collect()
    }
    let tail = serial
        .map(last6)
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| last6(fs_uuid));
    format!("shoal-{tail}")
}

/// 16 bytes as a UUID in the usual lowercase hyphenated form.
pub(super) fn format_uuid(b: &[u8; 16]) -> String {
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// A random (version 4) UUID.
pub(super) fn new_uuid() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    format_uuid(&b)
}

/// Byte range of a partition, `end` exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Span {
    pub(super) start: u64,
    pub(super) end: u64,
}

impl Span {
    pub(super) fn len(self) -> u64 {
        self.end - self.start
    }
}

/// Where shoal's one partition goes on a device of `size` bytes with `sector`-byte logical blocks:
/// from 1 MiB to the end of the last usable LBA (before the backup GPT) rounded down to a MiB.
/// `None` when that leaves less than a MiB or the sector size is not 512 or 4096.
pub(super) fn partition_span(size: u64, sector: u64) -> Option<Span> {
    if sector != 512 && sector != 4096 {
        return None;
    }
    let lbas = size / sector;
    // The backup header is the last LBA; the backup entry array (128 × 128 bytes) is just before
    // it.
    let last_usable = lbas.checked_sub(2 + 16384u64.div_ceil(sector))?;
    let end = (last_usable + 1) * sector / MIB * MIB;
    (end >= 2 * MIB).then_some(Span { start: MIB, end })
}

/// The partition spans for either sector size (the probe does not know which one the drive has).
pub(super) fn candidate_spans(size: u64) -> Vec<Span> {
    let mut spans: Vec<Span> = [512, 4096]
        .iter()
        .filter_map(|s| partition_span(size, *s))
        .collect();
    spans.dedup();
    spans
}

pub(super) fn to_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blockdev::partition_name;

    #[test]
    fn disk_names_and_partition_names() {
        for ok in ["sda", "nvme0n1", "loop3", "mmcblk0", "vd-a_b.c"] {
            assert!(valid_disk_name(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "../sda",
            "sda/..",
            "cciss!c0d0",
            "a b",
            ".hidden",
            &"x".repeat(65),
        ] {
            assert!(!valid_disk_name(bad), "{bad:?}");
        }
        assert_eq!(partition_name("sdb", 1), "sdb1");
        assert_eq!(partition_name("vdaa", 2), "vdaa2");
        assert_eq!(partition_name("nvme0n1", 1), "nvme0n1p1");
        assert_eq!(partition_name("loop3", 1), "loop3p1");
        assert_eq!(partition_name("mmcblk0", 1), "mmcblk0p1");
    }

    #[test]
    fn label_is_the_serial_tail_or_the_uuid_tail_and_fits_xfs() {
        let uuid = "0b5e0c2a-1f3d-4c7e-9a2b-3c4d5e6f7a8b";
        assert_eq!(fs_label(Some("WD-WCC4N7XYZ123"), uuid), "shoal-XYZ123");
        assert_eq!(fs_label(Some("/tmp/.tmpAb/disk.img"), uuid), "shoal-iskimg");
        assert_eq!(fs_label(Some("  A1 "), uuid), "shoal-A1");
        assert_eq!(fs_label(None, uuid), "shoal-6f7a8b");
        assert_eq!(
            fs_label(Some("--"), uuid),
            "shoal-6f7a8b",
            "a serial without letters or digits"
        );
        for serial in [Some("S3Z9NB0K123456789"), None] {
            assert!(fs_label(serial, uuid).len() <= 12);
        }
    }

    #[test]
    fn uuids_are_random_version_4() {
        let a = new_uuid();
        let b = new_uuid();
        assert_ne!(a, b);
        let parts: Vec<&str> = a.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(a
            .chars()
            .all(|c| c == '-' || c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert!(parts[2].starts_with('4'));
        assert!(matches!(
            parts[3].chars().next(),
            Some('8' | '9' | 'a' | 'b')
        ));
    }

    #[test]
    fn partition_goes_from_1_mib_to_the_last_usable_mib() {
        // 64 MiB of 512-byte sectors: last usable LBA 131038, so the partition ends at 63 MiB.
        assert_eq!(
            partition_span(64 * MIB, 512),
            Some(Span {
                start: MIB,
                end: 63 * MIB
            })
        );
        assert_eq!(
            partition_span(64 * MIB, 4096),
            Some(Span {
                start: MIB,
                end: 63 * MIB
            })
        );
        // Half a MiB beyond a MiB boundary is room for the backup GPT: the partition ends at the
        // boundary.
        assert_eq!(
            partition_span(64 * MIB + 512 * 1024, 512),
            Some(Span {
                start: MIB,
                end: 64 * MIB
            })
        );
        assert_eq!(
            partition_span(64 * MIB + 16 * 1024, 512),
            Some(Span {
                start: MIB,
                end: 63 * MIB
            })
        );
        assert_eq!(
            partition_span(64 * MIB + 17408, 512),
            Some(Span {
                start: MIB,
                end: 64 * MIB
            })
        );
        assert_eq!(
            partition_span(64 * MIB + 17408, 4096),
            Some(Span {
                start: MIB,
                end: 63 * MIB
            })
        );
        assert_eq!(
            partition_span(3 * MIB, 512),
            Some(Span {
                start: MIB,
                end: 2 * MIB
            })
        );
        assert_eq!(partition_span(2 * MIB, 512), None);
        assert_eq!(partition_span(0, 512), None);
        assert_eq!(partition_span(64 * MIB, 1024), None);
    }
}
