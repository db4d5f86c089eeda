//! TLS and QUIC configurations for the control connection.
//!
//! - The controller presents a certificate for [`CONTROLLER_SERVER_NAME`] issued by the fleet CA,
//!   and asks for a client certificate without requiring one: a connection without one may only
//!   enrol.
//! - An enrolled agent trusts only the fleet CA and presents its node certificate (mutual TLS).
//! - A new agent has no trust anchor yet: it accepts a controller whose chain contains the CA whose
//!   SHA-256 its join token carries, and then verifies the chain against that CA as usual.

use std::{sync::Arc, time::Duration};

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    client::WebPkiServerVerifier,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    server::WebPkiClientVerifier,
    DigitallySignedStruct, RootCertStore, SignatureScheme,
};

use crate::pki::{sha256, CONTROLLER_SERVER_NAME};

/// ALPN of the agent–controller control protocol.
pub const CONTROL_ALPN: &[u8] = b"shoal-control";

/// ALPN of controller–controller mesh connections (several controllers on one etcd cluster).
pub const MESH_ALPN: &[u8] = b"shoal-mesh";

/// ALPN of agent–agent overlay connections.
pub const PEER_ALPN: &[u8] = b"shoal-peer";

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// rustls refused the certificates or keys.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client certificate verifier could not be built.
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// QUIC refused the TLS configuration (no TLS 1.3 suite).
    #[error("QUIC TLS configuration: {0}")]
    Quic(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca_der: &[u8]) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from(ca_der.to_vec()))?;
    Ok(Arc::new(roots))
}

/// The idle timeout of a control connection unless the agent asks for a shorter one (QUIC takes
/// the shorter of the two sides').
pub const CONTROL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// QUIC transport settings for a control connection: small windows (control traffic is a few KiB a
/// minute, and the controller holds thousands of these) and a keep-alive that holds NAT mappings.
pub fn control_transport(keep_alive: Option<Duration>) -> quinn::TransportConfig {
    control_transport_with_idle(keep_alive, CONTROL_IDLE_TIMEOUT)
}

/// [`control_transport`] with another idle timeout: agents that fail over between controllers
/// ask for a short one, so a controller that died without a close frame is noticed within it.
pub fn control_transport_with_idle(
    keep_alive: Option<Duration>,
    idle: Duration,
) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(4u32.into())
        // One: the controller's NAT probe port answers on a stream it opens.
        .max_concurrent_uni_streams(1u32.into())
        .stream_receive_window((256u32 * 1024).into())
        .receive_window((1024u32 * 1024).into())
        .send_window(1024 * 1024)
        .keep_alive_interval(keep_alive);
    // An idle timeout well above the keep-alive, so one lost keep-alive does not end the session.
    if let Ok(idle) = quinn::IdleTimeout::try_from(idle) {
        t.max_idle_timeout(Some(idle));
    }
    // The control connection also carries relayed peer packets as datagrams. A relayed QUIC packet
    // is at least 1200 bytes (QUIC's minimum for Initials) plus a 4-byte relay header, which does
    // not fit quinn's default starting MTU of 1200: start at 1280 (IPv6's minimum link MTU, less
    // headers, is 1232, but every underlay shoal targets carries 1280-byte UDP payloads; path MTU
    // discovery then raises it and black-hole detection lowers it if a path cannot).
    t.initial_mtu(1280);
    t
}

