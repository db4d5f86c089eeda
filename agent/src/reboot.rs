//! Remote reboots (protocol 4, `ControllerMsg::Reboot`): the controller assigned this netbooted
//! node a new image and asks it to boot it.
//!
//! The decision ([`decide`]) is pure: refuse when `--no-remote-reboot`, or when the image the
//! controller named for this reboot did not verify ([`NamedImage::Refused`]: the node stays up);
//! else the operator's `--reboot-command` if given (tests use a stand-in); else, when the
//! controller prefers kexec and `--no-kexec` is not given, kexec into the image the controller
//! named if it verified ([`NamedImage::Verified`]: [`prepare`] downloads its kernel and initramfs
//! from the controller's boot HTTP server into RAM, checks their SHA-256 and loads them with
//! `kexec_file_load(2)`; any error falls back to the full reboot) or into a kernel something else
//! loaded (`/sys/kernel/kexec_loaded` is `1`); else the `reboot(2)` syscall after `sync(2)`.
//! [`execute`] carries it out (kexec is `reboot(2)` with `RB_KEXEC`, no kexec-tools needed). The
//! agent acknowledges, with the method it will really use, before executing.
//!
//! # Which kernels the agent kexecs
//!
//! Only one whose image manifest verifies with a key the node holds itself (`--image-key FILE`,
//! baked into the image by `images/build.sh`), never one the controller vouches for:
//! [`check_image`] verifies the [`SignedKexecImage`]'s manifest signature, checks its rules and
//! version, takes the kernel and initramfs SHA-256 from it, and builds the kernel command line
//! itself (the one the iPXE script boots: `initrd=… shoal.controller=… shoal.token=… shoal.image=…
//! <manifest cmdline>`) from a controller address that must parse as `IP:PORT` and a token that
//! must parse as a join token of this node's fleet, so nothing else can be slipped onto it. An
//! image that does not verify is refused, and so is the reboot that follows it.
//!
//! Without `--image-key`, and for the unsigned v4 `KexecImage`, the agent does not kexec a
//! controller-named image: it reboots fully. That is no weaker than the netboot trust the node
//! already has: a full reboot runs firmware and iPXE, which boot whatever the controller's boot
//! server hands out (iPXE checks no signature), so a node that netboots trusts the controller with
//! its next kernel anyway. What the image key adds is that a controller (or anyone who took it
//! over) cannot push a kernel of its choosing into a running node by kexec: on a disk-booted node,
//! or with signed iPXE, that is the difference between rebooting it and owning it.

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    time::Duration,
};

use shoal_overlay::pki::TempFile;

use shoal_proto::{ImageManifest, JoinToken, KexecImage, SignedKexecImage};

use crate::release::ImageKey;

/// Remote reboot settings. Every field has a documented default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebootConfig {
    /// Whether the controller may reboot this machine (default true; `--no-remote-reboot` turns it
    /// off).
    pub allowed: bool,
    /// A shell command run instead of kexec or `reboot(2)` (`--reboot-command`; default none).
    pub command: Option<String>,
    /// The file saying whether a kexec kernel is loaded (default `/sys/kernel/kexec_loaded`).
    pub kexec_loaded: PathBuf,
    /// Whether kexec may be used when the controller prefers it (default true; `--no-kexec` turns
    /// it off, e.g. for hardware whose devices do not survive a kexec).
    pub kexec: bool,
    /// Where the image's kernel and initramfs are downloaded before loading (default
    /// `/run/shoal-kexec`, a tmpfs, mode 0700; each file under a unique exclusive name, removed
    /// once loaded).
    pub kexec_dir: PathBuf,
    /// The keys a kexec image's manifest must be signed with (`--image-key FILE`, repeatable;
    /// default none: the agent never kexecs a controller-named image, it reboots fully).
    pub image_keys: Vec<ImageKey>,
}

impl Default for RebootConfig {
    fn default() -> Self {
        Self {
            allowed: true,
            command: None,
            kexec_loaded: PathBuf::from("/sys/kernel/kexec_loaded"),
            kexec: true,
            kexec_dir: PathBuf::from("/run/shoal-kexec"),
            image_keys: Vec::new(),
        }
    }
}

