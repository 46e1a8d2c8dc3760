//! Real TLS handshakes over TCP on 127.0.0.1 between managers built from test PKI.

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};
use webpki::KeyUsage;
use x509_parser::extensions::{GeneralName, ParsedExtension};

use super::ca::Ca;
use super::verify::{SpiffeServerVerifier, TrustBundle};
use super::*;

const TD: &str = "cluster.local";
const HOUR: Duration = Duration::from_secs(3600);
/// Upper bound for any single network step, so a broken test fails instead of hanging.
const STEP: Duration = Duration::from_secs(10);

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new(TD, ns, sa).unwrap()
}

fn write(path: &Path, contents: impl AsRef<[u8]>) {
    std::fs::write(path, contents).unwrap();
}

/// Writes `ca`'s cert and key into `dir` under `name` and returns the paths.
fn write_ca(dir: &Path, name: &str, ca: &Ca) -> (PathBuf, PathBuf) {
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    write(&cert, &ca.cert_pem);
    write(&key, &ca.key_pem);
    (cert, key)
}

fn issuer_manager(
    td: &str,
    dir: &Path,
    name: &str,
    ca: &Ca,
    trust_bundle: Option<PathBuf>,
    lifetime: Duration,
) -> Arc<IdentityManager> {
    let (cert, key) = write_ca(dir, name, ca);
    Arc::new(
        IdentityManager::new(
            td,
            IdentitySource::Issuer {
                cert,
                key,
                trust_bundle,
                lifetime,
                renew_at: DEFAULT_RENEW_AT,
            },
        )
        .unwrap(),
    )
}

/// Writes `<dir>/<ns>.<sa>.crt/.key` for `id`, issued by `ca`.
fn write_workload(dir: &Path, ca: &Ca, id: &SpiffeId, nb: SystemTime, na: SystemTime) {
    let (chain, key) = ca.issue(id, nb, na).unwrap();
    let stem = format!("{}.{}", id.namespace(), id.service_account());
    write(&dir.join(format!("{stem}.crt")), chain);
    write(&dir.join(format!("{stem}.key")), key);
}

fn serial_of(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    cert.raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn info_for(m: &IdentityManager, id: &SpiffeId) -> CertificateInfo {
    m.certificates()
        .into_iter()
        .find(|c| &c.identity == id)
        .unwrap_or_else(|| panic!("no certificate for {id}"))
}

/// What one side learnt from a handshake followed by a ping/pong exchange.
#[derive(Debug)]
struct Side {
    peer: Option<SpiffeId>,
    alpn: Option<Vec<u8>>,
    version: Option<rustls::ProtocolVersion>,
    peer_leaf: Option<CertificateDer<'static>>,
}

fn side(conn: &rustls::CommonState) -> Side {
    Side {
        peer: peer_spiffe_id(conn),
        alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
        version: conn.protocol_version(),
        peer_leaf: conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.clone().into_owned()),
    }
}

struct Outcome {
    client: io::Result<Side>,
    server: io::Result<Side>,
}

impl Outcome {
    fn ok(self) -> (Side, Side) {
        match (self.client, self.server) {
            (Ok(c), Ok(s)) => (c, s),
            (c, s) => panic!("handshake failed: client {c:?}, server {s:?}"),
        }
    }

    fn server_rejection(&self) -> HandshakeRejection {
        classify_io_error(self.server.as_ref().expect_err("server should refuse"))
    }

    fn client_rejection(&self) -> HandshakeRejection {
        classify_io_error(self.client.as_ref().expect_err("client should refuse"))
    }
}

/// Connected TLS streams, both sides having exchanged one ping/pong (so, in TLS 1.3, the
/// server has really accepted the client's certificate).
struct Pair {
    client: client::TlsStream<TcpStream>,
    server: server::TlsStream<TcpStream>,
}

impl Pair {
    /// Proves the connection still carries data both ways.
    async fn exchange(&mut self, msg: &[u8; 4]) {
        tokio::time::timeout(STEP, async {
            self.client.write_all(msg).await.unwrap();
            let mut buf = [0u8; 4];
            self.server.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, msg);
            self.server.write_all(&buf).await.unwrap();
            self.client.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, msg);
        })
        .await
        .expect("exchange timed out");
    }
}

fn localhost() -> ServerName<'static> {
    ServerName::from(IpAddr::from(Ipv4Addr::LOCALHOST))
}

async fn connect(
    server_cfg: Arc<ServerConfig>,
    client_cfg: Arc<ClientConfig>,
) -> (io::Result<Pair>, Outcome) {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        let mut tls = TlsAcceptor::from(server_cfg).accept(tcp).await?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await?;
        tls.write_all(b"pong").await?;
        tls.flush().await?;
        io::Result::Ok(tls)
    });
    let client = async {
        let tcp = TcpStream::connect(addr).await?;
        let mut tls = TlsConnector::from(client_cfg)
            .connect(localhost(), tcp)
            .await?;
        tls.write_all(b"ping").await?;
        tls.flush().await?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await?;
        assert_eq!(&buf, b"pong");
        io::Result::Ok(tls)
    };
    let client = tokio::time::timeout(STEP, client)
        .await
        .expect("client timed out");
    let server = tokio::time::timeout(STEP, server)
        .await
        .expect("server timed out")
        .expect("server task panicked");
    let outcome = Outcome {
        client: client
            .as_ref()
            .map(|t| side(t.get_ref().1))
            .map_err(copy_err),
        server: server
            .as_ref()
            .map(|t| side(t.get_ref().1))
            .map_err(copy_err),
    };
    let pair = match (client, server) {
        (Ok(client), Ok(server)) => Ok(Pair { client, server }),
        (Err(e), _) | (_, Err(e)) => Err(e),
    };
    (pair, outcome)
}

