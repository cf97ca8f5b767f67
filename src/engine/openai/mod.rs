//! Remote OpenAI-compatible engines (vLLM, llama.cpp's server, llama-cpp-python, SGLang, TGI,
//! mistral.rs's server, Ollama) as a [`Backend`]: satstream becomes the payment gateway in
//! front of an engine cluster, with the same metering as for a local engine.
//!
//! How the engine interface maps onto HTTP (docs/scale-out.md says why):
//! - **Prompts** are tokenized on the gateway by llama.cpp with the model's own GGUF vocabulary
//!   and chat template ([`vocab`]), and sent to `POST /completions` as those exact tokens, so
//!   the upstream sees the tokens the client was charged for (chat completions would re-render
//!   the template upstream, out of the gateway's sight). OpenAI's API takes them as text
//!   (special tokens written out); llama.cpp's native API takes the ids themselves.
//! - **Tokens** are streamed (SSE, parsed by `eventsource-stream`). With `api = "openai"` each
//!   event's text is mapped back to its token id; an event carrying several tokens' text (a
//!   character split across tokens, held back by the upstream) is split by the tokenizer, and
//!   when the upstream reports `usage`, its count is checked against the gateway's. With
//!   `api = "llama.cpp"` ([`llamacpp`]) each event carries the sampled token's id and the
//!   server's own count of generated tokens, and the gateway charges that count.
//! - **Pause**: an upstream cannot pause. The driver's "may I go on?" is asked before each
//!   streamed token is passed on; when the allowance is used up the request is dropped, which
//!   closes the connection and cancels it upstream, and a resume is a new request whose prompt
//!   is the prompt plus the text generated so far (upstream prefix caching makes it cheap).
//! - **Replicas** ([`pool`]): least-loaded among the healthy; a replica that cannot be reached
//!   before the first token is skipped for the next one (nothing was delivered from it), one
//!   that fails mid-stream ends the generation with [`SegmentEnd::UpstreamFailed`].

mod llamacpp;
mod pool;
mod vocab;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::sync::oneshot;
use tracing::{debug, warn};

use super::backend::{Backend, BoxFuture, Segment, SegmentEnd, SegmentRequest, TokenObserver};
use super::Prompt;
use crate::config::{UpstreamApi, UpstreamConfig};
use pool::{error_chain, Check, Lease, Pool};
use vocab::Vocab;

pub struct OpenAiBackend {
    ctx: Arc<Ctx>,
}

struct Ctx {
    pool: Arc<Pool>,
    vocab: Vocab,
    api: UpstreamApi,
    idle_timeout: Duration,
}

impl OpenAiBackend {
    /// Loads the tokenizer from `path` (the model's GGUF, read vocabulary only) and checks the
    /// replicas once. A replica that answers but does not serve the model is a configuration
    /// error and fails the load; unreachable ones only warn (the health checks keep trying).
    pub async fn load(model_id: &str, path: &Path, cfg: &UpstreamConfig) -> Result<Self, String> {
        let api_key = api_key(cfg)?;
        let upstream_model = if cfg.model.is_empty() {
            model_id.to_string()
        } else {
            cfg.model.clone()
        };
        let pool = Pool::new(
            model_id.to_string(),
            upstream_model,
            &cfg.urls,
            api_key,
            Duration::from_secs(cfg.connect_timeout_secs),
        )?;
        let path = path.to_path_buf();
        let vocab = tokio::task::spawn_blocking(move || Vocab::load(&path))
            .await
            .map_err(|e| format!("tokenizer load panicked: {e}"))??;
        let checks = pool.check_all().await;
        for (i, c) in checks.iter().enumerate() {
            match c {
                Check::Misconfigured(e) => return Err(format!("upstream {}: {e}", pool.url(i))),
                Check::Unreachable(e) => {
                    warn!(url = pool.url(i), error = %e, "upstream replica unreachable at start")
                }
                Check::Healthy => {}
            }
        }
        pool.spawn_health_checks(Duration::from_secs(cfg.health_interval_secs));
        Ok(OpenAiBackend {
            ctx: Arc::new(Ctx {
                pool,
                vocab,
                api: cfg.api,
                idle_timeout: Duration::from_secs(cfg.idle_timeout_secs),
            }),
        })
    }
}

