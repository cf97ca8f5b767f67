//! The paying client, the other side of the product: what `satstream generate|chat|demo` and
//! the benchmarks run, and what an integrator can copy.
//!
//! - [`wallet`]: the client's own ldk-node (data dir and seed of its own), paying and waiting
//!   for payment outcomes.
//! - [`stream`]: one Generate call, paid chunk by chunk within a budget: BOLT11 invoices,
//!   ATOMIC chunks decrypted with the preimage the payment reveals, KEYSEND top-ups.
//! - [`console`]: live text + status line, or JSON lines, and the summary.
//! - [`pipe`]: pays the invoices Generate events carry in any text piped through it
//!   (`grpcurl … | satstream wallet pay`), within a budget.
//! - [`cmd`]: the client's commands, one module each (`generate`/`chat`, `wallet`, `account`,
//!   `demo`, `regtest`); the `satstream` binary only parses arguments.

pub mod cmd;
pub mod console;
pub mod pipe;
pub mod stream;
pub mod wallet;

pub use stream::{generate, ClientEvent, Summary};
pub use wallet::{PayOutcome, Wallet};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("wallet: {0}")]
    Wallet(String),
    #[error("payment: {0}")]
    Payment(String),
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("server: {0}")]
    Server(#[from] tonic::Status),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error(transparent)]
    Node(#[from] crate::node::NodeError),
    /// A command was used wrongly; the message says how to use it.
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("regtest world: {0}")]
    Harness(String),
}

/// A gRPC channel to a satstream server: plaintext for `http://`, TLS for `https://` (trusting
/// `cacert` when given, else the public web PKI roots).
pub async fn connect(
    server: &str,
    cacert: Option<&std::path::Path>,
) -> Result<tonic::transport::Channel, ClientError> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
    let bad = |e: &dyn std::fmt::Display| ClientError::Usage(format!("--server {server:?}: {e}"));
    let mut ep = Endpoint::from_shared(server.to_string()).map_err(|e| bad(&e))?;
    if server.starts_with("https://") {
        let mut tls = ClientTlsConfig::new();
        tls = match cacert {
            Some(path) => {
                let pem = std::fs::read(path)
                    .map_err(|e| ClientError::Usage(format!("--cacert {}: {e}", path.display())))?;
                tls.ca_certificate(Certificate::from_pem(pem))
            }
            None => tls.with_webpki_roots(),
        };
        ep = ep.tls_config(tls).map_err(|e| bad(&e))?;
    } else if cacert.is_some() {
        return Err(ClientError::Usage(
            "--cacert is for https:// servers; this one is plaintext".into(),
        ));
    }
    ep.connect()
        .await
        .map_err(|e| ClientError::Usage(format!("cannot reach the server at {server}: {e}")))
}
