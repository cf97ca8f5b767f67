//! Black-box tests on real parts: Bitcoin Core regtest, ldk-node, mistral.rs, SQLite, grpcurl.
//! One test binary (linking is slow); one module per area.

mod abuse;
mod crash;
mod demo;
mod engine;
mod exposure;
mod foundation;
mod gateway;
mod grpcurl;
mod http;
mod money;
mod monitor;
mod page;
mod paid;
mod prepaid;
mod receipts;
mod resume;
mod short;
mod support;
