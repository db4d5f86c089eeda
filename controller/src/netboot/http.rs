//! The boot HTTP server (plain HTTP on the netboot interface; iPXE's HTTPS would need a trust setup
//! in every iPXE binary):
//!
//! - `GET /boot/<mac>.ipxe`: the iPXE script for one machine. It boots the image assigned to the
//!   machine's node (`shoalctl nodes set-image`), else the default image, with a kernel command
//!   line carrying the controller's address and a join token minted for this one boot (single use,
//!   short life, see [`super::NetbootConfig::boot_token_ttl`], bound to the MAC with
//!   [`TokenBinding::Mac`]). A token is minted only for a MAC the DHCP server saw PXE-boot moments
//!   before, at a bounded rate, one outstanding per MAC ([`super::boot_tokens`]); anyone else gets
//!   a script that says why and returns to the firmware. The token enrols once, and the agent pins
//!   the CA hash inside it, so a machine in the middle cannot impersonate the controller.
//! - `GET /images/<version>/<file>`: the kernel and initramfs of a stored image.
//!
//! Connections are served by hyper directly (axum's `serve` has no timeouts) under [`HttpLimits`]:
//! the request head must arrive within `header_read_timeout` (which also ends idle keep-alive
//! connections), a connection on which nothing moves for `idle_timeout` is closed, and connections
//! are capped overall and per client address.

use std::{
    collections::BTreeMap,
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use axum::{
    body::Body,
    extract::{Path, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use shoal_overlay::pki;
use shoal_proto::{ControllerMsg, JoinToken, KexecImage, NodeId, SignedKexecImage, UnixMillis};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::{debug, info, warn};

use super::{
    boot_tokens::Refusal,
    dhcp::Mac,
    slots::{SharedSlots, SlotLimits},
};
use crate::{server::now_ms, server::Controller, store::StoreError};
use shoal_controller_core::registry::TokenBinding;
use shoal_controller_core::registry::TokenRecord;

/// Label set on nodes enrolled by a boot token: the image version they booted.
pub const IMAGE_LABEL: &str = "netboot.image";
/// Label set on nodes enrolled by a boot token: the MAC that fetched the script.
pub const MAC_LABEL: &str = "netboot.mac";

/// The largest request head (request line and headers) read, in bytes; hyper's minimum is 8 KiB.
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// Limits of the boot HTTP server. Every field has a documented default ([`HttpLimits::default`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// A request head must be complete this long after the connection opens or the previous
    /// response ends, so this also closes idle keep-alive connections; default 10 s.
    pub header_read_timeout: Duration,
    /// A connection on which no byte moves either way for this long is closed (a client that stops
    /// reading a response); default 30 s.
    pub idle_timeout: Duration,
    /// Connections at once; default 256 overall and 8 per client address (iPXE uses one).
    pub connections: SlotLimits,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            connections: SlotLimits {
                total: 256,
                per_client: 8,
            },
        }
    }
}

/// What the boot scripts point at.
#[derive(Debug, Clone)]
pub struct BootContext {
    /// The controller's agent endpoint (QUIC), as reachable from the netboot network.
    pub controller_addr: SocketAddr,
    /// Base URL of this server.
    pub http_base: String,
}

#[derive(Debug, Clone)]
struct HttpState {
    controller: Arc<Controller>,
    boot: BootContext,
}

fn router(controller: Arc<Controller>, boot: BootContext) -> Router {
    Router::new()
        .route("/boot/{file}", get(boot_script))
        .route("/images/{version}/{file}", get(image_file))
        .with_state(HttpState { controller, boot })
}

/// Serves until the task is aborted, under the controller's [`HttpLimits`].
pub async fn run(
    controller: Arc<Controller>,
    boot: BootContext,
    listener: tokio::net::TcpListener,
) {
    let limits = controller.netboot.config.http;
    serve(router(controller, boot), listener, limits).await
}

