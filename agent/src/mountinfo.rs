//! The kernel's mount tables: `/proc/self/mountinfo` parsed into [`MountEntry`]s (for the drives:
//! what is mounted where, by device number), and [`unescape_octal`], the kernel's escaping of
//! paths, which `/proc/self/mounts` (read by the health report) uses too.
//!
//! The parsers are pure functions over text; [`read_mountinfo`] and [`mounted`] are their thin
//! shells.

use std::{
    ffi::OsString,
    fs, io,
    os::unix::ffi::OsStringExt,
    path::{Path, PathBuf},
};

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Major number of the mounted device.
    pub major: u32,
    /// Minor number of the mounted device.
    pub minor: u32,
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// Filesystem type.
    pub fstype: String,
    /// Mount source (`/dev/sdb1`).
    pub source: String,
}

/// Parses `/proc/self/mountinfo` (proc(5)); lines that do not parse are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let (_id, _parent, dev, _root, mount_point) = (
                fields.next()?,
                fields.next()?,
                fields.next()?,
                fields.next()?,
                fields.next()?,
            );
            let (major, minor) = dev.split_once(':')?;
            // Optional fields end with a lone "-".
            let mut rest = fields.skip_while(|f| *f != "-").skip(1);
            let (fstype, source) = (rest.next()?, rest.next()?);
            Some(MountEntry {
                major: major.parse().ok()?,
                minor: minor.parse().ok()?,
                mount_point: PathBuf::from(OsString::from_vec(unescape_octal(mount_point))),
                fstype: fstype.to_owned(),
                source: String::from_utf8_lossy(&unescape_octal(source)).into_owned(),
            })
        })
        .collect()
}

/// Undoes the kernel's octal escaping of space, tab, newline and backslash in mount tables
/// (`\040`). A backslash not followed by three octal digits of a byte's value stays as it is.
pub fn unescape_octal(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let digits = bytes.get(i + 1..i + 4);
        let code = digits
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)))
            .map(|d| d.iter().fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0')))
            .and_then(|code| u8::try_from(code).ok());
        match code {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    out
}

/// This process's mount table.
pub fn read_mountinfo() -> io::Result<Vec<MountEntry>> {
    Ok(parse_mountinfo(&fs::read_to_string(
        "/proc/self/mountinfo",
    )?))
}

/// Whether something is mounted at `mount_point` (as `/proc/self/mountinfo` spells it).
pub fn mounted(mount_point: &Path) -> bool {
    read_mountinfo().is_ok_and(|m| m.iter().any(|e| e.mount_point == mount_point))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sysfs::DevNumber;

    #[test]
    fn mountinfo_lines_parse_with_escapes_and_optional_fields() {
        let text = "\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard
120 27 259:3 / /var/lib/shoal/drives/0b5e0c2a-1f3d-4c7e-9a2b-3c4d5e6f7a8b rw,nosuid,nodev shared:5 master:1 - xfs /dev/nvme0n1p1 rw
121 27 0:50 / /mnt/with\\040space rw - tmpfs tmp\\134fs rw
garbage
";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 3);
        assert_eq!(
            (m[0].major, m[0].minor, m[0].fstype.as_str()),
            (254, 0, "ext4")
        );
        assert_eq!(
            m[1].mount_point,
            Path::new("/var/lib/shoal/drives/0b5e0c2a-1f3d-4c7e-9a2b-3c4d5e6f7a8b")
        );
        assert_eq!(
            (
                m[1].major,
                m[1].minor,
                m[1].fstype.as_str(),
                m[1].source.as_str()
            ),
            (259, 3, "xfs", "/dev/nvme0n1p1")
        );
        assert_eq!(m[2].mount_point, Path::new("/mnt/with space"));
        assert_eq!(m[2].source, "tmp\\fs");
        assert_eq!(
            DevNumber::parse("259:3\n"),
            Some(DevNumber {
                major: 259,
                minor: 3
            })
        );
        assert_eq!(DevNumber::parse("259"), None);
    }

    #[test]
    fn octal_unescape() {
        assert_eq!(unescape_octal(r"/mnt/a\040b\011c\134d"), b"/mnt/a b\tc\\d");
        assert_eq!(unescape_octal(r"/plain"), b"/plain");
        // Truncated or non-octal escapes stay as they are.
        assert_eq!(unescape_octal(r"/x\04"), br"/x\04");
        assert_eq!(unescape_octal(r"/x\089"), br"/x\089");
        assert_eq!(unescape_octal("/caf\u{e9}\\040"), "/caf\u{e9} ".as_bytes());
    }
}
