//! `https` upstreams are verified. A loopback TLS upstream whose certificate
//! a private CA signed is reached through a pool built on that CA's file
//! (`TlsRoots::CaFile`, what `serve --llm-ca-file` installs for broker-side
//! forwarding), with the real key sent; with the built-in roots the same
//! upstream is refused (502 naming the certificate) and no request reaches it.

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use turnstile_client::{CredentialHeader, ForwarderConfig, LlmForwarder, TlsRoots, UpstreamPool};

/// A CA (its PEM) and a certificate for 127.0.0.1 it signed, with its key.
fn ca_and_leaf() -> (String, CertificateDer<'static>, PrivateKeyDer<'static>) {
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca.self_signed(&ca_key).expect("ca cert");
    let leaf_key = KeyPair::generate().expect("leaf key");
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .expect("leaf params")
        .signed_by(&leaf_key, &ca, &ca_key)
        .expect("leaf cert");
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    (ca.pem(), leaf.der().clone(), key)
}

/// An HTTPS upstream on loopback answering each request "ok"; the request
/// heads it received come out of the channel.
async fn upstream(
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
) -> (String, mpsc::UnboundedReceiver<String>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("https://{}", listener.local_addr().expect("addr"));
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                // A handshake the client refused ends here.
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = tx.send(String::from_utf8_lossy(&head).into_owned());
                let _ = tls
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                    )
                    .await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (url, rx)
}

/// One request from "the agent" through `forwarder`: the response as text.
async fn through(forwarder: &LlmForwarder) -> String {
    let (mut agent, ours) = tokio::io::duplex(1 << 16);
    let f = forwarder.clone();
    tokio::spawn(async move { f.serve_connection(ours).await });
    agent
        .write_all(
            b"POST /v1/messages HTTP/1.1\r\nhost: relay\r\nx-api-key: turnstile-relay\r\n\
              content-length: 2\r\nconnection: close\r\n\r\n{}",
        )
        .await
        .expect("request");
    let mut response = String::new();
    agent.read_to_string(&mut response).await.expect("response");
    response
}

#[tokio::test]
async fn an_https_upstream_is_verified_against_the_configured_ca_only() {
    let (ca_pem, cert, key) = ca_and_leaf();
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca_pem).expect("ca file");
    let (url, mut seen) = upstream(cert, key).await;
    let config = || ForwarderConfig::new(url.clone(), "sk-real", CredentialHeader::XApiKey);

    let trusted = UpstreamPool::new(TlsRoots::CaFile(ca_file)).expect("pool");
    let forwarder = LlmForwarder::with_pool(config(), &trusted).expect("forwarder");
    let response = through(&forwarder).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with("ok"), "{response}");
    let head = seen.recv().await.expect("the upstream got the request");
    assert!(head.contains("x-api-key: sk-real"), "{head}");
    assert!(!head.contains("turnstile-relay"), "{head}");

    let bundled = UpstreamPool::new(TlsRoots::Bundled).expect("pool");
    let forwarder = LlmForwarder::with_pool(config(), &bundled).expect("forwarder");
    let response = through(&forwarder).await;
    assert!(response.starts_with("HTTP/1.1 502"), "{response}");
    assert!(
        response.to_lowercase().contains("certificate"),
        "the 502 names the certificate: {response}"
    );
    assert!(
        seen.try_recv().is_err(),
        "no request reached an upstream that was not trusted"
    );
}
