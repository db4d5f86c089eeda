//! The boot HTTP server (plain HTTP on the netboot interface; iPXE's HTTPS would need a trust setup in
//! every iPXE binary):
//!
//! - `GET /boot/<mac>.ipxe`: the iPXE script for one machine. It boots the image assigned to the
//!   machine's node (`shoalctl nodes set-image`), else the default image, with a kernel command line
//!   carrying the controller's address and a join token minted for this one boot (single use, short
//!   life, see [`super::NetbootConfig::boot_token_ttl`], bound to the MAC with
//!   [`TokenBinding::Mac`]). A token is minted only for a MAC the DHCP server saw PXE-boot moments
//!   before, at a bounded rate, one outstanding per MAC ([`super::boot_tokens`]); anyone else gets a
//!   script that says why and returns to the firmware. The token enrols once, and the agent pins the
//!   CA hash inside it, so a machine in the middle cannot impersonate the controller.
//! - `GET /images/<version>/<file>`: the kernel and initramfs of a stored image.
//!
//! Connections are served by hyper directly (axum's `serve` has no timeouts) under [`HttpLimits`]:
//! the request head must arrive within `header_read_timeout` (which also ends idle keep-alive
//! connections), a connection on which nothing moves for `idle_timeout` is closed, and connections are
//! capped overall and per client address.

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
use shoal_proto::{JoinToken, KexecImage, NodeId, UnixMillis};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::{debug, info, warn};

use super::{
    boot_tokens::Refusal,
    dhcp::Mac,
    slots::{SharedSlots, SlotLimits},
};
use crate::{
    server::{now_ms, Controller},
    store::{StoreError, TokenBinding, TokenRecord},
};

/// Label set on nodes enrolled by a boot token: the image version they booted.
pub const IMAGE_LABEL: &str = "netboot.image";
/// Label set on nodes enrolled by a boot token: the MAC that fetched the script.
pub const MAC_LABEL: &str = "netboot.mac";

/// The largest request head (request line and headers) read, in bytes; hyper's minimum is 8 KiB.
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// Limits of the boot HTTP server. Every field has a documented default ([`HttpLimits::default`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// A request head must be complete this long after the connection opens or the previous response
    /// ends, so this also closes idle keep-alive connections; default 10 s.
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
            connections: SlotLimits { total: 256, per_client: 8 },
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
pub async fn run(controller: Arc<Controller>, boot: BootContext, listener: tokio::net::TcpListener) {
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
                // Out of file descriptors, typically: give connections time to close instead of spinning.
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
            http.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout).max_buf_size(MAX_HEAD_BYTES);
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
        Self { inner, idle, last_progress: now, timer: Box::pin(tokio::time::sleep_until(now + idle)) }
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
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "connection idle"))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for IdleTimeout<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
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
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
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

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
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

/// A script that tells the console why and returns to the firmware (which tries its next boot device).
fn refusal(reason: &str) -> String {
    format!("#!ipxe\necho shoal: {reason}\nsleep 5\nexit 1\n")
}

/// A script that tells the console why, waits, asks DHCP again (a fresh PXE sighting) and fetches
/// its script once more.
fn retry_later(reason: &str, after: Duration, url: &str) -> String {
    format!("#!ipxe\necho shoal: {reason}\nsleep {}\ndhcp\nchain --replace --autofree {url}\n", after.as_secs().max(1))
}

