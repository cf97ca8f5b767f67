//! The inference engine: loads the configured models, admits generations (bounded concurrency
//! and queue per model), and streams exactly one event per generated token, with pause/resume
//! by allowance so the payment layer can meter generation without ever blocking the backend.
//!
//! Layout: [`backend`] is the interface to an inference library, implemented by [`mistral`]
//! and [`llamacpp`] in process and by [`openai`] for remote engine clusters; [`pump`] drives one generation over backend segments; [`gguf`] validates
//! model files before any library sees them; [`detok`] attributes text to tokens;
//! [`tiny_model`] writes a deterministic test model.

pub mod backend;
pub mod detok;
mod error;
pub mod gguf;
pub mod llamacpp;
pub mod mistral;
pub mod openai;
mod pump;
pub mod requantize;
#[cfg(feature = "devtools")]
pub mod tiny_model;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{info, info_span, Instrument};

use crate::config::ModelConfig;
use backend::Backend;
use detok::TokenBytes;

pub use error::EngineError;
pub use pump::{EventStream, GenerationHandle};

/// One chat message; the model's own chat template turns a list of them into the prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    /// Rendered with the model's chat template, with the assistant generation prompt appended.
    Chat(Vec<ChatMessage>),
    /// Used verbatim (the tokenizer's special-token rules apply).
    Text(String),
    /// Already tokenized by [`Engine::tokenize`] (a request is tokenized once).
    Tokens(Vec<u32>),
}

impl Prompt {
    fn is_empty(&self) -> bool {
        match self {
            Prompt::Text(t) => t.is_empty(),
            Prompt::Chat(m) => m.iter().all(|m| m.content.is_empty()),
            Prompt::Tokens(t) => t.is_empty(),
        }
    }
}

/// A generation slot taken on a model ([`Engine::admit`]); started with [`Engine::start`].
/// Dropping it frees the slot.
#[derive(Debug)]
pub struct Admission {
    model: String,
    permit: OwnedSemaphorePermit,
}

#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub prompt: Prompt,
    /// Upper bound on generated tokens (end-of-sequence not counted). Must be ≥ 1 and
    /// prompt tokens + max_tokens must fit the context length.
    pub max_tokens: u32,
    /// 0 = greedy (deterministic).
    pub temperature: f64,
    /// Nucleus sampling; 0 or 1 = off.
    pub top_p: f64,
    /// Divides the logit of every token among the last [`PENALTY_LAST_N`] (1 = off).
    pub repetition_penalty: f64,
    /// The sampler's seed (llama.cpp; None: a random one). Meaningless when greedy.
    pub seed: Option<u64>,
    /// The generation ends (reason `Stop(s)`) with the token that completes `s`; the text
    /// of that token, stop string included, is delivered.
    pub stop: Vec<String>,
    /// Tokens the generation may produce before pausing (see [`GenerationHandle::set_allowance`]).
    /// Use `u32::MAX` (or ≥ max_tokens) for no pausing.
    pub allowance: u32,
}

impl GenerateParams {
    /// Greedy, no stop strings, no pausing.
    pub fn new(prompt: Prompt, max_tokens: u32) -> Self {
        Self {
            prompt,
            max_tokens,
            temperature: 0.0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: None,
            stop: Vec::new(),
            allowance: u32::MAX,
        }
    }
}

/// Tokens a repetition penalty looks back over (llama.cpp's and mistral.rs's default window).
pub const PENALTY_LAST_N: i32 = 64;

/// A sampling setting a model cannot honour: the request field and what to fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SamplingRefused {
    pub field: &'static str,
    pub message: String,
}

