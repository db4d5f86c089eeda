//! Remote reboots (protocol 4, `ControllerMsg::Reboot`): the controller assigned this netbooted node a
//! new image and asks it to boot it.
//!
//! The decision ([`decide`]) is pure: refuse when `--no-remote-reboot`; else the operator's
//! `--reboot-command` if given (tests use a stand-in); else, when the controller prefers kexec and
//! `--no-kexec` is not given, kexec into the image the controller named ([`ControllerMsg::KexecImage`]:
//! [`prepare`] downloads its kernel and initramfs from the controller's boot HTTP server into RAM,
//! checks their SHA-256 and loads them with `kexec_file_load(2)`; any error falls back to the full
//! reboot) or into a kernel something else loaded (`/sys/kernel/kexec_loaded` is `1`); else the
//! `reboot(2)` syscall after `sync(2)`. [`execute`] carries it out (kexec is `reboot(2)` with
//! `RB_KEXEC`, no kexec-tools needed). The agent acknowledges, with the method it will really use,
//! before executing.
//!
//! [`ControllerMsg::KexecImage`]: shoal_proto::ControllerMsg::KexecImage

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    time::Duration,
};

use shoal_proto::KexecImage;

/// Remote reboot settings. Every field has a documented default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebootConfig {
    /// Whether the controller may reboot this machine (default true; `--no-remote-reboot` turns it off).
    pub allowed: bool,
    /// A shell command run instead of kexec or `reboot(2)` (`--reboot-command`; default none).
    pub command: Option<String>,
    /// The file saying whether a kexec kernel is loaded (default `/sys/kernel/kexec_loaded`).
    pub kexec_loaded: PathBuf,
    /// Whether kexec may be used when the controller prefers it (default true; `--no-kexec` turns it
    /// off, e.g. for hardware whose devices do not survive a kexec).
    pub kexec: bool,
    /// Where the image's kernel and initramfs are downloaded before loading (default
    /// `/run/shoal-kexec`, a tmpfs; removed once loaded).
    pub kexec_dir: PathBuf,
}

impl Default for RebootConfig {
    fn default() -> Self {
        Self {
            allowed: true,
            command: None,
            kexec_loaded: PathBuf::from("/sys/kernel/kexec_loaded"),
            kexec: true,
            kexec_dir: PathBuf::from("/run/shoal-kexec"),
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

/// Whether a kexec kernel is loaded, from the kernel's `kexec_loaded` file (`1` or `0`); a missing
/// or unreadable file means no.
pub fn kexec_loaded(config: &RebootConfig) -> bool {
    std::fs::read_to_string(&config.kexec_loaded).map(|s| s.trim() == "1").unwrap_or(false)
}

/// What to do with a reboot request: the method, or the reason for refusing. `image` is the image
/// the controller named for kexec, if it did.
pub fn decide(config: &RebootConfig, prefer_kexec: bool, image: Option<&KexecImage>) -> Result<RebootMethod, String> {
    if !config.allowed {
        return Err("remote reboots are disabled on this node (--no-remote-reboot)".into());
    }
    if let Some(c) = &config.command {
        return Ok(RebootMethod::Command(c.clone()));
    }
    if prefer_kexec && config.kexec {
        if let Some(i) = image {
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
            Ok(()) => (RebootMethod::Kexec, format!("kexec into image {}", image.version)),
            Err(e) => {
                tracing::warn!(image = %image.version, cause = %e, "kexec not possible; rebooting fully");
                (RebootMethod::Syscall, format!("reboot(2) (kexec into image {} failed: {e})", image.version))
            }
        },
        other => {
            let text = other.to_string();
            (other, text)
        }
    }
}

/// Splits `http://HOST:PORT/PATH` into the address and the path.
pub fn split_url(url: &str) -> Result<(SocketAddr, String), String> {
    let rest = url.strip_prefix("http://").ok_or_else(|| format!("{url}: not an http:// URL"))?;
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let addr = host.parse::<SocketAddr>().map_err(|e| format!("{url}: {e} (an IP:PORT is expected)"))?;
    Ok((addr, if path.is_empty() { "/".into() } else { path.to_owned() }))
}

/// Downloads `url` (plain HTTP/1.0: the controller's boot server) into `dest`, checking its SHA-256.
pub fn download(url: &str, sha256_hex: &str, dest: &Path) -> Result<(), String> {
    let (addr, path) = split_url(url)?;
    let net = |e: std::io::Error| format!("{url}: {e}");
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).map_err(net)?;
    stream.set_read_timeout(Some(Duration::from_secs(30))).map_err(net)?;
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
    let file_err = |e: std::io::Error| format!("{}: {e}", dest.display());
    let mut file = fs::File::create(dest).map_err(file_err)?;
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
        return Err(format!("{url}: SHA-256 is {got}, the controller said {sha256_hex}"));
    }
    Ok(())
}

/// Downloads the image's kernel and initramfs into `dir`, checks them, and loads them with
/// `kexec_file_load(2)`. The files are removed afterwards (the kernel holds its own copy).
pub fn load(image: &KexecImage, dir: &Path) -> Result<(), String> {
    fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let (kernel, initrd) = (dir.join("vmlinuz"), dir.join("initrd.img"));
    let result = download(&image.kernel_url, &image.kernel_sha256, &kernel)
        .and_then(|()| download(&image.initrd_url, &image.initrd_sha256, &initrd))
        .and_then(|()| kexec_file_load(&kernel, &initrd, &image.cmdline));
    let _ = fs::remove_file(&kernel);
    let _ = fs::remove_file(&initrd);
    result
}

fn kexec_file_load(kernel: &Path, initrd: &Path, cmdline: &str) -> Result<(), String> {
    let k = fs::File::open(kernel).map_err(|e| format!("{}: {e}", kernel.display()))?;
    let i = fs::File::open(initrd).map_err(|e| format!("{}: {e}", initrd.display()))?;
    let cmd = std::ffi::CString::new(cmdline).map_err(|_| "the command line holds a NUL byte".to_owned())?;
    let len = cmd.as_bytes_with_nul().len();
    // SAFETY: kexec_file_load(2) only reads: the two descriptors, open for the whole call, and `len`
    // bytes at `cmd`, a live NUL-terminated buffer of exactly that length.
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
        Err(format!("kexec_file_load(2): {}", std::io::Error::last_os_error()))
    }
}

