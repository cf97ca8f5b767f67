//! What a connection passes before any handler sees it, and who a client is.
//!
//! A listener's connections are capped in all and per client, and each must finish its TLS
//! handshake (or, in plaintext, send its first bytes) within a deadline: a client that opens
//! sockets and says nothing holds a file descriptor and a task, never a session slot, and only
//! for that long. Connections over a cap are closed at once.
//!
//! A client is counted by its address prefix ([`ClientKeys`]): one IPv6 /64 is one customer's
//! network, so a cap per full address would be no cap at all. Behind a reverse proxy every
//! client shares the proxy's address; the address it forwards (`x-forwarded-for`) is believed
//! only from the proxies the operator configured.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;

/// How clients are told apart: address prefixes, and the proxies whose forwarded address is
/// believed.
#[derive(Debug, Clone)]
pub struct ClientKeys {
    v4_prefix: u8,
    v6_prefix: u8,
    trusted_proxies: Vec<IpNet>,
}

#[derive(Debug, thiserror::Error)]
#[error("server.trusted_proxies[{index}]: {value:?} is not an address or a CIDR (e.g. 10.0.0.0/8)")]
pub struct BadProxy {
    pub index: usize,
    pub value: String,
}

impl ClientKeys {
    pub fn new(v4_prefix: u8, v6_prefix: u8, trusted: &[String]) -> Result<ClientKeys, BadProxy> {
        let trusted_proxies = trusted
            .iter()
            .enumerate()
            .map(|(index, v)| {
                v.parse::<IpNet>()
                    .or_else(|_| v.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| BadProxy {
                        index,
                        value: v.clone(),
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(ClientKeys {
            v4_prefix: v4_prefix.min(32),
            v6_prefix: v6_prefix.min(128),
            trusted_proxies,
        })
    }

    pub fn from_config(c: &crate::config::Config) -> Result<ClientKeys, BadProxy> {
        ClientKeys::new(
            c.limits.client_prefix_v4,
            c.limits.client_prefix_v6,
            &c.server.trusted_proxies,
        )
    }

    /// The prefix `ip` is counted by (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn key(&self, ip: IpAddr) -> IpAddr {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        let len = match ip {
            IpAddr::V4(_) => self.v4_prefix,
            IpAddr::V6(_) => self.v6_prefix,
        };
        IpNet::new(ip, len).map(|n| n.network()).unwrap_or(ip)
    }

    fn trusted(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|n| n.contains(&ip))
    }

    /// The client behind a connection from `peer`: `peer` itself, unless `peer` is a trusted
    /// proxy, then the right-most address of `forwarded_for` (comma-separated, as proxies
    /// append) that is not a trusted proxy. What a client writes there itself is to the left
    /// of what its proxies appended, so it is never taken.
    pub fn client(&self, peer: IpAddr, forwarded_for: Option<&str>) -> IpAddr {
        if !self.trusted(peer) {
            return peer;
        }
        let Some(list) = forwarded_for else {
            return peer;
        };
        for hop in list.rsplit(',') {
            match hop.trim().parse::<IpAddr>() {
                Ok(ip) if self.trusted(ip) => continue,
                Ok(ip) => return ip,
                // An entry we cannot read: nothing to its left can be believed.
                Err(_) => return peer,
            }
        }
        peer
    }
}

/// A listener's connection limits.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    /// Open connections in all.
    pub max_connections: usize,
    /// Open connections per client key.
    pub max_per_client: usize,
    /// Longest a new connection may take to finish TLS (or send its first bytes).
    pub handshake: Duration,
}

#[derive(Default)]
struct Open {
    total: usize,
    per_client: HashMap<IpAddr, usize>,
}

/// One open connection's place under the caps; freed when the connection is dropped.
struct Slot {
    open: Arc<Mutex<Open>>,
    key: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut o = self.open.lock().unwrap_or_else(|p| p.into_inner());
        o.total -= 1;
        if let Some(n) = o.per_client.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                o.per_client.remove(&self.key);
            }
        }
    }
}

enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// A connection that passed the front door: plaintext or TLS, with its place under the caps.
pub struct Conn {
    io: Io,
    remote: SocketAddr,
    _slot: Slot,
}

impl Conn {
    pub fn remote_addr(&self) -> SocketAddr {
        self.remote
    }
}