/// How the agent reboots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RebootMethod {
    /// `sh -c COMMAND` (the operator's `--reboot-command`).
    Command(String),
    /// kexec into the loaded kernel (`reboot(2)` with `RB_KEXEC`).
    Kexec,
    /// Load this image's kernel and initramfs ([`prepare`]), then [`RebootMethod::Kexec`]; on any
    /// error, [`RebootMethod::Syscall`].
    KexecImage(Box<KexecImage>),
    /// `sync(2)` then `reboot(2)` with `RB_AUTOBOOT`.
    Syscall,
}

impl std::fmt::Display for RebootMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RebootMethod::Command(c) => write!(f, "--reboot-command {c}"),
            RebootMethod::Kexec => f.write_str("kexec"),
            RebootMethod::KexecImage(i) => write!(f, "kexec into image {}", i.version),
            RebootMethod::Syscall => f.write_str("reboot(2)"),
        }
    }
}

/// A controller-named kexec image, as the agent judged it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamedImage {
    /// It verified with one of this node's image keys: what to kexec, with hashes and command line
    /// taken from the signed manifest.
    Verified(KexecImage),
    /// It did not verify: the reboot that follows is refused, naming why, and the node stays up.
    Refused {
        /// The version the controller named.
        version: String,
        /// Why.
        reason: ImageRefusal,
    },
    /// It is not kexec'd, and the reboot that follows is a full one: unsigned (a v4 controller's
    /// `KexecImage`) or this node holds no image key.
    Untrusted {
        /// The version the controller named.
        version: String,
        /// Why it is not used.
        why: &'static str,
    },
}

/// Why a signed kexec image was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ImageRefusal {
    /// No key of this node verifies the manifest's signature.
    #[error(
        "its manifest signature does not verify with this node's image keys (--image-key {keys})"
    )]
    BadSignature {
        /// The ids of the keys the node holds.
        keys: String,
    },
    /// The signature is not 64 bytes, the manifest is not one, or a field breaks the rules.
    #[error("malformed image: {0}")]
    Malformed(String),
    /// The signed manifest is for another version than the controller named.
    #[error("the signed manifest is for image {manifest}, but the controller named {named}")]
    VersionMismatch {
        /// What the controller said.
        named: String,
        /// What the manifest says.
        manifest: String,
    },
    /// The controller address for the booted image is not `IP:PORT`.
    #[error("controller address {0:?} is not IP:PORT")]
    BadController(String),
    /// The boot token is not a join token.
    #[error("the boot token is not a join token: {0}")]
    BadToken(shoal_proto::TokenFormatError),
    /// The boot token pins another CA than the one this node trusts.
    #[error("the boot token is for another fleet (its CA hash is not this node's CA)")]
    OtherFleet,
}

/// Judges a [`SignedKexecImage`]: signature with `keys` first (nothing is parsed before that), then
/// the manifest's rules and version, the URLs, the controller address and the token (whose CA hash
/// must be `ca_sha256`, this node's CA, when known). A verified image becomes the [`KexecImage`] to
/// load, its command line built here. Pure.
pub fn check_image(
    image: &SignedKexecImage,
    keys: &[ImageKey],
    ca_sha256: Option<[u8; 32]>,
) -> NamedImage {
    let version = image.version.clone();
    if keys.is_empty() {
        return NamedImage::Untrusted {
            version,
            why: "this node holds no image key (--image-key)",
        };
    }
    match verify_image(image, keys, ca_sha256) {
        Ok(k) => NamedImage::Verified(k),
        Err(reason) => NamedImage::Refused { version, reason },
    }
}

