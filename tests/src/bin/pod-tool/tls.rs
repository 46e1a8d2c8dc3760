//! TLS (rustls, blocking): a line echo over TCP or TLS, and a probe of a TLS
//! server's checks (the agent's tunnel port).

use std::fs::File;
use std::io::{BufReader, ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, ring};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, ServerConfig, ServerConnection,
    SignatureScheme, StreamOwned, SupportedProtocolVersion,
};

use crate::common::{Conn, addr, dial, listen, preview};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let mut r = BufReader::new(File::open(path).with_context(|| path.display().to_string())?);
    let certs = rustls_pemfile::certs(&mut r)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("certificates in {}", path.display()))?;
    if certs.is_empty() {
        bail!("no certificate in {}", path.display());
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let mut r = BufReader::new(File::open(path).with_context(|| path.display().to_string())?);
    rustls_pemfile::private_key(&mut r)
        .with_context(|| format!("private key in {}", path.display()))?
        .with_context(|| format!("no private key in {}", path.display()))
}

/// Accepts any server certificate: these clients test the server's checks,
/// not the other way round.
#[derive(Debug)]
struct AcceptAnyServer(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A client config that accepts any server, offers `versions` and `alpn`,
/// and presents the certificate chain and key in `cert` if given.
fn client_config(
    versions: &[&'static SupportedProtocolVersion],
    alpn: &[&[u8]],
    cert: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider)));
    let mut config = match cert {
        Some((c, k)) => builder.with_client_auth_cert(certs(c)?, key(k)?)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

fn tls_client(
    tcp: Conn,
    host: IpAddr,
    config: Arc<ClientConfig>,
) -> Result<StreamOwned<ClientConnection, Conn>> {
    let conn = ClientConnection::new(config, ServerName::IpAddress(host.into()))?;
    Ok(StreamOwned::new(conn, tcp))
}

/// Reads until a read ends with `\n` (or EOF).
fn read_line_chunks(s: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = vec![0; 1 << 20];
    loop {
        let k = s.read(&mut buf)?;
        if k == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&buf[..k]);
        if buf[k - 1] == b'\n' {
            return Ok(out);
        }
    }
}

/// `line-echo-server <port> [--cert C --key K]`: dual-stack, one connection
/// at a time (over TLS with a certificate): answers the first line and
/// closes. Prints `ready`.
pub fn line_echo_server(port: u16, tls: Option<(&Path, &Path)>) -> Result<()> {
    let config = match tls {
        Some((c, k)) => Some(Arc::new(
            ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()?
                .with_no_client_auth()
                .with_single_cert(certs(c)?, key(k)?)?,
        )),
        None => None,
    };
    let listener = listen(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)), true)?;
    println!("ready");
    loop {
        let (c, peer) = listener.accept()?;
        let served = (|| -> Result<()> {
            match &config {
                Some(config) => {
                    let conn = ServerConnection::new(config.clone())?;
                    let mut s = StreamOwned::new(conn, c);
                    let line = read_line_chunks(&mut s)?;
                    s.write_all(&line)?;
                    s.conn.send_close_notify();
                    s.flush()?;
                }
                None => {
                    let mut s = c;
                    let line = read_line_chunks(&mut s)?;
                    s.write_all(&line)?;
                }
            }
            Ok(())
        })();
        if let Err(e) = served {
            eprintln!("error: {peer}: {e:#}");
        }
    }
}