/// io::Error is not Clone; keep the kind and the inner rustls error for classification.
fn copy_err(e: &io::Error) -> io::Error {
    let inner = e
        .get_ref()
        .and_then(|i| i.downcast_ref::<rustls::Error>())
        .cloned();
    match inner {
        Some(tls) => io::Error::new(e.kind(), tls),
        None => io::Error::new(e.kind(), e.to_string()),
    }
}

async fn handshake(server_cfg: Arc<ServerConfig>, client_cfg: Arc<ClientConfig>) -> Outcome {
    connect(server_cfg, client_cfg).await.1
}

// ---------------------------------------------------------------------------------------
// Certificates

#[test]
fn issued_certificates_have_the_spiffe_shape_and_verify_for_both_usages() {
    let ca = Ca::new_root("test root").unwrap();
    let a = id("default", "a");
    let now = SystemTime::now();
    let (chain_pem, key_pem) = ca.issue(&a, now - HOUR, now + HOUR).unwrap();
    assert!(key_pem.contains("BEGIN PRIVATE KEY"));
    let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(chain.len(), 2, "leaf then CA");
    assert_eq!(&chain[1], ca.cert_der());

    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
    assert!(leaf.subject().iter().next().is_none(), "empty subject");
    let mut uris = Vec::new();
    let (mut ku, mut eku, mut bc) = (None, None, None);
    for ext in leaf.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                assert!(ext.critical, "SAN must be critical with an empty subject");
                for n in &san.general_names {
                    match n {
                        GeneralName::URI(u) => uris.push(u.to_string()),
                        other => panic!("unexpected SAN {other:?}"),
                    }
                }
            }
            ParsedExtension::KeyUsage(k) => ku = Some(*k),
            ParsedExtension::ExtendedKeyUsage(e) => eku = Some((e.server_auth, e.client_auth)),
            ParsedExtension::BasicConstraints(b) => bc = Some(b.ca),
            _ => {}
        }
    }
    assert_eq!(uris, vec![a.to_string()]);
    let ku = ku.expect("key usage");
    assert!(ku.digital_signature() && !ku.key_cert_sign());
    assert_eq!(eku, Some((true, true)));
    assert_eq!(bc, Some(false));

    let (_, root) = x509_parser::parse_x509_certificate(ca.cert_der()).unwrap();
    assert!(root.basic_constraints().unwrap().unwrap().value.ca);

    // webpki requires the EKU matching each direction.
    let bundle = TrustBundle::from_pem(ca.cert_pem.as_bytes(), Path::new("mem")).unwrap();
    let provider = rustls::crypto::ring::default_provider();
    for usage in [KeyUsage::server_auth(), KeyUsage::client_auth()] {
        let got = bundle
            .verify(&provider, &chain[0], &chain[1..], UnixTime::now(), usage)
            .unwrap();
        assert_eq!(got, a);
    }
    // And another CA's bundle refuses it.
    let other = Ca::new_root("other").unwrap();
    let other_bundle = TrustBundle::from_pem(other.cert_pem.as_bytes(), Path::new("m")).unwrap();
    let err = other_bundle
        .verify(
            &provider,
            &chain[0],
            &[],
            UnixTime::now(),
            KeyUsage::client_auth(),
        )
        .unwrap_err();
    assert_eq!(classify_tls_error(&err), HandshakeRejection::UnknownIssuer);
}

/// Issuing by signing request: the node makes the key and the request, the
/// CA signs the identity *it* decides over the request's key (a request
/// naming another identity gets the CA's), and a request whose signature does
/// not verify (the requester does not hold the key) is refused.
#[test]
fn a_signing_request_gets_the_identity_the_ca_decides_over_the_requesters_key() {
    let ca = Ca::new_root("test root").unwrap();
    let asked = id("default", "a");
    let decided = id("default", "b");
    let (request_pem, key) = super::ca::signing_request(&asked).unwrap();
    assert!(
        request_pem.contains("BEGIN CERTIFICATE REQUEST"),
        "{request_pem}"
    );
    let request = super::ca::SigningRequest::from_pem(&request_pem).unwrap();
    let now = SystemTime::now();
    let leaf_pem = ca
        .sign_request(&request, &decided, now - HOUR, now + HOUR)
        .unwrap();
    let leaf: CertificateDer<'static> = rustls_pemfile::certs(&mut leaf_pem.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    let (_, parsed) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    assert_eq!(
        parsed.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw(),
        "the certificate is over the requester's key"
    );
    let bundle = TrustBundle::from_pem(ca.cert_pem.as_bytes(), Path::new("mem")).unwrap();
    let provider = rustls::crypto::ring::default_provider();
    for usage in [KeyUsage::server_auth(), KeyUsage::client_auth()] {
        let got = bundle
            .verify(&provider, &leaf, &[], UnixTime::now(), usage)
            .unwrap();
        assert_eq!(got, decided, "the CA's identity, not the request's");
    }
    // A request whose signature is broken: no proof of the key.
    let der_start = request_pem.find('\n').unwrap() + 1;
    let mut tampered: Vec<char> = request_pem.chars().collect();
    let at = der_start + 200;
    tampered[at] = if tampered[at] == 'A' { 'B' } else { 'A' };
    let tampered: String = tampered.into_iter().collect();
    let err = super::ca::SigningRequest::from_pem(&tampered)
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("signature does not verify"),
        "{err}"
    );
    // Not a request at all.
    let err = super::ca::SigningRequest::from_pem(&ca.cert_pem)
        .err()
        .unwrap();
    assert!(err.to_string().contains("CERTIFICATE REQUEST"), "{err}");
    // Backwards validity is refused.
    assert!(
        ca.sign_request(&request, &decided, now, now - HOUR)
            .is_err()
    );
}

