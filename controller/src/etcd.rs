//! Placeholder for the etcd connection settings (the etcd backend's branch brings the real module).

use std::{path::PathBuf, time::Duration};

/// How the controller reaches etcd.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// Endpoint URLs.
    pub endpoints: Vec<String>,
    /// Key prefix (default `/shoal/`).
    pub prefix: String,
    /// CA of etcd's server certificates.
    pub ca_file: Option<PathBuf>,
    /// Client certificate.
    pub cert_file: Option<PathBuf>,
    /// Client key.
    pub key_file: Option<PathBuf>,
    /// Per-request timeout (default 2 s).
    pub request_timeout: Duration,
}

/// Why etcd could not be reached.
#[derive(Debug, thiserror::Error)]
#[error("etcd: {0}")]
pub struct EtcdError(String);

/// Connects a client.
pub async fn connect(config: &EtcdConfig) -> Result<etcd_client::Client, EtcdError> {
    let options = etcd_client::ConnectOptions::new()
        .with_connect_timeout(config.request_timeout)
        .with_timeout(config.request_timeout);
    etcd_client::Client::connect(&config.endpoints, Some(options))
        .await
        .map_err(|e| EtcdError(e.to_string()))
}
