//! Reading the kernel's attribute files (sysfs, and procfs text such as `cpuinfo`): the one set of
//! readers every part of the agent uses.
//!
//! Nothing here fails or panics on what the kernel (or a fixture tree) holds: a missing,
//! unreadable or blank attribute is `None`, `false` or an empty list. Readers take full paths, so
//! tests point them at fixture trees.

use std::{fmt, fs, io, path::Path};

use tracing::debug;

/// A file's contents, non-UTF-8 bytes replaced; `None` if it cannot be read (missing, permission,
/// `EINVAL` from sysfs).
pub fn read_text(path: &Path) -> Option<String> {
    match fs::read(path) {
        Ok(bytes) => Some(String::from_utf8_lossy(&bytes).into_owned()),
        Err(err) => {
            unreadable(path, &err);
            None
        }
    }
}

/// An attribute trimmed; `None` if unreadable or blank. Non-UTF-8 bytes are replaced: for text
/// shown to people (DMI strings, interface state).
pub fn read_attr(path: &Path) -> Option<String> {
    read_text(path).and_then(|s| non_empty(s.trim()))
}

/// An attribute trimmed; `None` if unreadable, blank or not UTF-8. For a disk's model and serial
/// number: a serial with replaced bytes would be made up, and the controller keys a drive's
/// history and `--force` on it.
pub fn read_utf8_attr(path: &Path) -> Option<String> {
    match fs::read_to_string(path) {
        Ok(s) => non_empty(s.trim()),
        Err(err) => {
            unreadable(path, &err);
            None
        }
    }
}

/// A number attribute (`size`, `start`, `diskseq`); `None` if unreadable or not a number.
pub fn read_u64(path: &Path) -> Option<u64> {
    read_attr(path)?.parse().ok()
}

/// Whether the attribute `file` in `dir` is `1` (`ro`, `removable`, `hidden`); false when
/// unreadable.
pub fn flag(dir: &Path, file: &str) -> bool {
    read_attr(&dir.join(file)).as_deref() == Some("1")
}

/// The names in a directory (`holders/`), sorted; empty when it cannot be listed.
pub fn sorted_entries(dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

/// A device number, `major:minor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DevNumber {
    /// Major number (8 for SCSI disks, 7 for loop, 259 for NVMe and other extended devices).
    pub major: u32,
    /// Minor number.
    pub minor: u32,
}

impl fmt::Display for DevNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

impl DevNumber {
    /// `8:16` as in sysfs `dev` files (and mountinfo's third field).
    pub fn parse(s: &str) -> Option<Self> {
        let (major, minor) = s.trim().split_once(':')?;
        Some(Self {
            major: major.parse().ok()?,
            minor: minor.parse().ok()?,
        })
    }

    /// The `dev` attribute of the sysfs device directory `dir`.
    pub fn read(dir: &Path) -> Option<Self> {
        read_attr(&dir.join("dev")).and_then(|s| Self::parse(&s))
    }
}

fn unreadable(path: &Path, err: &io::Error) {
    // Missing attributes are normal (no `device/serial` on SATA); anything else is worth a trace.
    if err.kind() != io::ErrorKind::NotFound {
        debug!(path = %path.display(), cause = %err, "unreadable attribute");
    }
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_trimmed_and_blank_or_missing_ones_are_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        let write =
            |name: &str, bytes: &[u8]| fs::write(dir.path().join(name), bytes).expect("write");
        write("model", b"  Samsung SSD  \n");
        write("blank", b"   \n");
        write("latin1", b"Caf\xe9\n");
        write("size", b"2048\n");
        write("ro", b"1\n");
        write("dev", b"259:3\n");
        assert_eq!(
            read_attr(&dir.path().join("model")).as_deref(),
            Some("Samsung SSD")
        );
        assert_eq!(read_attr(&dir.path().join("blank")), None);
        assert_eq!(read_attr(&dir.path().join("missing")), None);
        assert_eq!(
            read_attr(&dir.path().join("latin1")).as_deref(),
            Some("Caf\u{fffd}")
        );
        assert_eq!(read_utf8_attr(&dir.path().join("latin1")), None);
        assert_eq!(
            read_utf8_attr(&dir.path().join("model")).as_deref(),
            Some("Samsung SSD")
        );
        assert_eq!(read_u64(&dir.path().join("size")), Some(2048));
        assert_eq!(read_u64(&dir.path().join("model")), None);
        assert!(flag(dir.path(), "ro") && !flag(dir.path(), "missing"));
        assert_eq!(
            DevNumber::read(dir.path()),
            Some(DevNumber {
                major: 259,
                minor: 3
            })
        );
        assert_eq!(DevNumber::parse("259"), None);
    }
}
