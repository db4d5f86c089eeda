//! The backup archive: its format, its checks, and its encryption. No file or network I/O: bytes
//! in, bytes out, so the parser can be fuzzed and every check tested directly.
//!
//! On disk an archive is an [age] file encrypted with a passphrase (scrypt, work factor
//! 2^[`WORK_FACTOR`]). Inside (the *content*):
//!
//! ```text
//! magic "SHOALDR\0" (8) | format version, u16 BE (2) | body length, u64 BE (8)
//!   | SHA-256 of the body (32) | body: postcard of [`Archive`]
//! ```
//!
//! [`Archive`] is a [`Manifest`] (controller version, creation time, counts, what the data dir
//! held that the archive leaves out), every store table with its entries, and the data dir's files
//! ([`FILES`]). age's MAC already detects any change; the length and hash say *damaged* in plain
//! words even if a future change made the encryption optional, and guard the decoder.
//!
//! The file is untrusted input — it comes back from a password manager, a USB stick or a backup
//! target after months. Everything is bounded before it is kept: the decrypted size
//! ([`MAX_CONTENT_BYTES`], read through a limit, never trusting a length field), the scrypt work
//! factor a file may demand ([`MAX_WORK_FACTOR`]), tables, entries, key sizes, file names (an
//! allow-list, so a file can never name a path outside the data dir) and sizes; keys must be
//! strictly ascending and the manifest's counts must match. The fuzz target
//! `controller/fuzz/fuzz_targets/dr_archive.rs` and the unit tests below feed it garbage.
//!
//! [age]: https://age-encryption.org/v1

use std::io::Read;

use age::secrecy::SecretString;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use shoal_proto::UnixMillis;

use crate::store::TableDump;

/// The content's first bytes.
pub const MAGIC: &[u8; 8] = b"SHOALDR\0";

/// The format this code writes and reads.
pub const FORMAT_VERSION: u16 = 1;

/// Magic, version, length and hash.
const HEADER_BYTES: usize = 8 + 2 + 8 + 32;

/// scrypt work factor (log2 N) archives are sealed with: 2^18 takes some 256 MiB and about a second.
pub const WORK_FACTOR: u8 = 18;

/// Largest scrypt work factor a file may demand before it is refused (2^20: 1 GiB of memory).
pub const MAX_WORK_FACTOR: u8 = 20;

/// Largest decrypted content accepted or written.
pub const MAX_CONTENT_BYTES: u64 = shoal_api::dr::MAX_ARCHIVE_BYTES - (16 << 20);

/// Most tables in one archive.
pub const MAX_TABLES: usize = 256;

/// Most entries in one archive, over all tables.
pub const MAX_ENTRIES: u64 = 16 << 20;

/// Longest table name.
pub const MAX_TABLE_NAME: usize = 64;

/// Longest key.
pub const MAX_KEY_BYTES: usize = 64 << 10;

/// Largest file.
pub const MAX_FILE_BYTES: usize = 1 << 20;

/// Longest manifest string (controller version, an item left out).
pub const MAX_TEXT: usize = 512;

/// Most items the manifest lists as left out.
pub const MAX_LEFT_OUT: usize = 4096;

/// The data dir's files an archive carries: the only names it may hold, and each is required.
pub const FILES: [&str; 4] = [
    crate::registry::ca::CA_CERT_FILE,
    crate::registry::ca::CA_KEY_FILE,
    shoal_api::ADMIN_CONF_FILE,
    // Without it the backup targets' sealed secrets in the store do not open.
    crate::backups::secrets::SECRETS_KEY_FILE,
];

