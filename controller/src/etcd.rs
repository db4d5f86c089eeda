//! Where the controller finds its etcd cluster, and the one way to connect to it: the store's
//! backend ([`crate::store::EtcdBackend`]) and leader election use the same [`connect`].
//!
//! etcd must run with `--max-txn-ops 4096` (or more): a store transaction or batch is one etcd
//! transaction, and shoal sends up to [`crate::store::MAX_BATCH_OPS`] operations in one.

use std::{path::PathBuf, time::Duration};

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

/// How to reach the etcd cluster that holds the controllers' shared state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// Client URLs of the members (`http://10.0.0.1:2379`, `https://…` with TLS). Default: none
    /// (must be given).
    pub endpoints: Vec<String>,
    /// Every key lives under it, so several fleets can share one etcd. Default: `/shoal/`.
    pub prefix: String,
    /// CA certificate (PEM) that signed the members' server certificates. Default: none (plain
    /// HTTP, or the system's roots are not used either: give it for `https://` endpoints).
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM), for members that require client authentication. Default: none.
    pub cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM). Default: none.
    pub key_file: Option<PathBuf>,
    /// How long one request may take before etcd counts as unavailable. Default: 2 s.
    pub request_timeout: Duration,
}

/// [`EtcdConfig::prefix`]'s default.
pub const DEFAULT_PREFIX: &str = "/shoal/";

/// [`EtcdConfig::request_timeout`]'s default.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

impl Default for EtcdConfig {
    fn default() -> Self {
        EtcdConfig {
            endpoints: Vec::new(),
            prefix: DEFAULT_PREFIX.to_owned(),
            ca_file: None,
            cert_file: None,
            key_file: None,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }
}

/// Why the controller cannot use its etcd configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EtcdError {
    /// The configuration is unusable (no endpoints, a key without a certificate, …).
    #[error("etcd configuration: {0}")]
    Config(String),
    /// A TLS file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The client refused the endpoints or options.
    #[error("etcd client at {endpoints}: {source}")]
    Client {
        /// The endpoints, comma-separated.
        endpoints: String,
        /// The client's error.
        source: etcd_client::Error,
    },
}

impl EtcdConfig {
    /// Checks what can be checked without a network: endpoints given, prefix absolute and ending
    /// in `/`, key and certificate together, `https://` endpoints with TLS files, a timeout above
    /// zero.
    pub fn validate(&self) -> Result<(), EtcdError> {
        if self.endpoints.is_empty() {
            return Err(EtcdError::Config("no endpoints given".into()));
        }
        if !self.prefix.starts_with('/') || !self.prefix.ends_with('/') {
            return Err(EtcdError::Config(format!(
                "prefix {:?} must start and end with '/'",
                self.prefix
            )));
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err(EtcdError::Config(
                "a client certificate and its key go together: give both or neither".into(),
            ));
        }
        let tls = self.ca_file.is_some() || self.cert_file.is_some();
        if let Some(plain) = self
            .endpoints
            .iter()
            .find(|e| tls && e.starts_with("http://"))
        {
            return Err(EtcdError::Config(format!(
                "TLS files are given but endpoint {plain} is http://; use https:// endpoints"
            )));
        }
        if self.request_timeout.is_zero() {
            return Err(EtcdError::Config("request timeout is zero".into()));
        }
        Ok(())
    }

    /// The endpoints, comma-separated, for messages.
    pub fn endpoints_text(&self) -> String {
        self.endpoints.join(",")
    }

    /// The client options this configuration asks for (TLS files read now).
    pub fn connect_options(&self) -> Result<ConnectOptions, EtcdError> {
        let mut options = ConnectOptions::new()
            .with_timeout(self.request_timeout)
            .with_connect_timeout(self.request_timeout)
            .with_keep_alive(Duration::from_secs(5), self.request_timeout);
        if self.ca_file.is_some() || self.cert_file.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &self.ca_file {
                tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
            }
            if let (Some(cert), Some(key)) = (&self.cert_file, &self.key_file) {
                tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            options = options.with_tls(tls);
        }
        Ok(options)
    }
}

fn read(path: &PathBuf) -> Result<Vec<u8>, EtcdError> {
    std::fs::read(path).map_err(|source| EtcdError::Read {
        path: path.clone(),
        source,
    })
}

/// A client of the cluster `config` names. Connections are made lazily: this fails only on a bad
/// configuration, not on an unreachable cluster. Call it inside the tokio runtime that will drive
/// the client (its connections live there).
pub async fn connect(config: &EtcdConfig) -> Result<Client, EtcdError> {
    connect_with(config, config.connect_options()?).await
}

/// [`connect`] with options adjusted by the caller (the store adds `require_leader`).
pub(crate) async fn connect_with(
    config: &EtcdConfig,
    options: ConnectOptions,
) -> Result<Client, EtcdError> {
    config.validate()?;
    Client::connect(&config.endpoints, Some(options))
        .await
        .map_err(|source| EtcdError::Client {
            endpoints: config.endpoints_text(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_validation() {
        let c = EtcdConfig::default();
        assert_eq!(c.prefix, "/shoal/");
        assert_eq!(c.request_timeout, Duration::from_secs(2));
        assert!(matches!(c.validate(), Err(EtcdError::Config(_))));
        let c = EtcdConfig {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            ..Default::default()
        };
        c.validate().expect("valid");
        let bad = EtcdConfig {
            prefix: "shoal".into(),
            ..c.clone()
        };
        assert!(bad.validate().is_err());
        let half = EtcdConfig {
            cert_file: Some("/c.pem".into()),
            ..c.clone()
        };
        assert!(half.validate().is_err());
        let plain_with_ca = EtcdConfig {
            ca_file: Some("/ca.pem".into()),
            ..c
        };
        assert!(plain_with_ca.validate().is_err());
    }
}
