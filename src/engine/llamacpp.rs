//! llama.cpp (through the llama-cpp-2 crate) as a [`Backend`], with a true pause.
//!
//! One engine thread owns the model's context and serves every generation of the model with
//! batched decode: each step puts one token of every active sequence into one batch (a new
//! sequence's prompt goes in as its prefill). A segment that ends at its allowance leaves its
//! sequence *parked*: its KV cache stays and it is simply left out of the batch. When the
//! driver resumes (a new segment whose tokens extend a parked sequence's), the sequence
//! continues from its cache, with its own sampler state: a resume costs nothing and yields
//! exactly the tokens an uninterrupted run would. A cancelled segment's sequence is freed at
//! once; parked sequences are evicted least recently used when a new sequence needs a slot or
//! the KV cache is full.

use std::num::NonZeroU32;
use std::path::Path;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, OnceLock};

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use rand::Rng;
use tokio::sync::oneshot;
use tracing::{debug, warn};

use super::backend::{Backend, BoxFuture, Segment, SegmentEnd, SegmentRequest, TokenObserver};
use super::Prompt;

/// llama.cpp's process-wide initialisation (once per process).
pub(super) fn backend() -> Result<&'static LlamaBackend, String> {
    static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            llama_cpp_2::send_logs_to_tracing(
                llama_cpp_2::LogOptions::default().with_logs_enabled(true),
            );
            LlamaBackend::init().map_err(|e| format!("llama.cpp init: {e}"))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Threads a context decodes with: one per core.
fn threads() -> i32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as i32)
        .unwrap_or(2)
}

/// Prompt tokens decoded per batch (prefill chunks).
const BATCH: usize = 512;

pub struct LlamaCppBackend {
    model: Arc<LlamaModel>,
    cmds: std_mpsc::Sender<Cmd>,
    next_id: std::sync::atomic::AtomicU64,
}

enum Cmd {
    Start {
        id: u64,
        request: SegmentRequest,
        observer: Arc<dyn TokenObserver>,
        done: oneshot::Sender<SegmentEnd>,
    },
    /// The segment was dropped: cancelled if it still runs (its KV freed), else nothing.
    Drop { id: u64 },
}

impl LlamaCppBackend {
    /// Loads a GGUF file on the CPU and starts the engine thread. `max_concurrent` sequences
    /// run at once; as many more can stay parked. `context_length` is one sequence's limit.
    pub async fn load(
        path: &Path,
        max_concurrent: usize,
        context_length: u32,
    ) -> Result<Self, String> {
        let path = path.to_path_buf();
        let model = tokio::task::spawn_blocking(move || {
            LlamaModel::load_from_file(backend()?, &path, &LlamaModelParams::default())
                .map_err(|e| format!("llama.cpp failed to load: {e}"))
        })
        .await
        .map_err(|e| format!("llama.cpp panicked while loading: {e}"))??;
        let model = Arc::new(model);
        let n_seq = (max_concurrent.max(1) * 2) as u32;
        // One shared pool of KV cells: enough for a few full-length sequences, not for every
        // slot at full length (memory stays bounded; the pool evicts parked sequences).
        let cells = context_length.saturating_mul(max_concurrent.clamp(1, 4) as u32);
        let threads = threads();
        let (cmds, rx) = std_mpsc::channel();
        let (ready_tx, ready_rx) = oneshot::channel();
        let m = model.clone();
        std::thread::Builder::new()
            .name("llama.cpp".into())
            .spawn(move || {
                let params = LlamaContextParams::default()
                    .with_n_ctx(NonZeroU32::new(cells.max(512)))
                    .with_n_batch(BATCH as u32)
                    .with_n_ubatch(BATCH as u32)
                    .with_n_seq_max(n_seq)
                    .with_kv_unified(true)
                    .with_n_threads(threads)
                    .with_n_threads_batch(threads);
                let ctx = match backend().and_then(|b| {
                    m.new_context(b, params)
                        .map_err(|e| format!("llama.cpp context: {e}"))
                }) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                Engine::new(&m, ctx, n_seq).run(rx);
            })
            .map_err(|e| format!("llama.cpp thread: {e}"))?;
        ready_rx
            .await
            .map_err(|_| "llama.cpp thread died".to_string())??;
        Ok(Self {
            model,
            cmds,
            next_id: Default::default(),
        })
    }
}