/// QUIC transport settings for an overlay peer connection. Keep-alives every second hold NAT
/// mappings open and let a dead path be noticed after `idle` so traffic moves to another path
/// quickly; windows are small because overlay frames travel as datagrams, not streams.
pub fn peer_transport(idle: Duration, congestion: Congestion) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    match congestion {
        Congestion::Cubic => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()))
        }
        Congestion::NewReno => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::NewRenoConfig::default()))
        }
        Congestion::Bbr => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()))
        }
    };
    t.max_concurrent_bidi_streams(0u32.into())
        // One: the peer's observation of our address (`observed.rs`), read once per connection.
        .max_concurrent_uni_streams(1u32.into())
        .stream_receive_window((64u32 * 1024).into())
        .keep_alive_interval(Some(Duration::from_secs(1)))
        // The starting MTU stays at QUIC's 1200: a relayed connection rides inside the control
        // connection's datagrams and must fit them from the first packet. Path MTU discovery raises
        // it on direct paths within a few round trips; until then large frames are fragmented.
        .datagram_receive_buffer_size(Some(4 << 20))
        .datagram_send_buffer_size(4 << 20);
    if let Ok(idle) = quinn::IdleTimeout::try_from(idle) {
        t.max_idle_timeout(Some(idle));
    }
    t
}

/// The outer (QUIC) congestion controller of peer connections. Overlay frames ride in unreliable
/// datagrams, so the outer controller only paces and drops; the inner TCP flows do their own
/// congestion control on top. See docs/performance.md for the measurement behind the default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Congestion {
    /// CUBIC (quinn's default).
    #[default]
    Cubic,
    /// NewReno.
    NewReno,
    /// BBR (quinn's experimental implementation).
    Bbr,
}

impl std::str::FromStr for Congestion {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cubic" => Ok(Congestion::Cubic),
            "newreno" => Ok(Congestion::NewReno),
            "bbr" => Ok(Congestion::Bbr),
            other => Err(format!(
                "unknown congestion controller {other:?} (cubic, newreno, bbr)"
            )),
        }
    }
}

/// Node-to-node TLS: both sides present their node certificate and require the other's, issued by
/// the fleet CA. Which node may connect is checked after the handshake against the netmap (node id
/// and key).
#[derive(Clone)]
pub struct PeerTls {
    client: Arc<rustls::ClientConfig>,
    server: Arc<quinn::crypto::rustls::QuicServerConfig>,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerTls").finish_non_exhaustive()
    }
}

impl PeerTls {
    /// Configurations for a node with this certificate and key.
    pub fn new(
        ca_der: &[u8],
        cert_der: &[u8],
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, TlsError> {
        let provider = provider();
        let chain = vec![CertificateDer::from(cert_der.to_vec())];
        let mut client = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots(ca_der)?)
            .with_client_auth_cert(chain.clone(), key.clone_key())?;
        client.alpn_protocols = vec![PEER_ALPN.to_vec()];
        let verifier =
            WebPkiClientVerifier::builder_with_provider(roots(ca_der)?, provider.clone())
                .build()?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)?;
        server.alpn_protocols = vec![PEER_ALPN.to_vec()];
        let server = quinn::crypto::rustls::QuicServerConfig::try_from(server)
            .map_err(|e| TlsError::Quic(e.to_string()))?;
        Ok(Self {
            client: Arc::new(client),
            server: Arc::new(server),
        })
    }

    /// The client side, for connecting to a peer.
    pub fn client_config(
        &self,
        transport: Arc<quinn::TransportConfig>,
    ) -> Result<quinn::ClientConfig, TlsError> {
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(self.client.clone())
            .map_err(|e| TlsError::Quic(e.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        config.transport_config(transport);
        Ok(config)
    }

    /// The server side, for the node's endpoint to accept peers.
    pub fn server_config(&self, transport: Arc<quinn::TransportConfig>) -> quinn::ServerConfig {
        let mut config = quinn::ServerConfig::with_crypto(self.server.clone());
        config.transport_config(transport);
        config
    }
}

/// The controller's QUIC server configuration.
pub fn controller_server_config(
    ca_der: &[u8],
    server_chain: Vec<CertificateDer<'static>>,
    server_key: PrivateKeyDer<'static>,
) -> Result<quinn::ServerConfig, TlsError> {
    let provider = provider();
    let client_verifier =
        WebPkiClientVerifier::builder_with_provider(roots(ca_der)?, provider.clone())
            .allow_unauthenticated()
            .build()?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(server_chain, server_key)?;
    tls.alpn_protocols = vec![CONTROL_ALPN.to_vec(), MESH_ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(Arc::new(control_transport(None)));
    Ok(config)
}

/// An enrolled agent's configuration: trusts only the fleet CA, presents its node certificate.
pub fn node_client_config(
    ca_der: &[u8],
    cert_der: &[u8],
    key: PrivateKeyDer<'static>,
    keep_alive: Duration,
) -> Result<quinn::ClientConfig, TlsError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(ca_der)?)
        .with_client_auth_cert(vec![CertificateDer::from(cert_der.to_vec())], key)?;
    tls.alpn_protocols = vec![CONTROL_ALPN.to_vec()];
    client_config(tls, keep_alive)
}

