//! Tooling that runs the whole product on one machine over the regtest [`crate::harness`]:
//! `satstream demo` (one paid chat generation shown live) and `satstream regtest` (a world
//! that keeps running for grpcurl). They sit beside `bench::cli` rather than in the client, so
//! that the client (which the harness uses as its payer) never depends on the harness.

pub mod demo;
pub mod regtest;