impl Backend for LlamaCppBackend {
    fn name(&self) -> &'static str {
        "llama.cpp"
    }

    fn tokenize(&self, prompt: Prompt) -> BoxFuture<'_, Result<Vec<u32>, String>> {
        let model = self.model.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || tokenize(&model, prompt))
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
            let id = self
                .next_id
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let (done, rx) = oneshot::channel();
            self.cmds
                .send(Cmd::Start {
                    id,
                    request,
                    observer,
                    done,
                })
                .map_err(|_| "llama.cpp engine stopped".to_string())?;
            Ok(Box::new(LlamaSegment {
                id,
                done: Some(rx),
                cmds: self.cmds.clone(),
            }) as Box<dyn Segment>)
        })
    }
}

/// Exact prompt tokens: the GGUF's chat template applied by llama.cpp, special tokens parsed
/// (as mistral.rs tokenizes), BOS added when the model asks for it.
pub(super) fn tokenize(model: &LlamaModel, prompt: Prompt) -> Result<Vec<u32>, String> {
    let text = match prompt {
        Prompt::Tokens(ids) => return Ok(ids),
        Prompt::Text(t) => t,
        Prompt::Chat(messages) => {
            let tmpl = model
                .chat_template(None)
                .map_err(|e| format!("the model has no chat template: {e}"))?;
            let msgs = messages
                .into_iter()
                .map(|m| LlamaChatMessage::new(m.role, m.content))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("chat message: {e}"))?;
            model
                .apply_chat_template(&tmpl, &msgs, true)
                .map_err(|e| format!("chat template: {e}"))?
        }
    };
    Ok(model
        .vocab()
        .tokenize(text.as_bytes(), true, true)
        .into_iter()
        .map(|t| t.0 as u32)
        .collect())
}

struct LlamaSegment {
    id: u64,
    done: Option<oneshot::Receiver<SegmentEnd>>,
    cmds: std_mpsc::Sender<Cmd>,
}

impl Segment for LlamaSegment {
    fn finished(&mut self) -> BoxFuture<'_, SegmentEnd> {
        Box::pin(async move {
            match self.done.as_mut() {
                Some(rx) => rx
                    .await
                    .unwrap_or_else(|_| SegmentEnd::Failed("the llama.cpp engine stopped".into())),
                None => SegmentEnd::Ended,
            }
        })
    }
}

impl Drop for LlamaSegment {
    fn drop(&mut self) {
        let _ = self.cmds.send(Cmd::Drop { id: self.id });
    }
}

/// The sampling a sequence was started with (a parked sequence is only continued with the
/// same, so that its sampler's state carries on).
#[derive(Clone, Copy, PartialEq)]
struct Sampling {
    temperature: f64,
    top_p: f64,
    repetition_penalty: f64,
    seed: Option<u64>,
}

fn sampler(s: Sampling, n_vocab: i32) -> LlamaSampler {
    let mut chain = Vec::new();
    if s.repetition_penalty != 1.0 {
        chain.push(LlamaSampler::penalties(
            n_vocab,
            super::PENALTY_LAST_N,
            s.repetition_penalty as f32,
            0.0,
            0.0,
        ));
    }
    if s.temperature <= 0.0 {
        chain.push(LlamaSampler::greedy());
        return LlamaSampler::chain_simple(chain);
    }
    if s.top_p > 0.0 && s.top_p < 1.0 {
        chain.push(LlamaSampler::top_p(s.top_p as f32, 1));
    }
    chain.push(LlamaSampler::temp(s.temperature as f32));
    // A seeded sampler draws the same tokens for the same request; the sequence keeps its
    // sampler across pauses, so a paid stream's pauses do not change them.
    let seed = s
        .seed
        .map_or_else(|| rand::thread_rng().gen(), |s| s as u32);
    chain.push(LlamaSampler::dist(seed));
    LlamaSampler::chain_simple(chain)
}

struct Running {
    id: u64,
    observer: Arc<dyn TokenObserver>,
    done: oneshot::Sender<SegmentEnd>,
    generated: u32,
    max_new: u32,
}

/// One llama.cpp sequence: its history, what of it is in the KV cache, its sampler.
struct Seq {
    seq_id: i32,
    tokens: Vec<LlamaToken>,
    decoded: usize,
    sampling: Sampling,
    sampler: LlamaSampler,
    running: Option<Running>,
    last_used: u64,
}

struct Engine<'m> {
    model: &'m LlamaModel,
    ctx: llama_cpp_2::context::LlamaContext<'m>,
    seqs: Vec<Seq>,
    n_seq: u32,
    clock: u64,
}

impl<'m> Engine<'m> {
    fn new(model: &'m LlamaModel, ctx: llama_cpp_2::context::LlamaContext<'m>, n_seq: u32) -> Self {
        Engine {
            model,
            ctx,
            seqs: Vec::new(),
            n_seq,
            clock: 0,
        }
    }

