//! The paying client, the other side of the product: what `satstream generate|chat|demo` and
//! the benchmarks run, and what an integrator can copy.
//!
//! - [`wallet`]: the client's own ldk-node (data dir and seed of its own), paying and waiting
//!   for payment outcomes.
//! - [`stream`]: one Generate call, paid chunk by chunk within a budget: BOLT11 invoices,
//!   ATOMIC chunks decrypted with the preimage the payment reveals, KEYSEND top-ups.
//! - [`console`]: live text + status line, or JSON lines, and the summary.
//! - [`pipe`]: pays the invoices in any text piped through it (`grpcurl … | satstream wallet
//!   pay`), within a budget.

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
    Lightning(#[from] crate::lightning::LightningError),
}