fn api_key(cfg: &UpstreamConfig) -> Result<Option<String>, String> {
    let key = if !cfg.api_key_file.as_os_str().is_empty() {
        crate::files::check_private(&cfg.api_key_file, "upstream API key file")
            .map_err(|e| e.to_string())?;
        std::fs::read_to_string(&cfg.api_key_file).map_err(|e| {
            format!(
                "cannot read upstream.api_key_file {}: {e}",
                cfg.api_key_file.display()
            )
        })?
    } else if !cfg.api_key_env.is_empty() {
        std::env::var(&cfg.api_key_env).map_err(|_| {
            format!(
                "upstream.api_key_env names {}, which is not set",
                cfg.api_key_env
            )
        })?
    } else {
        return Ok(None);
    };
    let key = key.trim().to_string();
    if key.is_empty() {
        return Err("the upstream API key is empty".into());
    }
    Ok(Some(key))
}

impl Backend for OpenAiBackend {
    fn name(&self) -> &'static str {
        "openai"
    }

    fn tokenize(&self, prompt: Prompt) -> BoxFuture<'_, Result<Vec<u32>, String>> {
        let ctx = self.ctx.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || ctx.vocab.tokenize(prompt))
                .await
                .map_err(|e| format!("tokenization task failed: {e}"))?
        })
    }

    fn start(
        &self,
        request: SegmentRequest,
        observer: Arc<dyn TokenObserver>,
    ) -> BoxFuture<'_, Result<Box<dyn Segment>, String>> {
        let ctx = self.ctx.clone();
        Box::pin(async move {
            let (tx, rx) = oneshot::channel();
            let task = tokio::spawn(async move {
                let _ = tx.send(run(ctx, request, observer).await);
            });
            Ok(Box::new(RemoteSegment {
                done: rx,
                task: task.abort_handle(),
            }) as Box<dyn Segment>)
        })
    }

    fn available(&self) -> Result<(), String> {
        if self.ctx.pool.any_healthy() {
            Ok(())
        } else {
            Err(self.ctx.pool.why_unavailable())
        }
    }
}

/// Dropping it aborts the request task, which drops the HTTP response: the connection closes
/// and the upstream stops generating when it next writes.
struct RemoteSegment {
    done: oneshot::Receiver<SegmentEnd>,
    task: tokio::task::AbortHandle,
}

impl Segment for RemoteSegment {
    fn finished(&mut self) -> BoxFuture<'_, SegmentEnd> {
        Box::pin(async move {
            (&mut self.done)
                .await
                .unwrap_or_else(|_| SegmentEnd::Failed("the upstream request task ended".into()))
        })
    }
}

impl Drop for RemoteSegment {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One streamed completions event (the fields the gateway reads).
#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Usage {
    completion_tokens: u32,
}

/// How one attempt on one replica ended.
enum Attempt {
    Done(SegmentEnd),
    /// Nothing was passed on from this replica: another one may take the request.
    Retry(String),
}

