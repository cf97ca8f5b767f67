//! `POST /v1/chat/completions` and `POST /v1/completions`: OpenAI's request, validated by the
//! gRPC checks, opened as a PREPAID session with [`crate::session::open`], and the meter's
//! events translated to OpenAI's response, whole or as SSE.
//!
//! The account is debited per chunk as it streams (the meter's PREPAID path). When the balance
//! runs out the stream ends cleanly with `finish_reason: "length"` and `satstream.halted =
//! "balance_exhausted"`; when the client goes away the session ends at once (no Resume here).
//! Every response names its session (`x-satstream-session-id`) and ends with the signed
//! receipt (`satstream.receipt`).

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{ApiError, Peer, State};
use crate::session::{Mode, OpenError, Opening};
use crate::wire::proto::{self, generate_event::Event as Ev, GenerateEvent, PaymentMode};

/// The header naming a completion's session.
pub const SESSION_HEADER: &str = "x-satstream-session-id";
/// `max_tokens` when the request gives none (bounded by what fits the context).
const DEFAULT_MAX_TOKENS: u32 = 512;
/// OpenAI's limit on stop sequences.
const MAX_STOPS: usize = 4;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Text,
}

#[derive(Deserialize, Default)]
pub struct Request {
    model: Option<String>,
    messages: Option<Vec<Message>>,
    prompt: Option<PromptField>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    stop: Option<Stop>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    seed: Option<i64>,
    /// Not OpenAI's: vLLM's and others' extension (llama.cpp calls it repeat_penalty).
    repetition_penalty: Option<f64>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    n: Option<u32>,
    best_of: Option<u32>,
    echo: Option<bool>,
    logprobs: Option<Value>,
    top_logprobs: Option<Value>,
    suffix: Option<String>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    logit_bias: Option<Value>,
    tools: Option<Value>,
    tool_choice: Option<Value>,
    functions: Option<Value>,
    function_call: Option<Value>,
    response_format: Option<Value>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum PromptField {
    One(String),
    Many(Vec<Value>),
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    include_usage: Option<bool>,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

/// What the request asks, in the gRPC request's terms.
struct Asked {
    messages: Vec<proto::ChatMessage>,
    prompt: String,
    max_tokens: Option<u32>,
    temperature: f64,
    top_p: f64,
    repetition_penalty: f64,
    seed: Option<u64>,
    stop: Vec<String>,
    stream: bool,
    include_usage: bool,
}

fn unsupported(field: &str, why: &str) -> ApiError {
    ApiError::bad(
        field,
        format!("not supported by this server ({why}); remove it"),
    )
}

/// Checks everything that needs no engine: OpenAI's fields, refusing clearly those that
/// would change the output in ways we cannot serve.
fn asked(kind: Kind, r: Request, backend: crate::config::BackendKind) -> Result<Asked, ApiError> {
    if let Some(n) = r.n.filter(|&n| n != 1) {
        return Err(ApiError::bad(
            "n",
            format!("only 1 choice per request here (got {n}); send one request per choice"),
        ));
    }
    if let Some(b) = r.best_of.filter(|&b| b != 1) {
        return Err(ApiError::bad("best_of", format!("only 1 here (got {b})")));
    }
    if r.echo == Some(true) {
        return Err(unsupported("echo", "the prompt is not returned"));
    }
    if r.logprobs
        .as_ref()
        .is_some_and(|v| !matches!(v, Value::Null | Value::Bool(false)))
    {
        return Err(unsupported("logprobs", "no log probabilities are returned"));
    }
    if r.top_logprobs.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(unsupported(
            "top_logprobs",
            "no log probabilities are returned",
        ));
    }
    if r.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(unsupported("suffix", "no insertion mode"));
    }
    for (field, v) in [
        ("presence_penalty", r.presence_penalty),
        ("frequency_penalty", r.frequency_penalty),
    ] {
        if v.is_some_and(|v| v != 0.0) {
            return Err(unsupported(field, "no penalties in the sampler"));
        }
    }
    if r.logit_bias
        .as_ref()
        .is_some_and(|v| v.as_object().is_some_and(|o| !o.is_empty()))
    {
        return Err(unsupported("logit_bias", "no logit bias in the sampler"));
    }
    for (field, v) in [
        ("tools", &r.tools),
        ("tool_choice", &r.tool_choice),
        ("functions", &r.functions),
        ("function_call", &r.function_call),
    ] {
        if v.as_ref()
            .is_some_and(|v| !v.is_null() && v != &json!([]) && v != "none")
        {
            return Err(unsupported(field, "no tool or function calling"));
        }
    }
    if let Some(f) = &r.response_format {
        let t = f.get("type").and_then(Value::as_str).unwrap_or("text");
        if t != "text" {
            return Err(unsupported(
                "response_format",
                "only {\"type\": \"text\"}: no constrained JSON output",
            ));
        }
    }
    let (messages, prompt) = match kind {
        Kind::Chat => {
            if r.prompt.is_some() {
                return Err(ApiError::bad(
                    "prompt",
                    "chat completions take `messages`; `prompt` is for POST /v1/completions",
                ));
            }
            let Some(ms) = r.messages else {
                return Err(ApiError::bad(
                    "messages",
                    "required: a list of {role, content}",
                ));
            };
            if ms.is_empty() {
                return Err(ApiError::bad(
                    "messages",
                    "empty: give at least one message",
                ));
            }
            let mut out = Vec::with_capacity(ms.len());
            for (i, m) in ms.into_iter().enumerate() {
                let role = match m.role.as_str() {
                    "system" | "developer" => "system",
                    "user" => "user",
                    "assistant" => "assistant",
                    other => {
                        return Err(ApiError::bad(
                            &format!("messages[{i}].role"),
                            format!(
                                "{other:?} is not served here; use \"system\", \"developer\", \
                                 \"user\" or \"assistant\""
                            ),
                        ))
                    }
                };
                let content = match m.content {
                    None => String::new(),
                    Some(Content::Text(t)) => t,
                    Some(Content::Parts(parts)) => {
                        let mut t = String::new();
                        for (j, p) in parts.into_iter().enumerate() {
                            match (p.kind.as_str(), p.text) {
                                ("text", Some(s)) => t.push_str(&s),
                                (k, _) => {
                                    return Err(ApiError::bad(
                                        &format!("messages[{i}].content[{j}]"),
                                        format!("only text parts are served here (got {k:?})"),
                                    ))
                                }
                            }
                        }
                        t
                    }
                };
                out.push(proto::ChatMessage {
                    role: role.to_string(),
                    content,
                });
            }
            (out, String::new())
        }
        Kind::Text => {
            if r.messages.is_some() {
                return Err(ApiError::bad(
                    "messages",
                    "completions take `prompt`; `messages` is for POST /v1/chat/completions",
                ));
            }
            let prompt =
                match r.prompt {
                    None => return Err(ApiError::bad("prompt", "required: the text to continue")),
                    Some(PromptField::One(s)) => s,
                    Some(PromptField::Many(v)) => match v.as_slice() {
                        [Value::String(s)] => s.clone(),
                        _ => return Err(ApiError::bad(
                            "prompt",
                            "one text prompt per request here (not a list of prompts or tokens)",
                        )),
                    },
                };
            (Vec::new(), prompt)
        }
    };
    let max_tokens = r.max_completion_tokens.or(r.max_tokens);
    let temperature = r.temperature.unwrap_or(1.0);
    let top_p = r.top_p.unwrap_or(1.0);
    let repetition_penalty = r.repetition_penalty.unwrap_or(1.0);
    let seed = match r.seed {
        Some(s) if s < 0 => return Err(ApiError::bad("seed", "must be ≥ 0")),
        s => s.map(|s| s as u64),
    };
    crate::engine::check_sampling(backend, temperature, top_p, repetition_penalty, seed)
        .map_err(|r| ApiError::bad(r.field, r.message))?;
    let stop = match r.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop.len() > MAX_STOPS {
        return Err(ApiError::bad(
            "stop",
            format!("at most {MAX_STOPS} sequences (got {})", stop.len()),
        ));
    }
    if let Some(i) = stop.iter().position(|s| s.is_empty()) {
        return Err(ApiError::bad(&format!("stop[{i}]"), "must not be empty"));
    }
    let stream = r.stream.unwrap_or(false);
    if r.stream_options.is_some() && !stream {
        return Err(ApiError::bad(
            "stream_options",
            "only with \"stream\": true",
        ));
    }
    Ok(Asked {
        messages,
        prompt,
        max_tokens,
        temperature,
        top_p,
        repetition_penalty,
        seed,
        stop,
        stream,
        include_usage: r
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
    })
}