#[test]
fn ca_from_pem_round_trips_and_checks_its_inputs() {
    let ca = Ca::new_root("root").unwrap();
    let again = Ca::from_pem(&ca.cert_pem, &ca.key_pem).unwrap();
    let a = id("ns", "a");
    let now = SystemTime::now();
    let (chain, _) = again.issue(&a, now, now + HOUR).unwrap();
    let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut chain.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    let bundle = TrustBundle::from_pem(ca.cert_pem.as_bytes(), Path::new("m")).unwrap();
    let provider = rustls::crypto::ring::default_provider();
    bundle
        .verify(
            &provider,
            &chain[0],
            &chain[1..],
            UnixTime::now(),
            KeyUsage::client_auth(),
        )
        .unwrap();

    let other = Ca::new_root("other").unwrap();
    let err = Ca::from_pem(&ca.cert_pem, &other.key_pem).unwrap_err();
    assert!(err.to_string().contains("does not match"), "{err:#}");
    let (leaf, leaf_key) = ca.issue(&a, now, now + HOUR).unwrap();
    let err = Ca::from_pem(&leaf, &leaf_key).unwrap_err();
    assert!(err.to_string().contains("not a CA"), "{err:#}");
    assert!(ca.issue(&a, now, now).is_err(), "empty validity");
    assert!(!format!("{ca:?}").contains("PRIVATE"));
}

// ---------------------------------------------------------------------------------------
// Handshakes

#[tokio::test]
async fn issuer_source_mints_and_peers_see_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new_root("root").unwrap();
    let m = issuer_manager(TD, dir.path(), "issuer", &ca, None, HOUR);
    let (a, b) = (id("default", "a"), id("other-ns", "b"));
    m.ensure(&[a.clone(), b.clone()]).unwrap();

    let certs = m.certificates();
    assert_eq!(certs.len(), 2);
    for c in &certs {
        assert_eq!(c.source, CertSource::Minted);
        assert_eq!(c.source.as_str(), "minted");
        assert!(c.not_before < SystemTime::now() && SystemTime::now() < c.not_after);
        let life = c.not_after.duration_since(c.not_before).unwrap();
        assert!(life <= HOUR + NOT_BEFORE_BACKDATE + Duration::from_secs(1));
    }
    let json = serde_json::to_string(&certs).unwrap();
    assert!(
        json.contains("\"minted\"") && !json.contains("PRIVATE"),
        "{json}"
    );

    let server_cfg = m.server_config(&b).unwrap();
    let client_cfg = m.client_config(&a, &b).unwrap();
    let (client, server) = handshake(server_cfg, client_cfg).await.ok();
    assert_eq!(client.peer.as_ref(), Some(&b));
    assert_eq!(server.peer.as_ref(), Some(&a));
    assert_eq!(client.alpn.as_deref(), Some(ALPN_H2));
    assert_eq!(server.alpn.as_deref(), Some(ALPN_H2));
    assert_eq!(client.version, Some(rustls::ProtocolVersion::TLSv1_3));

    // ensure() forgets identities that are no longer wanted.
    m.ensure(std::slice::from_ref(&a)).unwrap();
    assert_eq!(m.certificates().len(), 1);
    let err = m.server_config(&b).unwrap_err();
    assert!(err.to_string().contains("no certificate held"), "{err:#}");
    // Identities of another trust domain are refused.
    let foreign = SpiffeId::new("elsewhere", "default", "a").unwrap();
    assert!(m.ensure(&[a.clone(), foreign]).is_err());
    assert_eq!(
        m.certificates().len(),
        1,
        "the valid identity is still held"
    );
}

#[tokio::test]
async fn rejections_are_refused_and_classified() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new_root("root").unwrap();
    let m = issuer_manager(TD, dir.path(), "issuer", &ca, None, HOUR);
    let (a, b, c) = (id("ns", "a"), id("ns", "b"), id("ns", "c"));
    m.ensure(&[a.clone(), b.clone(), c.clone()]).unwrap();
    let server_b = m.server_config(&b).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(SpiffeServerVerifier {
        manager: m.clone(),
        expected: b.clone(),
    });

    // Client without a certificate.
    let mut no_cert = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    no_cert.alpn_protocols = vec![ALPN_H2.to_vec()];
    let out = handshake(server_b.clone(), Arc::new(no_cert)).await;
    assert_eq!(
        out.server_rejection(),
        HandshakeRejection::NoClientCertificate
    );
    assert_eq!(
        out.client_rejection(),
        HandshakeRejection::NoClientCertificate
    );

    // Client certificate from another CA (the client itself trusts both CAs).
    let other_ca = Ca::new_root("other root").unwrap();
    let both = dir.path().join("both.pem");
    write(&both, format!("{}{}", ca.cert_pem, other_ca.cert_pem));
    let m_other = issuer_manager(TD, dir.path(), "other", &other_ca, Some(both), HOUR);
    m_other.ensure(std::slice::from_ref(&a)).unwrap();
    let out = handshake(server_b.clone(), m_other.client_config(&a, &b).unwrap()).await;
    assert_eq!(out.server_rejection(), HandshakeRejection::UnknownIssuer);
    assert_eq!(out.client_rejection(), HandshakeRejection::UnknownIssuer);

    // Expired and not-yet-valid client certificates, from files.
    let files = dir.path().join("files");
    std::fs::create_dir(&files).unwrap();
    let bundle = files.join("bundle.pem");
    write(&bundle, &ca.cert_pem);
    let (expired, future) = (id("ns", "expired"), id("ns", "future"));
    let now = SystemTime::now();
    write_workload(&files, &ca, &expired, now - 2 * HOUR, now - HOUR);
    write_workload(&files, &ca, &future, now + HOUR, now + 2 * HOUR);
    let m_files = Arc::new(
        IdentityManager::new(
            TD,
            IdentitySource::Files {
                dir: files.clone(),
                trust_bundle: bundle,
            },
        )
        .unwrap(),
    );
    m_files.ensure(&[expired.clone(), future.clone()]).unwrap();
    let out = handshake(
        server_b.clone(),
        m_files.client_config(&expired, &b).unwrap(),
    )
    .await;
    assert_eq!(out.server_rejection(), HandshakeRejection::Expired);
    let out = handshake(
        server_b.clone(),
        m_files.client_config(&future, &b).unwrap(),
    )
    .await;
    assert_eq!(out.server_rejection(), HandshakeRejection::NotYetValid);
    // rustls uses one alert for both; the client sees "expired".
    assert_eq!(out.client_rejection(), HandshakeRejection::Expired);

    // Server presenting the wrong SPIFFE ID: client expects b, server is c.
    let server_c = m.server_config(&c).unwrap();
    let out = handshake(server_c, m.client_config(&a, &b).unwrap()).await;
    assert_eq!(out.client_rejection(), HandshakeRejection::WrongIdentity);
    assert_eq!(out.server_rejection(), HandshakeRejection::BadCertificate);

    // A client of another trust domain, signed by a CA we trust.
    let m_td = issuer_manager("other.domain", dir.path(), "issuer-td", &ca, None, HOUR);
    let stranger = SpiffeId::new("other.domain", "ns", "a").unwrap();
    m_td.ensure(std::slice::from_ref(&stranger)).unwrap();
    let out = handshake(server_b.clone(), m_td.client_config(&stranger, &b).unwrap()).await;
    assert_eq!(out.server_rejection(), HandshakeRejection::WrongTrustDomain);
    // And a server of another trust domain is not who the client expects.
    let out = handshake(
        m_td.server_config(&stranger).unwrap(),
        m.client_config(&a, &b).unwrap(),
    )
    .await;
    assert_eq!(out.client_rejection(), HandshakeRejection::WrongIdentity);

    // A TLS 1.2-only client.
    let mut tls12 = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    tls12.alpn_protocols = vec![ALPN_H2.to_vec()];
    let out = handshake(server_b.clone(), Arc::new(tls12)).await;
    assert_eq!(out.server_rejection(), HandshakeRejection::ProtocolVersion);
    assert_eq!(out.client_rejection(), HandshakeRejection::ProtocolVersion);

    // The good case still works with the same server config.
    let (client, _) = handshake(server_b, m.client_config(&a, &b).unwrap())
        .await
        .ok();
    assert_eq!(client.peer, Some(b));
}