/// Checks a request's sampling settings against what `backend` can do; the front doors map
/// a refusal to their own error (gRPC InvalidArgument, HTTP 400), naming the field.
pub fn check_sampling(
    backend: crate::config::BackendKind,
    temperature: f64,
    top_p: f64,
    repetition_penalty: f64,
    seed: Option<u64>,
) -> Result<(), SamplingRefused> {
    let refuse = |field, message: &str| {
        Err(SamplingRefused {
            field,
            message: message.into(),
        })
    };
    if !(0.0..=2.0).contains(&temperature) {
        return refuse("temperature", "must be between 0 and 2");
    }
    if !(top_p > 0.0 && top_p <= 1.0) {
        return refuse("top_p", "must be in (0, 1]");
    }
    if !(repetition_penalty > 0.0 && repetition_penalty <= 2.0) {
        return refuse(
            "repetition_penalty",
            "must be in (0, 2]: 1 is off, 1.1 a usual chat setting",
        );
    }
    if seed.is_some() && temperature > 0.0 && backend == crate::config::BackendKind::Mistralrs {
        return refuse(
            "seed",
            "this model runs on mistral.rs, which draws every request from one engine-wide              generator and cannot seed a request; for reproducible output use temperature 0              (greedy), or a model on llama.cpp",
        );
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishReason {
    /// The model ended the output.
    Eos,
    /// `max_tokens` (the value) tokens were generated.
    Length(u32),
    /// A stop string (the value) was generated.
    Stop(String),
    /// [`GenerationHandle::stop`] was called.
    Stopped,
    /// [`GenerationHandle::cancel`] was called or the event stream was dropped.
    Cancelled,
    /// The backend failed; the tokens delivered before are valid.
    Error(String),
    /// A remote engine failed mid-generation or could not be reached; the tokens delivered
    /// before are valid.
    UpstreamFailed(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenEvent {
    /// Exactly one generated token. `index` is 0-based over the whole generation (resumes
    /// included). `text` is what this token completes: a token holding only part of a
    /// character has empty text and the character comes with the token that completes it, so
    /// the concatenated texts are the output and the number of events is the token count.
    Token { text: String, index: u32 },
    /// The allowance is used up (`generated` tokens so far); the backend is idle for this
    /// generation until the allowance is raised, then events continue with the next index.
    Paused { generated: u32 },
    /// Terminal. `completion_tokens` = Token events delivered on this stream.
    Finished {
        reason: FinishReason,
        completion_tokens: u32,
    },
}

/// A started generation. Dropping `events` cancels it.
#[derive(Debug)]
pub struct Generation {
    pub events: EventStream,
    pub handle: GenerationHandle,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    pub id: String,
    /// Effective context length: the model's, capped by the configuration.
    pub context_length: u32,
    pub chunk_tokens: u32,
    pub msat_per_token: u64,
    pub msat_per_prompt_token: u64,
    /// Lower-cased GGUF `general.architecture`.
    pub architecture: String,
    pub max_concurrent: u32,
    pub max_queue: u32,
    pub backend: &'static str,
}

/// Admission counters of one model at an instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelStats {
    /// Generations holding a slot (running in the backend).
    pub running: u32,
    /// New generations waiting for a slot (paused ones resuming are not counted).
    pub queued: u32,
}

struct LoadedModel {
    info: ModelInfo,
    backend: Arc<dyn Backend>,
    bytes: Arc<TokenBytes>,
    slots: Arc<Semaphore>,
    queued: AtomicU32,
}

struct Inner {
    models: Vec<Arc<LoadedModel>>,
    by_id: HashMap<String, Arc<LoadedModel>>,
    /// Also the count of generations started (ids start at 1).
    next_id: AtomicU64,
}

/// The engine facade. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("models", &self.models())
            .finish()
    }
}

/// Decrements the queue counter however the wait ends (admitted, or the caller gave up).
struct QueueGuard<'a>(&'a AtomicU32);
impl Drop for QueueGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Engine {
    /// Loads every model, fully offline, on the CPU. Each file's GGUF header is checked first
    /// so that a missing, corrupt or unsupported file fails with a message naming the model.
    pub async fn load(models: &[ModelConfig]) -> Result<Engine, EngineError> {
        let mut loaded = Vec::with_capacity(models.len());
        let mut by_id = HashMap::new();
        for cfg in models {
            if cfg.id.is_empty() {
                return Err(EngineError::Config("a model has an empty id".into()));
            }
            if by_id.contains_key(&cfg.id) {
                return Err(EngineError::Config(format!(
                    "model id `{}` appears twice",
                    cfg.id
                )));
            }
            if cfg.max_concurrent == 0 {
                return Err(EngineError::Config(format!(
                    "model `{}`: max_concurrent must be at least 1",
                    cfg.id
                )));
            }
            let model = Arc::new(
                load_one(cfg)
                    .instrument(info_span!("load_model", model = %cfg.id))
                    .await?,
            );
            by_id.insert(cfg.id.clone(), model.clone());
            loaded.push(model);
        }
        Ok(Engine {
            inner: Arc::new(Inner {
                models: loaded,
                by_id,
                next_id: AtomicU64::new(1),
            }),
        })
    }