pub async fn chat(
    s: State,
    peer: ConnectInfo<Peer>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    complete(Kind::Chat, s, peer, headers, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

pub async fn text(
    s: State,
    peer: ConnectInfo<Peer>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    complete(Kind::Text, s, peer, headers, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn complete(
    kind: Kind,
    axum::extract::State(h): State,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let app = h.app.clone();
    // The body may hold the prompt (and JSON's quoting); beyond twice the prompt cap it is
    // refused before it is parsed.
    let limit = (app.config.limits.max_prompt_bytes as usize)
        .saturating_mul(2)
        .max(64 * 1024);
    let req: Request = super::read_json(body, limit).await?;
    let model_id = match req.model.as_deref() {
        None | Some("") => {
            return Err(ApiError::bad(
                "model",
                "required; GET /v1/models lists the models on sale",
            ))
        }
        Some(m) => m.to_string(),
    };
    let backend = crate::grpc::inference::request::model_config(&app, &model_id)?.backend;
    let a = asked(kind, req, backend)?;
    // Who pays, before any engine work: a bad key is refused before the prompt is tokenized.
    let account = h.caller(&headers).await?;
    let c = crate::grpc::inference::request::check(
        &app,
        &model_id,
        &a.messages,
        &a.prompt,
        a.max_tokens.unwrap_or(1),
        PaymentMode::Prepaid as i32,
    )
    .await?;
    let ctx = app
        .engine
        .model(&c.model.id)
        .map(|m| m.context_length)
        .unwrap_or(u32::MAX);
    let max_tokens = match a.max_tokens {
        Some(m) => m,
        None => {
            let room = ctx.saturating_sub(c.prompt_tokens());
            let m = DEFAULT_MAX_TOKENS.min(room);
            if m == 0 {
                return Err(ApiError::bad(
                    "messages",
                    format!("the prompt fills the model's context of {ctx} tokens"),
                ));
            }
            app.engine
                .check_fits(&c.model.id, c.prompt_tokens(), m)
                .map_err(tonic::Status::from)?;
            m
        }
    };
    // The same first payment session::open will ask of the account.
    let first = c.price.first_payment(c.prompt_tokens(), max_tokens);
    let client = h.client(peer, &headers);
    let account =
        match account {
            Some(acc) if acc.available_msat() >= first => acc,
            Some(acc) => {
                let why = format!(
                    "the account's available balance is {} msat; this request's first payment is \
                 {first} msat",
                    acc.available_msat()
                );
                return Err(h.challenge(Some(&acc), first, client, why).await);
            }
            None => return Err(h
                .challenge(
                    None,
                    first,
                    client,
                    "payment required (no credentials: `Authorization: Bearer <account token>`)"
                        .into(),
                )
                .await),
        };
    let opening = Opening {
        model: c.model,
        mode: Mode::Prepaid,
        wire_mode: PaymentMode::Prepaid as i32,
        prompt_sha256: crate::wire::receipt::prompt_sha256(&a.messages, &a.prompt),
        prompt: c.prompt,
        price: c.price,
        max_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        repetition_penalty: a.repetition_penalty,
        seed: a.seed,
        stop: a.stop,
        window_chunks: app.config.payments.window_chunks.max(1),
        account: Some(account),
        client,
        resumable: false,
    };
    let mut opened = crate::session::open(app.clone(), opening)
        .await
        .map_err(|e| match e {
            OpenError::NoInbound { .. } => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
            }
            OpenError::Refused(m) => ApiError::new(StatusCode::TOO_MANY_REQUESTS, m),
            // OpenAI's clients retry a busy server on 503.
            OpenError::Engine(e @ crate::engine::EngineError::Busy { .. }) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
            }
            OpenError::Engine(e) => tonic::Status::from(e).into(),
            OpenError::Store(e) => tonic::Status::from(e).into(),
            OpenError::Internal(m) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, m),
        })?;
    let accepted = match opened.events.recv().await {
        Some(Ok(GenerateEvent {
            event: Some(Ev::Accepted(acc)),
        })) => acc,
        Some(Err(s)) => return Err(s.into()),
        _ => {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the session ended before it started; see the server log",
            ))
        }
    };
    let sid = accepted.session_id.clone();
    tracing::info!(session = %sid, model = %accepted.model, stream = a.stream, "HTTP completion");
    let t = Translate {
        kind,
        id: format!(
            "{}-{sid}",
            if kind == Kind::Chat {
                "chatcmpl"
            } else {
                "cmpl"
            }
        ),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        model: accepted.model.clone(),
        session_id: sid.clone(),
        prompt_tokens: accepted.prompt_tokens,
        include_usage: a.include_usage,
        started: false,
        held: None,
        balance: None,
    };
    let header = (
        HeaderName::from_static(SESSION_HEADER),
        HeaderValue::from_str(&sid).expect("hex"),
    );
    if !a.stream {
        // OpenAI's whole response, but written as the answer is generated (the JSON's content
        // string grows chunk by chunk): a client that goes away is noticed as in a stream, and
        // its session ends at once instead of being drawn to its end unheard.
        let body = futures_util::stream::unfold(
            (opened.events, t, 0u8),
            |(mut rx, mut t, stage)| async move {
                let piece = match stage {
                    0 => {
                        let p = t.json_head();
                        return Some((p, (rx, t, 1)));
                    }
                    2 => return None,
                    _ => match rx.recv().await {
                        Some(Ok(GenerateEvent { event: Some(ev) })) => match t.json_piece(ev) {
                            (p, true) => return Some((p, (rx, t, 2))),
                            (p, false) => p,
                        },
                        Some(Ok(_)) => String::new(),
                        Some(Err(s)) => return Some((t.json_failed(s.into()), (rx, t, 2))),
                        None => {
                            let e = ApiError::new(
                                StatusCode::INTERNAL_SERVER_ERROR,
                                "the session ended without its last event; see the server log",
                            );
                            return Some((t.json_failed(e), (rx, t, 2)));
                        }
                    },
                };
                Some((piece, (rx, t, 1)))
            },
        )
        .filter(|p| std::future::ready(!p.is_empty()))
        .map(|p| Ok::<_, Infallible>(axum::body::Bytes::from(p)));
        return Ok((
            [
                header,
                (
                    axum::http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                ),
            ],
            axum::body::Body::from_stream(body),
        )
            .into_response());
    }
    // The body owns the meter's receiver: a client that goes away drops it, and the meter
    // ends the session at once.
    let events = futures_util::stream::unfold(
        (opened.events, t, false),
        |(mut rx, mut t, done)| async move {
            if done {
                return None;
            }
            let (events, end) = match rx.recv().await {
                Some(Ok(GenerateEvent { event: Some(ev) })) => t.streamed(ev),
                Some(Ok(_)) => (Vec::new(), false),
                Some(Err(s)) => (
                    vec![
                        Event::default().data(ApiError::from(s).body().to_string()),
                        Event::default().data("[DONE]"),
                    ],
                    true,
                ),
                // The meter's stream closed without an end: close ours properly anyway.
                None => (vec![Event::default().data("[DONE]")], true),
            };
            Some((events, (rx, t, end)))
        },
    )
    .flat_map(|v| futures_util::stream::iter(v.into_iter().map(Ok::<_, Infallible>)));
    Ok(([header], Sse::new(events).keep_alive(KeepAlive::default())).into_response())
}