/// Serves `app` on `listener` under `limits` until the task is aborted.
async fn serve(app: Router, listener: tokio::net::TcpListener, limits: HttpLimits) {
    let slots = SharedSlots::new(limits.connections);
    let mut refusal_logged: Option<Instant> = None;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors, typically: give connections time to close instead of
                // spinning.
                warn!(cause = %e, "boot HTTP accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let slot = match slots.acquire(peer.ip()) {
            Ok(s) => s,
            Err(e) => {
                // One line per 10 s at most: a flood must not flood the log too.
                if refusal_logged.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
                    refusal_logged = Some(Instant::now());
                    warn!(%peer, cause = %e, in_use = slots.in_use(), "boot HTTP connection refused");
                } else {
                    debug!(%peer, cause = %e, "boot HTTP connection refused");
                }
                drop(stream);
                continue;
            }
        };
        let service = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let io = TokioIo::new(IdleTimeout::new(stream, limits.idle_timeout));
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .max_buf_size(MAX_HEAD_BYTES);
            if let Err(e) = http.serve_connection(io, service).await {
                debug!(%peer, cause = %e, "boot HTTP connection ended");
            }
        });
    }
}

/// A stream that fails with `TimedOut` once neither reads nor writes have moved a byte for `idle`
/// while the connection waits on one of them.
#[derive(Debug)]
struct IdleTimeout<S> {
    inner: S,
    idle: Duration,
    last_progress: tokio::time::Instant,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl<S> IdleTimeout<S> {
    fn new(inner: S, idle: Duration) -> Self {
        let now = tokio::time::Instant::now();
        Self {
            inner,
            idle,
            last_progress: now,
            timer: Box::pin(tokio::time::sleep_until(now + idle)),
        }
    }

    fn progressed(&mut self) {
        self.last_progress = tokio::time::Instant::now();
    }

    /// The inner stream is not ready: fail if it has been idle too long, else wait (with the timer
    /// registered to wake us at the deadline).
    fn pending<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let deadline = self.last_progress + self.idle;
        if self.timer.deadline() != deadline {
            self.timer.as_mut().reset(deadline);
        }
        match self.timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "connection idle",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for IdleTimeout<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    self.progressed();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => self.pending(cx),
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for IdleTimeout<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, data) {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    self.progressed();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => self.pending(cx),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write_vectored(cx, bufs) {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    self.progressed();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => self.pending(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Pending => self.pending(cx),
            other => other,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_shutdown(cx) {
            Poll::Pending => self.pending(cx),
            other => other,
        }
    }
}

fn script(body: String) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response()
}

/// A script that tells the console why and returns to the firmware (which tries its next boot
/// device).
fn refusal(reason: &str) -> String {
    format!("#!ipxe\necho shoal: {reason}\nsleep 5\nexit 1\n")
}

/// A script that tells the console why, waits, asks DHCP again (a fresh PXE sighting) and fetches
/// its script once more.
fn retry_later(reason: &str, after: Duration, url: &str) -> String {
    format!(
        "#!ipxe\necho shoal: {reason}\nsleep {}\ndhcp\nchain --replace --autofree {url}\n",
        after.as_secs().max(1)
    )
}

/// Mints a single-use, short-lived join token for one boot of `mac` with `image`, bound to
/// `binding`.
fn mint_token(
    ctl: &Controller,
    mac: &Mac,
    image: &str,
    binding: &TokenBinding,
) -> Result<JoinToken, StoreError> {
    let now = now_ms();
    let token = JoinToken {
        id: hex::encode(rand::random::<[u8; 8]>()),
        secret: hex::encode(rand::random::<[u8; 16]>()),
        ca_sha256: ctl.ca.sha256(),
    };
    let ttl_ms = ctl.netboot.config.boot_token_ttl.as_millis() as u64;
    let labels = BTreeMap::from([
        (IMAGE_LABEL.to_owned(), image.to_owned()),
        (MAC_LABEL.to_owned(), mac.to_string()),
    ]);
    let record = TokenRecord {
        id: token.id.clone(),
        secret_sha256: pki::sha256(token.secret.as_bytes()),
        created_at: now,
        expires_at: Some(UnixMillis(now.0.saturating_add(ttl_ms))),
        max_uses: Some(1),
        uses: 0,
        revoked_at: None,
        labels,
    };
    ctl.store.create_bound_token(&record, binding)?;
    Ok(token)
}

/// Revokes the boot token a new one replaced, unless it was used (its enrolment may still be
/// answered) or is gone (pruned). The store's sweep deletes it later.
fn retire_replaced(ctl: &Controller, mac: &Mac, id: &str) -> Result<(), StoreError> {
    let unused = ctl
        .store
        .tokens()?
        .into_iter()
        .find(|t| t.id == id)
        .is_some_and(|t| t.uses == 0 && t.revoked_at.is_none());
    if unused {
        ctl.store.revoke_token(id, now_ms())?;
        info!(%mac, token = %id, "unused boot token replaced by a new one and revoked");
    }
    Ok(())
}

/// The image for a machine: its node's assignment, else the default.
fn image_for(ctl: &Controller, mac: &Mac) -> Result<Option<String>, StoreError> {
    let mac_text = mac.to_string();
    let node = ctl.store.nodes()?.into_iter().find(|n| {
        n.inventory.as_ref().is_some_and(|i| {
            i.nics
                .iter()
                .any(|nic| nic.mac.as_deref() == Some(mac_text.as_str()))
        })
    });
    if let Some(node) = node {
        if let Some(v) = ctl.netboot.machines.node_image(&node.id)? {
            return Ok(Some(v));
        }
    }
    Ok(ctl.netboot.images.default_version().ok().flatten())
}

/// The iPXE script for `mac` asking at `now`: a boot with a fresh token, or a refusal. Blocking
/// (store).
fn boot_script_text(
    ctl: &Controller,
    boot: &BootContext,
    mac: Mac,
    now: Instant,
) -> Result<String, StoreError> {
    let machine = ctl.netboot.machines.machine(&mac)?;
    if !machine.as_ref().is_some_and(|m| m.admitted)
        && ctl.netboot.config.admission == super::machines::AdmissionPolicy::Hold
    {
        info!(%mac, "boot script refused: machine not admitted");
        return Ok(refusal("this machine waits for `shoalctl machines admit`"));
    }
    let window = ctl.netboot.config.boot_tokens.sighting_window;
    let not_sighted = || {
        info!(%mac, window = %humantime::format_duration(window), "boot script refused: the DHCP server saw no PXE boot from this MAC in the window");
        refusal(&format!("no PXE boot from {mac} seen in the last {}; boot tokens are only minted for machines booting from the network", humantime::format_duration(window)))
    };
    if !ctl.netboot.gate().sighted(&mac, now) {
        return Ok(not_sighted());
    }
    let Some(version) = image_for(ctl, &mac)? else {
        warn!(%mac, "no image to boot: add one with `shoalctl image add`");
        return Ok(refusal("no image to boot (shoalctl image add DIR)"));
    };
    let manifest = match ctl.netboot.images.get(&version) {
        Ok(m) => m,
        Err(e) => {
            warn!(%mac, image = %version, cause = %e, "assigned image unavailable");
            return Ok(refusal(&format!("image {version} unavailable")));
        }
    };
    let admitted = ctl.netboot.gate().admit(&mac, now);
    match admitted {
        Ok(()) => {}
        Err(Refusal::NotSighted(_)) => return Ok(not_sighted()),
        Err(r @ Refusal::Busy(wait)) => {
            let stats = ctl.netboot.gate().stats();
            warn!(%mac, retry_in_ms = wait.as_millis() as u64, refused_busy = stats.refused_busy, "boot script refused: boot token rate spent");
            // Spread the retries of a crowd: 5 to 14 s, by the MAC's last byte.
            let after =
                wait.max(Duration::from_secs(5)) + Duration::from_secs(u64::from(mac.0[5] % 10));
            return Ok(retry_later(
                &r.to_string(),
                after,
                &format!("{}/boot/{}.ipxe", boot.http_base, mac.dashed()),
            ));
        }
    }
    let token = mint_token(ctl, &mac, &version, &TokenBinding::Mac(mac.to_string()))?;
    let replaced = ctl.netboot.gate().minted(mac, token.id.clone());
    if let Some(old) = replaced {
        retire_replaced(ctl, &mac, &old)?;
    }
    ctl.netboot.machines.booted(mac, &version, now_ms())?;
    let base = format!("{}/images/{version}", boot.http_base);
    let cmdline = kernel_cmdline(boot, &manifest, &token, &version);
    info!(%mac, image = %version, token = %token.id, "boot script served with a single-use join token");
    Ok(format!(
        "#!ipxe\necho shoal: booting image {version}\nkernel {base}/{kernel} {cmdline}\ninitrd {base}/{initrd}\nboot\n",
        kernel = manifest.kernel.file,
        initrd = manifest.initrd.file,
        cmdline = cmdline.trim_end(),
    ))
}

async fn boot_script(State(st): State<HttpState>, Path(file): Path<String>) -> Response {
    let Some(mac) = file
        .strip_suffix(".ipxe")
        .and_then(|m| m.parse::<Mac>().ok())
    else {
        return (StatusCode::NOT_FOUND, "not found").into_response();
    };
    let now = Instant::now();
    let result =
        tokio::task::spawn_blocking(move || boot_script_text(&st.controller, &st.boot, mac, now))
            .await;
    match result {
        Ok(Ok(text)) => script(text),
        Ok(Err(e)) => {
            warn!(%mac, cause = %e, "boot script failed");
            (StatusCode::SERVICE_UNAVAILABLE, "controller storage failed").into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// The kernel command line of one boot: the controller's address, the boot's join token, the image
/// version, then the image's own arguments.
fn kernel_cmdline(
    boot: &BootContext,
    manifest: &super::images::Manifest,
    token: &JoinToken,
    version: &str,
) -> String {
    format!(
        "initrd={initrd} shoal.controller={ctl_addr} shoal.token={token} shoal.image={version} {extra}",
        initrd = manifest.initrd.file,
        ctl_addr = boot.controller_addr,
        extra = manifest.cmdline,
    )
}

/// What `node` needs to kexec into `version`: the same kernel, initramfs and command line its iPXE
/// script would boot, with a join token minted for that boot. For a v5 agent ([`SignedKexecImage`])
/// the image's signed manifest, URLs, controller address and token: the agent verifies the manifest
/// with its own image keys and builds the command line itself, so the controller cannot hand it a
/// kernel of its choosing. For a v4 agent ([`KexecImage`]) the hashes and the finished command
/// line. `None` when the netboot servers do not run or the node's MAC (label `netboot.mac`) is not
/// known. Blocking (store).
pub(crate) fn kexec_image(
    ctl: &Controller,
    node: &NodeId,
    version: &str,
    protocol: u16,
) -> Result<Option<ControllerMsg>, crate::store::StoreError> {
    let Some(boot) = ctl.netboot.boot.get() else {
        return Ok(None);
    };
    let Some(mac) = ctl
        .store
        .node(node)?
        .and_then(|n| n.labels.get(MAC_LABEL).and_then(|m| m.parse::<Mac>().ok()))
    else {
        return Ok(None);
    };
    let Ok(manifest) = ctl.netboot.images.get(version) else {
        return Ok(None);
    };
    let signed = if protocol >= SIGNED_KEXEC_PROTOCOL {
        match ctl.netboot.images.signed_manifest(version) {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(node = %node, image = %version, cause = %e, "signed manifest unreadable; no kexec instructions");
                return Ok(None);
            }
        }
    } else {
        None
    };
    let token = mint_token(ctl, &mac, version, &TokenBinding::Node(node.clone()))?;
    ctl.netboot.machines.booted(mac, version, now_ms())?;
    let base = format!("{}/images/{version}", boot.http_base);
    let (kernel_url, initrd_url) = (
        format!("{base}/{}", manifest.kernel.file),
        format!("{base}/{}", manifest.initrd.file),
    );
    Ok(Some(match signed {
        Some((manifest, signature)) => ControllerMsg::SignedKexecImage(SignedKexecImage {
            version: version.to_owned(),
            manifest,
            signature,
            kernel_url,
            initrd_url,
            controller: boot.controller_addr.to_string(),
            boot_token: token.to_string(),
        }),
        None => ControllerMsg::KexecImage(KexecImage {
            version: version.to_owned(),
            kernel_url,
            kernel_sha256: manifest.kernel.sha256.clone(),
            initrd_url,
            initrd_sha256: manifest.initrd.sha256.clone(),
            cmdline: kernel_cmdline(boot, &manifest, &token, version)
                .trim_end()
                .to_owned(),
        }),
    }))
}

/// The first protocol whose agents verify kexec images themselves ([`SignedKexecImage`]).
pub const SIGNED_KEXEC_PROTOCOL: u16 = 5;

async fn image_file(
    State(st): State<HttpState>,
    Path((version, file)): Path<(String, String)>,
) -> Response {
    let path = match st.controller.netboot.images.file(&version, &file) {
        Ok(p) => p,
        Err(_) => return (StatusCode::NOT_FOUND, "not found").into_response(),
    };
    let f = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(_) => return (StatusCode::NOT_FOUND, "not found").into_response(),
    };
    let len = f.metadata().await.map(|m| m.len()).unwrap_or(0);
    info!(image = %version, %file, bytes = len, "serving image file");
    // Streamed: a client that stops mid-transfer only drops its connection.
    let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(f, 64 * 1024));
    (
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_LENGTH, len.to_string()),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, path::Path as FsPath, str::FromStr};