#[test]
fn labels_and_non_tls_errors() {
    let e = io::Error::new(io::ErrorKind::ConnectionReset, "reset");
    assert!(matches!(
        classify_io_error(&e),
        HandshakeRejection::Other(_)
    ));
    assert_eq!(
        HandshakeRejection::WrongIdentity.as_label(),
        "wrong_identity"
    );
    assert_eq!(
        classify_tls_error(&rustls::Error::NoCertificatesPresented).as_label(),
        "no_client_certificate"
    );
    assert_eq!(
        HandshakeRejection::Other("x".into()).to_string(),
        "other: x"
    );
}

// ---------------------------------------------------------------------------------------
// Rotation, renewal, reload

#[tokio::test]
async fn bundle_and_issuer_rotation_through_reload_with_the_same_configs() {
    let dir = tempfile::tempdir().unwrap();
    let (old_ca, new_ca) = (Ca::new_root("old").unwrap(), Ca::new_root("new").unwrap());
    let both_pem = format!("{}{}", old_ca.cert_pem, new_ca.cert_pem);
    let (a, b) = (id("ns", "a"), id("ns", "b"));

    // Server: issues from the old CA, trusts only the old root at first.
    let server_bundle = dir.path().join("server-bundle.pem");
    write(&server_bundle, &old_ca.cert_pem);
    let s = issuer_manager(
        TD,
        dir.path(),
        "server-issuer",
        &old_ca,
        Some(server_bundle.clone()),
        HOUR,
    );
    s.ensure(std::slice::from_ref(&b)).unwrap();
    let server_cfg = s.server_config(&b).unwrap();

    // Clients: one per CA, both trusting both roots.
    let old_bundle = dir.path().join("old-client-bundle.pem");
    let new_bundle = dir.path().join("new-client-bundle.pem");
    write(&old_bundle, &both_pem);
    write(&new_bundle, &both_pem);
    let c_old = issuer_manager(TD, dir.path(), "old", &old_ca, Some(old_bundle), HOUR);
    let c_new = issuer_manager(
        TD,
        dir.path(),
        "new",
        &new_ca,
        Some(new_bundle.clone()),
        HOUR,
    );
    c_old.ensure(std::slice::from_ref(&a)).unwrap();
    c_new.ensure(std::slice::from_ref(&a)).unwrap();
    let old_cfg = c_old.client_config(&a, &b).unwrap();
    let new_cfg = c_new.client_config(&a, &b).unwrap();

    // 1. Old root only.
    let (pair, out) = connect(server_cfg.clone(), old_cfg.clone()).await;
    out.ok();
    let mut established = pair.unwrap();
    let out = handshake(server_cfg.clone(), new_cfg.clone()).await;
    assert_eq!(out.server_rejection(), HandshakeRejection::UnknownIssuer);

    // 2. Old and new roots: both accepted.
    write(&server_bundle, &both_pem);
    s.reload().unwrap();
    assert_eq!(s.trust_bundle_len(), 2);
    handshake(server_cfg.clone(), old_cfg.clone()).await.ok();
    handshake(server_cfg.clone(), new_cfg.clone()).await.ok();
    established.exchange(b"one!").await;

    // 3. New root only: old-CA clients refused, the established connection carries on.
    write(&server_bundle, &new_ca.cert_pem);
    s.reload().unwrap();
    let out = handshake(server_cfg.clone(), old_cfg.clone()).await;
    assert_eq!(out.server_rejection(), HandshakeRejection::UnknownIssuer);
    handshake(server_cfg.clone(), new_cfg.clone()).await.ok();
    established.exchange(b"two!").await;

    // Client side: the new-CA client drops the old root, so the server (still issuing from
    // the old CA) is refused through the same client config...
    write(&new_bundle, &new_ca.cert_pem);
    c_new.reload().unwrap();
    let out = handshake(server_cfg.clone(), new_cfg.clone()).await;
    assert_eq!(out.client_rejection(), HandshakeRejection::UnknownIssuer);

    // ...until the server's issuer moves to the new CA: reload re-mints its certificate.
    let before = info_for(&s, &b).serial;
    write_ca(dir.path(), "server-issuer", &new_ca);
    s.reload().unwrap();
    assert_ne!(
        info_for(&s, &b).serial,
        before,
        "re-minted by the new issuer"
    );
    let (client, _) = handshake(server_cfg.clone(), new_cfg.clone()).await.ok();
    assert_eq!(
        serial_of(client.peer_leaf.as_ref().unwrap()),
        info_for(&s, &b).serial
    );
    established.exchange(b"3rd!").await;
}

