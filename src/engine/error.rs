use std::path::PathBuf;

/// Everything the engine can refuse or fail with. Messages say what to fix.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A model from the configuration could not be loaded.
    #[error("model `{model}` ({path}): {reason}")]
    Load {
        model: String,
        path: PathBuf,
        reason: String,
    },
    /// The model configuration itself is inconsistent.
    #[error("invalid model configuration: {0}")]
    Config(String),
    #[error("unknown model `{0}`")]
    UnknownModel(String),
    /// A request field is out of range (maps to gRPC InvalidArgument).
    #[error("{0}")]
    InvalidArgument(String),
    /// The prompt alone does not leave room for a single output token (gRPC ResourceExhausted).
    #[error(
        "prompt is too long for model `{model}`: {prompt_tokens} tokens, context length is \
         {context_length} (at most {} prompt tokens leave room for output)",
        .context_length.saturating_sub(1)
    )]
    PromptTooLong {
        model: String,
        prompt_tokens: u32,
        context_length: u32,
    },
    /// Admission refused: every slot is running and the queue is full (gRPC ResourceExhausted).
    #[error(
        "model `{model}` is busy: {running} generations running, {queued} waiting (limits \
         {max_concurrent} and {max_queue}); retry later"
    )]
    Busy {
        model: String,
        running: u32,
        queued: u32,
        max_concurrent: u32,
        max_queue: u32,
    },
    /// The inference backend failed (gRPC Unavailable/Internal).
    #[error("model `{model}`: {backend} error: {reason}")]
    Backend {
        model: String,
        backend: &'static str,
        reason: String,
    },
}
