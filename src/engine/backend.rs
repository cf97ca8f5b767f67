//! The interface between the engine's generation driver and an inference library.
//!
//! The driver owns everything that must be exact (token counting, text attribution, stop
//! strings, allowance, pause/resume); a backend only has to (1) tokenize a prompt, (2) run one
//! *segment*: continue a token sequence, reporting every generated token in order and asking
//! before each sampling step whether it may go on, and (3) stop at once when its [`Segment`] is
//! dropped. Pausing is "end the segment cleanly", resuming is "start a new segment from the
//! prompt plus the generated tokens" — which is why backends without a pause (mistral.rs) fit,
//! and why a llama.cpp or remote backend is an addition, not a rewrite.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use super::Prompt;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Receives the tokens of a running segment. Called from the backend's own thread/loop: every
/// method must return quickly and never block.
pub trait TokenObserver: Send + Sync {
    /// The next generated token, in order (end-of-sequence tokens are never reported).
    fn on_token(&self, id: u32);
    /// Asked before every sampling step. `false` = end the sequence now, cleanly (as if the
    /// model had produced end-of-sequence), so that no further token is generated.
    fn proceed(&self) -> bool;
}

/// One backend run: a continuation of `tokens` by at most `max_new_tokens` tokens.
#[derive(Debug, Clone)]
pub struct SegmentRequest {
    pub tokens: Vec<u32>,
    /// A safety net only: the driver ends the segment through [`TokenObserver::proceed`].
    pub max_new_tokens: u32,
    pub temperature: f64,
    pub top_p: f64,
    /// 1 = off.
    pub repetition_penalty: f64,
    /// None: the backend's own randomness.
    pub seed: Option<u64>,
}

/// How a segment ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SegmentEnd {
    /// The sequence ended (end-of-sequence sampled or forced, or the length safety net).
    Ended,
    /// The backend reported an error; tokens reported before it are valid.
    Failed(String),
    /// A remote engine failed or became unreachable; tokens reported before it are valid.
    UpstreamFailed(String),
}

/// A running segment. Dropping it cancels the work immediately.
pub trait Segment: Send {
    /// Resolves when the sequence has ended. Must keep draining the backend's output while
    /// pending so that a slow consumer elsewhere can never stall the backend.
    fn finished(&mut self) -> BoxFuture<'_, SegmentEnd>;
}

/// An inference library serving one loaded model.
pub trait Backend: Send + Sync + 'static {
    /// Short name for logs ("mistral.rs").
    fn name(&self) -> &'static str;
    /// Exact prompt tokens, after the chat template for [`Prompt::Chat`].
    fn tokenize(&self, prompt: Prompt) -> BoxFuture<'_, Result<Vec<u32>, String>>;
    /// Starts a segment; tokens are reported to `observer` while it runs.
    fn start(
        &self,
        request: SegmentRequest,
        observer: Arc<dyn TokenObserver>,
    ) -> BoxFuture<'_, Result<Box<dyn Segment>, String>>;
    /// Whether new generations can run now (a remote backend with no healthy replica cannot);
    /// the reason otherwise. Checked at admission.
    fn available(&self) -> Result<(), String> {
        Ok(())
    }
}
