//! `AdminClient`, the one HTTPS client of the admin API: `shoalctl`, the load generators and the
//! tests talk to the controller through it. Blocking (ureq), so a one-request CLI needs no async
//! runtime; it trusts only the fleet CA from `admin.conf`.

use serde::Serialize;

use crate::{
    admin_conf::AdminConf,
    drives::{
        DriveCommandView, DrivePolicies, DrivePolicyView, DriveView, PrepareRequest,
        SelfTestRequest, SetDrivePolicy,
    },
    error::ApiError,
    networks::{CreateNetwork, MemberSpec, NetworkDetail, NetworkUpdate, NetworkView},
    tokens::{CreateToken, CreatedToken},
};

/// Decodes the first PEM certificate's body (the CA in `admin.conf`).
fn pem_to_der(pem: &str) -> Option<Vec<u8>> {
    use rustls_pki_types::{pem::PemObject, CertificateDer};
    CertificateDer::from_pem_slice(pem.as_bytes())
        .ok()
        .map(|c| c.to_vec())
}

/// Why an admin API call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminClientError {
    /// The credential file's CA is not a PEM certificate.
    #[error("admin.conf: the ca field is not a PEM certificate")]
    BadCa,
    /// The controller could not be reached.
    #[error("cannot reach the controller at {api}: {cause}")]
    Unreachable {
        /// The API address.
        api: String,
        /// The cause.
        cause: String,
    },
    /// The controller answered with an error.
    #[error("{message} (HTTP {status})")]
    Api {
        /// HTTP status.
        status: u16,
        /// The controller's error text.
        message: String,
    },
    /// The answer was not what the endpoint returns.
    #[error("unexpected answer from {path}: {cause}")]
    Decode {
        /// The request path.
        path: String,
        /// The cause.
        cause: String,
    },
}

/// A blocking client of the admin API, authenticated by an [`AdminConf`]: `shoalctl` and the tests
/// talk to the controller through it.
#[derive(Clone)]
pub struct AdminClient {
    agent: ureq::Agent,
    base: String,
    auth: String,
}

impl std::fmt::Debug for AdminClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminClient")
            .field("base", &self.base)
            .finish()
    }
}