/// The meter's events as OpenAI's objects.
struct Translate {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    session_id: String,
    prompt_tokens: u32,
    include_usage: bool,
    /// The first chunk (chat: with the assistant role) was sent.
    started: bool,
    /// A streamed chunk waiting for the account's balance after its debit (the meter sends
    /// each PREPAID chunk's Balance right after its Tokens), so that every chunk event carries
    /// what it cost: the page's live meter reads it.
    held: Option<Value>,
    /// The account as of the last Balance event: (spent, available), msat.
    balance: Option<(u64, u64)>,
}

/// How a session ended: OpenAI's reason, our extension, the completion's tokens.
struct Ending {
    finish_reason: &'static str,
    satstream: Value,
    completion_tokens: u32,
}

impl Translate {
    fn ending(&self, ev: &Ev) -> Option<Ending> {
        match ev {
            Ev::Done(d) => Some(Ending {
                finish_reason: match proto::FinishReason::try_from(d.finish_reason) {
                    Ok(proto::FinishReason::Length) => "length",
                    _ => "stop",
                },
                satstream: json!({
                    "session_id": self.session_id,
                    "paid_msat": d.paid_msat,
                    "balance_msat": d.balance_msat,
                    "receipt": d.receipt.as_ref().map(super::receipt_json),
                }),
                completion_tokens: d.completion_tokens,
            }),
            Ev::Halted(x) => Some(Ending {
                // The answer was cut short: by OpenAI's words, a length limit (the balance's).
                finish_reason: "length",
                satstream: json!({
                    "session_id": self.session_id,
                    "halted": halt_name(x.reason),
                    "message": x.message,
                    "paid_msat": x.paid_msat,
                    "balance_msat": x.balance_msat,
                    "receipt": x.receipt.as_ref().map(super::receipt_json),
                }),
                completion_tokens: x.completion_tokens_delivered,
            }),
            _ => None,
        }
    }

