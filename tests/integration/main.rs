//! Black-box tests on real parts: Bitcoin Core regtest, ldk-node, SQLite, grpcurl.
//! One test binary (linking is slow); one module per area.

mod foundation;
mod grpcurl;
mod support;