impl AdminClient {
    /// A client that trusts only the fleet CA from the credential file.
    pub fn new(conf: &AdminConf) -> Result<AdminClient, AdminClientError> {
        let ca = pem_to_der(&conf.ca).ok_or(AdminClientError::BadCa)?;
        let tls = ureq::tls::TlsConfig::builder()
            .provider(ureq::tls::TlsProvider::Rustls)
            .root_certs(ureq::tls::RootCerts::Specific(std::sync::Arc::new(vec![
                ureq::tls::Certificate::from_der(&ca).to_owned(),
            ])))
            .unversioned_rustls_crypto_provider(std::sync::Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .build();
        let agent = ureq::Agent::config_builder()
            .tls_config(tls)
            .http_status_as_error(false)
            .timeout_global(Some(std::time::Duration::from_secs(30)))
            .build()
            .new_agent();
        Ok(AdminClient {
            agent,
            base: conf.api.trim_end_matches('/').to_owned(),
            auth: format!("Bearer {}", conf.token),
        })
    }

    /// One request; `Ok(None)` for an empty (204) answer.
    fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Option<T>, AdminClientError> {
        self.call_timeout(method, path, body, None)
    }

    /// One request, with its own overall timeout instead of the client's 30 s.
    fn call_timeout<T: serde::de::DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
        timeout: Option<std::time::Duration>,
    ) -> Result<Option<T>, AdminClientError> {
        let url = format!("{}{}", self.base, path);
        let result = match (method, body) {
            ("POST", Some(b)) => match timeout {
                Some(t) => self
                    .agent
                    .post(&url)
                    .header("authorization", &self.auth)
                    .config()
                    .timeout_global(Some(t))
                    .build()
                    .send_json(b),
                None => self
                    .agent
                    .post(&url)
                    .header("authorization", &self.auth)
                    .send_json(b),
            },
            ("DELETE", _) => self
                .agent
                .delete(&url)
                .header("authorization", &self.auth)
                .call(),
            _ => self
                .agent
                .get(&url)
                .header("authorization", &self.auth)
                .call(),
        };
        let unreachable = |e: ureq::Error| AdminClientError::Unreachable {
            api: self.base.clone(),
            cause: e.to_string(),
        };
        let mut resp = result.map_err(unreachable)?;
        let status = resp.status().as_u16();
        if status == 204 {
            return Ok(None);
        }
        let text = resp.body_mut().read_to_string().map_err(unreachable)?;
        if !(200..300).contains(&status) {
            let message = serde_json::from_str::<ApiError>(&text)
                .map(|e| e.error)
                .unwrap_or(text);
            return Err(AdminClientError::Api { status, message });
        }
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| AdminClientError::Decode {
                path: path.to_owned(),
                cause: e.to_string(),
            })
    }

    fn required<T>(path: &str, v: Option<T>) -> Result<T, AdminClientError> {
        v.ok_or_else(|| AdminClientError::Decode {
            path: path.to_owned(),
            cause: "empty answer".into(),
        })
    }

    /// `GET path`.
    pub fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, AdminClientError> {
        Self::required(path, self.call("GET", path, None)?)
    }

    /// `POST path` with a JSON body.
    pub fn post<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T, AdminClientError> {
        let body = serde_json::to_value(body).map_err(|e| AdminClientError::Decode {
            path: path.to_owned(),
            cause: e.to_string(),
        })?;
        Self::required(path, self.call("POST", path, Some(&body))?)
    }

    /// `DELETE path`; the answer, if the endpoint returns one.
    pub fn delete<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
    ) -> Result<Option<T>, AdminClientError> {
        self.call("DELETE", path, None)
    }

    /// `POST path` with a JSON body, waiting up to `timeout` for the answer (drive commands).
    pub fn post_waiting<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
        timeout: std::time::Duration,
    ) -> Result<T, AdminClientError> {
        let body = serde_json::to_value(body).map_err(|e| AdminClientError::Decode {
            path: path.to_owned(),
            cause: e.to_string(),
        })?;
        Self::required(
            path,
            self.call_timeout("POST", path, Some(&body), Some(timeout))?,
        )
    }

    /// `POST path` with a JSON body, for endpoints that answer 204 No Content.
    pub fn post_no_content(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> Result<(), AdminClientError> {
        let body = serde_json::to_value(body).map_err(|e| AdminClientError::Decode {
            path: path.to_owned(),
            cause: e.to_string(),
        })?;
        self.call::<serde_json::Value>("POST", path, Some(&body))
            .map(|_| ())
    }

    /// `POST path` with a raw body (image uploads); the answer is ignored.
    pub fn upload(&self, path: &str, bytes: &[u8]) -> Result<(), AdminClientError> {
        self.upload_reporting(path, bytes, &mut |_| {})
    }

    /// [`AdminClient::upload`], calling `sent` with the bytes sent so far as the body goes out
    /// (for a progress display).
    pub fn upload_reporting(
        &self,
        path: &str,
        bytes: &[u8],
        sent: &mut dyn FnMut(u64),
    ) -> Result<(), AdminClientError> {
        let url = format!("{}{}", self.base, path);
        let mut body = Reporting {
            rest: bytes,
            sent: 0,
            report: sent,
        };
        let unreachable = |e: ureq::Error| AdminClientError::Unreachable {
            api: self.base.clone(),
            cause: e.to_string(),
        };
        let mut resp = self
            .agent
            .post(&url)
            .header("authorization", &self.auth)
            .header("content-type", "application/octet-stream")
            // Known up front: sent as Content-Length, not chunked, though the body is a reader.
            .header("content-length", bytes.len().to_string())
            .config()
            .timeout_global(Some(std::time::Duration::from_secs(600)))
            .build()
            .send(ureq::SendBody::from_reader(&mut body))
            .map_err(unreachable)?;
        let status = resp.status().as_u16();
        if !(200..300).contains(&status) {
            let text = resp.body_mut().read_to_string().unwrap_or_default();
            let message = serde_json::from_str::<ApiError>(&text)
                .map(|e| e.error)
                .unwrap_or(text);
            return Err(AdminClientError::Api { status, message });
        }
        Ok(())
    }

    /// `POST path` with a JSON body, answered by raw bytes of at most `limit` (a backup archive).
    pub fn post_for_bytes(
        &self,
        path: &str,
        body: &impl Serialize,
        limit: u64,
        timeout: std::time::Duration,
    ) -> Result<Vec<u8>, AdminClientError> {
        let url = format!("{}{}", self.base, path);
        let unreachable = |e: ureq::Error| AdminClientError::Unreachable {
            api: self.base.clone(),
            cause: e.to_string(),
        };
        let body = serde_json::to_value(body).map_err(|e| AdminClientError::Decode {
            path: path.to_owned(),
            cause: e.to_string(),
        })?;
        let mut resp = self
            .agent
            .post(&url)
            .header("authorization", &self.auth)
            .config()
            .timeout_global(Some(timeout))
            .build()
            .send_json(&body)
            .map_err(unreachable)?;
        let status = resp.status().as_u16();
        if !(200..300).contains(&status) {
            let text = resp.body_mut().read_to_string().unwrap_or_default();
            let message = serde_json::from_str::<ApiError>(&text)
                .map(|e| e.error)
                .unwrap_or(text);
            return Err(AdminClientError::Api { status, message });
        }
        resp.body_mut()
            .with_config()
            .limit(limit)
            .read_to_vec()
            .map_err(unreachable)
    }

    /// Creates a join token.
    pub fn create_token(&self, req: &CreateToken) -> Result<CreatedToken, AdminClientError> {
        self.post("/v1/tokens", req)
    }
}