fn verify_image(
    image: &SignedKexecImage,
    keys: &[ImageKey],
    ca_sha256: Option<[u8; 32]>,
) -> Result<KexecImage, ImageRefusal> {
    if image.signature.len() != 64 {
        return Err(ImageRefusal::Malformed(format!(
            "signature is {} bytes, not 64",
            image.signature.len()
        )));
    }
    if !keys
        .iter()
        .any(|k| k.verifies(&image.manifest, &image.signature))
    {
        return Err(ImageRefusal::BadSignature {
            keys: keys.iter().map(|k| k.id()).collect::<Vec<_>>().join(", "),
        });
    }
    let m: ImageManifest = serde_json::from_slice(&image.manifest)
        .map_err(|e| ImageRefusal::Malformed(format!("manifest: {e}")))?;
    m.validate()
        .map_err(|e| ImageRefusal::Malformed(e.to_string()))?;
    if m.version != image.version {
        return Err(ImageRefusal::VersionMismatch {
            named: image.version.clone(),
            manifest: m.version,
        });
    }
    for url in [&image.kernel_url, &image.initrd_url] {
        split_url(url).map_err(ImageRefusal::Malformed)?;
    }
    // Parsed and written out again: only the canonical forms reach the command line.
    let controller: SocketAddr = image
        .controller
        .parse()
        .map_err(|_| ImageRefusal::BadController(image.controller.clone()))?;
    let token: JoinToken = image.boot_token.parse().map_err(ImageRefusal::BadToken)?;
    if ca_sha256.is_some_and(|ca| ca != token.ca_sha256) {
        return Err(ImageRefusal::OtherFleet);
    }
    let cmdline = format!(
        "initrd={initrd} shoal.controller={controller} shoal.token={token} shoal.image={version} {extra}",
        initrd = m.initrd.file,
        version = m.version,
        extra = m.cmdline,
    );
    Ok(KexecImage {
        version: m.version,
        kernel_url: image.kernel_url.clone(),
        kernel_sha256: m.kernel.sha256,
        initrd_url: image.initrd_url.clone(),
        initrd_sha256: m.initrd.sha256,
        cmdline: cmdline.trim_end().to_owned(),
    })
}

/// Whether a kexec kernel is loaded, from the kernel's `kexec_loaded` file (`1` or `0`); a missing
/// or unreadable file means no.
pub fn kexec_loaded(config: &RebootConfig) -> bool {
    crate::sysfs::read_attr(&config.kexec_loaded).as_deref() == Some("1")
}

/// What to do with a reboot request: the method, or the reason for refusing. `image` is the image
/// the controller named for this reboot, if it did, as [`check_image`] judged it.
pub fn decide(
    config: &RebootConfig,
    prefer_kexec: bool,
    image: Option<&NamedImage>,
) -> Result<RebootMethod, String> {
    if !config.allowed {
        return Err("remote reboots are disabled on this node (--no-remote-reboot)".into());
    }
    if let Some(NamedImage::Refused { version, reason }) = image {
        return Err(format!("image {version} refused: {reason}; not rebooting"));
    }
    if let Some(c) = &config.command {
        return Ok(RebootMethod::Command(c.clone()));
    }
    if prefer_kexec && config.kexec {
        if let Some(NamedImage::Verified(i)) = image {
            return Ok(RebootMethod::KexecImage(Box::new(i.clone())));
        }
        if kexec_loaded(config) {
            return Ok(RebootMethod::Kexec);
        }
    }
    Ok(RebootMethod::Syscall)
}

/// Readies a method before the acknowledgement: [`RebootMethod::KexecImage`] is downloaded, checked
/// and loaded (blocking: seconds), becoming [`RebootMethod::Kexec`], or [`RebootMethod::Syscall`]
/// when that fails. Returns the method and the text for the acknowledgement.
pub fn prepare(method: RebootMethod, dir: &Path) -> (RebootMethod, String) {
    match method {
        RebootMethod::KexecImage(image) => match load(&image, dir) {
            Ok(()) => (
                RebootMethod::Kexec,
                format!("kexec into image {}", image.version),
            ),
            Err(e) => {
                tracing::warn!(image = %image.version, cause = %e, "kexec not possible; rebooting fully");
                (
                    RebootMethod::Syscall,
                    format!("reboot(2) (kexec into image {} failed: {e})", image.version),
                )
            }
        },
        other => {
            let text = other.to_string();
            (other, text)
        }
    }
}

/// Splits `http://HOST:PORT/PATH` into the address and the path (printable ASCII without spaces:
/// it goes into the request line as it is).
pub fn split_url(url: &str) -> Result<(SocketAddr, String), String> {
    if !url.bytes().all(|b| (b'!'..=b'~').contains(&b)) {
        return Err(format!("{url:?}: not a plain http:// URL"));
    }
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: not an http:// URL"))?;
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let addr = host
        .parse::<SocketAddr>()
        .map_err(|e| format!("{url}: {e} (an IP:PORT is expected)"))?;
    Ok((
        addr,
        if path.is_empty() {
            "/".into()
        } else {
            path.to_owned()
        },
    ))
}

