//! `shoalctl wireguard peer add|list|remove`: WireGuard devices of overlay networks.
//!
//! The device's private key is made here, printed once inside its configuration and never sent to
//! the controller (which stores only the public key).

use std::io::IsTerminal;

use anyhow::Context;
use clap::Subcommand;
use serde::Serialize;
use shoal_api::client::AdminClient;
use shoal_api::wireguard::{AddPeer, AddedPeer, PeerView};
use shoal_wireguard::{ClientConfig, Key};

use crate::output::Out;

/// `shoalctl wireguard …`.
#[derive(Debug, Subcommand)]
pub enum WireguardCmd {
    /// Devices that reach an overlay network with a stock WireGuard client.
    #[command(subcommand, alias = "peers")]
    Peer(PeerCmd),
}

/// `shoalctl wireguard peer …`.
#[derive(Debug, Subcommand)]
pub enum PeerCmd {
    /// Add a device: it gets an address of the network and a configuration to import.
    Add {
        /// Device name: 1 to 31 of a-z, 0-9 and '-'.
        name: String,
        /// The overlay network it joins.
        #[arg(long)]
        network: String,
        /// The device's public key (as `wg pubkey` prints it). Without it a key pair is made here
        /// and the private key is printed once, in the configuration, and stored nowhere.
        #[arg(long)]
        public_key: Option<String>,
        /// Where clients send to (HOST:PORT): the network's floating gateway endpoint. Needed for
        /// the network's first device; replaces the stored one when given.
        #[arg(long)]
        endpoint: Option<String>,
    },
    /// List a network's devices.
    List {
        /// The overlay network.
        #[arg(long)]
        network: String,
    },
    /// Remove a device: the gateways stop accepting it.
    Remove {
        /// Device name.
        name: String,
        /// The overlay network.
        #[arg(long)]
        network: String,
    },
}

/// What `peer add -o json` prints: the API's answer, and the configuration with the private key
/// when it was made here.
#[derive(Serialize)]
struct Added<'a> {
    #[serde(flatten)]
    added: &'a AddedPeer,
    /// The generated private key (absent with `--public-key`).
    private_key: Option<String>,
    /// The `wg-quick` configuration.
    config: String,
}

pub fn wireguard(client: &AdminClient, cmd: WireguardCmd, out: &Out) -> anyhow::Result<()> {
    let WireguardCmd::Peer(cmd) = cmd;
    match cmd {
        PeerCmd::Add {
            name,
            network,
            public_key,
            endpoint,
        } => {
            let (private, public) = match public_key {
                Some(k) => (None, k.parse::<Key>().context("--public-key")?),
                None => {
                    let private = Key::generate_private();
                    (Some(private), private.public())
                }
            };
            let added = client.add_wireguard_peer(
                &network,
                &AddPeer {
                    name,
                    public_key: public.to_string(),
                    endpoint,
                },
            )?;
            let config = client_config(&added, private)?;
            let text = config.render();
            out.show(
                &Added {
                    added: &added,
                    private_key: private.map(|k| k.to_string()),
                    config: text.clone(),
                },
                || {
                    println!(
                        "added WireGuard device {} to network {} as {}",
                        added.peer.name, added.peer.network, added.peer.address
                    );
                    if private.is_some() {
                        println!(
                            "its private key is in this configuration only; it is stored nowhere\n"
                        );
                    } else {
                        println!();
                    }
                    print!("{text}");
                    if std::io::stdout().is_terminal() {
                        match qr(&text) {
                            Some(code) => println!("\n{code}"),
                            None => println!("\n(the configuration is too long for a QR code)"),
                        }
                    }
                },
            )?;
        }
        PeerCmd::List { network } => {
            let peers: Vec<PeerView> = client.wireguard_peers(&network)?;
            out.show(&peers, || {
                out.table_wide(
                    &["NAME", "ADDRESS", "ADDED"],
                    &["PUBLIC KEY"],
                    peers.iter().map(|p| {
                        vec![
                            p.name.clone(),
                            p.address.clone(),
                            p.created_at.clone(),
                            p.public_key.clone(),
                        ]
                    }),
                )
            })?;
        }
        PeerCmd::Remove { name, network } => {
            let gone = client.remove_wireguard_peer(&network, &name)?;
            out.show(&gone, || {
                println!(
                    "removed WireGuard device {} ({}) from network {}",
                    gone.name, gone.address, gone.network
                )
            })?;
        }
    }
    Ok(())
}

fn client_config(added: &AddedPeer, private: Option<Key>) -> anyhow::Result<ClientConfig> {
    Ok(ClientConfig {
        private_key: private,
        address: added
            .peer
            .address
            .parse()
            .context("the controller's device address")?,
        gateway_public_key: added
            .gateway_public_key
            .parse()
            .context("the controller's gateway key")?,
        endpoint: added.endpoint.clone(),
        allowed_ips: added.allowed_ips.clone(),
    })
}

/// The configuration as a QR code in terminal blocks (two rows per character), as the WireGuard
/// apps scan it.
fn qr(text: &str) -> Option<String> {
    let code = qrcode::QrCode::new(text.as_bytes()).ok()?;
    Some(
        code.render::<qrcode::render::unicode::Dense1x2>()
            .dark_color(qrcode::render::unicode::Dense1x2::Light)
            .light_color(qrcode::render::unicode::Dense1x2::Dark)
            .build(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configuration_fits_a_qr_code() {
        let config = ClientConfig {
            private_key: Some(Key::generate_private()),
            address: "10.90.0.10".parse().expect("ip"),
            gateway_public_key: Key::generate_private().public(),
            endpoint: "gateway.example.net:51820".into(),
            allowed_ips: "10.90.0.0/16".into(),
        };
        let code = qr(&config.render()).expect("a QR code");
        assert!(code.lines().count() > 20, "{code}");
    }
}