/// Carries out the reboot. Returns only if it did not happen (a command that exits 0 counts as
/// done: the machine is expected to go down by itself).
pub fn execute(method: &RebootMethod) -> Result<(), String> {
    let run = |cmd: &mut std::process::Command| -> Result<(), String> {
        let status = cmd.status().map_err(|e| format!("{}: {e}", describe(cmd)))?;
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
    std::iter::once(cmd.get_program()).chain(cmd.get_args()).map(|s| s.to_string_lossy()).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn config(dir: &std::path::Path, loaded: Option<&str>) -> RebootConfig {
        let path = dir.join("kexec_loaded");
        if let Some(v) = loaded {
            std::fs::write(&path, v).unwrap();
        }
        RebootConfig { kexec_loaded: path, ..Default::default() }
    }

    #[test]
    fn kexec_when_loaded_and_preferred_else_the_syscall() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(decide(&config(dir.path(), None), true, None), Ok(RebootMethod::Syscall), "no kexec_loaded file");
        assert_eq!(decide(&config(dir.path(), Some("0\n")), true, None), Ok(RebootMethod::Syscall));
        let mut loaded = config(dir.path(), Some("1\n"));
        assert_eq!(decide(&loaded, true, None), Ok(RebootMethod::Kexec));
        assert_eq!(decide(&loaded, false, None), Ok(RebootMethod::Syscall), "the controller asked for a full reboot");
        assert_eq!(RebootMethod::Kexec.to_string(), "kexec");
        let img = image("http://127.0.0.1:1/k", "http://127.0.0.1:1/i");
        assert_eq!(decide(&loaded, true, Some(&img)), Ok(RebootMethod::KexecImage(Box::new(img.clone()))), "the named image first");
        assert_eq!(decide(&loaded, false, Some(&img)), Ok(RebootMethod::Syscall));
        loaded.kexec = false;
        assert_eq!(decide(&loaded, true, Some(&img)), Ok(RebootMethod::Syscall), "--no-kexec");
    }

    #[test]
    fn the_command_overrides_both_and_refusal_overrides_everything() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(dir.path(), Some("1"));
        c.command = Some("true".into());
        assert_eq!(decide(&c, true, None), Ok(RebootMethod::Command("true".into())));
        c.allowed = false;
        let why = decide(&c, true, None).unwrap_err();
        assert!(why.contains("--no-remote-reboot"), "{why}");
    }

    #[test]
    fn the_stand_in_command_runs_and_its_failure_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("rebooted");
        let script = dir.path().join("fake-reboot.sh");
        std::fs::write(&script, format!("#!/bin/sh\necho \"$1\" > '{}'\n", marker.display())).unwrap();
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
            kernel_sha256: hex::encode(ring::digest::digest(&ring::digest::SHA256, b"kernel").as_ref()),
            initrd_url: initrd_url.into(),
            initrd_sha256: hex::encode(ring::digest::digest(&ring::digest::SHA256, b"initrd").as_ref()),
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
                let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
                let _ = s.write_all(body);
            }
        });
        addr
    }

    #[test]
    fn downloads_are_checked_and_a_failed_load_falls_back_to_the_full_reboot() {
        assert_eq!(split_url("http://10.0.0.1:7442/images/v2/vmlinuz").unwrap(), ("10.0.0.1:7442".parse().unwrap(), "/images/v2/vmlinuz".into()));
        assert!(split_url("https://10.0.0.1/x").is_err() && split_url("http://name:80/x").is_err());
        let dir = tempfile::tempdir().unwrap();
        let addr = serve(b"kernel", 4);
        let dest = dir.path().join("k");
        let img = image(&format!("http://{addr}/k"), &format!("http://{addr}/i"));
        download(&img.kernel_url, &img.kernel_sha256, &dest).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"kernel");
        let err = download(&img.initrd_url, &img.initrd_sha256, &dest).unwrap_err();
        assert!(err.contains("SHA-256"), "{err}");
        // The initramfs hash does not match: the reboot falls back to reboot(2), and says so.
        let (method, ack) = prepare(RebootMethod::KexecImage(Box::new(img)), &dir.path().join("kexec"));
        assert_eq!(method, RebootMethod::Syscall);
        assert!(ack.starts_with("reboot(2) (kexec into image v2 failed") && ack.contains("SHA-256"), "{ack}");
        assert!(!dir.path().join("kexec/vmlinuz").exists(), "downloads are removed");
        assert_eq!(prepare(RebootMethod::Syscall, dir.path()), (RebootMethod::Syscall, "reboot(2)".into()));
    }
}