/// Downloads `url` (plain HTTP/1.0: the controller's boot server) into `dest`, an exclusive
/// temporary file, checking its SHA-256.
pub fn download(url: &str, sha256_hex: &str, dest: &mut TempFile) -> Result<(), String> {
    let (addr, path) = split_url(url)?;
    let net = |e: std::io::Error| format!("{url}: {e}");
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).map_err(net)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(net)?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).map_err(net)?;
    let mut reader = BufReader::new(stream);
    let mut status = String::new();
    reader.read_line(&mut status).map_err(net)?;
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(format!("{url}: {}", status.trim()));
    }
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).map_err(net)? == 0 || line.trim().is_empty() {
            break;
        }
    }
    let path = dest.path().to_owned();
    let file_err = |e: std::io::Error| format!("{}: {e}", path.display());
    let file = dest.file();
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = reader.read(&mut buf).map_err(net)?;
        if n == 0 {
            break;
        }
        digest.update(&buf[..n]);
        file.write_all(&buf[..n]).map_err(file_err)?;
    }
    let got = hex::encode(digest.finish().as_ref());
    if !got.eq_ignore_ascii_case(sha256_hex) {
        return Err(format!(
            "{url}: SHA-256 is {got}, the controller said {sha256_hex}"
        ));
    }
    Ok(())
}

/// Downloads the image's kernel and initramfs into `dir`, checks them, and loads them with
/// `kexec_file_load(2)`. The files are removed afterwards (the kernel holds its own copy).
pub fn load(image: &KexecImage, dir: &Path) -> Result<(), String> {
    shoal_overlay::pki::ensure_private_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let temp = |name: &str| {
        TempFile::new_in(dir, name, 0o600).map_err(|e| format!("{}: {e}", dir.display()))
    };
    // Both removed when dropped, loaded or not: the kernel keeps its own copy.
    let (mut kernel, mut initrd) = (temp("vmlinuz")?, temp("initrd.img")?);
    download(&image.kernel_url, &image.kernel_sha256, &mut kernel)?;
    download(&image.initrd_url, &image.initrd_sha256, &mut initrd)?;
    for t in [&mut kernel, &mut initrd] {
        t.reopen_read_only()
            .map_err(|e| format!("{}: {e}", t.path().display()))?;
    }
    kexec_file_load(kernel.file(), initrd.file(), &image.cmdline)
}

/// `kexec_file_load(2)` of the two files, read by the kernel from their descriptors (the ones the
/// downloads were written and checked through, not a path opened again).
fn kexec_file_load(k: &fs::File, i: &fs::File, cmdline: &str) -> Result<(), String> {
    let cmd = std::ffi::CString::new(cmdline)
        .map_err(|_| "the command line holds a NUL byte".to_owned())?;
    let len = cmd.as_bytes_with_nul().len();
    // SAFETY: kexec_file_load(2) only reads: the two descriptors, open for the whole call, and
    // `len` bytes at `cmd`, a live NUL-terminated buffer of exactly that length.
    #[allow(unsafe_code)]
    let r = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_kexec_file_load,
            k.as_raw_fd(),
            i.as_raw_fd(),
            len as nix::libc::c_ulong,
            cmd.as_ptr(),
            0 as nix::libc::c_ulong,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(format!(
            "kexec_file_load(2): {}",
            std::io::Error::last_os_error()
        ))
    }
}

/// Carries out the reboot. Returns only if it did not happen (a command that exits 0 counts as
/// done: the machine is expected to go down by itself).
pub fn execute(method: &RebootMethod) -> Result<(), String> {
    let run = |cmd: &mut std::process::Command| -> Result<(), String> {
        let status = cmd
            .status()
            .map_err(|e| format!("{}: {e}", describe(cmd)))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("{} exited with {status}", describe(cmd)))
        }
    };
    match method {
        RebootMethod::Command(c) => run(std::process::Command::new("sh").arg("-c").arg(c)),
        RebootMethod::Kexec => {
            nix::unistd::sync();
            match nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_KEXEC) {
                Ok(never) => match never {},
                Err(e) => Err(format!("reboot(2) RB_KEXEC: {e}")),
            }
        }
        // Not prepared: the full reboot.
        RebootMethod::KexecImage(_) | RebootMethod::Syscall => {
            nix::unistd::sync();
            match nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT) {
                Ok(never) => match never {},
                Err(e) => Err(format!("reboot(2): {e}")),
            }
        }
    }
}

