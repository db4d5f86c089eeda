//! `serve` flags for netboot.

use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

use anyhow::bail;
use shoal_controller::netboot::{dhcp, machines::AdmissionPolicy, NetbootConfig};

#[derive(Debug, clap::Args)]
pub struct NetbootArgs {
    /// Run DHCP, TFTP and the boot HTTP server on this interface (off when absent).
    #[arg(long)]
    netboot_interface: Option<String>,
    /// Be the network's DHCP server for FIRST-LAST (leases persisted in the store).
    #[arg(long, requires = "netboot_interface", conflicts_with = "proxy_dhcp")]
    dhcp_range: Option<String>,
    /// Answer only PXE clients and leave addresses to the network's DHCP server (proxyDHCP).
    #[arg(long, requires = "netboot_interface")]
    proxy_dhcp: bool,
    /// Gateway handed out with --dhcp-range.
    #[arg(long)]
    dhcp_router: Option<Ipv4Addr>,
    /// DNS server handed out with --dhcp-range (repeatable).
    #[arg(long)]
    dhcp_dns: Vec<Ipv4Addr>,
    /// TCP port of the boot HTTP server (iPXE scripts, kernels, initramfs).
    #[arg(long, default_value_t = 7442)]
    netboot_http_port: u16,
    /// Directory served over TFTP (iPXE binaries).
    #[arg(long, default_value = "/usr/lib/ipxe")]
    tftp_root: PathBuf,
    /// Trusted image signing key (the .pub file images/build.sh writes); repeatable.
    #[arg(long)]
    image_key: Vec<PathBuf>,
    /// Hold new PXE clients until `shoalctl machines admit MAC` (default: admit every PXE client).
    #[arg(long)]
    hold_new_machines: bool,
    /// Lifetime of the single-use join token in each boot script.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    boot_token_ttl: Duration,
    /// A boot script gets a token only this soon after the DHCP server saw its MAC PXE-boot.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    boot_sighting_window: Duration,
    /// Boot tokens minted at once before the rate (one a second) applies: machines powering on
    /// together.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    boot_token_burst: u32,
    /// Rows of the machine table (`shoalctl machines list`); new MACs beyond it are not recorded.
    #[arg(long, default_value_t = shoal_controller::netboot::machines::DEFAULT_MAX_MACHINES)]
    max_machines: usize,
}

impl NetbootArgs {
    /// The validated configuration.
    pub fn config(self) -> anyhow::Result<NetbootConfig> {
        let mut c = NetbootConfig::default();
        if self.netboot_interface.is_some() && self.dhcp_range.is_none() && !self.proxy_dhcp {
            bail!("--netboot-interface needs --dhcp-range FIRST-LAST or --proxy-dhcp");
        }
        if let Some(r) = &self.dhcp_range {
            c.dhcp = dhcp::parse_range(r)?;
        }
        c.interface = self.netboot_interface;
        c.router = self.dhcp_router;
        c.dns = self.dhcp_dns;
        c.http_port = self.netboot_http_port;
        c.tftp_root = self.tftp_root;
        c.image_keys = self.image_key;
        c.admission = if self.hold_new_machines {
            AdmissionPolicy::Hold
        } else {
            AdmissionPolicy::AdmitAll
        };
        c.boot_token_ttl = self.boot_token_ttl;
        c.boot_tokens.sighting_window = self.boot_sighting_window;
        c.boot_tokens.burst = self.boot_token_burst;
        c.max_machines = self.max_machines;
        Ok(c)
    }
}
