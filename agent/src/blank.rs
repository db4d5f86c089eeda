//! Blank-drive detection: is there a partition table, filesystem, LVM, RAID or ZFS signature on it?
//!
//! Sans-IO: [`signatures`] looks at the first and last bytes of a device (read by the caller, at
//! least [`HEAD_LEN`] and [`TAIL_LEN`] where the device is that large) and names every signature it
//! finds, at the offsets the formats define (the same places `blkid`/`wipefs` look). A drive is
//! blank when it finds none. Preparing a drive (GPT, mkfs) is only ever offered for blank drives,
//! so a false "blank" would destroy data: each format is checked at every place it can live,
//! including the end-of-device copies (GPT backup header, md 0.90/1.0 superblocks, ZFS labels 2 and
//! 3).

/// Bytes from the start of the device [`signatures`] wants: ZFS labels 0 and 1 (512 KiB).
pub const HEAD_LEN: usize = 512 * 1024;
/// Bytes from the end of the device [`signatures`] wants: ZFS labels 2 and 3 and md 0.90 (512 KiB).
pub const TAIL_LEN: usize = 512 * 1024;

/// Something found on a device that makes it not blank.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Signature {
    /// A GPT header (primary, or the backup in the last sector).
    Gpt,
    /// The 0x55AA boot signature: an MBR partition table, a protective MBR, or a FAT/NTFS boot
    /// sector.
    BootSector,
    /// ext2/3/4.
    Ext,
    /// XFS.
    Xfs,
    /// btrfs.
    Btrfs,
    /// FAT (vfat).
    Fat,
    /// NTFS.
    Ntfs,
    /// Linux swap.
    Swap,
    /// An LVM2 physical volume label.
    LvmPv,
    /// A Linux md RAID superblock (0.90, 1.0, 1.1 or 1.2).
    MdRaid,
    /// A ZFS vdev label (uberblock magic).
    Zfs,
    /// A LUKS encrypted volume header.
    Luks,
    /// An ISO 9660 filesystem.
    Iso9660,
}

impl std::fmt::Display for Signature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Signature::Gpt => "GPT partition table",
            Signature::BootSector => "MBR / boot sector",
            Signature::Ext => "ext2/3/4 filesystem",
            Signature::Xfs => "XFS filesystem",
            Signature::Btrfs => "btrfs filesystem",
            Signature::Fat => "FAT filesystem",
            Signature::Ntfs => "NTFS filesystem",
            Signature::Swap => "Linux swap",
            Signature::LvmPv => "LVM2 physical volume",
            Signature::MdRaid => "Linux RAID (md) member",
            Signature::Zfs => "ZFS pool member",
            Signature::Luks => "LUKS encrypted volume",
            Signature::Iso9660 => "ISO 9660 filesystem",
        })
    }
}

const MD_MAGIC: [u8; 4] = 0xa92b_4efc_u32.to_le_bytes();
const ZFS_UBERBLOCK_MAGIC: u64 = 0x00ba_b10c;

