//! Netboot's decisions: the DHCP server (full or proxy), the TFTP server, who gets a boot token, and
//! the per-client slot counts of the boot servers. The sockets are the controller's
//! (`shoal_controller::netboot`).

pub mod boot_tokens;
pub mod dhcp;
pub mod slots;
pub mod tftp;
