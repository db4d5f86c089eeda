//! The boot HTTP server (plain HTTP on the netboot interface; iPXE's HTTPS would need a trust setup in
//! every iPXE binary):
//!
//! - `GET /boot/<mac>.ipxe`: the iPXE script for one machine. It boots the image assigned to the
//!   machine's node (`shoalctl nodes set-image`), else the default image, with a kernel command line
//!   carrying the controller's address and a join token minted for this one boot (single use, short
//!   life, see [`super::NetbootConfig::boot_token_ttl`]). The token is no secret worth stealing for
//!   long: it enrols once, and the agent pins the CA hash inside it, so a machine in the middle cannot
//!   impersonate the controller.
//! - `GET /images/<version>/<file>`: the kernel and initramfs of a stored image.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc};

use axum::{
    body::Body,
    extract::{Path, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use shoal_overlay::pki;
use shoal_proto::{ControllerMsg, JoinToken, KexecImage, NodeId, SignedKexecImage, UnixMillis};
use tracing::{info, warn};

use super::dhcp::Mac;
use crate::{
    server::{now_ms, Controller},
    store::TokenRecord,
};

/// Label set on nodes enrolled by a boot token: the image version they booted.
pub const IMAGE_LABEL: &str = "netboot.image";
/// Label set on nodes enrolled by a boot token: the MAC that fetched the script.
pub const MAC_LABEL: &str = "netboot.mac";

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

/// Serves until the task is aborted.
pub async fn run(controller: Arc<Controller>, boot: BootContext, listener: tokio::net::TcpListener) {
    let app = Router::new()
        .route("/boot/{file}", get(boot_script))
        .route("/images/{version}/{file}", get(image_file))
        .with_state(HttpState { controller, boot });
    if let Err(e) = axum::serve(listener, app).await {
        warn!(cause = %e, "boot HTTP server stopped");
    }
}

fn script(body: String) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response()
}

/// A script that tells the console why and returns to the firmware (which tries its next boot device).
fn refusal(reason: &str) -> Response {
    script(format!("#!ipxe\necho shoal: {reason}\nsleep 5\nexit 1\n"))
}

/// Mints a single-use, short-lived join token for one boot of `mac` with `image`.
fn mint_boot_token(ctl: &Controller, mac: &Mac, image: &str) -> Result<JoinToken, crate::store::StoreError> {
    let now = now_ms();
    let token = JoinToken {
        id: hex::encode(rand::random::<[u8; 8]>()),
        secret: hex::encode(rand::random::<[u8; 16]>()),
        ca_sha256: ctl.ca.sha256(),
    };
    let ttl_ms = ctl.netboot.config.boot_token_ttl.as_millis() as u64;
    let labels = BTreeMap::from([(IMAGE_LABEL.to_owned(), image.to_owned()), (MAC_LABEL.to_owned(), mac.to_string())]);
    ctl.store.create_token(&TokenRecord {
        id: token.id.clone(),
        secret_sha256: pki::sha256(token.secret.as_bytes()),
        created_at: now,
        expires_at: Some(UnixMillis(now.0.saturating_add(ttl_ms))),
        max_uses: Some(1),
        uses: 0,
        revoked_at: None,
        labels,
    })?;
    Ok(token)
}

/// The image for a machine: its node's assignment, else the default.
fn image_for(ctl: &Controller, mac: &Mac) -> Result<Option<String>, crate::store::StoreError> {
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

async fn boot_script(State(st): State<HttpState>, Path(file): Path<String>) -> Response {
    let Some(mac) = file.strip_suffix(".ipxe").and_then(|m| m.parse::<Mac>().ok()) else {
        return (StatusCode::NOT_FOUND, "not found").into_response();
    };
    let ctl = st.controller.clone();
    let boot = st.boot.clone();
    let result = tokio::task::spawn_blocking(move || -> Result<Response, crate::store::StoreError> {
        let machine = ctl.netboot.machines.machine(&mac)?;
        if !machine.as_ref().is_some_and(|m| m.admitted) && ctl.netboot.config.admission == super::machines::AdmissionPolicy::Hold {
            info!(%mac, "boot script refused: machine not admitted");
            return Ok(refusal("this machine waits for `shoalctl machines admit`"));
        }
        let Some(version) = image_for(&ctl, &mac)? else {
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
        let token = mint_boot_token(&ctl, &mac, &version)?;
        ctl.netboot.machines.booted(mac, &version, now_ms())?;
        let base = format!("{}/images/{version}", boot.http_base);
        let cmdline = kernel_cmdline(&boot, &manifest, &token, &version);
        info!(%mac, image = %version, token = %token.id, "boot script served with a single-use join token");
        Ok(script(format!(
            "#!ipxe\necho shoal: booting image {version}\nkernel {base}/{kernel} {cmdline}\ninitrd {base}/{initrd}\nboot\n",
            kernel = manifest.kernel.file,
            initrd = manifest.initrd.file,
            cmdline = cmdline.trim_end(),
        )))
    })
    .await;
    match result {
        Ok(Ok(r)) => r,
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

/// What `node` needs to kexec into `version`: the same kernel, initramfs and command line its iPXE
/// script would boot, with a join token minted for that boot. For a v5 agent
/// ([`SignedKexecImage`]) the image's signed manifest, URLs, controller address and token: the agent
/// verifies the manifest with its own image keys and builds the command line itself, so the
/// controller cannot hand it a kernel of its choosing. For a v4 agent ([`KexecImage`]) the hashes and
/// the finished command line. `None` when the netboot servers do not run or the node's MAC (label
/// `netboot.mac`) is not known. Blocking (store).
pub(crate) fn kexec_image(ctl: &Controller, node: &NodeId, version: &str, protocol: u16) -> Result<Option<ControllerMsg>, crate::store::StoreError> {
    let Some(boot) = ctl.netboot.boot.get() else { return Ok(None) };
    let Some(mac) = ctl.store.node(node)?.and_then(|n| n.labels.get(MAC_LABEL).and_then(|m| m.parse::<Mac>().ok())) else {
        return Ok(None);
    };
    let Ok(manifest) = ctl.netboot.images.get(version) else { return Ok(None) };
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
    let token = mint_boot_token(ctl, &mac, version)?;
    ctl.netboot.machines.booted(mac, version, now_ms())?;
    let base = format!("{}/images/{version}", boot.http_base);
    let (kernel_url, initrd_url) = (format!("{base}/{}", manifest.kernel.file), format!("{base}/{}", manifest.initrd.file));
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
            cmdline: kernel_cmdline(boot, &manifest, &token, version).trim_end().to_owned(),
        }),
    }))
}

/// The first protocol whose agents verify kexec images themselves ([`SignedKexecImage`]).
pub const SIGNED_KEXEC_PROTOCOL: u16 = 5;

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
