//! `shoalctl image …`, `shoalctl machines …` and `shoalctl nodes set-image`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Subcommand;
use shoal_api::{
    netboot::{ImageView, Mac, MachineView, SetImage},
    nodes::NodeView,
    AdminClient,
};
use shoal_proto::{ImageManifest, ImageManifestError, IMAGE_MANIFEST_FILE, IMAGE_SIGNATURE_FILE};

use super::{output::Out, progress};

#[derive(Debug, Subcommand)]
pub enum ImageCmd {
    /// Upload a netboot image directory built by images/build.sh; the controller verifies its
    /// signature and hashes and refuses it otherwise.
    Add {
        /// The image directory (manifest.json, manifest.sig, kernel, initramfs).
        dir: PathBuf,
    },
    /// List stored images.
    List {},
    /// Make an image the one machines without an assignment boot.
    Default {
        /// Image version.
        version: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum MachinesCmd {
    /// Machines seen on the netboot network.
    List {},
    /// Let a held machine netboot.
    Admit {
        /// MAC address.
        mac: String,
    },
    /// Send a Wake-on-LAN magic packet on the netboot interface.
    Wake {
        /// MAC address.
        mac: String,
    },
}

fn add(client: &AdminClient, dir: &Path, out: &Out) -> anyhow::Result<()> {
    let manifest_path = dir.join(IMAGE_MANIFEST_FILE);
    let bytes = std::fs::read(&manifest_path)
        .with_context(|| format!("reading {}", manifest_path.display()))?;
    let m: ImageManifest = serde_json::from_slice(&bytes)
        .with_context(|| format!("parsing {}", manifest_path.display()))?;
    for name in [
        IMAGE_MANIFEST_FILE,
        IMAGE_SIGNATURE_FILE,
        m.kernel.file.as_str(),
        m.initrd.file.as_str(),
    ] {
        // The controller checks names too; refusing here spares uploading the rest.
        if !shoal_proto::is_plain_name(name) {
            return Err(ImageManifestError::Name(name.to_owned()).into());
        }
        let path = dir.join(name);
        let data = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        progress::upload(
            client,
            &format!("/v1/images/{}/files/{name}", m.version),
            name,
            &data,
        )
        .with_context(|| format!("uploading {name}"))?;
    }
    let view: ImageView =
        client.post(&format!("/v1/images/{}", m.version), &serde_json::json!({}))?;
    out.show(&view, || {
        say!(
            "added image {} (kernel {} bytes, initramfs {} bytes){}",
            view.version,
            view.kernel_bytes,
            view.initrd_bytes,
            if view.default { ", default" } else { "" }
        )
    })
}

pub fn image(client: &AdminClient, cmd: ImageCmd, out: &Out) -> anyhow::Result<()> {
    match cmd {
        ImageCmd::Add { dir } => add(client, &dir, out)?,
        ImageCmd::List {} => {
            let list: Vec<ImageView> = client.get("/v1/images")?;
            out.show(&list, || {
                out.table_wide(
                    &["VERSION", "DEFAULT", "KERNEL", "INITRAMFS", "AGE"],
                    &["BUILT AT"],
                    list.iter().map(|i| {
                        vec![
                            i.version.clone(),
                            if i.default { "*".into() } else { String::new() },
                            i.kernel_bytes.to_string(),
                            i.initrd_bytes.to_string(),
                            out.age(&i.built_at),
                            i.built_at.clone(),
                        ]
                    }),
                );
            })?
        }
        ImageCmd::Default { version } => {
            let view: ImageView = client.post(
                "/v1/images/default",
                &SetImage {
                    version: version.clone(),
                },
            )?;
            out.show(&view, || say!("default image is now {version}"))?;
        }
    }
    Ok(())
}

pub fn set_image(client: &AdminClient, id: &str, version: &str, out: &Out) -> anyhow::Result<()> {
    client.post_no_content(
        &format!("/v1/nodes/{id}/image"),
        &SetImage {
            version: version.to_owned(),
        },
    )?;
    // The API answers 204: the JSON is the node as it is now.
    let node: NodeView = client.get(&format!("/v1/nodes/{id}"))?;
    out.show(&node, || {
        say!("node {id} boots image {version} from its next netboot")
    })
}

pub fn machines(client: &AdminClient, cmd: MachinesCmd, out: &Out) -> anyhow::Result<()> {
    match cmd {
        MachinesCmd::List {} => {
            let list: Vec<MachineView> = client.get("/v1/machines")?;
            out.show(&list, || {
                out.table_wide(
                    &[
                        "MAC",
                        "VENDOR",
                        "ARCH",
                        "ADMITTED",
                        "NODE",
                        "IMAGE",
                        "FIRST SEEN",
                        "LAST SEEN",
                    ],
                    &["FIRST SEEN AT", "LAST SEEN AT"],
                    list.iter().map(|m| {
                        vec![
                            m.mac.clone(),
                            m.vendor.clone().unwrap_or("-".into()),
                            m.arch.clone().unwrap_or("-".into()),
                            if m.admitted {
                                "yes".into()
                            } else {
                                "held".into()
                            },
                            m.node.clone().unwrap_or("-".into()),
                            m.last_image.clone().unwrap_or("-".into()),
                            out.age(&m.first_seen),
                            out.age(&m.last_seen),
                            m.first_seen.clone(),
                            m.last_seen.clone(),
                        ]
                    }),
                );
            })?
        }
        MachinesCmd::Admit { mac } => {
            client.post_no_content(&format!("/v1/machines/{mac}/admit"), &serde_json::json!({}))?;
            // The API answers 204: the JSON is the machine as it is now.
            let all: Vec<MachineView> = client.get("/v1/machines")?;
            let m = all.into_iter().find(|m| m.mac.eq_ignore_ascii_case(&mac));
            out.show(&m, || say!("admitted {mac}"))?;
        }
        MachinesCmd::Wake { mac } => {
            if mac.parse::<Mac>().is_err() {
                bail!("{mac:?} is not a MAC address");
            }
            client.post_no_content(&format!("/v1/machines/{mac}/wake"), &serde_json::json!({}))?;
            out.show(&serde_json::json!({ "mac": mac, "sent": true }), || {
                say!("sent Wake-on-LAN to {mac}")
            })?;
        }
    }
    Ok(())
}