/// `line-echo <host> <port> <marker> <pad> [--tls]`: sends `pad` bytes of
/// `p`, the marker and `\n`, checks the echo, prints `ok <bytes>`.
pub fn line_echo(host: IpAddr, port: u16, marker: &str, pad: usize, tls: bool) -> Result<()> {
    let timeout = Duration::from_secs(20);
    let tcp = dial(addr(host, port), timeout, timeout, "")?;
    let mut msg = vec![b'p'; pad];
    msg.extend_from_slice(marker.as_bytes());
    msg.push(b'\n');
    let got = if tls {
        let config = client_config(rustls::DEFAULT_VERSIONS, &[], None)?;
        let mut s = tls_client(tcp, host, config)?;
        s.write_all(&msg)?;
        read_line_chunks(&mut s)?
    } else {
        let mut s = tcp;
        s.write_all(&msg)?;
        read_line_chunks(&mut s)?
    };
    if got != msg {
        bail!("echo mismatch: sent {} bytes, got {}", msg.len(), got.len());
    }
    println!("ok {}", got.len());
    Ok(())
}

/// How [`tls_probe`] talks to the server.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ProbeMode {
    /// An HTTP/1.1 request in plaintext.
    Plain,
    /// 64 KiB of random bytes.
    Garbage,
    /// TLS 1.2 at most.
    Tls12,
    /// TLS 1.3.
    Tls13,
}

/// `tls-probe <mode> <host> <port> [--cert C --key K]`: a real TLS client
/// (ALPN h2, any server certificate accepted) for the tunnel port's
/// refusals. Prints one line: `OPEN ...` (the peer answered after the
/// handshake; for `plain`, with HTTP) or `REFUSED <why>`.
pub fn tls_probe(
    mode: ProbeMode,
    host: IpAddr,
    port: u16,
    cert: Option<(&Path, &Path)>,
) -> Result<()> {
    let timeout = Duration::from_secs(5);
    // Built first: a certificate that cannot be loaded fails the probe; it
    // is no refusal by the server.
    let config = match mode {
        ProbeMode::Plain | ProbeMode::Garbage => None,
        ProbeMode::Tls12 => Some(client_config(&[&rustls::version::TLS12], &[b"h2"], cert)?),
        ProbeMode::Tls13 => Some(client_config(&[&rustls::version::TLS13], &[b"h2"], cert)?),
    };
    let mut raw = dial(addr(host, port), timeout, timeout, "")?;
    let said = (|| -> Result<String> {
        let mut buf = [0u8; 100];
        match mode {
            ProbeMode::Plain => {
                raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")?;
                let k = raw.read(&mut buf)?;
                Ok(if buf[..k].starts_with(b"HTTP/") {
                    "OPEN".to_string()
                } else {
                    format!(
                        "REFUSED plaintext answered with {}",
                        preview(&buf[..k.min(20)])
                    )
                })
            }
            ProbeMode::Garbage => {
                let mut garbage = vec![0; 64 * 1024];
                File::open("/dev/urandom")?.read_exact(&mut garbage)?;
                raw.write_all(&garbage)?;
                let k = raw.read(&mut buf)?;
                Ok(if k == 0 || buf[0] == 0x15 {
                    "REFUSED closed".to_string()
                } else {
                    format!("OPEN answered {}", preview(&buf[..k.min(20)]))
                })
            }
            ProbeMode::Tls12 | ProbeMode::Tls13 => {
                let config = config.context("a TLS mode has a client config")?;
                let mut s = tls_client(raw.try_clone()?, host, config)?;
                while s.conn.is_handshaking() {
                    s.conn.complete_io(&mut s.sock)?;
                }
                // TLS 1.3: the server checks the client certificate after the
                // client thinks the handshake is done; the verdict arrives
                // with the first read.
                s.write_all(
                    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00",
                )?;
                s.flush()?;
                match s.read(&mut buf) {
                    Ok(0) => Ok("REFUSED closed".to_string()),
                    Ok(k) => Ok(format!("OPEN {k}")),
                    Err(e) if e.kind() == ErrorKind::UnexpectedEof => {
                        Ok("REFUSED closed".to_string())
                    }
                    Err(e) => Err(e.into()),
                }
            }
        }
    })();
    println!("{}", said.unwrap_or_else(|e| format!("REFUSED {e:#}")));
    Ok(())
}