    /// Generations started (prefill run) since the engine loaded.
    pub fn generations_started(&self) -> u64 {
        self.inner.next_id.load(Ordering::Relaxed) - 1
    }

    pub fn models(&self) -> Vec<ModelInfo> {
        self.inner.models.iter().map(|m| m.info.clone()).collect()
    }

    pub fn model(&self, id: &str) -> Option<ModelInfo> {
        self.inner.by_id.get(id).map(|m| m.info.clone())
    }

    pub fn stats(&self, id: &str) -> Option<ModelStats> {
        self.inner.by_id.get(id).map(|m| ModelStats {
            running: m.info.max_concurrent - m.slots.available_permits() as u32,
            queued: m.queued.load(Ordering::SeqCst),
        })
    }

    fn get(&self, id: &str) -> Result<&Arc<LoadedModel>, EngineError> {
        self.inner
            .by_id
            .get(id)
            .ok_or_else(|| EngineError::UnknownModel(id.to_string()))
    }

    /// Exact prompt tokens as the model will see them (chat template applied for
    /// [`Prompt::Chat`]): what the prompt is priced on. Async because tokenization runs in the
    /// backend.
    pub async fn count_prompt_tokens(
        &self,
        model: &str,
        prompt: &Prompt,
    ) -> Result<u32, EngineError> {
        Ok(self.tokenize(model, prompt.clone()).await?.len() as u32)
    }

    /// The prompt's tokens as the model will see them; pass them on as [`Prompt::Tokens`] so
    /// a request is tokenized once.
    pub async fn tokenize(&self, model: &str, prompt: Prompt) -> Result<Vec<u32>, EngineError> {
        tokenize(self.get(model)?, prompt).await
    }

    /// Checks that a prompt of `prompt_tokens` and `max_tokens` fit the model's context.
    pub fn check_fits(
        &self,
        model: &str,
        prompt_tokens: u32,
        max_tokens: u32,
    ) -> Result<(), EngineError> {
        let ctx = self.get(model)?.info.context_length;
        if prompt_tokens >= ctx {
            return Err(EngineError::PromptTooLong {
                model: model.to_string(),
                prompt_tokens,
                context_length: ctx,
            });
        }
        if prompt_tokens as u64 + max_tokens as u64 > ctx as u64 {
            return Err(EngineError::InvalidArgument(format!(
                "max_tokens {max_tokens} + prompt {prompt_tokens} tokens exceeds the context length \
                 {ctx} of model `{model}`; max_tokens may be at most {}",
                ctx - prompt_tokens
            )));
        }
        Ok(())
    }

    /// Takes a generation slot on `model` (waits while queued; [`EngineError::Busy`] when the
    /// queue is full).
    pub async fn admit(&self, model: &str) -> Result<Admission, EngineError> {
        let m = self.get(model)?;
        m.backend
            .available()
            .map_err(|reason| EngineError::Backend {
                model: model.to_string(),
                backend: m.backend.name(),
                reason,
            })?;
        Ok(Admission {
            model: model.to_string(),
            permit: admit(m).await?,
        })
    }

    /// Validates, admits (or refuses with [`EngineError::Busy`]; waits while queued) and starts
    /// a generation.
    pub async fn generate(
        &self,
        model: &str,
        params: GenerateParams,
    ) -> Result<Generation, EngineError> {
        self.get(model)?;
        validate(&params)?;
        let admission = self.admit(model).await?;
        self.start(admission, params).await
    }

    /// Starts a generation in a slot taken with [`Engine::admit`].
    pub async fn start(
        &self,
        admission: Admission,
        params: GenerateParams,
    ) -> Result<Generation, EngineError> {
        let model = admission.model.as_str();
        let m = self.get(model)?;
        validate(&params)?;
        let prompt = tokenize(m, params.prompt).await?;
        let prompt_tokens = prompt.len() as u32;
        let ctx = m.info.context_length;
        if prompt_tokens >= ctx {
            return Err(EngineError::PromptTooLong {
                model: model.to_string(),
                prompt_tokens,
                context_length: ctx,
            });
        }
        if prompt_tokens as u64 + params.max_tokens as u64 > ctx as u64 {
            return Err(EngineError::InvalidArgument(format!(
                "max_tokens {} + prompt {} tokens exceeds the context length {} of model `{}`; \
                 max_tokens may be at most {}",
                params.max_tokens,
                prompt_tokens,
                ctx,
                model,
                ctx - prompt_tokens
            )));
        }
        let permit = admission.permit;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        info!(
            id,
            model,
            prompt_tokens,
            max_tokens = params.max_tokens,
            allowance = params.allowance,
            "generation admitted"
        );
        let spec = pump::GenerationSpec {
            model: model.to_string(),
            prompt,
            max_tokens: params.max_tokens,
            allowance: params.allowance,
            temperature: params.temperature,
            top_p: params.top_p,
            repetition_penalty: params.repetition_penalty,
            seed: params.seed,
            stop: params.stop,
        };
        let (events, handle) = pump::spawn(
            spec,
            m.backend.clone(),
            m.bytes.clone(),
            m.slots.clone(),
            permit,
            id,
        );
        Ok(Generation { events, handle })
    }
}