/// Every signature found. `head` is the start of the device, `tail` its end, `size` its size in
/// bytes (they may overlap on a small device). Sorted, without duplicates; empty means blank.
pub fn signatures(head: &[u8], tail: &[u8], size: u64) -> Vec<Signature> {
    let at = |off: usize, magic: &[u8]| head.get(off..off + magic.len()) == Some(magic);
    // Bytes at an absolute device offset that falls inside `tail`.
    let tail_start = size.saturating_sub(tail.len() as u64);
    let at_end = |abs: u64, magic: &[u8]| {
        let Some(rel) = abs
            .checked_sub(tail_start)
            .and_then(|r| usize::try_from(r).ok())
        else {
            return false;
        };
        tail.get(rel..rel + magic.len()) == Some(magic)
    };
    let mut found = Vec::new();

    // GPT: header in LBA 1 (512- or 4096-byte sectors); backup header in the last LBA.
    if at(512, b"EFI PART")
        || at(4096, b"EFI PART")
        || at_end(size.saturating_sub(512), b"EFI PART")
        || at_end(size.saturating_sub(4096), b"EFI PART")
    {
        found.push(Signature::Gpt);
    }
    if at(510, &[0x55, 0xaa]) {
        found.push(Signature::BootSector);
    }
    if at(1024 + 56, &[0x53, 0xef]) {
        found.push(Signature::Ext);
    }
    if at(0, b"XFSB") {
        found.push(Signature::Xfs);
    }
    if at(65536 + 64, b"_BHRfS_M") {
        found.push(Signature::Btrfs);
    }
    if at(82, b"FAT32   ") || at(54, b"FAT12   ") || at(54, b"FAT16   ") || at(54, b"FAT     ") {
        found.push(Signature::Fat);
    }
    if at(3, b"NTFS    ") {
        found.push(Signature::Ntfs);
    }
    // Swap: the magic ends the first page, whatever the page size.
    if [4096usize, 8192, 16384, 65536]
        .iter()
        .any(|p| at(p - 10, b"SWAPSPACE2") || at(p - 10, b"SWAP-SPACE"))
    {
        found.push(Signature::Swap);
    }
    // LVM2: "LABELONE" in one of the first four sectors, "LVM2 001" 24 bytes into the label.
    if (0..4)
        .map(|s| s * 512)
        .any(|off| at(off, b"LABELONE") && at(off + 24, b"LVM2 001"))
    {
        found.push(Signature::LvmPv);
    }
    if md_superblock(&at, &at_end, size) {
        found.push(Signature::MdRaid);
    }
    if zfs_label(head, 0) || zfs_label(head, 256 * 1024) || zfs_end_labels(tail, tail_start, size) {
        found.push(Signature::Zfs);
    }
    if at(0, b"LUKS\xba\xbe") {
        found.push(Signature::Luks);
    }
    if at(32769, b"CD001") {
        found.push(Signature::Iso9660);
    }
    found.sort();
    found.dedup();
    found
}

fn md_superblock(
    at: &dyn Fn(usize, &[u8]) -> bool,
    at_end: &dyn Fn(u64, &[u8]) -> bool,
    size: u64,
) -> bool {
    // 1.1 at the start, 1.2 at 4 KiB.
    if at(0, &MD_MAGIC) || at(4096, &MD_MAGIC) {
        return true;
    }
    // 1.0: 8 KiB from the end, rounded down to 4 KiB.
    let sectors = size / 512;
    if sectors >= 16 && at_end(((sectors - 16) & !7) * 512, &MD_MAGIC) {
        return true;
    }
    // 0.90: the last 64 KiB-aligned 64 KiB block.
    let aligned = size & !(65536 - 1);
    aligned >= 65536 && at_end(aligned - 65536, &MD_MAGIC)
}

