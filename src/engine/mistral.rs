//! mistral.rs 0.8.1 as a [`Backend`].
//!
//! Facts this relies on (measured, see the project notes): mistral.rs has no pause and a full
//! response channel blocks its whole engine loop, so the [`Segment`] always drains the channel;
//! a per-request `CustomLogitsProcessor` is called exactly once per sampling step with the
//! sequence so far (prompt + generated), which is how tokens are observed exactly; forcing every
//! logit but EOS to -inf ends the sequence cleanly (finish reason "stop");
//! dropping the response receiver cancels the sequence within one step.

use std::path::Path;
use std::sync::{Arc, Mutex};

use either::Either;
use indexmap::IndexMap;
use mistralrs::core::TokenizationRequest;
use mistralrs::{
    Constraint, CustomLogitsProcessor, GgufModelBuilder, Model, NormalRequest, Request,
    RequestMessage, Response, SamplingParams, Tensor, TokenSource,
};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::backend::{Backend, BoxFuture, Segment, SegmentEnd, SegmentRequest, TokenObserver};
use super::Prompt;

/// mistral.rs on the CPU, without its prefix cache.
///
/// mistral.rs 0.8.1's prefix cacher only ever evicts caches held on a GPU: on the CPU every
/// finished sequence's KV cache is kept forever (~8–11 MB per SmolLM2 generation with distinct
/// prompts; an OOM kill is a crash). Reloading the engine past a token budget did not bound it
/// (soak: 421 MB → 6.5 GB over 1 000 generations), and the cache never served a resume anyway
/// (a resume is a prefix of a cached sequence, which it does not match; a pause/resume costs a
/// re-prefill either way, ~0.8 s). Off: memory stays flat. The llama.cpp backend pauses for real.
pub struct MistralBackend {
    model: Model,
    eos_token_id: u32,
}

impl MistralBackend {
    /// Loads a GGUF file fully offline on the CPU. The caller has validated the header (an
    /// unknown architecture would panic inside mistral.rs).
    pub async fn load(path: &Path, max_num_seqs: usize, eos_token_id: u32) -> Result<Self, String> {
        let abs = std::fs::canonicalize(path).map_err(|e| format!("cannot resolve path: {e}"))?;
        // The directory must be given as an existing absolute path: anything else is taken for
        // a Hugging Face repo id and mistral.rs goes to the network.
        let dir = abs
            .parent()
            .and_then(|d| d.to_str())
            .ok_or("model path is not valid UTF-8")?
            .to_string();
        let file = abs
            .file_name()
            .and_then(|f| f.to_str())
            .ok_or("model file name is not valid UTF-8")?
            .to_string();
        let builder = GgufModelBuilder::new(dir, vec![file])
            .with_token_source(TokenSource::None)
            .with_force_cpu()
            .with_max_num_seqs(max_num_seqs.max(1))
            .with_prefix_cache_n(None);
        // A panic while loading (mistral.rs asserts on odd files) must not take the server down.
        let model = tokio::spawn(builder.build())
            .await
            .map_err(|e| format!("mistral.rs panicked while loading: {e}"))?
            .map_err(|e| format!("mistral.rs failed to load: {e:#}"))?;
        Ok(Self {
            model,
            eos_token_id,
        })
    }
}