async fn run(ctx: Arc<Ctx>, req: SegmentRequest, observer: Arc<dyn TokenObserver>) -> SegmentEnd {
    let (prompt, partial) = match ctx.api {
        // llama.cpp takes the ids themselves.
        UpstreamApi::Llamacpp => (String::new(), Vec::new()),
        // Detokenizing a long prefix is CPU work: off the async workers.
        UpstreamApi::Openai => {
            let (c, tokens) = (ctx.clone(), req.tokens.clone());
            match tokio::task::spawn_blocking(move || c.vocab.text(&tokens)).await {
                Ok(p) => p,
                Err(e) => {
                    return SegmentEnd::Failed(format!("detokenizing the prompt failed: {e}"))
                }
            }
        }
    };
    let mut tried = Vec::new();
    let mut last = String::new();
    loop {
        let Some(mut lease) = ctx.pool.pick(&tried) else {
            return SegmentEnd::UpstreamFailed(if tried.is_empty() {
                ctx.pool.why_unavailable()
            } else {
                format!("no upstream replica could take the request (last: {last})")
            });
        };
        tried.push(lease.idx);
        match attempt(&ctx, &mut lease, &req, &prompt, &partial, &*observer).await {
            Attempt::Done(end) => return end,
            Attempt::Retry(why) => {
                lease.outcome = "unreachable";
                ctx.pool.mark(lease.idx, false, &why);
                warn!(url = lease.url(), error = %why, "upstream replica failed before its first token; trying another");
                last = format!("{}: {why}", lease.url());
            }
        }
    }
}

async fn attempt(
    ctx: &Arc<Ctx>,
    lease: &mut Lease,
    req: &SegmentRequest,
    prompt: &str,
    partial: &[u8],
    observer: &dyn TokenObserver,
) -> Attempt {
    if !observer.proceed() {
        lease.outcome = "cancelled";
        return Attempt::Done(SegmentEnd::Ended);
    }
    let resp = match send(ctx, lease, req, prompt).await {
        Ok(r) => r,
        Err(a) => return a,
    };
    match ctx.api {
        UpstreamApi::Openai => read(ctx, lease, req, partial, observer, resp).await,
        UpstreamApi::Llamacpp => llamacpp::read(ctx, lease, observer, resp).await,
    }
}

/// Sends the completions request; a refusal or an unreachable replica is the attempt's end.
async fn send(
    ctx: &Ctx,
    lease: &mut Lease,
    req: &SegmentRequest,
    prompt: &str,
) -> Result<reqwest::Response, Attempt> {
    let pool = &ctx.pool;
    let url = lease.url().to_string();
    let top_p = if req.top_p > 0.0 { req.top_p } else { 1.0 };
    let body = match ctx.api {
        UpstreamApi::Openai => serde_json::json!({
            "model": pool.upstream_model,
            "prompt": prompt,
            "max_tokens": req.max_new_tokens,
            "temperature": req.temperature,
            "top_p": top_p,
            "stream": true,
            "stream_options": { "include_usage": true },
        }),
        UpstreamApi::Llamacpp => llamacpp::body(req, top_p),
    };
    let mut body = body;
    if req.repetition_penalty != 1.0 {
        // llama.cpp's and llama-cpp-python's name, and vLLM's and SGLang's.
        body["repeat_penalty"] = req.repetition_penalty.into();
        body["repetition_penalty"] = req.repetition_penalty.into();
    }
    if let Some(seed) = req.seed {
        body["seed"] = seed.into();
    }
    let sent = pool
        .request(reqwest::Method::POST, format!("{url}/completions"))
        .json(&body)
        .send();
    let resp = match tokio::time::timeout(ctx.idle_timeout, sent).await {
        Err(_) => {
            return Err(Attempt::Retry(format!(
                "no response within {} s",
                ctx.idle_timeout.as_secs()
            )))
        }
        Ok(Err(e)) => return Err(Attempt::Retry(error_chain(&e))),
        Ok(Ok(r)) => r,
    };
    let status = resp.status();
    if !status.is_success() {
        let text = tokio::time::timeout(ctx.idle_timeout, resp.text())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        let text: String = text.chars().take(500).collect();
        if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            return Err(Attempt::Retry(format!("answered {status}: {text}")));
        }
        // The request itself was refused (a client error): another replica would refuse too.
        lease.outcome = "refused";
        return Err(Attempt::Done(SegmentEnd::Failed(format!(
            "upstream {url} refused the request ({status}): {text}"
        ))));
    }
    Ok(resp)
}