fn describe(cmd: &std::process::Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use ring::signature::{Ed25519KeyPair, KeyPair};
    use shoal_proto::{ImageFile, IMAGE_MANIFEST_FORMAT};

    use super::*;

    fn config(dir: &std::path::Path, loaded: Option<&str>) -> RebootConfig {
        let path = dir.join("kexec_loaded");
        if let Some(v) = loaded {
            std::fs::write(&path, v).unwrap();
        }
        RebootConfig {
            kexec_loaded: path,
            ..Default::default()
        }
    }

    #[test]
    fn kexec_when_loaded_and_preferred_else_the_syscall() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            decide(&config(dir.path(), None), true, None),
            Ok(RebootMethod::Syscall),
            "no kexec_loaded file"
        );
        assert_eq!(
            decide(&config(dir.path(), Some("0\n")), true, None),
            Ok(RebootMethod::Syscall)
        );
        let mut loaded = config(dir.path(), Some("1\n"));
        assert_eq!(decide(&loaded, true, None), Ok(RebootMethod::Kexec));
        assert_eq!(
            decide(&loaded, false, None),
            Ok(RebootMethod::Syscall),
            "the controller asked for a full reboot"
        );
        assert_eq!(RebootMethod::Kexec.to_string(), "kexec");
        let img = image("http://127.0.0.1:1/k", "http://127.0.0.1:1/i");
        let named = NamedImage::Verified(img.clone());
        assert_eq!(
            decide(&loaded, true, Some(&named)),
            Ok(RebootMethod::KexecImage(Box::new(img.clone()))),
            "the named image first"
        );
        assert_eq!(
            decide(&loaded, false, Some(&named)),
            Ok(RebootMethod::Syscall)
        );
        let unsigned = NamedImage::Untrusted {
            version: "v2".into(),
            why: "unsigned",
        };
        assert_eq!(
            decide(&config(dir.path(), Some("0")), true, Some(&unsigned)),
            Ok(RebootMethod::Syscall),
            "never kexec an unverified image"
        );
        loaded.kexec = false;
        assert_eq!(
            decide(&loaded, true, Some(&named)),
            Ok(RebootMethod::Syscall),
            "--no-kexec"
        );
    }

    #[test]
    fn the_command_overrides_both_and_refusal_overrides_everything() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(dir.path(), Some("1"));
        c.command = Some("true".into());
        assert_eq!(
            decide(&c, true, None),
            Ok(RebootMethod::Command("true".into()))
        );
        c.allowed = false;
        let why = decide(&c, true, None).unwrap_err();
        assert!(why.contains("--no-remote-reboot"), "{why}");
    }

    #[test]
    fn the_stand_in_command_runs_and_its_failure_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("rebooted");
        let script = dir.path().join("fake-reboot.sh");
        std::fs::write(
            &script,
            format!("#!/bin/sh\necho \"$1\" > '{}'\n", marker.display()),
        )
        .unwrap();
        let mut c = config(dir.path(), Some("1"));
        c.command = Some(format!("sh '{}' now", script.display()));
        let method = decide(&c, true, None).unwrap();
        execute(&method).unwrap();
        assert_eq!(std::fs::read_to_string(&marker).unwrap(), "now\n");
        let err = execute(&RebootMethod::Command("exit 3".into())).unwrap_err();
        assert!(err.contains("exit 3") && err.contains("3"), "{err}");
    }

    fn image(kernel_url: &str, initrd_url: &str) -> KexecImage {
        KexecImage {
            version: "v2".into(),
            kernel_url: kernel_url.into(),
            kernel_sha256: hex::encode(
                ring::digest::digest(&ring::digest::SHA256, b"kernel").as_ref(),
            ),
            initrd_url: initrd_url.into(),
            initrd_sha256: hex::encode(
                ring::digest::digest(&ring::digest::SHA256, b"initrd").as_ref(),
            ),
            cmdline: "console=ttyS0".into(),
        }
    }

    /// A one-request-per-connection HTTP server answering every GET with `body`.
    fn serve(body: &'static [u8], requests: usize) -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming().take(requests) {
                let mut s = stream.unwrap();
                // Read the whole request before answering.
                let mut req = Vec::new();
                let mut byte = [0u8; 1];
                while !req.ends_with(b"\r\n\r\n") && s.read(&mut byte).is_ok_and(|n| n == 1) {
                    req.push(byte[0]);
                }
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(body);
            }
        });
        addr
    }

    #[test]
    fn downloads_are_checked_and_a_failed_load_falls_back_to_the_full_reboot() {
        assert_eq!(
            split_url("http://10.0.0.1:7442/images/v2/vmlinuz").unwrap(),
            (
                "10.0.0.1:7442".parse().unwrap(),
                "/images/v2/vmlinuz".into()
            )
        );
        assert!(split_url("https://10.0.0.1/x").is_err() && split_url("http://name:80/x").is_err());
        let dir = tempfile::tempdir().unwrap();
        let addr = serve(b"kernel", 4);
        let mut dest = TempFile::new_in(dir.path(), "k", 0o600).unwrap();
        let img = image(&format!("http://{addr}/k"), &format!("http://{addr}/i"));
        download(&img.kernel_url, &img.kernel_sha256, &mut dest).unwrap();
        assert_eq!(std::fs::read(dest.path()).unwrap(), b"kernel");
        let mut other = TempFile::new_in(dir.path(), "i", 0o600).unwrap();
        let err = download(&img.initrd_url, &img.initrd_sha256, &mut other).unwrap_err();
        assert!(err.contains("SHA-256"), "{err}");
        drop((dest, other));
        // The initramfs hash does not match: the reboot falls back to reboot(2), and says so.
        let (method, ack) = prepare(
            RebootMethod::KexecImage(Box::new(img)),
            &dir.path().join("kexec"),
        );
        assert_eq!(method, RebootMethod::Syscall);
        assert!(
            ack.starts_with("reboot(2) (kexec into image v2 failed") && ack.contains("SHA-256"),
            "{ack}"
        );
        assert_eq!(
            std::fs::read_dir(dir.path().join("kexec")).unwrap().count(),
            0,
            "downloads are removed"
        );
        assert_eq!(
            std::fs::metadata(dir.path().join("kexec"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o700
        );
        assert!(
            split_url("http://10.0.0.1:80/a b").is_err()
                && split_url("http://10.0.0.1:80/a\r\nHost: x").is_err(),
            "nothing injected into the request"
        );
        assert_eq!(
            prepare(RebootMethod::Syscall, dir.path()),
            (RebootMethod::Syscall, "reboot(2)".into())
        );
    }

    fn keypair() -> (Ed25519KeyPair, ImageKey) {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let public = ImageKey::from_bytes(pair.public_key().as_ref().try_into().unwrap());
        (pair, public)
    }

    const CA: [u8; 32] = [7; 32];

    fn signed(
        pair: &Ed25519KeyPair,
        version: &str,
        edit: impl FnOnce(&mut ImageManifest),
    ) -> SignedKexecImage {
        let file = |name: &str, data: &[u8]| ImageFile {
            file: name.into(),
            size: data.len() as u64,
            sha256: hex::encode(ring::digest::digest(&ring::digest::SHA256, data).as_ref()),
        };
        let mut m = ImageManifest {
            format: IMAGE_MANIFEST_FORMAT,
            version: version.into(),
            kernel: file("vmlinuz", b"kernel"),
            initrd: file("initrd.img", b"initrd"),
            cmdline: "console=ttyS0 panic=10".into(),
            inputs: vec![],
            built_at: String::new(),
        };
        edit(&mut m);
        let manifest = serde_json::to_vec_pretty(&m).unwrap();
        let token = JoinToken {
            id: "0123456789abcdef".into(),
            secret: "ab".repeat(16),
            ca_sha256: CA,
        };
        SignedKexecImage {
            version: version.into(),
            signature: pair.sign(&manifest).as_ref().to_vec(),
            manifest,
            kernel_url: format!("http://10.78.0.1:7442/images/{version}/vmlinuz"),
            initrd_url: format!("http://10.78.0.1:7442/images/{version}/initrd.img"),
            controller: "10.78.0.1:7440".into(),
            boot_token: token.to_string(),
        }
    }

    #[test]
    fn a_signed_image_is_kexeced_with_the_hashes_and_command_line_of_its_manifest() {
        let (pair, key) = keypair();
        let img = signed(&pair, "v2", |_| {});
        let NamedImage::Verified(k) = check_image(&img, &[keypair().1, key], Some(CA)) else {
            panic!("refused")
        };
        assert_eq!(
            k.kernel_sha256,
            hex::encode(ring::digest::digest(&ring::digest::SHA256, b"kernel").as_ref())
        );
        assert_eq!(
            k.initrd_sha256,
            hex::encode(ring::digest::digest(&ring::digest::SHA256, b"initrd").as_ref())
        );
        assert_eq!(
            k.cmdline,
            format!("initrd=initrd.img shoal.controller=10.78.0.1:7440 shoal.token={} shoal.image=v2 console=ttyS0 panic=10", img.boot_token)
        );
        assert_eq!(
            (k.version.as_str(), k.kernel_url.as_str()),
            ("v2", img.kernel_url.as_str())
        );
    }

    #[test]
    fn an_image_that_does_not_verify_is_refused_and_so_is_the_reboot() {
        let (pair, key) = keypair();
        let (other, _) = keypair();
        let refused = |img: &SignedKexecImage| match check_image(img, &[key], Some(CA)) {
            NamedImage::Refused { reason, .. } => reason,
            other => panic!("not refused: {other:?}"),
        };
        // Signed by a key the node does not hold (the controller may well trust it).
        let by_other = signed(&other, "v3", |_| {});
        let why = refused(&by_other);
        assert!(
            matches!(why, ImageRefusal::BadSignature { ref keys } if *keys == key.id()),
            "{why}"
        );
        // The controller changing anything the signature covers, or anything it adds, is caught.
        let mut tampered = signed(&pair, "v3", |_| {});
        tampered.manifest = String::from_utf8(tampered.manifest)
            .unwrap()
            .replace("panic=10", "init=/bin/sh")
            .into_bytes();
        assert!(matches!(
            refused(&tampered),
            ImageRefusal::BadSignature { .. }
        ));
        let mut renamed = signed(&pair, "v3", |_| {});
        renamed.version = "v4".into();
        assert!(matches!(
            refused(&renamed),
            ImageRefusal::VersionMismatch { .. }
        ));
        let mut injected = signed(&pair, "v3", |_| {});
        injected.controller = "10.78.0.1:7440 init=/bin/sh".into();
        assert!(matches!(refused(&injected), ImageRefusal::BadController(_)));
        let mut injected = signed(&pair, "v3", |_| {});
        injected.boot_token = format!("{} init=/bin/sh", injected.boot_token);
        assert!(matches!(refused(&injected), ImageRefusal::BadToken(_)));
        let mut elsewhere = signed(&pair, "v3", |_| {});
        elsewhere.kernel_url = "http://10.78.0.1:7442/x\r\nX: y".into();
        assert!(matches!(refused(&elsewhere), ImageRefusal::Malformed(_)));
        let signed_junk = signed(&pair, "v3", |m| m.cmdline = "a\nb".into());
        assert!(
            matches!(refused(&signed_junk), ImageRefusal::Malformed(_)),
            "signed, but breaks the rules"
        );
        let mut short = signed(&pair, "v3", |_| {});
        short.signature.pop();
        assert!(matches!(refused(&short), ImageRefusal::Malformed(_)));
        let foreign = signed(&pair, "v3", |_| {});
        assert_eq!(
            match check_image(&foreign, &[key], Some([8; 32])) {
                NamedImage::Refused { reason, .. } => reason,
                o => panic!("{o:?}"),
            },
            ImageRefusal::OtherFleet
        );

        // The reboot that follows a refused image is refused, naming why, even with a reboot
        // command.
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(dir.path(), Some("1"));
        c.command = Some("true".into());
        let named = check_image(&by_other, &[key], Some(CA));
        let why = decide(&c, true, Some(&named)).unwrap_err();
        assert!(
            why.contains("image v3 refused")
                && why.contains("does not verify")
                && why.contains(&key.id()),
            "{why}"
        );
        // A node without image keys does not kexec it but reboots fully (the netboot trust).
        let untrusted = check_image(&by_other, &[], Some(CA));
        assert!(
            matches!(untrusted, NamedImage::Untrusted { .. }),
            "{untrusted:?}"
        );
        assert_eq!(
            decide(&config(dir.path(), Some("0")), true, Some(&untrusted)),
            Ok(RebootMethod::Syscall)
        );
    }
}
