//! TLS to an `https://` upstream: rustls (aws-lc-rs, TLS 1.3 and 1.2),
//! verified against the same roots as the webhooks' client — the system's
//! trusted roots through the platform verifier — plus the CA certificates of
//! `[server] upstream_ca_file` when set (a private CA). The server name sent
//! (SNI) and verified is the upstream URL's host; ALPN offers `http/1.1`
//! only, as the upstream leg speaks HTTP/1.1. Verification is never turned
//! off: a certificate that does not verify fails the handshake, which is a
//! connect failure of the upstream (502, retried where the policy retries
//! 502).

use std::sync::Arc;

use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};

/// How connections to one `https://` upstream are secured: the TLS settings
/// and the name the certificate must carry.
#[derive(Clone)]
pub struct UpstreamTls {
    connector: TlsConnector,
    name: ServerName<'static>,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// A TLS handshake with the upstream failed (its certificate did not
/// verify, named another host, or the upstream does not speak TLS).
#[derive(Debug, thiserror::Error)]
#[error("TLS handshake with the upstream failed")]
pub struct HandshakeError(#[source] pub std::io::Error);

impl UpstreamTls {
    /// TLS to the upstream whose URL host is `host` (a DNS name or an IP
    /// address, IPv6 in brackets or not), trusting the system's roots and
    /// `extra_roots`.
    ///
    /// # Errors
    /// `host` is not a valid server name, or no trusted root could be loaded
    /// (the system has none and `extra_roots` is empty); the message says how
    /// to fix it.
    pub fn for_host(
        host: &str,
        extra_roots: &[CertificateDer<'static>],
    ) -> Result<UpstreamTls, String> {
        let bare = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let name = ServerName::try_from(bare.to_owned())
            .map_err(|e| format!("upstream host `{host}` is not a valid TLS server name: {e}"))?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier = rustls_platform_verifier::Verifier::new_with_extra_roots(
            extra_roots.iter().cloned(),
            Arc::clone(&provider),
        )
        .map_err(|e| {
            format!(
                "no trusted CA certificates for the https:// upstream ({e}); install the system's \
                 CA certificates (ca-certificates) or set [server] upstream_ca_file"
            )
        })?;
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| format!("TLS settings: {e}"))?
            .dangerous()
            // Not dangerous: this is the platform verifier, which verifies.
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(UpstreamTls {
            connector: TlsConnector::from(Arc::new(config)),
            name,
        })
    }

    /// The TLS handshake over a connected socket.
    ///
    /// # Errors
    /// The handshake failed (see [`HandshakeError`]).
    pub async fn handshake(&self, tcp: TcpStream) -> Result<TlsStream<TcpStream>, HandshakeError> {
        self.connector
            .connect(self.name.clone(), tcp)
            .await
            .map_err(HandshakeError)
    }
}