/// The largest SSE event accepted from an upstream (a streamed event carries a few tokens).
const MAX_EVENT_BYTES: usize = 64 * 1024;

/// The next event of an upstream's stream, in either protocol.
enum Next {
    Data(String),
    /// The stream ended.
    Closed,
    /// It failed, went silent or sent what no upstream should.
    Failed(String),
}

type Events = std::pin::Pin<
    Box<
        dyn futures_util::Stream<
                Item = Result<
                    eventsource_stream::Event,
                    eventsource_stream::EventStreamError<reqwest::Error>,
                >,
            > + Send,
    >,
>;

fn events(resp: reqwest::Response) -> Events {
    Box::pin(resp.bytes_stream().eventsource())
}

/// Waits for the next event, at most the idle deadline.
async fn next(events: &mut Events, idle: Duration) -> Next {
    let ev = match tokio::time::timeout(idle, events.next()).await {
        Err(_) => return Next::Failed(format!("sent nothing for {} s", idle.as_secs())),
        Ok(None) => return Next::Closed,
        Ok(Some(Err(e))) => return Next::Failed(error_chain(&e)),
        Ok(Some(Ok(ev))) => ev,
    };
    // One event carries a few tokens; a megabyte of "text" is not an upstream we can
    // count exactly (and tokenizing it would hold this worker).
    if ev.data.len() > MAX_EVENT_BYTES {
        return Next::Failed(format!(
            "sent an event of {} bytes (at most {MAX_EVENT_BYTES})",
            ev.data.len()
        ));
    }
    Next::Data(ev.data)
}

/// Passes tokens on, asking the driver after each whether to go on, as a local engine asks
/// before its next sampling step: at the allowance (or a stop/cancel) the attempt ends at once
/// (dropping the request cancels it upstream while it computes the next token).
fn pass_on(
    ids: &[u32],
    observer: &dyn TokenObserver,
    lease: &mut Lease,
    passed: &mut u32,
) -> Option<Attempt> {
    for &id in ids {
        observer.on_token(id);
        *passed += 1;
        if !observer.proceed() {
            lease.outcome = "cancelled";
            debug!(passed = *passed, "upstream stream ended by the driver");
            return Some(Attempt::Done(SegmentEnd::Ended));
        }
    }
    None
}

/// How an attempt ends when its replica failed: another replica may take it if nothing was
/// passed on yet, else the generation ends (the tokens passed on stay valid and paid for).
fn failed(pool: &Pool, lease: &mut Lease, passed: u32, why: String) -> Attempt {
    if passed == 0 {
        return Attempt::Retry(why);
    }
    lease.outcome = "failed";
    pool.mark(lease.idx, false, &why);
    Attempt::Done(SegmentEnd::UpstreamFailed(format!(
        "upstream {} failed mid-stream after {passed} tokens: {why}",
        lease.url()
    )))
}
/// A piece longer than this is tokenized on a blocking thread (one token is a few bytes).
const BIG_PIECE_BYTES: usize = 256;