    fn usage(&self, completion_tokens: u32) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        })
    }

    fn chunk(&self, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": if self.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }

    fn choice(&self, text: &str, finish: Option<&str>, first: bool) -> Value {
        match self.kind {
            Kind::Chat => {
                let mut delta = json!({ "content": text });
                if first {
                    delta["role"] = json!("assistant");
                }
                json!([{ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish }])
            }
            Kind::Text => {
                json!([{ "index": 0, "text": text, "logprobs": null, "finish_reason": finish }])
            }
        }
    }

    /// SSE events for one meter event, and whether it was the end (which closes with
    /// `[DONE]`). A chunk is sent once the balance after its debit is known (the next event),
    /// with `satstream: {chunk_index, tokens, spent_msat, available_msat}`.
    fn streamed(&mut self, ev: Ev) -> (Vec<Event>, bool) {
        let data = |v: Value| Event::default().data(v.to_string());
        let mut out = Vec::new();
        if let Ev::Balance(b) = &ev {
            self.balance = Some((b.spent_msat, b.available_msat));
        }
        if let Some(held) = self.held.take() {
            out.push(data(self.with_balance(held)));
        }
        if let Ev::Tokens(tk) = &ev {
            let first = !self.started;
            self.started = true;
            let mut c = self.chunk(self.choice(&tk.text, None, first));
            c["satstream"] = json!({ "chunk_index": tk.chunk_index, "tokens": tk.tokens });
            self.held = Some(c);
            return (out, false);
        }
        let Some(end) = self.ending(&ev) else {
            return (out, false);
        };
        let first = !self.started;
        self.started = true;
        let mut last = self.chunk(self.choice("", Some(end.finish_reason), first));
        last["satstream"] = end.satstream;
        out.push(data(last));
        if self.include_usage {
            let mut u = self.chunk(json!([]));
            u["usage"] = self.usage(end.completion_tokens);
            out.push(data(u));
        }
        out.push(Event::default().data("[DONE]"));
        (out, true)
    }

    fn with_balance(&self, mut chunk: Value) -> Value {
        if let Some((spent, available)) = self.balance {
            chunk["satstream"]["spent_msat"] = json!(spent);
            chunk["satstream"]["available_msat"] = json!(available);
        }
        chunk
    }

    /// Non-streamed, the body's start: everything up to the answer's text.
    fn json_head(&self) -> String {
        let head = json!({
            "id": self.id,
            "object": if self.kind == Kind::Chat { "chat.completion" } else { "text_completion" },
            "created": self.created,
            "model": self.model,
        })
        .to_string();
        let open = match self.kind {
            Kind::Chat => {
                r#""choices":[{"index":0,"logprobs":null,"message":{"role":"assistant","content":""#
            }
            Kind::Text => r#""choices":[{"index":0,"logprobs":null,"text":""#,
        };
        // `{...}` without its closing brace, then the choice up to the open text string.
        format!("{},{open}", &head[..head.len() - 1])
    }

    /// Non-streamed, one meter event: the text to append, and whether the body is complete.
    fn json_piece(&mut self, ev: Ev) -> (String, bool) {
        if let Ev::Tokens(tk) = &ev {
            return (escaped(&tk.text), false);
        }
        let Some(end) = self.ending(&ev) else {
            return (String::new(), false);
        };
        let close = match self.kind {
            Kind::Chat => "\"}",
            Kind::Text => "\"",
        };
        (
            format!(
                "{close},\"finish_reason\":{}}}],\"usage\":{},\"satstream\":{}}}",
                json!(end.finish_reason),
                self.usage(end.completion_tokens),
                end.satstream
            ),
            true,
        )
    }

    /// Non-streamed, an error after the body began: the text closed, the error beside it.
    fn json_failed(&self, e: ApiError) -> String {
        let close = match self.kind {
            Kind::Chat => "\"}",
            Kind::Text => "\"",
        };
        format!(
            "{close},\"finish_reason\":null}}],\"error\":{}}}",
            e.body()["error"]
        )
    }
}

