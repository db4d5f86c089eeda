//! The probe step: what is on a drive. [`probe`] reads a drive that is not being prepared;
//! [`Job::probe_and_wipe`] reads through the job's exclusive descriptor, checks a forced serial
//! number, and zeroes a forced drive's signatures.

use std::{fs::File, io, os::unix::fs::FileExt, path::Path};

use tracing::warn;

use super::{
    device::{device_size, read_at},
    error::{list, PrepareError, ProbeError},
    job::{Job, Step},
    layout::{candidate_spans, partition_span, to_usize, valid_disk_name, Span, MIB},
};
use crate::blank::{self, Signature};

/// Where DOS partitioning started the first partition: sector 63.
const DOS_START: usize = 63 * 512;

/// Every signature on a device of `size` bytes, reading through `read(offset, len)`: at both ends
/// of the device, at sector 63 (DOS partitions), and where shoal's partition will be (its first MiB
/// and its last, for either sector size). Sorted, without duplicates; empty means blank.
fn scan(
    size: u64,
    read: &mut dyn FnMut(u64, usize) -> io::Result<Vec<u8>>,
) -> io::Result<Vec<Signature>> {
    let head_len = size.min(2 * MIB);
    let head = read(0, to_usize(head_len))?;
    let tail_len = size.min(MIB);
    let tail = read(size - tail_len, to_usize(tail_len))?;
    let mut found = blank::signatures(&head, &tail, size);
    if let Some(dos) = head.get(DOS_START..) {
        found.extend(blank::signatures(dos, &[], size - DOS_START as u64));
    }
    if let Some(part_head) = head.get(to_usize(MIB)..) {
        for span in candidate_spans(size) {
            let part_tail = read(span.end - MIB, to_usize(MIB))?;
            found.extend(blank::signatures(part_head, &part_tail, span.len()));
        }
    }
    found.sort();
    found.dedup();
    Ok(found)
}

/// The ranges a forced prepare zeroes: everything [`scan`] reads.
fn wipe_ranges(size: u64) -> Vec<(u64, u64)> {
    let mut ranges = vec![
        (0, size.min(2 * MIB)),
        (size - size.min(MIB), size.min(MIB)),
    ];
    ranges.extend(
        candidate_spans(size)
            .into_iter()
            .map(|s| (s.end - MIB, MIB)),
    );
    ranges
}

/// What is on drive `disk` (`<dev_dir>/<disk>`): every signature [`blank::signatures`] finds at
/// either end of the device, or at the start or end of where a partition would be (1 MiB, and
/// sector 63). Empty means blank. Opens the device read-only and writes nothing.
pub fn probe(dev_dir: &Path, disk: &str) -> Result<Vec<Signature>, ProbeError> {
    if !valid_disk_name(disk) {
        return Err(ProbeError::BadName {
            disk: disk.to_owned(),
        });
    }
    let path = dev_dir.join(disk);
    let file = File::open(&path).map_err(|source| ProbeError::Open {
        path: path.clone(),
        source,
    })?;
    let read = |source| ProbeError::Read {
        path: path.clone(),
        source,
    };
    let size = device_size(&file).map_err(read)?;
    scan(size, &mut |off, len| read_at(&file, off, len)).map_err(read)
}