/// Reads the stream, passing each token on while the driver allows.
async fn read(
    ctx: &Arc<Ctx>,
    lease: &mut Lease,
    req: &SegmentRequest,
    partial: &[u8],
    observer: &dyn TokenObserver,
    resp: reqwest::Response,
) -> Attempt {
    let pool = &ctx.pool;
    let url = lease.url().to_string();
    let mut events = events(resp);
    let mut passed = 0u32;
    let mut finish: Option<String> = None;
    let mut ids = Vec::new();
    // Text-less tokens a "length" finish implies, waiting for `usage` to confirm them.
    let mut textless = 0u32;
    // The bytes of a character the prompt was cut inside of: already delivered, so the
    // upstream's regeneration of them is not passed on again.
    let mut skip = partial.to_vec();
    let failed = |lease: &mut Lease, passed: u32, why: String| failed(pool, lease, passed, why);
    loop {
        let data = match next(&mut events, ctx.idle_timeout).await {
            Next::Data(d) => d,
            Next::Closed if finish.is_some() => break,
            Next::Closed => {
                return failed(lease, passed, "closed the stream mid-generation".into())
            }
            Next::Failed(why) => return failed(lease, passed, why),
        };
        if data.trim() == "[DONE]" {
            if finish.is_some() {
                break;
            }
            // llama-cpp-python ends a stream it interrupts (for another request) this way.
            return failed(
                lease,
                passed,
                "ended the stream without a finish_reason".into(),
            );
        }
        let chunk: Chunk = match serde_json::from_str(&data) {
            Ok(c) => c,
            Err(e) => {
                let head: String = data.chars().take(200).collect();
                return failed(
                    lease,
                    passed,
                    format!("sent an unreadable event ({e}): {head}"),
                );
            }
        };
        if let Some(err) = chunk.error {
            return failed(lease, passed, format!("reported an error: {err}"));
        }
        if let Some(choice) = chunk.choices.into_iter().next() {
            let mut piece = choice.text.as_deref().unwrap_or_default().as_bytes();
            if !skip.is_empty() && !piece.is_empty() {
                if let Some(rest) = piece.strip_prefix(skip.as_slice()) {
                    piece = rest;
                    skip.clear();
                } else if skip.starts_with(piece) {
                    skip.drain(..piece.len());
                    piece = &[];
                } else {
                    // Sampled differently this time: the held-back character stays broken.
                    skip.clear();
                }
            }
            ids.clear();
            if piece.len() > BIG_PIECE_BYTES {
                // A big piece is real tokenizer work: off the async workers.
                let (c, p) = (ctx.clone(), piece.to_vec());
                match tokio::task::spawn_blocking(move || {
                    let mut v = Vec::new();
                    c.vocab.ids(&p, &mut v);
                    v
                })
                .await
                {
                    Ok(v) => ids = v,
                    Err(e) => return failed(lease, passed, format!("tokenizing failed: {e}")),
                }
            } else if !piece.is_empty() {
                ctx.vocab.ids(piece, &mut ids);
            }
            if choice.finish_reason.as_deref() == Some("length") {
                // "length" means max_tokens were generated. Fewer passed on means the upstream
                // dropped an unfinished character at the end (llama-cpp-python decodes its
                // last event with errors="ignore"): at most 3 tokens of UTF-8. They are
                // charged, as text-less tokens, only if the upstream's usage confirms them.
                let missing = req.max_new_tokens.saturating_sub(passed + ids.len() as u32);
                if (1..=3).contains(&missing) {
                    textless = missing;
                }
            }
            if let Some(end) = pass_on(&ids, observer, lease, &mut passed) {
                return end;
            }
            if choice.finish_reason.is_some() {
                finish = choice.finish_reason;
            }
        }
        if let Some(u) = chunk.usage {
            // The upstream's own count confirms the text-less tokens of a cut character.
            let confirmed = u.completion_tokens.saturating_sub(passed).min(textless);
            for _ in 0..confirmed {
                observer.on_token(ctx.vocab.textless());
                passed += 1;
            }
            textless = 0;
            if u.completion_tokens != passed {
                crate::metrics::upstream_count_mismatch(&pool.model);
                warn!(
                    upstream = u.completion_tokens,
                    counted = passed,
                    url = %url,
                    "the upstream's token count differs from the gateway's"
                );
            }
            if u.completion_tokens < passed {
                // We counted (and charge) more tokens than the upstream generated: stop
                // before charging any more on a count we cannot trust.
                lease.outcome = "failed";
                return Attempt::Done(SegmentEnd::UpstreamFailed(format!(
                    "upstream {url} reports {} tokens generated, the gateway counted {passed}: \
                     halted rather than charge for tokens the upstream did not generate",
                    u.completion_tokens
                )));
            }
        }
    }
    lease.outcome = "ok";
    Attempt::Done(SegmentEnd::Ended)
}