/// A ZFS label at `offset` in `buf`: its uberblock array (128 KiB into the label, 1 KiB or larger
/// slots) holds the uberblock magic, in either byte order.
fn zfs_label(buf: &[u8], offset: usize) -> bool {
    let array = offset + 128 * 1024;
    (0..128).any(|slot| {
        let at = array + slot * 1024;
        buf.get(at..at + 8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .is_some_and(|b| {
                u64::from_le_bytes(b) == ZFS_UBERBLOCK_MAGIC
                    || u64::from_be_bytes(b) == ZFS_UBERBLOCK_MAGIC
            })
    })
}

/// ZFS labels 2 and 3: the last two 256 KiB blocks of the device, size aligned down to 256 KiB.
fn zfs_end_labels(tail: &[u8], tail_start: u64, size: u64) -> bool {
    let aligned = size & !(256 * 1024 - 1);
    [2u64, 1].iter().any(|n| {
        let Some(abs) = aligned.checked_sub(n * 256 * 1024) else {
            return false;
        };
        match abs
            .checked_sub(tail_start)
            .and_then(|r| usize::try_from(r).ok())
        {
            Some(rel) => zfs_label(tail, rel),
            None => false,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u64 = 64 << 20;

    /// A zeroed device image of `SIZE` bytes, as head and tail buffers.
    fn blank() -> (Vec<u8>, Vec<u8>) {
        (vec![0; HEAD_LEN], vec![0; TAIL_LEN])
    }

    fn put(buf: &mut [u8], off: usize, bytes: &[u8]) {
        buf[off..off + bytes.len()].copy_from_slice(bytes);
    }

    fn tail_off(abs: u64) -> usize {
        usize::try_from(abs - (SIZE - TAIL_LEN as u64)).expect("in tail")
    }

    #[test]
    fn zeroed_device_is_blank() {
        let (h, t) = blank();
        assert!(signatures(&h, &t, SIZE).is_empty());
        // A device smaller than the buffers, and an empty one.
        assert!(signatures(&[0; 4096], &[0; 4096], 4096).is_empty());
        assert!(signatures(&[], &[], 0).is_empty());
    }

    #[test]
    fn each_start_of_device_signature_is_found() {
        let cases: &[(usize, &[u8], Signature)] = &[
            (512, b"EFI PART", Signature::Gpt),
            (4096, b"EFI PART", Signature::Gpt),
            (510, &[0x55, 0xaa], Signature::BootSector),
            (1080, &[0x53, 0xef], Signature::Ext),
            (0, b"XFSB", Signature::Xfs),
            (65600, b"_BHRfS_M", Signature::Btrfs),
            (82, b"FAT32   ", Signature::Fat),
            (3, b"NTFS    ", Signature::Ntfs),
            (4086, b"SWAPSPACE2", Signature::Swap),
            (65526, b"SWAPSPACE2", Signature::Swap),
            (0, &MD_MAGIC, Signature::MdRaid),
            (4096, &MD_MAGIC, Signature::MdRaid),
            (0, b"LUKS\xba\xbe", Signature::Luks),
            (32769, b"CD001", Signature::Iso9660),
        ];
        for (off, magic, sig) in cases {
            let (mut h, t) = blank();
            put(&mut h, *off, magic);
            assert_eq!(signatures(&h, &t, SIZE), vec![*sig], "{sig} at {off}");
        }
    }

    #[test]
    fn lvm_label_needs_both_magics_in_one_of_the_first_sectors() {
        let (mut h, t) = blank();
        put(&mut h, 512, b"LABELONE");
        assert!(
            signatures(&h, &t, SIZE).is_empty(),
            "LABELONE alone is not LVM2"
        );
        put(&mut h, 512 + 24, b"LVM2 001");
        assert_eq!(signatures(&h, &t, SIZE), vec![Signature::LvmPv]);
    }

    #[test]
    fn end_of_device_copies_are_found() {
        // GPT backup header only (primary wiped).
        let (h, mut t) = blank();
        put(&mut t, tail_off(SIZE - 512), b"EFI PART");
        assert_eq!(signatures(&h, &t, SIZE), vec![Signature::Gpt]);
        // md 1.0: 8 KiB from the end.
        let (h, mut t) = blank();
        put(&mut t, tail_off(SIZE - 8192), &MD_MAGIC);
        assert_eq!(signatures(&h, &t, SIZE), vec![Signature::MdRaid]);
        // md 0.90: the last 64 KiB block.
        let (h, mut t) = blank();
        put(&mut t, tail_off(SIZE - 65536), &MD_MAGIC);
        assert_eq!(signatures(&h, &t, SIZE), vec![Signature::MdRaid]);
        // ZFS label 3 (last 256 KiB), uberblock slot 5, little-endian.
        let (h, mut t) = blank();
        put(
            &mut t,
            tail_off(SIZE - 256 * 1024 + 128 * 1024 + 5 * 1024),
            &ZFS_UBERBLOCK_MAGIC.to_le_bytes(),
        );
        assert_eq!(signatures(&h, &t, SIZE), vec![Signature::Zfs]);
    }

    #[test]
    fn zfs_label_zero_in_either_byte_order() {
        for magic in [
            ZFS_UBERBLOCK_MAGIC.to_le_bytes(),
            ZFS_UBERBLOCK_MAGIC.to_be_bytes(),
        ] {
            let (mut h, t) = blank();
            put(&mut h, 128 * 1024, &magic);
            assert_eq!(signatures(&h, &t, SIZE), vec![Signature::Zfs]);
        }
    }

    #[test]
    fn gpt_disk_shows_gpt_and_protective_mbr() {
        let (mut h, mut t) = blank();
        put(&mut h, 510, &[0x55, 0xaa]);
        put(&mut h, 512, b"EFI PART");
        put(&mut t, tail_off(SIZE - 512), b"EFI PART");
        assert_eq!(
            signatures(&h, &t, SIZE),
            vec![Signature::Gpt, Signature::BootSector]
        );
    }

    fn head_and_tail(path: &std::path::Path, size: u64) -> (Vec<u8>, Vec<u8>) {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::File::open(path).expect("open image");
        let mut head = vec![0; HEAD_LEN];
        f.read_exact(&mut head).expect("read head");
        let mut tail = vec![0; TAIL_LEN];
        f.seek(SeekFrom::Start(size - TAIL_LEN as u64))
            .expect("seek");
        f.read_exact(&mut tail).expect("read tail");
        (head, tail)
    }

    /// Real tools on a sparse image file. A tool this host lacks is skipped (the others still
    /// run), or fails the test where host tests are required.
    #[test]
    fn real_mkfs_outputs_are_not_blank() {
        use std::process::Command;

        use shoal_testkit::{cmd, skip};

        let tools: &[(&str, &str, &[&str], Signature)] = &[
            ("mkfs.ext4", "e2fsprogs", &["-q", "-F"], Signature::Ext),
            ("mkswap", "util-linux", &[], Signature::Swap),
            ("mkfs.xfs", "xfsprogs", &["-q", "-f"], Signature::Xfs),
            ("mkfs.btrfs", "btrfs-progs", &["-q", "-f"], Signature::Btrfs),
            ("mkfs.vfat", "dosfstools", &["-F", "32"], Signature::Fat),
            ("sgdisk", "gdisk", &["-o"], Signature::Gpt),
        ];
        let wipefs = skip::tool("wipefs", "util-linux")
            .inspect_err(|missing| skip::skip(module_path!(), missing))
            .ok();
        let dir = tempfile::tempdir().expect("tempdir");
        for (tool, package, args, expected) in tools {
            let program = match skip::tool(tool, package) {
                Ok(program) => program,
                Err(missing) => {
                    skip::skip(module_path!(), &missing);
                    continue;
                }
            };
            let path = dir.path().join(format!("{tool}.img"));
            let size: u64 = 320 << 20; // XFS's minimum is 300 MB
            std::fs::File::create(&path)
                .and_then(|f| f.set_len(size))
                .expect("image");
            cmd::run(Command::new(program).args(*args).arg(&path))
                .unwrap_or_else(|e| panic!("{e:#}"));
            let (head, tail) = head_and_tail(&path, size);
            let found = signatures(&head, &tail, size);
            assert!(found.contains(expected), "{tool}: {found:?}");
            // Wiped with wipefs, it is blank again (the tool this module must agree with).
            if let Some(wipefs) = &wipefs {
                cmd::run(Command::new(wipefs).args(["-a", "-f"]).arg(&path))
                    .unwrap_or_else(|e| panic!("{e:#}"));
                let (head, tail) = head_and_tail(&path, size);
                let found = signatures(&head, &tail, size);
                assert!(found.is_empty(), "{tool} after wipefs: {found:?}");
            }
        }
    }
}