/// Why an archive could not be written or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ArchiveError {
    /// The passphrase is too short (or absurdly long).
    #[error("{0}")]
    WeakPassphrase(String),
    /// The bytes are not an age file encrypted with a passphrase.
    #[error("not a shoal controller backup: not a passphrase-encrypted age file")]
    NotAnArchive,
    /// The passphrase does not open the file.
    #[error("wrong passphrase: the backup does not decrypt with it")]
    WrongPassphrase,
    /// The file is damaged or truncated (age's MAC, the length or the hash disagree).
    #[error("the backup is damaged or truncated: {0}")]
    Damaged(String),
    /// The file demands more scrypt work than [`MAX_WORK_FACTOR`] allows.
    #[error("the backup demands an scrypt work factor of 2^{required}; at most 2^{MAX_WORK_FACTOR} is accepted")]
    ExcessiveWork {
        /// What the file asks for.
        required: u8,
    },
    /// Larger than a bound.
    #[error("the backup is larger than {limit} bytes")]
    TooLarge {
        /// The bound.
        limit: u64,
    },
    /// A format this controller does not know (a newer one).
    #[error(
        "backup format {0} is not supported by this controller (it reads format {FORMAT_VERSION})"
    )]
    UnsupportedVersion(u16),
    /// The content decrypted and hashed correctly but breaks the format's rules.
    #[error("the backup's content is invalid: {0}")]
    Invalid(String),
    /// Encryption failed.
    #[error("cannot encrypt the backup: {0}")]
    Encrypt(String),
}

/// What an archive says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The version of the controller that wrote it.
    pub controller_version: String,
    /// When its snapshot was taken.
    pub created_at: UnixMillis,
    /// Node records in the store.
    pub nodes: u64,
    /// Tables.
    pub tables: u64,
    /// Entries, over all tables.
    pub entries: u64,
    /// Files.
    pub files: u64,
    /// What the data dir held that the archive leaves out (`releases/<version>/<target>`,
    /// `images/<version>`): to upload again after a restore.
    pub left_out: Vec<String>,
}

/// One store table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchivedTable {
    /// Its name.
    pub name: String,
    /// Its entries, keys strictly ascending.
    pub entries: Vec<(Vec<u8>, Vec<u8>)>,
}

impl From<TableDump> for ArchivedTable {
    fn from(t: TableDump) -> Self {
        ArchivedTable {
            name: t.name,
            entries: t.entries,
        }
    }
}

/// One file of the data dir.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchivedFile {
    /// Its name in the data dir, one of [`FILES`].
    pub name: String,
    /// Its permission bits (masked to 0o777 when written).
    pub mode: u32,
    /// Its bytes.
    pub bytes: Vec<u8>,
}

/// Everything a controller needs to be the same fleet again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Archive {
    /// What it holds.
    pub manifest: Manifest,
    /// The store, table by table, in name order.
    pub tables: Vec<ArchivedTable>,
    /// The data dir's files.
    pub files: Vec<ArchivedFile>,
}

impl Archive {
    /// The file called `name`.
    pub fn file(&self, name: &str) -> Option<&ArchivedFile> {
        self.files.iter().find(|f| f.name == name)
    }

