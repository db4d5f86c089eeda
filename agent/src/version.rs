//! The version this agent reports, with a patchable slot.
//!
//! The binary carries [`VERSION_SLOT_MAGIC`] followed by 64 bytes, all zero in a normal build, in
//! which case the version is `CARGO_PKG_VERSION`. A NUL-terminated version written into those bytes
//! (after the magic, in a copy of the file) makes the binary report that version instead. That
//! gives the update tests a second, genuinely different agent binary without a second cargo build
//! (which, in a fresh target directory, recompiles every dependency). Nothing else reads the slot.

/// The 16 bytes that precede the version slot in the binary; appears once in it.
pub const VERSION_SLOT_MAGIC: [u8; 16] = *b"\0SHOALVERSLOT\x01\x02\0";
/// Bytes in the slot after the magic.
pub const VERSION_SLOT_LEN: usize = 64;

const fn slot() -> [u8; 16 + VERSION_SLOT_LEN] {
    let mut s = [0u8; 16 + VERSION_SLOT_LEN];
    let mut i = 0;
    while i < 16 {
        s[i] = VERSION_SLOT_MAGIC[i];
        i += 1;
    }
    s
}

#[used]
static VERSION_SLOT: [u8; 16 + VERSION_SLOT_LEN] = slot();

/// The agent's version: the patched slot if it holds a valid release name, else
/// `CARGO_PKG_VERSION`.
pub fn agent_version() -> String {
    // black_box: the compiler must read the bytes in the file, not the zeros it knows were put
    // there.
    let bytes = std::hint::black_box(&VERSION_SLOT);
    parse_slot(&bytes[16..]).unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_owned())
}

fn parse_slot(slot: &[u8]) -> Option<String> {
    let end = slot.iter().position(|b| *b == 0).unwrap_or(slot.len());
    let text = std::str::from_utf8(&slot[..end]).ok()?;
    shoal_proto::check_release_name(text).ok()?;
    Some(text.to_owned())
}

/// Writes `version` into the slot of a binary's bytes (for tests and release tooling). Fails if the
/// magic is not found exactly once or the version does not fit.
pub fn patch_version(binary: &mut [u8], version: &str) -> Result<(), String> {
    shoal_proto::check_release_name(version).map_err(|e| e.to_string())?;
    if version.len() >= VERSION_SLOT_LEN {
        return Err(format!(
            "version {version:?} is longer than {} bytes",
            VERSION_SLOT_LEN - 1
        ));
    }
    let found: Vec<usize> = binary
        .windows(16)
        .enumerate()
        .filter(|(_, w)| *w == VERSION_SLOT_MAGIC)
        .map(|(i, _)| i)
        .collect();
    let [at] = found[..] else {
        return Err(format!(
            "the version slot magic occurs {} times, not once",
            found.len()
        ));
    };
    let slot = &mut binary[at + 16..at + 16 + VERSION_SLOT_LEN];
    slot.fill(0);
    slot[..version.len()].copy_from_slice(version.as_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_slot_means_the_package_version_and_a_patched_one_its_content() {
        assert_eq!(agent_version(), env!("CARGO_PKG_VERSION"));
        assert_eq!(parse_slot(&[0; VERSION_SLOT_LEN]), None);
        let mut fake = b"head".to_vec();
        fake.extend(slot());
        fake.extend(b"tail");
        patch_version(&mut fake, "0.2.0-test").expect("patched");
        assert_eq!(parse_slot(&fake[4 + 16..]), Some("0.2.0-test".into()));
        assert!(patch_version(&mut fake, "../x").is_err());
        let mut twice = fake.clone();
        twice.extend(slot());
        assert!(patch_version(&mut twice, "1").is_err());
    }
}