/// An upload body that says how much of it was read.
struct Reporting<'a> {
    rest: &'a [u8],
    sent: u64,
    report: &'a mut dyn FnMut(u64),
}

impl std::io::Read for Reporting<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.rest.read(buf)?;
        self.sent += n as u64;
        (self.report)(self.sent);
        Ok(n)
    }
}

/// Percent-encodes a path segment or query value (everything but RFC 3986's unreserved characters).
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Nodes.
impl AdminClient {
    /// Every node, or those a label selector matches (the controller parses and matches it).
    pub fn nodes(
        &self,
        selector: Option<&str>,
    ) -> Result<Vec<crate::nodes::NodeView>, AdminClientError> {
        match selector {
            Some(s) => self.get(&format!("/v1/nodes?selector={}", escape(s))),
            None => self.get("/v1/nodes"),
        }
    }

    /// Sets and removes a node's labels.
    pub fn label_node(
        &self,
        node: &str,
        req: &crate::nodes::LabelNode,
    ) -> Result<crate::nodes::LabelsChanged, AdminClientError> {
        self.post(&format!("/v1/nodes/{}/labels", escape(node)), req)
    }

    /// Deletes the disruption budget of a selector (one percent-encoded path segment).
    pub fn delete_budget(&self, selector: &str) -> Result<(), AdminClientError> {
        self.delete::<serde_json::Value>(&format!("/v1/budgets/{}", escape(selector)))?;
        Ok(())
    }
}

/// Overlay networks.
impl AdminClient {
    /// Lists overlay networks.
    pub fn networks(&self) -> Result<Vec<NetworkView>, AdminClientError> {
        self.get("/v1/networks")
    }

    /// One network with its members.
    pub fn network(&self, name: &str) -> Result<NetworkDetail, AdminClientError> {
        self.get(&format!("/v1/networks/{}", escape(name)))
    }

    /// Creates a network.
    pub fn create_network(&self, req: &CreateNetwork) -> Result<NetworkView, AdminClientError> {
        self.post("/v1/networks", req)
    }

    /// Deletes a network and all its memberships.
    pub fn delete_network(&self, name: &str) -> Result<NetworkUpdate, AdminClientError> {
        let path = format!("/v1/networks/{}", escape(name));
        Self::required(&path, self.delete(&path)?)
    }

    /// Adds a node, or a selector (and the nodes it matches), to a network.
    pub fn add_to_network(
        &self,
        name: &str,
        who: &MemberSpec,
    ) -> Result<NetworkUpdate, AdminClientError> {
        self.post(&format!("/v1/networks/{}/members", escape(name)), who)
    }