/// A new agent's configuration: trusts the controller whose chain holds the CA pinned by the token.
pub fn enrol_client_config(
    ca_sha256: [u8; 32],
    keep_alive: Duration,
) -> Result<quinn::ClientConfig, TlsError> {
    let provider = provider();
    let verifier = PinnedCaVerifier {
        ca_sha256,
        provider: provider.clone(),
    };
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    tls.alpn_protocols = vec![CONTROL_ALPN.to_vec()];
    client_config(tls, keep_alive)
}

fn client_config(
    tls: rustls::ClientConfig,
    keep_alive: Duration,
) -> Result<quinn::ClientConfig, TlsError> {
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(Arc::new(control_transport(Some(keep_alive))));
    Ok(config)
}

/// The name agents put in SNI and verify the controller certificate against.
pub fn controller_server_name() -> &'static str {
    CONTROLLER_SERVER_NAME
}

/// Verifies a server chain against the CA that the chain itself carries, once that CA's hash
/// matches the pin from the join token.
#[derive(Debug)]
struct PinnedCaVerifier {
    ca_sha256: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates.iter().find(|c| sha256(c) == self.ca_sha256).ok_or_else(|| {
            rustls::Error::General(
                "the controller's CA does not match the CA hash in the join token (wrong controller, or a token from another fleet)".into(),
            )
        })?;
        let verifier = WebPkiServerVerifier::builder_with_provider(
            roots(ca).map_err(|e| rustls::Error::General(e.to_string()))?,
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        verifier.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The certificate chain the peer presented on a connection, if any.
pub fn peer_chain(conn: &quinn::Connection) -> Option<Vec<CertificateDer<'static>>> {
    conn.peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()
        .map(|b| *b)
}

/// How a controller dials another controller of its cluster: it trusts the fleet CA and the
/// controllers' server name, and proves itself inside the connection (a secret only holders of the
/// CA key can compute), not with a client certificate.
pub fn mesh_client_config(ca_der: &[u8]) -> Result<quinn::ClientConfig, TlsError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(ca_der)?)
        .with_no_client_auth();
    tls.alpn_protocols = vec![MESH_ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(Arc::new(mesh_transport()));
    Ok(config)
}

/// The mesh connection's transport: a dead controller is noticed within about 3 s (its agents move
/// and its presence is dropped), and relayed packets ride in datagrams.
pub fn mesh_transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(1u32.into())
        // One: the peer's observation of our address (`observed.rs`), read once per connection.
        .max_concurrent_uni_streams(1u32.into())
        .stream_receive_window((4u32 * 1024 * 1024).into())
        .receive_window((8u32 * 1024 * 1024).into())
        .send_window(8 * 1024 * 1024)
        .keep_alive_interval(Some(Duration::from_millis(500)))
        .datagram_receive_buffer_size(Some(4 << 20))
        .datagram_send_buffer_size(4 << 20)
        // A relayed peer packet (at least 1200 bytes) with the mesh's 8-byte header must fit from
        // the first packet, as on the agents' control connections.
        .initial_mtu(1280);
    if let Ok(idle) = quinn::IdleTimeout::try_from(Duration::from_secs(3)) {
        t.max_idle_timeout(Some(idle));
    }
    t
}

/// The ALPN a connection negotiated, if any.
pub fn negotiated_alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}