/// `s` as the inside of a JSON string.
fn escaped(s: &str) -> String {
    let q = serde_json::to_string(s).expect("a string serializes");
    q[1..q.len() - 1].to_string()
}

/// A halt's reason as a short name (`balance_exhausted`, `payment_timeout`…).
fn halt_name(reason: i32) -> String {
    proto::HaltReason::try_from(reason)
        .map(|r| {
            r.as_str_name()
                .trim_start_matches("HALT_REASON_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| "unspecified".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(kind: Kind) -> Translate {
        Translate {
            kind,
            id: "x-1".into(),
            created: 7,
            model: "m".into(),
            session_id: "ab".into(),
            prompt_tokens: 3,
            include_usage: false,
            started: false,
            held: None,
            balance: None,
        }
    }

    fn tokens(text: &str) -> Ev {
        Ev::Tokens(proto::Tokens {
            text: text.into(),
            ..Default::default()
        })
    }

    fn sse(events: &[Event]) -> Vec<String> {
        events.iter().map(|e| format!("{e:?}")).collect::<Vec<_>>()
    }

    #[test]
    fn every_streamed_chunk_carries_the_balance_after_its_debit() {
        let mut tr = t(Kind::Chat);
        let balance = |spent, available| {
            Ev::Balance(proto::Balance {
                credited_msat: 100_000,
                spent_msat: spent,
                available_msat: available,
            })
        };
        // The prompt's debit: nothing to send yet.
        assert!(tr.streamed(balance(3_000, 97_000)).0.is_empty());
        let mut t1 = tokens("Hel");
        if let Ev::Tokens(t) = &mut t1 {
            t.chunk_index = 0;
            t.tokens = 2;
        }
        // Held until its own debit is known...
        assert!(tr.streamed(t1).0.is_empty());
        let (out, end) = tr.streamed(balance(5_000, 95_000));
        assert!(!end);
        let s = sse(&out).join("");
        for want in [
            r#"\"content\":\"Hel\""#,
            r#"\"role\":\"assistant\""#,
            r#"\"chunk_index\":0"#,
            r#"\"tokens\":2"#,
            r#"\"spent_msat\":5000"#,
            r#"\"available_msat\":95000"#,
        ] {
            assert!(s.contains(want), "{want} in {s}");
        }
        // ...and a chunk the end follows at once is sent before the end.
        assert!(tr.streamed(tokens("lo")).0.is_empty());
        let (out, end) = tr.streamed(Ev::Done(proto::Done::default()));
        assert!(end);
        let s = sse(&out);
        assert_eq!(s.len(), 3, "{s:?}");
        assert!(s[0].contains(r#"\"content\":\"lo\""#), "{}", s[0]);
        assert!(s[0].contains(r#"\"spent_msat\":5000"#), "{}", s[0]);
        assert!(s[1].contains("finish_reason"), "{}", s[1]);
        assert!(s[2].contains("[DONE]"), "{}", s[2]);
    }

    #[test]
    fn a_whole_response_written_as_it_grows_is_openais_json() {
        for kind in [Kind::Chat, Kind::Text] {
            let mut tr = t(kind);
            let mut body = tr.json_head();
            for p in ["He said \"hi\"\n", "— ok\\", "!"] {
                let (s, end) = tr.json_piece(tokens(p));
                assert!(!end);
                body.push_str(&s);
            }
            let (s, end) = tr.json_piece(Ev::Done(proto::Done {
                finish_reason: proto::FinishReason::Length as i32,
                completion_tokens: 5,
                paid_msat: 5_000,
                ..Default::default()
            }));
            assert!(end);
            body.push_str(&s);
            let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
            let text = match kind {
                Kind::Chat => &v["choices"][0]["message"]["content"],
                Kind::Text => &v["choices"][0]["text"],
            };
            assert_eq!(text, "He said \"hi\"\n— ok\\!");
            assert_eq!(v["choices"][0]["finish_reason"], "length");
            assert_eq!(v["usage"]["total_tokens"], 8);
            assert_eq!(v["satstream"]["paid_msat"], 5_000);
            assert_eq!(v["id"], "x-1");
            // Cut by an error after it began: still JSON, with the error beside the text.
            let mut tr = t(kind);
            let mut body = tr.json_head();
            body.push_str(&tr.json_piece(tokens("a")).0);
            body.push_str(
                &tr.json_failed(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "boom")),
            );
            let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
            assert_eq!(v["error"]["message"], "boom");
        }
    }
}