impl Connected for Conn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        // TcpConnectInfo has no public constructor: read it off the TCP stream underneath.
        match &self.io {
            Io::Plain(s) => s.connect_info(),
            Io::Tls(s) => s.get_ref().0.connect_info(),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// A rustls acceptor for `tls` (ALPN: `alpn`, e.g. `h2` for gRPC).
pub fn acceptor(tls: &crate::tls::ServerTls, alpn: &[&[u8]]) -> Result<TlsAcceptor, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(tls.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("certificate: {e}"))?;
    let key =
        PrivateKeyDer::from_pem_slice(tls.key_pem.as_bytes()).map_err(|e| format!("key: {e}"))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The connections of `listener` that pass the caps and finish their handshake in time, as a
/// stream for a server's `serve_with_incoming`. Ends when `stop` is cancelled.
pub fn incoming(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    caps: Caps,
    keys: ClientKeys,
    stop: CancellationToken,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let open = Arc::new(Mutex::new(Open::default()));
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                _ = stop.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors, say: wait a moment rather than spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let key = keys.key(remote.ip());
            let slot = {
                let mut o = open.lock().unwrap_or_else(|p| p.into_inner());
                let mine = o.per_client.get(&key).copied().unwrap_or(0);
                if o.total >= caps.max_connections || mine >= caps.max_per_client {
                    crate::metrics::connection_refused(if o.total >= caps.max_connections {
                        "total"
                    } else {
                        "per_client"
                    });
                    tracing::debug!(client = %key, total = o.total, mine, "connection over the caps: closed");
                    continue;
                }
                o.total += 1;
                *o.per_client.entry(key).or_default() += 1;
                Slot {
                    open: open.clone(),
                    key,
                }
            };
            let _ = tcp.set_nodelay(true);
            let (tls, tx) = (tls.clone(), tx.clone());
            tokio::spawn(async move {
                let io = tokio::time::timeout(caps.handshake, async {
                    match tls {
                        Some(a) => a.accept(tcp).await.map(|s| Io::Tls(Box::new(s))),
                        None => {
                            // Plaintext: the client speaks first (the HTTP/2 preface).
                            let mut b = [0u8; 1];
                            tcp.peek(&mut b).await.map(|_| Io::Plain(tcp))
                        }
                    }
                })
                .await;
                match io {
                    Ok(Ok(io)) => {
                        let _ = tx
                            .send(Ok(Conn {
                                io,
                                remote,
                                _slot: slot,
                            }))
                            .await;
                    }
                    Ok(Err(e)) => tracing::debug!(%remote, error = %e, "handshake failed"),
                    Err(_) => {
                        crate::metrics::connection_refused("handshake_timeout");
                        tracing::debug!(%remote, "no handshake in time: closed")
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn clients_are_counted_by_prefix() {
        let k = ClientKeys::new(32, 64, &[]).unwrap();
        assert_eq!(
            k.key(ip("2001:db8:1:2:aaaa::1")),
            k.key(ip("2001:db8:1:2:bbbb::9"))
        );
        assert_ne!(k.key(ip("2001:db8:1:2::1")), k.key(ip("2001:db8:1:3::1")));
        assert_ne!(k.key(ip("10.0.0.1")), k.key(ip("10.0.0.2")));
        assert_eq!(k.key(ip("::ffff:10.0.0.1")), ip("10.0.0.1"));
        let k24 = ClientKeys::new(24, 48, &[]).unwrap();
        assert_eq!(k24.key(ip("10.0.0.1")), k24.key(ip("10.0.0.200")));
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let k = ClientKeys::new(32, 64, &["10.0.0.0/8".into(), "192.0.2.7".into()]).unwrap();
        // Not a proxy: its header is the client's own words.
        assert_eq!(
            k.client(ip("203.0.113.5"), Some("1.2.3.4")),
            ip("203.0.113.5")
        );
        // A proxy: the right-most address it did not add itself.
        assert_eq!(
            k.client(ip("10.1.1.1"), Some("6.6.6.6, 198.51.100.9, 10.2.2.2")),
            ip("198.51.100.9")
        );
        assert_eq!(
            k.client(ip("192.0.2.7"), Some(" 198.51.100.9 ")),
            ip("198.51.100.9")
        );
        // A proxy with no header, or garbage: the proxy itself.
        assert_eq!(k.client(ip("10.1.1.1"), None), ip("10.1.1.1"));
        assert_eq!(
            k.client(ip("10.1.1.1"), Some("junk, 10.2.2.2")),
            ip("10.1.1.1")
        );
        assert!(ClientKeys::new(32, 64, &["nope".into()]).is_err());
    }
}