#[tokio::test]
async fn minted_certificates_renew_and_new_handshakes_present_them() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new_root("root").unwrap();
    let lifetime = Duration::from_secs(2);
    let m = issuer_manager(TD, dir.path(), "issuer", &ca, None, lifetime);
    let (a, b) = (id("ns", "a"), id("ns", "b"));
    let start = Instant::now();
    let minted_at = SystemTime::now();
    m.ensure(&[a.clone(), b.clone()]).unwrap();
    let server_cfg = m.server_config(&b).unwrap();
    let client_cfg = m.client_config(&a, &b).unwrap();
    let (old_a, old_b) = (info_for(&m, &a), info_for(&m, &b));

    let next = m.next_renewal().expect("minted certs have a renewal time");
    assert!(
        next >= minted_at + lifetime / 2,
        "renewal at half the lifetime"
    );
    assert!(next <= SystemTime::now() + lifetime / 2);
    assert_eq!(m.renew_due().unwrap(), 0, "nothing due right after minting");

    // Poll until both have been replaced (they were minted a moment apart).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut renewed = 0;
    while renewed < 2 {
        assert!(Instant::now() < deadline, "renewal did not happen in time");
        renewed += m.renew_due().unwrap();
        if renewed < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(renewed, 2);
    assert!(
        start.elapsed() >= lifetime / 2,
        "renewed early: {:?}",
        start.elapsed()
    );
    let (new_a, new_b) = (info_for(&m, &a), info_for(&m, &b));
    assert_ne!(new_a.serial, old_a.serial);
    assert_ne!(new_b.serial, old_b.serial);
    assert!(new_b.not_after > old_b.not_after);
    assert!(m.next_renewal().unwrap() > next);

    // The configs built before renewal present the new certificates.
    let (client, server) = handshake(server_cfg, client_cfg).await.ok();
    assert_eq!(serial_of(client.peer_leaf.as_ref().unwrap()), new_b.serial);
    assert_eq!(serial_of(server.peer_leaf.as_ref().unwrap()), new_a.serial);
}

#[tokio::test]
async fn files_source_loads_reports_missing_files_and_reloads_replaced_certs() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new_root("root").unwrap();
    let bundle = dir.path().join("ca.pem");
    let source = IdentitySource::Files {
        dir: dir.path().to_path_buf(),
        trust_bundle: bundle.clone(),
    };
    // A missing bundle is named.
    let err = IdentityManager::new(TD, source.clone()).unwrap_err();
    assert!(
        format!("{err:#}").contains(&bundle.display().to_string()),
        "{err:#}"
    );
    write(&bundle, &ca.cert_pem);

    let (a, b) = (id("default", "a"), id("default", "b"));
    let now = SystemTime::now();
    write_workload(dir.path(), &ca, &a, now - HOUR, now + HOUR);
    write_workload(dir.path(), &ca, &b, now - HOUR, now + HOUR);
    let m = Arc::new(IdentityManager::new(TD, source).unwrap());
    m.ensure(&[a.clone(), b.clone()]).unwrap();
    assert!(
        m.certificates()
            .iter()
            .all(|c| c.source == CertSource::File)
    );
    assert_eq!(m.next_renewal(), None);

    // A missing file is named, and the others stay held.
    let missing = id("default", "missing");
    let err = m
        .ensure(&[a.clone(), b.clone(), missing.clone()])
        .unwrap_err();
    let want = dir.path().join("default.missing.crt");
    assert!(
        format!("{err:#}").contains(&want.display().to_string()),
        "{err:#}"
    );
    assert_eq!(m.certificates().len(), 2);

    // A file whose SAN is not the identity its name says is refused.
    for ext in ["crt", "key"] {
        std::fs::copy(
            dir.path().join(format!("default.a.{ext}")),
            dir.path().join(format!("default.impostor.{ext}")),
        )
        .unwrap();
    }
    let err = m
        .ensure(&[a.clone(), b.clone(), id("default", "impostor")])
        .unwrap_err();
    assert!(format!("{err:#}").contains("expected"), "{err:#}");

    let server_cfg = m.server_config(&b).unwrap();
    let client_cfg = m.client_config(&a, &b).unwrap();
    let (client, _) = handshake(server_cfg.clone(), client_cfg.clone()).await.ok();
    let first = info_for(&m, &b).serial;
    assert_eq!(serial_of(client.peer_leaf.as_ref().unwrap()), first);

    // reload() picks up a replaced certificate file.
    write_workload(dir.path(), &ca, &b, now - HOUR, now + 2 * HOUR);
    m.reload().unwrap();
    let second = info_for(&m, &b).serial;
    assert_ne!(second, first);
    let (client, _) = handshake(server_cfg.clone(), client_cfg.clone()).await.ok();
    assert_eq!(serial_of(client.peer_leaf.as_ref().unwrap()), second);

    // renew_due() notices changed files too, once.
    write_workload(dir.path(), &ca, &b, now - HOUR, now + 3 * HOUR);
    assert_eq!(m.renew_due().unwrap(), 1);
    assert_eq!(m.renew_due().unwrap(), 0);
    assert_ne!(info_for(&m, &b).serial, second);

    // A key that does not match its certificate is refused by reload, keeping the old one.
    let held = info_for(&m, &b).serial;
    let (_, other_key) = ca.issue(&b, now - HOUR, now + HOUR).unwrap();
    write(&dir.path().join("default.b.key"), other_key);
    let err = m.reload().unwrap_err();
    assert!(format!("{err:#}").contains("default.b.key"), "{err:#}");
    assert_eq!(info_for(&m, &b).serial, held);
    handshake(server_cfg, client_cfg).await.ok();
}