    fn run(mut self, cmds: std_mpsc::Receiver<Cmd>) {
        loop {
            let busy = self.seqs.iter().any(|s| s.running.is_some());
            // Idle: wait for work. Busy: take what has come, then step.
            let first = if busy {
                match cmds.try_recv() {
                    Ok(c) => Some(c),
                    Err(std_mpsc::TryRecvError::Empty) => None,
                    Err(std_mpsc::TryRecvError::Disconnected) => return,
                }
            } else {
                match cmds.recv() {
                    Ok(c) => Some(c),
                    Err(_) => return,
                }
            };
            if let Some(c) = first {
                self.command(c);
                while let Ok(c) = cmds.try_recv() {
                    self.command(c);
                }
            }
            self.step();
        }
    }

    fn command(&mut self, c: Cmd) {
        self.clock += 1;
        match c {
            Cmd::Start {
                id,
                request,
                observer,
                done,
            } => {
                let tokens: Vec<LlamaToken> = request
                    .tokens
                    .iter()
                    .map(|&t| LlamaToken(t as i32))
                    .collect();
                let sampling = Sampling {
                    temperature: request.temperature,
                    top_p: request.top_p,
                    repetition_penalty: request.repetition_penalty,
                    seed: request.seed,
                };
                let running = Running {
                    id,
                    observer,
                    done,
                    generated: 0,
                    max_new: request.max_new_tokens,
                };
                // A parked sequence this one continues (the longest history that is a prefix).
                let parked = self
                    .seqs
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| {
                        s.running.is_none()
                            && s.sampling == sampling
                            && s.tokens.len() <= tokens.len()
                            && tokens[..s.tokens.len()] == s.tokens[..]
                    })
                    .max_by_key(|(_, s)| s.tokens.len())
                    .map(|(i, _)| i);
                let clock = self.clock;
                if let Some(i) = parked {
                    let s = &mut self.seqs[i];
                    debug!(
                        seq = s.seq_id,
                        cached = s.decoded,
                        "llama.cpp: resuming a parked sequence"
                    );
                    s.tokens.extend_from_slice(&tokens[s.tokens.len()..]);
                    s.running = Some(running);
                    s.last_used = clock;
                    return;
                }
                let Some(seq_id) = self.free_seq_id() else {
                    let _ = running
                        .done
                        .send(SegmentEnd::Failed("no llama.cpp sequence slot free".into()));
                    return;
                };
                self.seqs.push(Seq {
                    seq_id,
                    tokens,
                    decoded: 0,
                    sampling,
                    sampler: sampler(sampling, self.model.n_vocab()),
                    running: Some(running),
                    last_used: clock,
                });
            }
            Cmd::Drop { id } => {
                if let Some(i) = self
                    .seqs
                    .iter()
                    .position(|s| s.running.as_ref().is_some_and(|r| r.id == id))
                {
                    // Cancelled while running: free its KV cache now.
                    let s = self.seqs.remove(i);
                    self.forget(s.seq_id);
                }
            }
        }
    }

    /// A sequence id no sequence uses, evicting the least recently used parked one if needed.
    fn free_seq_id(&mut self) -> Option<i32> {
        if let Some(id) =
            (0..self.n_seq as i32).find(|id| self.seqs.iter().all(|s| s.seq_id != *id))
        {
            return Some(id);
        }
        self.evict_parked().then(|| self.free_seq_id()).flatten()
    }

    /// Frees the least recently used parked sequence; false when none is parked.
    fn evict_parked(&mut self) -> bool {
        let Some(i) = self
            .seqs
            .iter()
            .enumerate()
            .filter(|(_, s)| s.running.is_none())
            .min_by_key(|(_, s)| s.last_used)
            .map(|(i, _)| i)
        else {
            return false;
        };
        let s = self.seqs.remove(i);
        self.forget(s.seq_id);
        true
    }

    fn forget(&mut self, seq_id: i32) {
        if let Err(e) = self.ctx.clear_kv_cache_seq(Some(seq_id as u32), None, None) {
            warn!(seq_id, error = %e, "llama.cpp: clearing a sequence's cache");
        }
    }

    /// Ends a running segment; its sequence stays parked.
    fn end(s: &mut Seq, how: SegmentEnd) {
        if let Some(r) = s.running.take() {
            let _ = r.done.send(how);
        }
    }

    /// One decode step over every running sequence.
    fn step(&mut self) {
        // The driver decides, before each sampling step, whether a segment may go on.
        for s in self.seqs.iter_mut() {
            if let Some(r) = &s.running {
                if !r.observer.proceed() || r.generated >= r.max_new {
                    Self::end(s, SegmentEnd::Ended);
                }
            }
        }
        let mut batch = LlamaBatch::new(BATCH, self.n_seq as i32);
        // (index into seqs, batch index of its logits) for sequences sampled this step.
        let mut sampled = Vec::new();
        let mut added = Vec::new();
        for (i, s) in self.seqs.iter().enumerate() {
            if s.running.is_none() {
                continue;
            }
            let room = BATCH - batch.n_tokens() as usize;
            if room == 0 {
                break;
            }
            let pending = &s.tokens[s.decoded..];
            let take = pending.len().min(room);
            for (j, &t) in pending[..take].iter().enumerate() {
                let last = j + 1 == pending.len();
                let pos = (s.decoded + j) as i32;
                if batch.add(t, pos, &[s.seq_id], last).is_err() {
                    break;
                }
                if last {
                    sampled.push((i, batch.n_tokens() - 1));
                }
            }
            added.push((i, take));
        }
        if added.is_empty() {
            return;
        }
        loop {
            match self.ctx.decode(&mut batch) {
                Ok(()) => break,
                Err(llama_cpp_2::DecodeError::NoKvCacheSlot) if self.evict_parked() => continue,
                Err(e) => {
                    let why = format!("llama.cpp decode: {e}");
                    for (i, _) in &added {
                        Self::end(&mut self.seqs[*i], SegmentEnd::Failed(why.clone()));
                    }
                    let failed: Vec<i32> =
                        added.iter().map(|(i, _)| self.seqs[*i].seq_id).collect();
                    self.seqs.retain(|s| !failed.contains(&s.seq_id));
                    for id in failed {
                        self.forget(id);
                    }
                    return;
                }
            }
        }
        for (i, n) in added {
            self.seqs[i].decoded += n;
        }
        let vocab = self.model.vocab();
        for (i, idx) in sampled {
            let s = &mut self.seqs[i];
            let tok = s.sampler.sample(&self.ctx, idx);
            s.sampler.accept(tok);
            if vocab.is_eog(tok) {
                Self::end(s, SegmentEnd::Ended);
                continue;
            }
            s.tokens.push(tok);
            if let Some(r) = s.running.as_mut() {
                r.generated += 1;
                r.observer.on_token(tok.0 as u32);
            }
        }
    }
}