    /// Removes a node, or a selector (and the nodes only it kept), from a network.
    pub fn remove_from_network(
        &self,
        name: &str,
        who: &MemberSpec,
    ) -> Result<NetworkUpdate, AdminClientError> {
        let mut path = format!("/v1/networks/{}/members", escape(name));
        let params: Vec<String> = [("node", &who.node), ("selector", &who.selector)]
            .into_iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", escape(v))))
            .collect();
        if !params.is_empty() {
            path = format!("{path}?{}", params.join("&"));
        }
        Self::required(&path, self.delete(&path)?)
    }
}

/// WireGuard devices.
impl AdminClient {
    /// Adds a WireGuard device to a network.
    pub fn add_wireguard_peer(
        &self,
        network: &str,
        req: &crate::wireguard::AddPeer,
    ) -> Result<crate::wireguard::AddedPeer, AdminClientError> {
        self.post(&format!("/v1/wireguard/{}/peers", escape(network)), req)
    }

    /// A network's WireGuard devices, by address.
    pub fn wireguard_peers(
        &self,
        network: &str,
    ) -> Result<Vec<crate::wireguard::PeerView>, AdminClientError> {
        self.get(&format!("/v1/wireguard/{}/peers", escape(network)))
    }

    /// Removes a WireGuard device; returns it.
    pub fn remove_wireguard_peer(
        &self,
        network: &str,
        name: &str,
    ) -> Result<crate::wireguard::PeerView, AdminClientError> {
        let path = format!("/v1/wireguard/{}/peers/{}", escape(network), escape(name));
        Self::required(&path, self.delete(&path)?)
    }
}

/// Drives.
impl AdminClient {
    /// How long the client waits for `drives prepare`: the controller's own wait (10 min) and a
    /// margin.
    pub const PREPARE_WAIT: std::time::Duration = std::time::Duration::from_secs(11 * 60);

    /// How long the client waits for `drives test`: the controller's own wait (60 s) and a margin.
    pub const SELF_TEST_WAIT: std::time::Duration = std::time::Duration::from_secs(90);

    /// Every drive (or one node's).
    pub fn drives(&self, node: Option<&str>) -> Result<Vec<DriveView>, AdminClientError> {
        match node {
            Some(n) => self.get(&format!("/v1/drives?node={}", escape(n))),
            None => self.get("/v1/drives"),
        }
    }

    /// Prepares a drive and waits for the agent's answer.
    pub fn prepare_drive(
        &self,
        node: &str,
        device: &str,
        req: &PrepareRequest,
    ) -> Result<DriveCommandView, AdminClientError> {
        self.post_waiting(
            &format!("/v1/drives/{}/{}/prepare", escape(node), escape(device)),
            req,
            Self::PREPARE_WAIT,
        )
    }

    /// Starts a SMART self-test (`short` or `long`) and waits for the agent to say it started.
    pub fn self_test_drive(
        &self,
        node: &str,
        device: &str,
        kind: &str,
    ) -> Result<DriveCommandView, AdminClientError> {
        let body = SelfTestRequest {
            kind: kind.to_owned(),
        };
        self.post_waiting(
            &format!("/v1/drives/{}/{}/self-test", escape(node), escape(device)),
            &body,
            Self::SELF_TEST_WAIT,
        )
    }

    /// Stored drive policies and every node's effective one.
    pub fn drive_policies(&self) -> Result<DrivePolicies, AdminClientError> {
        self.get("/v1/drive-policies")
    }

    /// Sets a drive policy for a node or a selector.
    pub fn set_drive_policy(
        &self,
        req: &SetDrivePolicy,
    ) -> Result<DrivePolicyView, AdminClientError> {
        self.post("/v1/drive-policies", req)
    }

    /// Deletes the drive policy of a node or a selector (`who` names exactly one).
    pub fn delete_drive_policy(
        &self,
        who: &MemberSpec,
    ) -> Result<DrivePolicyView, AdminClientError> {
        let params: Vec<String> = [("node", &who.node), ("selector", &who.selector)]
            .into_iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", escape(v))))
            .collect();
        let path = format!("/v1/drive-policies?{}", params.join("&"));
        Self::required(&path, self.delete(&path)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_and_query_values_are_percent_encoded() {
        assert_eq!(escape("sdb"), "sdb");
        assert_eq!(escape("a-b.c_d~e"), "a-b.c_d~e");
        assert_eq!(escape("role=db"), "role%3Ddb");
        assert_eq!(escape("../x y/é"), "..%2Fx%20y%2F%C3%A9");
    }
}