impl Job<'_> {
    /// Reads what is on the drive through the exclusive descriptor `file` and checks a
    /// `force_serial` against `serial`; a drive with data is refused unless forced, and then its
    /// signatures are zeroed ([`Step::Wipe`]). The drive's size and where the partition goes.
    pub(super) fn probe_and_wipe(
        &mut self,
        file: &File,
        sector: u64,
        serial: Option<&str>,
        force_serial: Option<&str>,
    ) -> Result<(u64, Span), PrepareError> {
        let disk = self.disk.to_owned();
        let read_err = |source| PrepareError::Read {
            disk: disk.clone(),
            source,
        };
        let size = device_size(file).map_err(read_err)?;
        let span = partition_span(size, sector).ok_or_else(|| PrepareError::TooSmall {
            disk: disk.clone(),
            size,
        })?;
        let found = scan(size, &mut |off, len| read_at(file, off, len)).map_err(read_err)?;
        if let Some(given) = force_serial {
            let Some(serial) = serial.map(str::trim).filter(|s| !s.is_empty()) else {
                return Err(PrepareError::NoSerial { disk: disk.clone() });
            };
            if given.trim() != serial {
                return Err(PrepareError::WrongSerial {
                    disk: disk.clone(),
                    serial: serial.to_owned(),
                    given: given.to_owned(),
                });
            }
        }
        if !found.is_empty() {
            if force_serial.is_none() {
                return Err(PrepareError::HasData { signatures: found });
            }
            warn!(signatures = %list(&found), "forced with the drive's serial number: zeroing its signatures");
            self.step(Step::Wipe)?;
            let write_err = |source| PrepareError::Write {
                disk: disk.clone(),
                step: Step::Wipe,
                source,
            };
            for (offset, len) in wipe_ranges(size) {
                file.write_all_at(&vec![0; to_usize(len)], offset)
                    .map_err(write_err)?;
            }
            file.sync_all().map_err(write_err)?;
            let left = scan(size, &mut |off, len| read_at(file, off, len)).map_err(read_err)?;
            if !left.is_empty() {
                return Err(PrepareError::WipeIncomplete {
                    disk: disk.clone(),
                    signatures: left,
                });
            }
        }
        Ok((size, span))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(size: u64) -> Vec<u8> {
        vec![0; to_usize(size)]
    }

    fn scan_image(img: &[u8]) -> Vec<Signature> {
        scan(img.len() as u64, &mut |off, len| {
            Ok(img[to_usize(off)..to_usize(off) + len].to_vec())
        })
        .expect("scan")
    }

    fn put(img: &mut [u8], at: u64, bytes: &[u8]) {
        img[to_usize(at)..to_usize(at) + bytes.len()].copy_from_slice(bytes);
    }

    #[test]
    fn a_zeroed_device_is_blank() {
        for size in [0, 4096, 3 * MIB, 16 * MIB, 16 * MIB + 12345] {
            assert_eq!(scan_image(&image(size)), vec![], "{size}");
        }
    }

    #[test]
    fn filesystems_of_wiped_partition_tables_are_found() {
        const SIZE: u64 = 16 * MIB;
        // `wipefs /dev/sdX` removes the GPT; the first partition's ext4 at 1 MiB remains.
        let mut img = image(SIZE);
        put(&mut img, MIB + 1080, &[0x53, 0xef]);
        assert!(blank::signatures(
            &img[..blank::HEAD_LEN],
            &img[to_usize(SIZE) - blank::TAIL_LEN..],
            SIZE
        )
        .is_empty());
        assert_eq!(scan_image(&img), vec![Signature::Ext]);
        // A DOS partition at sector 63 holding XFS.
        let mut img = image(SIZE);
        put(&mut img, 63 * 512, b"XFSB");
        assert_eq!(scan_image(&img), vec![Signature::Xfs]);
        // An md 1.0 superblock at the end of a partition where ours would end.
        let mut img = image(SIZE);
        let span = partition_span(SIZE, 512).expect("span");
        put(&mut img, span.end - 8192, &0xa92b_4efc_u32.to_le_bytes());
        assert_eq!(scan_image(&img), vec![Signature::MdRaid]);
        // And what the ends show is still found.
        let mut img = image(SIZE);
        put(&mut img, SIZE - 512, b"EFI PART");
        assert_eq!(scan_image(&img), vec![Signature::Gpt]);
    }

    #[test]
    fn zeroing_the_wipe_ranges_leaves_nothing_the_scan_finds() {
        for size in [16 * MIB, 16 * MIB + 17408, 5 * MIB] {
            let mut img = image(size);
            let span = partition_span(size, 512).expect("span");
            put(&mut img, 510, &[0x55, 0xaa]);
            put(&mut img, 512, b"EFI PART");
            put(&mut img, size - 512, b"EFI PART");
            put(&mut img, 63 * 512, b"XFSB");
            put(&mut img, MIB + 1080, &[0x53, 0xef]);
            put(&mut img, span.end - 8192, &0xa92b_4efc_u32.to_le_bytes());
            assert!(!scan_image(&img).is_empty());
            for (off, len) in wipe_ranges(size) {
                img[to_usize(off)..to_usize(off + len)].fill(0);
            }
            assert_eq!(scan_image(&img), vec![], "{size}");
        }
    }
}