    /// Checks every rule of the format (see the module docs).
    pub fn check(&self) -> Result<(), ArchiveError> {
        let invalid = |m: String| Err(ArchiveError::Invalid(m));
        let m = &self.manifest;
        if m.controller_version.len() > MAX_TEXT {
            return invalid("the controller version is too long".into());
        }
        if m.left_out.len() > MAX_LEFT_OUT || m.left_out.iter().any(|s| s.len() > MAX_TEXT) {
            return invalid("the list of what was left out is too long".into());
        }
        if self.tables.len() > MAX_TABLES {
            return invalid(format!(
                "{} tables, at most {MAX_TABLES}",
                self.tables.len()
            ));
        }
        let mut entries = 0u64;
        let mut previous: Option<&str> = None;
        for t in &self.tables {
            if t.name.is_empty()
                || t.name.len() > MAX_TABLE_NAME
                || !t
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_')
            {
                return invalid(format!("bad table name {:?}", truncate(&t.name)));
            }
            if previous.is_some_and(|p| p >= t.name.as_str()) {
                return invalid(format!("table {} is out of order or repeated", t.name));
            }
            previous = Some(&t.name);
            entries = entries.saturating_add(t.entries.len() as u64);
            if entries > MAX_ENTRIES {
                return invalid(format!("more than {MAX_ENTRIES} entries"));
            }
            let mut last: Option<&[u8]> = None;
            for (k, _) in &t.entries {
                if k.len() > MAX_KEY_BYTES {
                    return invalid(format!("a key of table {} is too long", t.name));
                }
                if last.is_some_and(|l| l >= k.as_slice()) {
                    return invalid(format!("keys of table {} are out of order", t.name));
                }
                last = Some(k);
            }
        }
        for f in &self.files {
            if !FILES.contains(&f.name.as_str()) {
                return invalid(format!("unexpected file {:?}", truncate(&f.name)));
            }
            if f.bytes.len() > MAX_FILE_BYTES {
                return invalid(format!(
                    "file {} is larger than {MAX_FILE_BYTES} bytes",
                    f.name
                ));
            }
            if self.files.iter().filter(|g| g.name == f.name).count() > 1 {
                return invalid(format!("file {} appears twice", f.name));
            }
        }
        if let Some(missing) = FILES.iter().find(|n| self.file(n).is_none()) {
            return invalid(format!("file {missing} is missing"));
        }
        if m.tables != self.tables.len() as u64
            || m.entries != entries
            || m.files != self.files.len() as u64
        {
            return invalid("the manifest's counts do not match the content".into());
        }
        Ok(())
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

/// The content bytes of `archive` (checked first: nothing is written that would be refused).
pub fn encode(archive: &Archive) -> Result<Vec<u8>, ArchiveError> {
    archive.check()?;
    let body = postcard::to_allocvec(archive).map_err(|e| ArchiveError::Invalid(e.to_string()))?;
    if (HEADER_BYTES + body.len()) as u64 > MAX_CONTENT_BYTES {
        return Err(ArchiveError::TooLarge {
            limit: MAX_CONTENT_BYTES,
        });
    }
    let mut out = Vec::with_capacity(HEADER_BYTES + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
    out.extend_from_slice(&(body.len() as u64).to_be_bytes());
    out.extend_from_slice(&Sha256::digest(&body));
    out.extend_from_slice(&body);
    Ok(out)
}

/// The archive in `content` (decrypted bytes), after every check.
pub fn decode(content: &[u8]) -> Result<Archive, ArchiveError> {
    if content.len() as u64 > MAX_CONTENT_BYTES {
        return Err(ArchiveError::TooLarge {
            limit: MAX_CONTENT_BYTES,
        });
    }
    if content.len() < HEADER_BYTES {
        if content.len() >= MAGIC.len() && &content[..MAGIC.len()] != MAGIC {
            return Err(ArchiveError::Invalid("no shoal backup header".into()));
        }
        return Err(ArchiveError::Damaged(format!(
            "{} bytes, shorter than the {HEADER_BYTES}-byte header",
            content.len()
        )));
    }
    let (header, body) = content.split_at(HEADER_BYTES);
    if &header[..8] != MAGIC {
        return Err(ArchiveError::Invalid("no shoal backup header".into()));
    }
    let version = u16::from_be_bytes([header[8], header[9]]);
    if version != FORMAT_VERSION {
        return Err(ArchiveError::UnsupportedVersion(version));
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&header[10..18]);
    let len = u64::from_be_bytes(len);
    if len != body.len() as u64 {
        return Err(ArchiveError::Damaged(format!(
            "the header says {len} bytes of content, {} are present",
            body.len()
        )));
    }
    if Sha256::digest(body).as_slice() != &header[18..50] {
        return Err(ArchiveError::Damaged(
            "the content's SHA-256 does not match".into(),
        ));
    }
    // postcard allocates no more than the input holds: a length prefix larger than what follows
    // fails when the bytes run out.
    let (archive, rest): (Archive, _) =
        postcard::take_from_bytes(body).map_err(|e| ArchiveError::Invalid(e.to_string()))?;
    if !rest.is_empty() {
        return Err(ArchiveError::Invalid(format!(
            "{} bytes after the content",
            rest.len()
        )));
    }
    archive.check()?;
    Ok(archive)
}

/// Encrypts `content` with `passphrase` at scrypt work factor 2^`work_factor`.
pub fn seal(content: &[u8], passphrase: &str, work_factor: u8) -> Result<Vec<u8>, ArchiveError> {
    shoal_api::dr::check_passphrase(passphrase).map_err(ArchiveError::WeakPassphrase)?;
    if !(1..=MAX_WORK_FACTOR).contains(&work_factor) {
        return Err(ArchiveError::Encrypt(format!(
            "work factor {work_factor} is outside 1..={MAX_WORK_FACTOR}"
        )));
    }
    let mut recipient = age::scrypt::Recipient::new(SecretString::from(passphrase.to_owned()));
    recipient.set_work_factor(work_factor);
    let encryptor =
        age::Encryptor::with_recipients(std::iter::once(&recipient as &dyn age::Recipient))
            .map_err(|e| ArchiveError::Encrypt(e.to_string()))?;
    let mut out = Vec::with_capacity(content.len() + content.len() / 4096 + 1024);
    let encrypt = |e: std::io::Error| ArchiveError::Encrypt(e.to_string());
    let mut writer = encryptor.wrap_output(&mut out).map_err(encrypt)?;
    std::io::Write::write_all(&mut writer, content).map_err(encrypt)?;
    writer.finish().map_err(encrypt)?;
    Ok(out)
}

/// Decrypts `sealed` with `passphrase`, reading at most [`MAX_CONTENT_BYTES`].
pub fn unseal(sealed: &[u8], passphrase: &str) -> Result<Vec<u8>, ArchiveError> {
    if !sealed.starts_with(b"age-encryption.org/") {
        return Err(ArchiveError::NotAnArchive);
    }
    let decryptor = age::Decryptor::new_buffered(sealed).map_err(decrypt_error)?;
    if !decryptor.is_scrypt() {
        return Err(ArchiveError::NotAnArchive);
    }
    let mut identity = age::scrypt::Identity::new(SecretString::from(passphrase.to_owned()));
    identity.set_max_work_factor(MAX_WORK_FACTOR);
    let reader = decryptor
        .decrypt(std::iter::once(&identity as &dyn age::Identity))
        .map_err(decrypt_error)?;
    let mut content = Vec::new();
    reader
        .take(MAX_CONTENT_BYTES + 1)
        .read_to_end(&mut content)
        .map_err(|e| ArchiveError::Damaged(format!("decryption: {e}")))?;
    if content.len() as u64 > MAX_CONTENT_BYTES {
        return Err(ArchiveError::TooLarge {
            limit: MAX_CONTENT_BYTES,
        });
    }
    Ok(content)
}

fn decrypt_error(e: age::DecryptError) -> ArchiveError {
    use age::DecryptError as D;
    match e {
        D::DecryptionFailed | D::KeyDecryptionFailed | D::NoMatchingKeys => {
            ArchiveError::WrongPassphrase
        }
        D::ExcessiveWork { required, .. } => ArchiveError::ExcessiveWork { required },
        D::UnknownFormat => ArchiveError::NotAnArchive,
        D::InvalidHeader => ArchiveError::Damaged("the age header is invalid".into()),
        D::InvalidMac => ArchiveError::Damaged("the age header's MAC does not match".into()),
        D::Io(e) => ArchiveError::Damaged(format!("reading the age header: {e}")),
    }
}

/// [`encode`] then [`seal`].
pub fn pack(archive: &Archive, passphrase: &str, work_factor: u8) -> Result<Vec<u8>, ArchiveError> {
    // Refuse a weak passphrase before the work of encoding.
    shoal_api::dr::check_passphrase(passphrase).map_err(ArchiveError::WeakPassphrase)?;
    seal(&encode(archive)?, passphrase, work_factor)
}

/// [`unseal`] then [`decode`].
pub fn open(sealed: &[u8], passphrase: &str) -> Result<Archive, ArchiveError> {
    if sealed.len() as u64 > shoal_api::dr::MAX_ARCHIVE_BYTES {
        return Err(ArchiveError::TooLarge {
            limit: shoal_api::dr::MAX_ARCHIVE_BYTES,
        });
    }
    decode(&unseal(sealed, passphrase)?)
}

/// Runs the content decoder on arbitrary bytes; the fuzz target's entry point. It must return
/// (an error, mostly) without panicking and without allocating beyond the input's size.
pub fn fuzz_decode(data: &[u8]) {
    if let Ok(archive) = decode(data) {
        // Whatever decodes passed the checks, so it encodes again, to the same archive.
        let again = encode(&archive).expect("a decoded archive encodes");
        assert_eq!(decode(&again).expect("re-encoded archive decodes"), archive);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const PASS: &str = "correct horse battery staple";
    /// Tests seal cheaply.
    pub(crate) const TEST_WORK_FACTOR: u8 = 4;

    pub(crate) fn sample() -> Archive {
        let tables = vec![
            ArchivedTable {
                name: "meta".into(),
                entries: vec![(b"k".to_vec(), b"v".to_vec())],
            },
            ArchivedTable {
                name: "nodes".into(),
                entries: vec![
                    (b"n1".to_vec(), vec![1, 2, 3]),
                    (b"n2".to_vec(), vec![4; 300]),
                ],
            },
        ];
        let files = FILES
            .iter()
            .map(|n| ArchivedFile {
                name: (*n).to_owned(),
                mode: 0o600,
                bytes: format!("contents of {n}").into_bytes(),
            })
            .collect::<Vec<_>>();
        Archive {
            manifest: Manifest {
                controller_version: "0.1.0".into(),
                created_at: UnixMillis(1_700_000_000_000),
                nodes: 2,
                tables: 2,
                entries: 3,
                files: files.len() as u64,
                left_out: vec!["releases/1.0.0/x86_64-linux".into()],
            },
            tables,
            files,
        }
    }

    #[test]
    fn round_trip() {
        let a = sample();
        let sealed = pack(&a, PASS, TEST_WORK_FACTOR).unwrap();
        assert!(sealed.starts_with(b"age-encryption.org/v1"));
        assert_eq!(open(&sealed, PASS).unwrap(), a);
    }

    #[test]
    fn a_wrong_passphrase_is_named() {
        let sealed = pack(&sample(), PASS, TEST_WORK_FACTOR).unwrap();
        let e = open(&sealed, "incorrect horse battery").unwrap_err();
        assert!(matches!(e, ArchiveError::WrongPassphrase), "{e:?}");
        assert!(e.to_string().contains("wrong passphrase"), "{e}");
    }

    #[test]
    fn short_passphrases_are_refused() {
        let e = pack(&sample(), "short", TEST_WORK_FACTOR).unwrap_err();
        assert!(matches!(e, ArchiveError::WeakPassphrase(_)), "{e:?}");
        assert!(e.to_string().contains("at least 12"), "{e}");
    }

    #[test]
    fn truncated_and_flipped_files_are_refused() {
        let sealed = pack(&sample(), PASS, TEST_WORK_FACTOR).unwrap();
        for len in [
            0,
            10,
            30,
            sealed.len() / 2,
            sealed.len() - 17,
            sealed.len() - 1,
        ] {
            let e = open(&sealed[..len], PASS).unwrap_err();
            assert!(
                matches!(
                    e,
                    ArchiveError::Damaged(_)
                        | ArchiveError::NotAnArchive
                        | ArchiveError::WrongPassphrase
                ),
                "truncated to {len}: {e:?}"
            );
        }
        let e = open(&sealed[..sealed.len() - 1], PASS).unwrap_err();
        assert!(matches!(e, ArchiveError::Damaged(_)), "{e:?}");
        // Every byte, flipped, is noticed (header: damaged or, in the scrypt stanza, a wrong
        // passphrase; payload: damaged).
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x01;
            assert!(
                open(&bad, PASS).is_err(),
                "flipping byte {i} went unnoticed"
            );
        }
    }

    #[test]
    fn excessive_work_is_refused_before_it_is_done() {
        let content = encode(&sample()).unwrap();
        let sealed = seal(&content, PASS, 12).unwrap();
        // Rewrite the stanza's work factor (12 → 30): refused before scrypt runs (and the header
        // MAC would fail after).
        let text = String::from_utf8_lossy(&sealed[..120]).into_owned();
        let at = text.find(" 12\n").unwrap();
        let mut bad = sealed.clone();
        bad[at + 1..at + 3].copy_from_slice(b"30");
        let e = open(&bad, PASS).unwrap_err();
        assert!(
            matches!(e, ArchiveError::ExcessiveWork { required: 30 }),
            "{e:?}"
        );
    }

    #[test]
    fn other_files_are_not_archives() {
        assert!(matches!(
            open(b"hello", PASS),
            Err(ArchiveError::NotAnArchive)
        ));
        assert!(matches!(
            open(&[0u8; 100], PASS),
            Err(ArchiveError::NotAnArchive)
        ));
    }

    #[test]
    fn content_checks() {
        let good = encode(&sample()).unwrap();
        assert_eq!(decode(&good).unwrap(), sample());
        let mut bad = good.clone();
        bad[9] = 2;
        assert!(matches!(
            decode(&bad),
            Err(ArchiveError::UnsupportedVersion(2))
        ));
        let mut bad = good.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(matches!(decode(&bad), Err(ArchiveError::Damaged(_))));
        assert!(matches!(
            decode(&good[..good.len() - 1]),
            Err(ArchiveError::Damaged(_))
        ));
        let refused = |a: Archive| encode(&a).unwrap_err().to_string();
        let mut a = sample();
        a.files[0].name = "../../etc/passwd".into();
        assert!(refused(a).contains("unexpected file"));
        let mut a = sample();
        a.files.pop();
        a.manifest.files -= 1;
        assert!(refused(a).contains("missing"));
        let mut a = sample();
        a.tables[1].entries.swap(0, 1);
        assert!(refused(a).contains("out of order"));
        let mut a = sample();
        a.tables.swap(0, 1);
        assert!(refused(a).contains("out of order"));
        let mut a = sample();
        a.tables[0].name = "bad/name".into();
        assert!(refused(a).contains("bad table name"));
        let mut a = sample();
        a.manifest.entries = 99;
        assert!(refused(a).contains("counts"));
    }

    /// Deterministic fuzzing of the content decoder: truncations, flipped bits, random bytes and
    /// valid-header garbage all give a clean error, never a panic or a huge allocation.
    #[test]
    fn garbled_content_gives_clean_errors() {
        let good = encode(&sample()).unwrap();
        for len in 0..good.len() {
            fuzz_decode(&good[..len]);
            assert!(decode(&good[..len]).is_err());
        }
        use rand::{rngs::StdRng, RngCore, SeedableRng};
        let mut rng = StdRng::seed_from_u64(0x9e37_79b9_7f4a_7c15);
        let mut next = move || rng.next_u64();
        for _ in 0..5000 {
            let mut bad = good.clone();
            for _ in 0..1 + next() % 4 {
                let i = (next() % bad.len() as u64) as usize;
                bad[i] = next() as u8;
            }
            fuzz_decode(&bad);
            // A body with a recomputed hash reaches the postcard decoder and the checks.
            let body = &bad[HEADER_BYTES..];
            let mut rehashed = bad[..18].to_vec();
            rehashed[..10].copy_from_slice(&good[..10]);
            rehashed[10..18].copy_from_slice(&(body.len() as u64).to_be_bytes());
            rehashed.extend_from_slice(&Sha256::digest(body));
            rehashed.extend_from_slice(body);
            fuzz_decode(&rehashed);
            let noise: Vec<u8> = (0..next() % 200).map(|_| next() as u8).collect();
            fuzz_decode(&noise);
        }
    }
}
