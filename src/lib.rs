//! satstream sells LLM tokens per chunk over the Bitcoin Lightning Network.
//!
//! # Layout
//! A request flows one way: `grpc` (or `http`) → session/meter → engine and `lightning` → `store`.
//!
//! - [`config`]: the TOML configuration, environment and `--set` overrides, validation.
//! - [`server`]: starts and stops the whole server in order (store, node, events, gRPC).
//! - [`shutdown`]: SIGINT/SIGTERM → one cancellation token.
//! - [`app`]: the state every handler shares.
//! - [`grpc`]: the edge. Generated types, `auth` (admin bearer token), one file per RPC under
//!   `grpc::admin` and `grpc::inference`, and the error → `tonic::Status` mapping.
//! - [`http`]: the HTTP face. OpenAI-compatible completions (streamed as SSE) and the
//!   account endpoints, paid from a PREPAID account (the API key) or through an L402
//!   challenge; it translates to the same validation, `session::open` and handlers as gRPC.
//!   It also serves the chat page (`http::page`) that people use from a browser.
//! - [`lightning`]: the embedded ldk-node and every money decision: hold invoices and the
//!   crash-safe claim protocol (`lightning::invoices`), refunds, channel closures, bounded
//!   state (`lightning::pruning` of payment records, `lightning::compaction` of channel
//!   monitors by splicing), and `lightning::events`, the single event loop that commits each
//!   event's effect before acknowledging it. [`node`]: building an ldk-node, shared with the client's wallet.
//! - [`wire`]: what crosses the wire, shared by server and client: the generated gRPC types
//!   and ATOMIC's chunk cipher.
//! - [`fault`]: test-only fault injection (`SATSTREAM_FAULT`) for the crash tests.
//! - [`net`]: what a connection passes before a handler sees it (connection caps, the TLS
//!   handshake under a deadline) and who a client is (address prefix, trusted proxies).
//! - [`topups`]: the unpaid TopUp invoices each client may hold.
//! - [`tls`]: the listener's certificate (configured, or generated on first start);
//!   [`files`]: private data dir and secrets (0700/0600, refused when exposed).
//! - [`session`]: the meter, one task per Generate stream: chunks, invoices or balance,
//!   claim-then-deliver, engine allowance, halting. [`pricing`]: every price computed once.
//! - [`store`]: all SQL. Sessions, invoices (an explicit state machine), keysend credits,
//!   prepaid accounts, refunds, losses and the append-only ledger; WAL mode, versioned
//!   migrations.
//! - [`engine`]: inference behind a small backend interface (mistral.rs and llama.cpp in
//!   process, remote OpenAI-compatible replicas): loading, admission, a never-blocking pump,
//!   exact token accounting, pause/resume by allowance.
//! - [`client`]: the paying client: its own ldk-node [`client::Wallet`] and the loop that
//!   runs a Generate stream and pays each chunk (BOLT11, ATOMIC decrypt, KEYSEND) in budget.
//! - [`logging`]: tracing setup, with known library noise classified for what it is.
//! - [`metrics`]: Prometheus export and the bench's in-process samples (payment → tokens,
//!   pause share, halt precision, money).
//! - [`bench`]: `satstream bench`, the performance goals measured in one run on the harness.
//! - [`harness`]: a real regtest world (Bitcoin Core, the server, a payer node, a channel) for
//!   tests, benchmarks and the demo; a real upstream engine server for the remote backend.
//! - [`devtools`]: `satstream demo` and `satstream regtest`, the whole product on one machine
//!   over the harness (the client itself never depends on the harness).
//!
//! `bench`, `harness`, `devtools` and `engine::tiny_model` are test and measurement tooling: they exist with
//! the default `devtools` feature; a server built with `--no-default-features` has none of them.

pub mod app;
#[cfg(feature = "devtools")]
pub mod bench;
pub mod client;
pub mod config;
#[cfg(feature = "devtools")]
pub mod devtools;
pub mod engine;
pub mod fault;
pub mod files;
pub mod grpc;
#[cfg(feature = "devtools")]
pub mod harness;
pub mod http;
pub mod lightning;
pub mod logging;
pub mod metrics;
pub mod net;
pub mod node;
pub mod pricing;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod store;
pub mod tls;
pub mod topups;
pub mod wire;
