//! The project's single integration-test binary (one link for all suites).
mod engine;
