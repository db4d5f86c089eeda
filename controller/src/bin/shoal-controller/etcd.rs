//! The etcd flags `serve` and `migrate` share.

use std::path::PathBuf;

use shoal_controller::etcd::{EtcdConfig, DEFAULT_PREFIX};

#[derive(Debug, Clone, clap::Args)]
pub struct EtcdArgs {
    /// Keep the store in this etcd cluster (client URLs, comma-separated), shared with the other
    /// controllers that use it, instead of sled in the data dir. etcd must run with
    /// `--max-txn-ops 4096` or more.
    #[arg(long, value_name = "URL[,URL...]", value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,
    /// Every key under this prefix, so fleets can share one etcd.
    #[arg(long, value_name = "PREFIX", default_value = DEFAULT_PREFIX, requires = "etcd_endpoints")]
    pub etcd_prefix: String,
    /// CA certificate (PEM) of the etcd members' server certificates (`https://` endpoints).
    #[arg(long, value_name = "FILE", requires = "etcd_endpoints")]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd.
    #[arg(long, value_name = "FILE", requires_all = ["etcd_endpoints", "etcd_key"])]
    pub etcd_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, value_name = "FILE", requires_all = ["etcd_endpoints", "etcd_cert"])]
    pub etcd_key: Option<PathBuf>,
}

impl EtcdArgs {
    /// The configuration the flags give, or `None` without `--etcd-endpoints`; checked.
    pub fn config(&self) -> anyhow::Result<Option<EtcdConfig>> {
        if self.etcd_endpoints.is_empty() {
            return Ok(None);
        }
        let config = EtcdConfig {
            endpoints: self.etcd_endpoints.clone(),
            prefix: self.etcd_prefix.clone(),
            ca_file: self.etcd_ca.clone(),
            cert_file: self.etcd_cert.clone(),
            key_file: self.etcd_key.clone(),
            ..EtcdConfig::default()
        };
        config.validate()?;
        Ok(Some(config))
    }
}