/// Mints a single-use, short-lived join token for one boot of `mac` with `image`, bound to `binding`.
fn mint_token(ctl: &Controller, mac: &Mac, image: &str, binding: &TokenBinding) -> Result<JoinToken, StoreError> {
    let now = now_ms();
    let token = JoinToken {
        id: hex::encode(rand::random::<[u8; 8]>()),
        secret: hex::encode(rand::random::<[u8; 16]>()),
        ca_sha256: ctl.ca.sha256(),
    };
    let ttl_ms = ctl.netboot.config.boot_token_ttl.as_millis() as u64;
    let labels = BTreeMap::from([(IMAGE_LABEL.to_owned(), image.to_owned()), (MAC_LABEL.to_owned(), mac.to_string())]);
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
    let unused = ctl.store.tokens()?.into_iter().find(|t| t.id == id).is_some_and(|t| t.uses == 0 && t.revoked_at.is_none());
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
        n.inventory.as_ref().is_some_and(|i| i.nics.iter().any(|nic| nic.mac.as_deref() == Some(mac_text.as_str())))
    });
    if let Some(node) = node {
        if let Some(v) = ctl.netboot.machines.node_image(&node.id)? {
            return Ok(Some(v));
        }
    }
    Ok(ctl.netboot.images.default_version().ok().flatten())
}

/// The iPXE script for `mac` asking at `now`: a boot with a fresh token, or a refusal. Blocking (store).
fn boot_script_text(ctl: &Controller, boot: &BootContext, mac: Mac, now: Instant) -> Result<String, StoreError> {
    let machine = ctl.netboot.machines.machine(&mac)?;
    if !machine.as_ref().is_some_and(|m| m.admitted) && ctl.netboot.config.admission == super::machines::AdmissionPolicy::Hold {
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
            let after = wait.max(Duration::from_secs(5)) + Duration::from_secs(u64::from(mac.0[5] % 10));
            return Ok(retry_later(&r.to_string(), after, &format!("{}/boot/{}.ipxe", boot.http_base, mac.dashed())));
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
    let Some(mac) = file.strip_suffix(".ipxe").and_then(|m| m.parse::<Mac>().ok()) else {
        return (StatusCode::NOT_FOUND, "not found").into_response();
    };
    let now = Instant::now();
    let result = tokio::task::spawn_blocking(move || boot_script_text(&st.controller, &st.boot, mac, now)).await;
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
fn kernel_cmdline(boot: &BootContext, manifest: &super::images::Manifest, token: &JoinToken, version: &str) -> String {
    format!(
        "initrd={initrd} shoal.controller={ctl_addr} shoal.token={token} shoal.image={version} {extra}",
        initrd = manifest.initrd.file,
        ctl_addr = boot.controller_addr,
        extra = manifest.cmdline,
    )
}

/// What `node` needs to kexec into `version` ([`KexecImage`]): the same kernel, initramfs and command
/// line its iPXE script would boot, with a join token minted for that boot. `None` when the netboot
/// servers do not run or the node's MAC (label `netboot.mac`) is not known. Blocking (store).
pub(crate) fn kexec_image(ctl: &Controller, node: &NodeId, version: &str) -> Result<Option<KexecImage>, crate::store::StoreError> {
    let Some(boot) = ctl.netboot.boot.get() else { return Ok(None) };
    let Some(mac) = ctl.store.node(node)?.and_then(|n| n.labels.get(MAC_LABEL).and_then(|m| m.parse::<Mac>().ok())) else {
        return Ok(None);
    };
    let Ok(manifest) = ctl.netboot.images.get(version) else { return Ok(None) };
    let token = mint_token(ctl, &mac, version, &TokenBinding::Node(node.clone()))?;
    ctl.netboot.machines.booted(mac, version, now_ms())?;
    let base = format!("{}/images/{version}", boot.http_base);
    Ok(Some(KexecImage {
        version: version.to_owned(),
        kernel_url: format!("{base}/{}", manifest.kernel.file),
        kernel_sha256: manifest.kernel.sha256.clone(),
        initrd_url: format!("{base}/{}", manifest.initrd.file),
        initrd_sha256: manifest.initrd.sha256.clone(),
        cmdline: kernel_cmdline(boot, &manifest, &token, version).trim_end().to_owned(),
    }))
}

async fn image_file(State(st): State<HttpState>, Path((version, file)): Path<(String, String)>) -> Response {
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
    ([(header::CONTENT_TYPE, "application/octet-stream".to_owned()), (header::CONTENT_LENGTH, len.to_string())], body).into_response()
}