fn validate(p: &GenerateParams) -> Result<(), EngineError> {
    let invalid = |s: String| Err(EngineError::InvalidArgument(s));
    if p.prompt.is_empty() {
        return invalid("prompt is empty".into());
    }
    if let Prompt::Chat(msgs) = &p.prompt {
        if let Some(m) = msgs.iter().find(|m| m.role.is_empty()) {
            return invalid(format!(
                "a chat message has an empty role (content {:?})",
                m.content
            ));
        }
    }
    if p.max_tokens == 0 {
        return invalid("max_tokens must be at least 1".into());
    }
    if !(p.temperature.is_finite() && p.temperature >= 0.0) {
        return invalid(format!("temperature must be ≥ 0, got {}", p.temperature));
    }
    if !(p.top_p.is_finite() && (0.0..=1.0).contains(&p.top_p)) {
        return invalid(format!("top_p must be within [0, 1], got {}", p.top_p));
    }
    if !(p.repetition_penalty.is_finite() && p.repetition_penalty > 0.0) {
        return invalid(format!(
            "repetition_penalty must be > 0 (1 = off), got {}",
            p.repetition_penalty
        ));
    }
    if p.stop.iter().any(|s| s.is_empty()) {
        return invalid("stop strings must not be empty".into());
    }
    Ok(())
}

async fn tokenize(m: &LoadedModel, prompt: Prompt) -> Result<Vec<u32>, EngineError> {
    if prompt.is_empty() {
        return Err(EngineError::InvalidArgument("prompt is empty".into()));
    }
    if let Prompt::Tokens(ids) = prompt {
        return Ok(ids);
    }
    let ids = m
        .backend
        .tokenize(prompt)
        .await
        .map_err(|reason| EngineError::Backend {
            model: m.info.id.clone(),
            backend: m.backend.name(),
            reason: format!("cannot tokenize the prompt: {reason}"),
        })?;
    if ids.is_empty() {
        return Err(EngineError::InvalidArgument("prompt has no tokens".into()));
    }
    Ok(ids)
}

async fn admit(m: &LoadedModel) -> Result<OwnedSemaphorePermit, EngineError> {
    if let Ok(p) = m.slots.clone().try_acquire_owned() {
        return Ok(p);
    }
    let before = m.queued.fetch_add(1, Ordering::SeqCst);
    let guard = QueueGuard(&m.queued);
    if before >= m.info.max_queue {
        drop(guard);
        return Err(EngineError::Busy {
            model: m.info.id.clone(),
            running: m.info.max_concurrent - m.slots.available_permits() as u32,
            queued: before,
            max_concurrent: m.info.max_concurrent,
            max_queue: m.info.max_queue,
        });
    }
    let permit = m
        .slots
        .clone()
        .acquire_owned()
        .await
        .expect("the semaphore is never closed");
    drop(guard);
    Ok(permit)
}