#[tokio::test]
async fn reload_with_broken_material_keeps_the_previous_state() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new_root("root").unwrap();
    let bundle = dir.path().join("bundle.pem");
    write(&bundle, &ca.cert_pem);
    let m = issuer_manager(TD, dir.path(), "issuer", &ca, Some(bundle.clone()), HOUR);
    let (a, b) = (id("ns", "a"), id("ns", "b"));
    m.ensure(&[a.clone(), b.clone()]).unwrap();
    let server_cfg = m.server_config(&b).unwrap();
    let client_cfg = m.client_config(&a, &b).unwrap();
    let serial = info_for(&m, &b).serial;

    let truncated = &ca.cert_pem[..ca.cert_pem.len() / 2];
    for broken in ["not a certificate\n", truncated, ""] {
        write(&bundle, broken);
        let err = m.reload().unwrap_err();
        assert!(
            format!("{err:#}").contains(&bundle.display().to_string()),
            "{err:#}"
        );
        assert_eq!(m.trust_bundle_len(), 1);
        handshake(server_cfg.clone(), client_cfg.clone()).await.ok();
    }
    std::fs::remove_file(&bundle).unwrap();
    let err = m.reload().unwrap_err();
    assert!(
        format!("{err:#}").contains(&bundle.display().to_string()),
        "{err:#}"
    );

    // A broken issuer key is named too, and nothing changes.
    write(&bundle, &ca.cert_pem);
    let key = dir.path().join("issuer.key");
    write(
        &key,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    );
    let err = m.reload().unwrap_err();
    assert!(
        format!("{err:#}").contains(&key.display().to_string()),
        "{err:#}"
    );
    assert_eq!(info_for(&m, &b).serial, serial);
    handshake(server_cfg, client_cfg).await.ok();
}

#[test]
fn constructor_validates_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new_root("root").unwrap();
    let (cert, key) = write_ca(dir.path(), "issuer", &ca);
    let source = |lifetime, renew_at| IdentitySource::Issuer {
        cert: cert.clone(),
        key: key.clone(),
        trust_bundle: None,
        lifetime,
        renew_at,
    };
    assert!(IdentityManager::new(TD, source(HOUR, 0.0)).is_err());
    assert!(IdentityManager::new(TD, source(HOUR, 1.5)).is_err());
    assert!(IdentityManager::new(TD, source(Duration::ZERO, 0.5)).is_err());
    assert!(IdentityManager::new("Bad Domain", source(HOUR, 0.5)).is_err());
    let missing = dir.path().join("nope.key");
    let err = IdentityManager::new(
        TD,
        IdentitySource::Issuer {
            cert: cert.clone(),
            key: missing.clone(),
            trust_bundle: None,
            lifetime: HOUR,
            renew_at: 0.5,
        },
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains(&missing.display().to_string()));
    IdentityManager::new(TD, source(HOUR, 1.0)).unwrap();
}

#[test]
fn certificates_without_exactly_one_spiffe_uri_are_not_identities() {
    use super::verify::spiffe_id_of;
    let dns_only = rcgen::generate_simple_self_signed(vec!["example.com".to_string()]).unwrap();
    let err = spiffe_id_of(dns_only.cert.der()).unwrap_err();
    assert_eq!(err, "no URI SAN");

    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![
        rcgen::SanType::URI("spiffe://cluster.local/ns/a/sa/a".try_into().unwrap()),
        rcgen::SanType::URI("spiffe://cluster.local/ns/b/sa/b".try_into().unwrap()),
    ];
    let two = params.self_signed(&key).unwrap();
    assert_eq!(
        spiffe_id_of(two.der()).unwrap_err(),
        "more than one URI SAN"
    );

    params.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://cluster.local/workload".try_into().unwrap(),
    )];
    let odd = params.self_signed(&key).unwrap();
    assert!(spiffe_id_of(odd.der()).unwrap_err().contains("/workload"));

    let err: rustls::Error = PeerIdentityError::Missing("no URI SAN".into()).into();
    assert_eq!(
        classify_tls_error(&err),
        HandshakeRejection::InvalidIdentity
    );
}

/// Moves everything `from` wants to send into `to`.
fn pump(from: &mut rustls::Connection, to: &mut rustls::Connection) -> Result<(), rustls::Error> {
    let mut wire = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut wire).unwrap();
    }
    let mut rd = &wire[..];
    while !rd.is_empty() {
        to.read_tls(&mut rd).unwrap();
        to.process_new_packets()?;
    }
    Ok(())
}