    use shoal_testkit::wait_async;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpSocket, TcpStream},
    };

    use super::*;
    use crate::{
        netboot::images::tests::make_image_with, netboot::NetbootConfig, server::ControllerConfig,
    };

    const MAC: Mac = Mac([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
    const VERSION: &str = "2030.1";

    /// A controller with one image (its initramfs `initrd`), netboot configured by `f`.
    fn controller(
        dir: &FsPath,
        initrd: &[u8],
        f: impl FnOnce(&mut NetbootConfig),
    ) -> Arc<Controller> {
        let img = make_image_with(VERSION, initrd);
        let mut config = ControllerConfig::for_tests(dir.to_owned());
        let key = dir.join("image-key.pub");
        std::fs::write(&key, hex::encode(img.public)).expect("key");
        config.netboot.image_keys.push(key);
        f(&mut config.netboot);
        let ctl = Controller::open(config, "127.0.0.1:1".parse().expect("addr")).expect("open");
        for name in ["manifest.json", "manifest.sig", "vmlinuz", "initrd.img"] {
            ctl.netboot
                .images
                .stage(
                    VERSION,
                    name,
                    &std::fs::read(img.dir.path().join(name)).expect("read"),
                )
                .expect("stage");
        }
        ctl.netboot.images.commit(VERSION).expect("commit");
        ctl
    }

    fn boot() -> BootContext {
        BootContext {
            controller_addr: "10.78.0.1:7440".parse().expect("addr"),
            http_base: "http://10.78.0.1:7442".into(),
        }
    }

    /// The token in a boot script, if there is one.
    fn token_in(script: &str) -> Option<JoinToken> {
        let start = script.find("shoal.token=")? + "shoal.token=".len();
        let text: String = script[start..]
            .chars()
            .take_while(|c| !c.is_whitespace())
            .collect();
        JoinToken::from_str(&text).ok()
    }

    fn token(ctl: &Controller, id: &str) -> TokenRecord {
        ctl.store
            .tokens()
            .expect("tokens")
            .into_iter()
            .find(|t| t.id == id)
            .expect("token stored")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_mac_that_never_pxe_booted_gets_no_token() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ctl = controller(dir.path(), b"initrd", |_| {});
        let script = boot_script_text(&ctl, &boot(), MAC, Instant::now()).expect("script");
        assert!(
            script.starts_with(
                "#!ipxe\necho shoal: no PXE boot from 52:54:00:12:34:56 seen in the last 2m"
            ),
            "{script}"
        );
        assert!(script.contains("exit 1"), "{script}");
        assert!(
            token_in(&script).is_none() && !script.contains("shoal.token"),
            "{script}"
        );
        assert!(
            ctl.store.tokens().expect("tokens").is_empty(),
            "nothing minted"
        );
        // Another MAC's sighting does not count for this one.
        ctl.netboot
            .gate()
            .saw_pxe_boot(Mac([2, 0, 0, 0, 0, 1]), Instant::now());
        assert!(
            token_in(&boot_script_text(&ctl, &boot(), MAC, Instant::now()).expect("script"))
                .is_none()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sighting_gets_a_mac_bound_token_a_second_replaces_the_first_and_the_window_closes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ctl = controller(dir.path(), b"initrd", |_| {});
        let seen = Instant::now();
        ctl.netboot.gate().saw_pxe_boot(MAC, seen);
        let first = token_in(
            &boot_script_text(&ctl, &boot(), MAC, seen + Duration::from_secs(3)).expect("script"),
        )
        .expect("a token");
        let rec = token(&ctl, &first.id);
        assert_eq!((rec.max_uses, rec.uses, rec.revoked_at), (Some(1), 0, None));
        assert_eq!(
            rec.labels.get(MAC_LABEL).map(String::as_str),
            Some("52:54:00:12:34:56")
        );
        assert_eq!(
            ctl.store.token_binding(&first.id).expect("binding"),
            Some(TokenBinding::Mac("52:54:00:12:34:56".into()))
        );
        assert!(ctl
            .netboot
            .machines
            .machine(&MAC)
            .expect("machine")
            .is_some_and(|m| m.last_image.as_deref() == Some(VERSION)));

        let script =
            boot_script_text(&ctl, &boot(), MAC, seen + Duration::from_secs(10)).expect("script");
        let second = token_in(&script).expect("a second token");
        assert!(script.contains(&format!("kernel http://10.78.0.1:7442/images/{VERSION}/vmlinuz initrd=initrd.img shoal.controller=10.78.0.1:7440 shoal.token=")), "{script}");
        assert_ne!(first.id, second.id);
        assert!(
            token(&ctl, &first.id).revoked_at.is_some(),
            "the first, unused, is revoked"
        );
        assert_eq!(token(&ctl, &second.id).revoked_at, None);
        assert_eq!(
            ctl.store
                .tokens()
                .expect("tokens")
                .iter()
                .filter(|t| t.revoked_at.is_none())
                .count(),
            1,
            "one outstanding token"
        );

        // Past the window (2 min by default), no more tokens until the machine PXE-boots again.
        let late = seen + Duration::from_secs(121);
        assert!(token_in(&boot_script_text(&ctl, &boot(), MAC, late).expect("script")).is_none());
        ctl.netboot.gate().saw_pxe_boot(MAC, late);
        assert!(token_in(&boot_script_text(&ctl, &boot(), MAC, late).expect("script")).is_some());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn minting_is_rate_bounded_and_refused_machines_are_told_to_retry() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ctl = controller(dir.path(), b"initrd", |c| {
            c.boot_tokens.burst = 3;
            c.boot_tokens.refill_every = Duration::from_secs(3600);
        });
        let now = Instant::now();
        let macs: Vec<Mac> = (0..5).map(|i| Mac([2, 0, 0, 0, 0, i])).collect();
        for m in &macs {
            ctl.netboot.gate().saw_pxe_boot(*m, now);
        }
        let scripts: Vec<String> = macs
            .iter()
            .map(|m| boot_script_text(&ctl, &boot(), *m, now).expect("script"))
            .collect();
        assert!(
            scripts[..3].iter().all(|s| token_in(s).is_some()),
            "the burst is served"
        );
        for (m, s) in macs[3..].iter().zip(&scripts[3..]) {
            assert!(token_in(s).is_none(), "{s}");
            assert!(s.contains("too many machines booting at once"), "{s}");
            assert!(
                s.contains(&format!(
                    "\ndhcp\nchain --replace --autofree http://10.78.0.1:7442/boot/{}.ipxe\n",
                    m.dashed()
                )),
                "{s}"
            );
        }
        assert_eq!(ctl.store.tokens().expect("tokens").len(), 3);
        assert_eq!(ctl.netboot.gate().stats().refused_busy, 2);
        // One refill interval later, one more machine gets its token.
        let later = now + Duration::from_secs(3600);
        ctl.netboot.gate().saw_pxe_boot(macs[3], later);
        assert!(
            token_in(&boot_script_text(&ctl, &boot(), macs[3], later).expect("script")).is_some()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_kexec_token_is_bound_to_its_node_and_needs_no_sighting() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ctl = controller(dir.path(), b"initrd", |_| {});
        let node = crate::test_support::enrol_for_tests(
            &ctl.store,
            "vm",
            &[(MAC_LABEL, "52:54:00:12:34:56")],
            now_ms(),
        );
        ctl.netboot.boot.set(boot()).expect("boot context");
        assert!(kexec_image(&ctl, &node, VERSION, 5)
            .expect("kexec")
            .is_some());
        let bound: Vec<TokenBinding> = ctl
            .store
            .tokens()
            .expect("tokens")
            .iter()
            .filter_map(|t| ctl.store.token_binding(&t.id).expect("binding"))
            .collect();
        assert_eq!(bound, vec![TokenBinding::Node(node)]);
        assert_eq!(
            ctl.netboot.gate().stats().minted,
            0,
            "not through the PXE gate"
        );
    }

    /// Serves the controller's boot router on a loopback port under `limits`.
    async fn serve_on_loopback(ctl: Arc<Controller>, limits: HttpLimits) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(serve(router(ctl, boot()), listener, limits));
        addr
    }

    async fn connect_from(from: Ipv4Addr, to: SocketAddr) -> TcpStream {
        let sock = TcpSocket::new_v4().expect("socket");
        sock.bind(SocketAddr::from((from, 0))).expect("bind client");
        sock.connect(to).await.expect("connect")
    }

    /// A whole response to `GET path` from `from`, or the error (a refused connection reads EOF).
    async fn get(from: Ipv4Addr, to: SocketAddr, path: &str) -> io::Result<String> {
        let mut s = connect_from(from, to).await;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
            .await
            .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
        let text = String::from_utf8_lossy(&out).into_owned();
        if text.starts_with("HTTP/1.1 200") {
            Ok(text)
        } else {
            Err(io::Error::other(format!("no response: {text:?}")))
        }
    }

    /// Waits until the server closes `s` (EOF or reset), for at most `deadline`; bytes read on the
    /// way are dropped.
    async fn closed_by_server(s: &mut TcpStream, deadline: Duration) -> bool {
        let mut buf = [0u8; 4096];
        tokio::time::timeout(deadline, async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await
        .is_ok()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_trickling_headers_is_cut_off_while_a_good_client_is_served() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ctl = controller(dir.path(), b"initrd", |_| {});
        let limits = HttpLimits {
            header_read_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(60),
            ..HttpLimits::default()
        };
        let addr = serve_on_loopback(ctl, limits).await;

        let slow = connect_from(Ipv4Addr::LOCALHOST, addr).await;
        let (mut slow_rx, mut slow_tx) = slow.into_split();
        // A header byte every 100 ms: never idle, never done.
        let trickle = tokio::spawn(async move {
            slow_tx
                .write_all(b"GET /boot/52-54-00-12-34-56.ipxe HTTP/1.1\r\nX-Slow: ")
                .await?;
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                slow_tx.write_all(b"a").await?;
            }
            #[allow(unreachable_code)]
            io::Result::Ok(())
        });
        let served = get(Ipv4Addr::LOCALHOST, addr, "/boot/52-54-00-12-34-56.ipxe")
            .await
            .expect("the good client is served");
        assert!(served.contains("#!ipxe"), "{served}");
        let mut buf = Vec::new();
        let cut =
            tokio::time::timeout(Duration::from_secs(10), slow_rx.read_to_end(&mut buf)).await;
        assert!(cut.is_ok(), "the trickling client was not cut off");
        assert!(
            trickle.await.expect("trickler").is_err(),
            "its writes fail once the server has closed"
        );
        // The server goes on serving.
        get(Ipv4Addr::LOCALHOST, addr, "/boot/52-54-00-12-34-56.ipxe")
            .await
            .expect("still served");
        // The header timeout runs again from the end of each response: an idle keep-alive
        // connection is closed by it too (the idle timeout here is a minute).
        let mut idle = connect_from(Ipv4Addr::LOCALHOST, addr).await;
        idle.write_all(b"GET /boot/52-54-00-12-34-56.ipxe HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        assert!(
            closed_by_server(&mut idle, Duration::from_secs(10)).await,
            "an idle keep-alive connection stayed open"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn silent_idle_and_stalled_connections_are_closed_and_each_client_has_a_share() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Bigger than the loopback socket buffers, so a client that stops reading stalls the
        // server.
        let initrd = vec![0x5a; 48 << 20];
        let ctl = controller(dir.path(), &initrd, |_| {});
        let limits = HttpLimits {
            header_read_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            connections: SlotLimits {
                total: 16,
                per_client: 1,
            },
        };
        let addr = serve_on_loopback(ctl, limits).await;
        let other = Ipv4Addr::new(127, 0, 0, 2);

        // A connection that never sends a byte is closed by the header timeout.
        let mut silent = connect_from(Ipv4Addr::LOCALHOST, addr).await;
        assert!(
            closed_by_server(&mut silent, Duration::from_secs(10)).await,
            "a silent connection stayed open"
        );
        drop(silent);

        // A keep-alive connection left idle after its response is closed too.
        let mut idle = connect_from(Ipv4Addr::LOCALHOST, addr).await;
        idle.write_all(b"GET /boot/52-54-00-12-34-56.ipxe HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        assert!(
            closed_by_server(&mut idle, Duration::from_secs(10)).await,
            "an idle keep-alive connection stayed open"
        );
        drop(idle);

        // A client that asks for the initramfs and stops reading holds its one slot...
        let mut stalled = connect_from(Ipv4Addr::LOCALHOST, addr).await;
        stalled
            .write_all(
                format!("GET /images/{VERSION}/initrd.img HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
            )
            .await
            .expect("write");
        let mut head = [0u8; 12];
        stalled
            .read_exact(&mut head)
            .await
            .expect("response starts");
        assert_eq!(&head, b"HTTP/1.1 200");
        // ...so its second connection is refused, while another client is served.
        assert!(
            get(Ipv4Addr::LOCALHOST, addr, "/boot/52-54-00-12-34-56.ipxe")
                .await
                .is_err(),
            "a second connection from a client at its share was served"
        );
        get(other, addr, "/boot/52-54-00-12-34-56.ipxe")
            .await
            .expect("another client is served");
        // Once the stalled connection is cut off (idle 1 s), the client is served again.
        wait_async::eventually(
            Duration::from_secs(15),
            "the stalled connection to be closed",
            || async {
                get(Ipv4Addr::LOCALHOST, addr, "/boot/52-54-00-12-34-56.ipxe")
                    .await
                    .ok()
            },
        )
        .await;
        // It got far less than the file: the server stopped writing to it.
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), stalled.read_to_end(&mut rest)).await;
        assert!(
            rest.len() < initrd.len(),
            "the stalled client got the whole file"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_are_capped_overall() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ctl = controller(dir.path(), b"initrd", |_| {});
        let limits = HttpLimits {
            header_read_timeout: Duration::from_secs(600),
            idle_timeout: Duration::from_secs(600),
            connections: SlotLimits {
                total: 2,
                per_client: 8,
            },
        };
        let addr = serve_on_loopback(ctl, limits).await;
        let holders = [
            connect_from(Ipv4Addr::new(127, 0, 0, 3), addr).await,
            connect_from(Ipv4Addr::new(127, 0, 0, 4), addr).await,
        ];
        // The server counts a connection once it accepted it; wait until both hold their slots.
        wait_async::eventually(
            Duration::from_secs(10),
            "a third connection to be refused",
            || async {
                let mut third = connect_from(Ipv4Addr::LOCALHOST, addr).await;
                closed_by_server(&mut third, Duration::from_millis(500))
                    .await
                    .then_some(())
            },
        )
        .await;
        assert!(
            get(Ipv4Addr::LOCALHOST, addr, "/boot/52-54-00-12-34-56.ipxe")
                .await
                .is_err(),
            "served past the cap"
        );
        drop(holders);
        wait_async::eventually(
            Duration::from_secs(10),
            "a client to be served again",
            || async {
                get(Ipv4Addr::LOCALHOST, addr, "/boot/52-54-00-12-34-56.ipxe")
                    .await
                    .ok()
            },
        )
        .await;
    }
}