/// What the weights of a file predict on a text, for comparing quantizations of one model:
/// perplexity, and each position's most likely next token.
#[cfg(feature = "devtools")]
#[derive(Debug, Clone)]
pub struct Predictions {
    pub perplexity: f64,
    pub top1: Vec<u32>,
}

/// Scores `text` (BOS added) with the weights in `path`: one batch, logits at every position.
/// Blocking; the text must fit one batch of [`BATCH`] tokens.
#[cfg(feature = "devtools")]
pub fn predictions(path: &Path, text: &str) -> Result<Predictions, String> {
    let model = LlamaModel::load_from_file(backend()?, path, &LlamaModelParams::default())
        .map_err(|e| format!("llama.cpp failed to load: {e}"))?;
    let tokens = model.vocab().tokenize(text.as_bytes(), true, false);
    if tokens.len() < 2 || tokens.len() > BATCH {
        return Err(format!(
            "the text is {} tokens; it must be 2..={BATCH}",
            tokens.len()
        ));
    }
    let threads = threads();
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(BATCH as u32))
        .with_n_batch(BATCH as u32)
        .with_n_ubatch(BATCH as u32)
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    let mut ctx = model
        .new_context(backend()?, params)
        .map_err(|e| format!("llama.cpp context: {e}"))?;
    let mut batch = LlamaBatch::new(tokens.len(), 1);
    for (i, t) in tokens.iter().enumerate() {
        batch
            .add(*t, i as i32, &[0], true)
            .map_err(|e| format!("batch: {e}"))?;
    }
    ctx.decode(&mut batch).map_err(|e| format!("decode: {e}"))?;
    let (mut nll, mut top1) = (0.0f64, Vec::with_capacity(tokens.len() - 1));
    for i in 0..tokens.len() - 1 {
        let logits = ctx.get_logits_ith(i as i32);
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = logits.iter().map(|l| ((l - max) as f64).exp()).sum();
        let next = tokens[i + 1].0 as usize;
        nll -= (logits[next] - max) as f64 - sum.ln();
        let best = (0..logits.len())
            .max_by(|a, b| logits[*a].total_cmp(&logits[*b]))
            .unwrap_or(0);
        top1.push(best as u32);
    }
    Ok(Predictions {
        perplexity: (nll / top1.len() as f64).exp(),
        top1,
    })
}