#[test]
fn reload_during_a_handshake_does_not_break_it() {
    let dir = tempfile::tempdir().unwrap();
    let (ca1, ca2) = (Ca::new_root("one").unwrap(), Ca::new_root("two").unwrap());
    let bundle = dir.path().join("bundle.pem");
    write(&bundle, format!("{}{}", ca1.cert_pem, ca2.cert_pem));
    let m = issuer_manager(TD, dir.path(), "issuer", &ca1, Some(bundle), HOUR);
    let (a, b) = (id("ns", "a"), id("ns", "b"));
    m.ensure(&[a.clone(), b.clone()]).unwrap();
    let first = info_for(&m, &b).serial;

    // Driven in memory so that the reload lands at a known point: after the server has
    // chosen and sent its certificate, before the client has verified it.
    let mut client = rustls::Connection::Client(
        rustls::ClientConnection::new(m.client_config(&a, &b).unwrap(), localhost()).unwrap(),
    );
    let mut server = rustls::Connection::Server(
        rustls::ServerConnection::new(m.server_config(&b).unwrap()).unwrap(),
    );
    pump(&mut client, &mut server).unwrap(); // ClientHello
    assert!(client.is_handshaking() && server.is_handshaking());

    write_ca(dir.path(), "issuer", &ca2);
    m.reload().unwrap();
    assert_ne!(
        info_for(&m, &b).serial,
        first,
        "server certificate re-minted"
    );

    pump(&mut server, &mut client).unwrap(); // server flight, with the old certificate
    pump(&mut client, &mut server).unwrap(); // client certificate and Finished
    assert!(!client.is_handshaking() && !server.is_handshaking());
    let leaf = client.peer_certificates().unwrap()[0].clone();
    assert_eq!(serial_of(&leaf), first);
    assert_eq!(peer_spiffe_id(&server), Some(a));
}

#[test]
fn manager_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<IdentityManager>();
    check::<Ca>();
}

/// A wall clock the test moves by hand.
struct ManualWallClock(parking_lot::Mutex<SystemTime>);

impl ManualWallClock {
    fn set(&self, at: SystemTime) {
        *self.0.lock() = at;
    }
}

impl WallClock for ManualWallClock {
    fn now(&self) -> SystemTime {
        *self.0.lock()
    }
}

/// Renewal follows the store's clock, not the machine's: nothing is due
/// before the renewal point, everything at it, and a clock set back before a
/// certificate's start mints it again (peers would take it for one not yet
/// valid). No sleeping, no moving the machine's clock.
#[test]
fn renewal_and_a_clock_set_back_follow_the_injected_clock() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new_root("root").unwrap();
    let (cert, key) = write_ca(dir.path(), "issuer", &ca);
    let start = SystemTime::now();
    let clock = Arc::new(ManualWallClock(parking_lot::Mutex::new(start)));
    let m = IdentityManager::with_clock(
        TD,
        IdentitySource::Issuer {
            cert,
            key,
            trust_bundle: None,
            lifetime: HOUR,
            renew_at: 0.5,
        },
        clock.clone(),
    )
    .unwrap();
    let a = id("ns", "a");
    m.ensure(std::slice::from_ref(&a)).unwrap();
    let first = info_for(&m, &a);
    assert_eq!(m.next_renewal(), Some(start + HOUR / 2));
    assert!(first.not_after >= start + HOUR - Duration::from_secs(1));

    clock.set(start + HOUR / 2 - Duration::from_secs(1));
    assert_eq!(
        m.renew_due().unwrap(),
        0,
        "renewed before half the lifetime"
    );
    clock.set(start + HOUR / 2);
    assert_eq!(
        m.renew_due().unwrap(),
        1,
        "not renewed at half the lifetime"
    );
    let second = info_for(&m, &a);
    assert_ne!(second.serial, first.serial);
    assert!(second.not_before <= start + HOUR / 2 && second.not_after > first.not_after);
    assert_eq!(m.renew_due().unwrap(), 0, "renewed twice");

    // The clock goes back a day: before the certificate's start.
    let earlier = start - 24 * HOUR;
    clock.set(earlier);
    assert_eq!(
        m.renew_due().unwrap(),
        1,
        "a certificate from the future was kept"
    );
    let third = info_for(&m, &a);
    assert!(
        third.not_before <= earlier && earlier < third.not_after,
        "the new certificate is valid at the clock's time"
    );
}

/// The Istio CA API over real gRPC (HTTP/2 on loopback): a node's request on
/// a pod's behalf, with its token and cluster id, reaches a signer, which
/// answers `[leaf, root]`; a refusal comes back as the signer's status.
#[tokio::test]
async fn create_certificate_travels_over_grpc_with_the_callers_token() {
    use super::ca_api::{
        CertificateService, CertificateSigner, IstioCertificateRequest, IstioCertificateResponse,
        create_certificate,
    };

    struct TokenSigner(Ca);
    impl CertificateSigner for TokenSigner {
        fn create_certificate(
            &self,
            request: tonic::Request<IstioCertificateRequest>,
        ) -> std::pin::Pin<
            Box<
                dyn Future<
                        Output = Result<tonic::Response<IstioCertificateResponse>, tonic::Status>,
                    > + Send,
            >,
        > {
            let token = request
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let cluster = request
                .metadata()
                .get("clusterid")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let request = request.into_inner();
            let answer = (|| {
                if token.as_deref() != Some("Bearer node-a")
                    || cluster.as_deref() != Some("Kubernetes")
                {
                    return Err(tonic::Status::unauthenticated("not allowed"));
                }
                let id: SpiffeId = request
                    .impersonated_identity()
                    .ok_or_else(|| tonic::Status::invalid_argument("no identity"))?
                    .parse()
                    .map_err(|_| tonic::Status::invalid_argument("not a SPIFFE ID"))?;
                let csr = super::ca::SigningRequest::from_pem(&request.csr)
                    .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
                let now = SystemTime::now();
                let lifetime = Duration::from_secs(request.validity_duration as u64);
                let leaf = self
                    .0
                    .sign_request(&csr, &id, now, now + lifetime)
                    .map_err(|e| tonic::Status::internal(e.to_string()))?;
                Ok(tonic::Response::new(IstioCertificateResponse {
                    cert_chain: vec![leaf, self.0.cert_pem.clone()],
                }))
            })();
            Box::pin(async move { answer })
        }
    }

    let ca = Ca::new_root("grpc root").unwrap();
    let root_pem = ca.cert_pem.clone();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let service = CertificateService::new(Arc::new(TokenSigner(ca)));
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let pod = id("shop", "frontend");
    let (csr, key) = super::ca::signing_request(&pod).unwrap();
    let request = IstioCertificateRequest::impersonating(csr, 3600, &pod.to_string());
    let response = create_certificate(channel.clone(), "node-a", "Kubernetes", request.clone())
        .await
        .unwrap();
    assert_eq!(response.cert_chain.len(), 2);
    assert_eq!(response.cert_chain[1], root_pem);
    let leaf = rustls_pemfile::certs(&mut response.cert_chain[0].as_bytes())
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(spiffe_id_of(&leaf).unwrap(), pod);
    let (_, parsed) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    assert_eq!(
        parsed.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw()
    );
    let refused = create_certificate(channel, "node-b", "Kubernetes", request)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    server.abort();
}

