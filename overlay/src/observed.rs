//! Peer-observed addresses: on a direct path each side tells the other the address its packets
//! arrive from, so a node learns its reflexive address as a peer sees it, not only as the
//! controller does. Behind two layers of NAT, or a NAT that maps per destination, the two differ,
//! and the peer's view is a candidate the controller could not have seen.
//!
//! One unidirectional stream per direct connection and direction, carrying one frame (a
//! postcard [`SocketAddr`]) and then finished. A receiver reads at most [`MAX_OBSERVED_LEN`]
//! bytes of the first stream only, within [`OBSERVE_TIMEOUT`]; peers of an older version never open
//! one (their transport allows none), which costs nothing.

use std::{net::SocketAddr, time::Duration};

use shoal_proto::{decode_frame, encode_frame};

/// The most bytes read of a peer's observation stream (a framed IPv6 socket address is about 30).
pub const MAX_OBSERVED_LEN: usize = 64;

/// How long a connection waits for its peer's observation.
pub const OBSERVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a peer's observation was not learnt.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ObservedError {
    /// The stream could not be opened, written or read (the connection closed, or the peer is of
    /// a version that sends none).
    #[error("observation stream: {0}")]
    Stream(String),
    /// Nothing arrived in time.
    #[error("no observation in time")]
    TimedOut,
    /// The bytes were not one framed socket address within [`MAX_OBSERVED_LEN`].
    #[error("malformed observation")]
    Malformed,
    /// An address no peer can reach us at (unspecified, multicast, port 0).
    #[error("unusable observed address {0}")]
    Unusable(SocketAddr),
}

/// Tells the peer the address its packets arrive from on `conn`.
pub async fn tell(conn: &quinn::Connection) -> Result<(), ObservedError> {
    let frame = encode_frame(&conn.remote_address()).map_err(|_| ObservedError::Malformed)?;
    let mut send = conn
        .open_uni()
        .await
        .map_err(|e| ObservedError::Stream(e.to_string()))?;
    send.write_all(&frame)
        .await
        .map_err(|e| ObservedError::Stream(e.to_string()))?;
    send.finish()
        .map_err(|e| ObservedError::Stream(e.to_string()))
}

/// The address the peer says our packets arrive from on `conn`, if it says so within `timeout`
/// ([`OBSERVE_TIMEOUT`] in the datapath).
pub async fn learn(
    conn: &quinn::Connection,
    timeout: Duration,
) -> Result<SocketAddr, ObservedError> {
    let read = async {
        let mut recv = conn
            .accept_uni()
            .await
            .map_err(|e| ObservedError::Stream(e.to_string()))?;
        recv.read_to_end(MAX_OBSERVED_LEN)
            .await
            .map_err(|_| ObservedError::Malformed)
    };
    let bytes = tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| ObservedError::TimedOut)??;
    parse(&bytes)
}

/// One framed socket address, whole, that a peer could reach.
pub fn parse(bytes: &[u8]) -> Result<SocketAddr, ObservedError> {
    let (addr, used): (SocketAddr, usize) =
        decode_frame(bytes).map_err(|_| ObservedError::Malformed)?;
    if used != bytes.len() {
        return Err(ObservedError::Malformed);
    }
    let ip = addr.ip();
    if addr.port() == 0 || ip.is_unspecified() || ip.is_multicast() {
        return Err(ObservedError::Unusable(addr));
    }
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::tls::{peer_transport, Congestion};

    #[test]
    fn only_one_whole_usable_address_parses() {
        let addr: SocketAddr = "198.51.100.7:40000".parse().unwrap();
        let frame = encode_frame(&addr).unwrap();
        assert_eq!(parse(&frame).unwrap(), addr);
        let mut long = frame.clone();
        long.push(0);
        assert!(matches!(parse(&long), Err(ObservedError::Malformed)));
        assert!(matches!(
            parse(&frame[..frame.len() - 1]),
            Err(ObservedError::Malformed)
        ));
        for bad in ["0.0.0.0:1", "224.0.0.1:5000", "198.51.100.7:0"] {
            let frame = encode_frame(&bad.parse::<SocketAddr>().unwrap()).unwrap();
            assert!(
                matches!(parse(&frame), Err(ObservedError::Unusable(_))),
                "{bad}"
            );
        }
    }

    /// Two endpoints on loopback with the peer transport (one incoming unidirectional stream
    /// allowed), a self-signed server certificate trusted by the client.
    fn pair() -> (quinn::Endpoint, quinn::Endpoint) {
        let cert = rcgen::generate_simple_self_signed(vec!["peer.test".into()]).unwrap();
        let cert_der = cert.cert.der().clone();
        let key = rustls_pki_types::PrivateKeyDer::Pkcs8(
            rustls_pki_types::PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()),
        );
        let transport = Arc::new(peer_transport(
            Duration::from_secs(4),
            Congestion::default(),
        ));
        let mut server_config =
            quinn::ServerConfig::with_single_cert(vec![cert_der.clone()], key).unwrap();
        server_config.transport_config(transport.clone());
        let server =
            quinn::Endpoint::server(server_config, "127.0.0.1:0".parse().unwrap()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert_der).unwrap();
        let mut client_config =
            quinn::ClientConfig::with_root_certificates(Arc::new(roots)).unwrap();
        client_config.transport_config(transport);
        let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        client.set_default_client_config(client_config);
        (server, client)
    }

    #[tokio::test]
    async fn each_side_learns_the_address_the_other_sees_it_at() {
        let (server, client) = pair();
        let connecting = client
            .connect(server.local_addr().unwrap(), "peer.test")
            .unwrap();
        let (c, s) = tokio::join!(connecting, async { server.accept().await.unwrap().await });
        let (c, s) = (c.unwrap(), s.unwrap());
        let (told_c, told_s, learnt_c, learnt_s) = tokio::join!(
            tell(&c),
            tell(&s),
            learn(&c, OBSERVE_TIMEOUT),
            learn(&s, OBSERVE_TIMEOUT)
        );
        told_c.unwrap();
        told_s.unwrap();
        assert_eq!(learnt_c.unwrap(), client.local_addr().unwrap());
        assert_eq!(learnt_s.unwrap(), server.local_addr().unwrap());
    }

    #[tokio::test]
    async fn a_peer_that_sends_nothing_or_junk_teaches_nothing() {
        let (server, client) = pair();
        let connecting = client
            .connect(server.local_addr().unwrap(), "peer.test")
            .unwrap();
        let (c, s) = tokio::join!(connecting, async { server.accept().await.unwrap().await });
        let (c, s) = (c.unwrap(), s.unwrap());
        // Junk longer than an address: refused without reading past the bound.
        let mut send = c.open_uni().await.unwrap();
        send.write_all(&[0xff; 1000]).await.unwrap();
        send.finish().unwrap();
        assert!(matches!(
            learn(&s, OBSERVE_TIMEOUT).await,
            Err(ObservedError::Malformed)
        ));
        // Silence: given up at the deadline.
        assert!(matches!(
            learn(&c, Duration::from_millis(200)).await,
            Err(ObservedError::TimedOut)
        ));
    }
}