impl Backend for MistralBackend {
    fn name(&self) -> &'static str {
        "mistral.rs"
    }

    fn tokenize(&self, prompt: Prompt) -> BoxFuture<'_, Result<Vec<u32>, String>> {
        let sender = self.model.inner().get_sender(None);
        Box::pin(async move {
            let sender = sender.map_err(|e| format!("engine unavailable: {e}"))?;
            let text = match prompt {
                Prompt::Chat(messages) => Either::Left(
                    messages
                        .into_iter()
                        .map(|m| {
                            IndexMap::from([
                                ("role".to_string(), Either::Left(m.role)),
                                ("content".to_string(), Either::Left(m.content)),
                            ])
                        })
                        .collect(),
                ),
                Prompt::Text(t) => Either::Right(t),
                Prompt::Tokens(ids) => return Ok(ids),
            };
            let (tx, mut rx) = mpsc::channel(1);
            // These are exactly the flags mistral.rs uses when it tokenizes a chat/completion
            // request itself, so the count matches what a request would process.
            let request = Request::Tokenize(TokenizationRequest {
                text,
                tools: None,
                add_generation_prompt: true,
                add_special_tokens: true,
                enable_thinking: None,
                reasoning_effort: None,
                response: tx,
            });
            // mistral.rs panics its engine loop if the tokenization receiver is gone when it
            // answers, so send and receive in a detached task: a caller giving up cannot drop
            // the receiver early.
            tokio::spawn(async move {
                sender
                    .send(request)
                    .await
                    .map_err(|_| "engine stopped".to_string())?;
                match rx.recv().await {
                    Some(Ok(ids)) => Ok(ids),
                    Some(Err(e)) => Err(e.to_string()),
                    None => Err("engine dropped the tokenization request".to_string()),
                }
            })
            .await
            .map_err(|e| format!("tokenization task failed: {e}"))?
        })
    }

    fn start(
        &self,
        request: SegmentRequest,
        observer: Arc<dyn TokenObserver>,
    ) -> BoxFuture<'_, Result<Box<dyn Segment>, String>> {
        Box::pin(async move {
            let runner = self.model.inner();
            let sender = runner
                .get_sender(None)
                .map_err(|e| format!("engine unavailable: {e}"))?;
            // Never full in practice (a dedicated task drains it), but sized so that even a
            // delayed drain cannot block mistral.rs: at most one chunk per token plus the end.
            let capacity = (request.max_new_tokens as usize)
                .saturating_add(4)
                .min(1 << 16);
            let (tx, rx) = mpsc::channel(capacity);
            let processor = Arc::new(Observe {
                prompt_len: request.tokens.len(),
                revealed: Mutex::new(0),
                observer,
                eos: self.eos_token_id,
            });
            let sampling_params = SamplingParams {
                // mistral.rs reads None as 1.0; 0 is how greedy (argmax) is selected.
                temperature: Some(request.temperature),
                top_p: (request.top_p > 0.0 && request.top_p < 1.0).then_some(request.top_p),
                repetition_penalty: (request.repetition_penalty != 1.0)
                    .then_some(request.repetition_penalty as f32),
                // The driver ends every segment itself through the logits processor, one token
                // before this limit, so the end is always clean and every token is observed.
                max_len: Some(request.max_new_tokens as usize + 1),
                ..SamplingParams::neutral()
            };
            let id = runner.next_request_id();
            let normal = NormalRequest {
                messages: RequestMessage::CompletionTokens(request.tokens),
                sampling_params,
                response: tx,
                return_logprobs: false,
                is_streaming: true,
                id,
                constraint: Constraint::None,
                suffix: None,
                tools: None,
                tool_choice: None,
                logits_processors: Some(vec![processor as Arc<dyn CustomLogitsProcessor>]),
                return_raw_logits: false,
                web_search_options: None,
                model_id: None,
                truncate_sequence: false,
            };
            sender
                .send(Request::Normal(Box::new(normal)))
                .await
                .map_err(|_| "engine stopped".to_string())?;
            debug!(request_id = id, "mistral.rs segment submitted");
            Ok(Box::new(MistralSegment { rx }) as Box<dyn Segment>)
        })
    }
}

/// The per-request logits processor: reports tokens and forces EOS when the driver says stop.
struct Observe {
    prompt_len: usize,
    /// Generated tokens already reported. A mutex, not an atomic: two calls must never report
    /// the same token (calls are sequential per sequence, this only makes it obviously so).
    revealed: Mutex<usize>,
    observer: Arc<dyn TokenObserver>,
    eos: u32,
}

impl CustomLogitsProcessor for Observe {
    fn apply(&self, logits: &Tensor, context: &[u32]) -> mistralrs::Result<Tensor> {
        // `context` is prompt + every token generated so far; the token sampled at the previous
        // step is its last element. So each call reveals the previous step's token, and the
        // final (forced or natural) EOS step reveals the last one.
        let generated = context.len().saturating_sub(self.prompt_len);
        {
            let mut revealed = self.revealed.lock().unwrap_or_else(|p| p.into_inner());
            while *revealed < generated {
                let id = context[self.prompt_len + *revealed];
                if id == self.eos {
                    // The sequence has ended; a call after it (mistral.rs may run one more step
                    // of a finished sequence in a batch) has nothing to report or decide.
                    return Ok(logits.clone());
                }
                self.observer.on_token(id);
                *revealed += 1;
            }
        }
        if self.observer.proceed() {
            return Ok(logits.clone());
        }
        let n = logits.elem_count();
        let eos = self.eos as usize;
        if logits.rank() != 1 || eos >= n {
            warn!(
                eos,
                n, "cannot force EOS on these logits; letting the step run"
            );
            return Ok(logits.clone());
        }
        let mut forced = vec![f32::NEG_INFINITY; n];
        forced[eos] = 0.0;
        Tensor::from_vec(forced, n, logits.device())?.to_dtype(logits.dtype())
    }
}

struct MistralSegment {
    rx: mpsc::Receiver<Response>,
}

impl Segment for MistralSegment {
    fn finished(&mut self) -> BoxFuture<'_, SegmentEnd> {
        Box::pin(async move {
            // Chunk text is ignored on purpose: tokens come from the logits processor. The
            // channel is only drained (so the engine loop never blocks) and watched for the end.
            // The end is a chunk with a finish reason, or — when the last token was an
            // incomplete character — just the channel closing without any final chunk.
            while let Some(resp) = self.rx.recv().await {
                match resp {
                    Response::CompletionChunk(c)
                        if c.choices.iter().any(|ch| ch.finish_reason.is_some()) =>
                    {
                        return SegmentEnd::Ended;
                    }
                    Response::Chunk(c) if c.choices.iter().any(|ch| ch.finish_reason.is_some()) => {
                        return SegmentEnd::Ended;
                    }
                    Response::Done(_) | Response::CompletionDone(_) => {
                        return SegmentEnd::Ended;
                    }
                    Response::InternalError(e) | Response::ValidationError(e) => {
                        return SegmentEnd::Failed(e.to_string())
                    }
                    Response::ModelError(msg, _) | Response::CompletionModelError(msg, _) => {
                        return SegmentEnd::Failed(msg)
                    }
                    _ => {}
                }
            }
            SegmentEnd::Ended
        })
    }
}