fn requesting_manager(dir: &Path, ca: &Ca, clock: Arc<dyn WallClock>) -> IdentityManager {
    let roots = dir.join("ca-root.crt");
    write(&roots, &ca.cert_pem);
    IdentityManager::with_clock(
        TD,
        IdentitySource::SigningRequest(SigningRequestSource {
            address: "https://ca.test:15012".into(),
            ca_roots: roots,
            server_name: None,
            token_file: dir.join("token"),
            cluster_id: "Kubernetes".into(),
            lifetime: HOUR,
            renew_at: 0.5,
        }),
        clock,
    )
    .unwrap()
}

/// What a CA answers for `id`: (its chain, the key made for it).
fn answer(
    ca: &Ca,
    id: &SpiffeId,
    roots: &str,
    now: SystemTime,
) -> (Vec<String>, rustls_pki_types::PrivateKeyDer<'static>) {
    let (csr, key) = super::ca::signing_request(id).unwrap();
    let request = super::ca::SigningRequest::from_pem(&csr).unwrap();
    let leaf = ca
        .sign_request(&request, id, now - Duration::from_secs(120), now + HOUR)
        .unwrap();
    (
        vec![leaf, roots.to_string()],
        rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
}

/// Requested certificates: only wanted identities are due; an answer is
/// taken only for the identity asked, over the key sent, chaining to the
/// roots sent with it, which become the bundle; renewal is due at the
/// fraction of what was left when it came, and after the clock went back.
#[test]
fn requested_certificates_are_checked_installed_and_fall_due() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new_root("requested root").unwrap();
    let other = Ca::new_root("another root").unwrap();
    let start = SystemTime::now();
    let clock = Arc::new(ManualWallClock(parking_lot::Mutex::new(start)));
    let m = requesting_manager(dir.path(), &ca, clock.clone());
    let (a, b) = (id("shop", "a"), id("shop", "b"));
    // Nothing made here: ensure only says what is wanted.
    m.ensure(&[a.clone(), b.clone()]).unwrap();
    assert!(m.certificates().is_empty());
    assert_eq!(m.due_for_request(), vec![a.clone(), b.clone()]);
    assert_eq!(m.trust_bundle_len(), 1);

    // A lone leaf, another identity, another root, another key: refused.
    let (chain, key) = answer(&ca, &a, &ca.cert_pem, start);
    let err = m
        .install_requested(&a, &chain[..1], key.clone_key())
        .unwrap_err();
    assert!(
        err.to_string().contains("expected the leaf and the roots"),
        "{err:#}"
    );
    let err = m
        .install_requested(&b, &chain, key.clone_key())
        .unwrap_err();
    assert!(format!("{err:#}").contains("asked for"), "{err:#}");
    let (_, stranger) = answer(&ca, &a, &ca.cert_pem, start);
    let err = m.install_requested(&a, &chain, stranger).unwrap_err();
    assert!(
        format!("{err:#}").contains("not over the key sent"),
        "{err:#}"
    );
    let (forged, forged_key) = answer(&other, &a, &ca.cert_pem, start);
    let err = m.install_requested(&a, &forged, forged_key).unwrap_err();
    assert!(format!("{err:#}").contains("does not verify"), "{err:#}");
    assert!(m.certificates().is_empty());

    // The right answer, with two roots: installed, the bundle is both.
    let both = format!("{}{}", ca.cert_pem, other.cert_pem);
    let (chain, key) = answer(&ca, &a, &both, start);
    let info = m.install_requested(&a, &chain, key).unwrap();
    assert_eq!(info.source, CertSource::Requested);
    assert_eq!(info.source.as_str(), "requested");
    assert_eq!(m.trust_bundle_len(), 2);
    assert_eq!(m.due_for_request(), vec![b.clone()]);
    // An answer for an identity no longer wanted is not kept.
    m.ensure(std::slice::from_ref(&a)).unwrap();
    let (chain, key) = answer(&ca, &b, &both, start);
    m.install_requested(&b, &chain, key).unwrap();
    assert_eq!(m.certificates().len(), 1);
    assert!(m.due_for_request().is_empty());
    // Renewal: at half of what was left (an hour), not of the backdated
    // lifetime; and again when the clock goes back before the start.
    *clock.0.lock() = start + Duration::from_secs(29 * 60);
    assert!(m.due_for_request().is_empty());
    *clock.0.lock() = start + Duration::from_secs(31 * 60);
    assert_eq!(m.due_for_request(), vec![a.clone()]);
    *clock.0.lock() = start - Duration::from_secs(600);
    assert_eq!(m.due_for_request(), vec![a.clone()]);
    // Reload keeps what the CA gave (the roots file is the channel's).
    m.reload().unwrap();
    assert_eq!(m.trust_bundle_len(), 2);
    assert_eq!(m.certificates().len(), 1);
    let health = m.request_health().unwrap();
    assert_eq!(health.succeeded, 0, "counted by the requester, not here");
}
