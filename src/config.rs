//! Configuration: one TOML file, every key overridable by environment (`SATSTREAM_<KEY>`) and
//! by `--set key=value` on the command line. Validated once at start: a bad value fails with the
//! key and the reason.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// One model the server sells. Prices are in millisatoshis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Public id clients ask for (e.g. "smollm2-135m").
    pub id: String,
    /// Local GGUF file. Relative paths are resolved against the current directory.
    pub path: PathBuf,
    /// Upper bound on prompt + output tokens; 0 = the model's own context length.
    #[serde(default)]
    pub context_length: u32,
    /// Price of one output token, msat.
    pub msat_per_token: u64,
    /// Price of one prompt token, msat (0 = prompts are free).
    #[serde(default)]
    pub msat_per_prompt_token: u64,
    /// Tokens per paid chunk.
    #[serde(default = "default_chunk_tokens")]
    pub chunk_tokens: u32,
    /// Generations running at once on this model.
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent: u32,
    /// Generations waiting for a slot before new ones get ResourceExhausted.
    #[serde(default = "default_max_queue")]
    pub max_queue: u32,
}

fn default_chunk_tokens() -> u32 {
    16
}
fn default_max_concurrent() -> u32 {
    4
}
fn default_max_queue() -> u32 {
    16
}
