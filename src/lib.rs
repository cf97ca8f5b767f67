//! satstream: sell LLM tokens per chunk over the Lightning Network.
pub mod config;
pub mod engine;