async fn load_one(cfg: &ModelConfig) -> Result<LoadedModel, EngineError> {
    let started = Instant::now();
    let path: PathBuf = if cfg.path.is_absolute() {
        cfg.path.clone()
    } else {
        std::env::current_dir()
            .map(|d| d.join(&cfg.path))
            .unwrap_or_else(|_| cfg.path.clone())
    };
    let fail = |reason: String| EngineError::Load {
        model: cfg.id.clone(),
        path: path.clone(),
        reason,
    };
    let header = match cfg.backend {
        // Only the tokenizer is read here: the weights (any architecture and quantization
        // the upstream runs) stay on the engine hosts.
        crate::config::BackendKind::Openai => gguf::read_metadata(&path),
        _ => gguf::read_info(&path),
    }
    .map_err(|e| fail(e.to_string()))?;
    if cfg.backend != crate::config::BackendKind::Openai {
        header.check_supported().map_err(|e| fail(e.to_string()))?;
    }
    let tok = header
        .tokenizer
        .as_ref()
        .ok_or_else(|| fail("the GGUF file has no embedded tokenizer (tokenizer.ggml.*)".into()))?;
    let eos = tok
        .eos_token_id
        .ok_or_else(|| fail("tokenizer.ggml.eos_token_id is missing".into()))?;
    if eos as usize >= tok.tokens.len() {
        return Err(fail(format!(
            "eos token id {eos} is outside the vocabulary of {} tokens",
            tok.tokens.len()
        )));
    }
    let bytes = TokenBytes::from_gguf(tok).map_err(fail)?;
    let model_ctx = header.context_length.map(|c| c.min(u32::MAX as u64) as u32);
    let context_length = match (model_ctx, cfg.context_length) {
        (Some(m), 0) => m,
        (Some(m), cap) => m.min(cap),
        (None, 0) => {
            return Err(fail(format!(
                "`{}.context_length` is missing; set context_length in the model configuration",
                header.architecture
            )))
        }
        (None, cap) => cap,
    };
    if context_length < 2 {
        return Err(fail(format!(
            "context length {context_length} is too small"
        )));
    }
    let backend: Arc<dyn Backend> = match cfg.backend {
        crate::config::BackendKind::Mistralrs => Arc::new(
            mistral::MistralBackend::load(&path, cfg.max_concurrent as usize, eos)
                .await
                .map_err(fail)?,
        ),
        crate::config::BackendKind::Llamacpp => Arc::new(
            llamacpp::LlamaCppBackend::load(&path, cfg.max_concurrent as usize, context_length)
                .await
                .map_err(fail)?,
        ),
        crate::config::BackendKind::Openai => {
            let upstream = cfg.upstream.as_ref().ok_or_else(|| {
                EngineError::Config(format!(
                    "model `{}`: backend openai needs [models.upstream] urls",
                    cfg.id
                ))
            })?;
            Arc::new(
                openai::OpenAiBackend::load(&cfg.id, &path, upstream)
                    .await
                    .map_err(fail)?,
            )
        }
    };
    info!(
        architecture = %header.architecture,
        context_length,
        vocab = bytes.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "model loaded"
    );
    Ok(LoadedModel {
        info: ModelInfo {
            id: cfg.id.clone(),
            context_length,
            chunk_tokens: cfg.chunk_tokens,
            msat_per_token: cfg.msat_per_token,
            msat_per_prompt_token: cfg.msat_per_prompt_token,
            architecture: header.architecture.clone(),
            max_concurrent: cfg.max_concurrent,
            max_queue: cfg.max_queue,
            backend: backend.name(),
        },
        backend,
        bytes: Arc::new(bytes),
        slots: Arc::new(Semaphore::new(cfg.max_concurrent as usize)),
        queued: AtomicU32::new(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BackendKind;

    #[test]
    fn sampling_is_checked_against_what_the_backend_can_do() {
        let ok = |b, t, p, r, s| check_sampling(b, t, p, r, s).map_err(|e| e.field);
        assert_eq!(ok(BackendKind::Mistralrs, 0.7, 0.9, 1.1, None), Ok(()));
        assert_eq!(ok(BackendKind::Llamacpp, 0.7, 0.9, 1.1, Some(42)), Ok(()));
        // Greedy output is reproducible on any backend, with or without a seed.
        assert_eq!(ok(BackendKind::Mistralrs, 0.0, 1.0, 1.0, Some(42)), Ok(()));
        // mistral.rs cannot seed one request.
        assert_eq!(
            ok(BackendKind::Mistralrs, 0.7, 1.0, 1.0, Some(42)),
            Err("seed")
        );
        assert_eq!(ok(BackendKind::Openai, 0.7, 1.0, 1.0, Some(42)), Ok(()));
        assert_eq!(
            ok(BackendKind::Llamacpp, 2.5, 1.0, 1.0, None),
            Err("temperature")
        );
        assert_eq!(ok(BackendKind::Llamacpp, 0.7, 0.0, 1.0, None), Err("top_p"));
        for bad in [0.0, -1.0, 2.5, f64::NAN] {
            assert_eq!(
                ok(BackendKind::Llamacpp, 0.7, 1.0, bad, None),
                Err("repetition_penalty"),
                "{bad}"
            );
        }
    }
}
