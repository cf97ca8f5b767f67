//! `satstream bench`: the performance goals measured side by side in one run, on the regtest
//! harness (real bitcoind, real ldk-node channel, the real engine), printed as one Markdown
//! table and written to `docs/benchmarks.md`.
//!
//! Every figure comes from this run: the raw engine rate is measured on the same loaded
//! engine, prompt and sampling as the paid stream it is compared with.

pub mod backends;
pub mod cli;
pub mod faults;
pub mod gateway;
pub mod http;
pub mod longrun;
mod short;
pub mod transport;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tonic::transport::Channel;

use crate::client::{self, ClientError, Summary};
use crate::config::ModelConfig;
use crate::engine::{ChatMessage as EngineMessage, GenerateParams, Prompt, TokenEvent};
use crate::harness::{Harness, HarnessError, HarnessOptions};
use crate::wire::proto::{
    generate_event::Event as Ev, inference_client::InferenceClient, ChatMessage, GenerateRequest,
    PaymentMode, SamplingParams,
};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Harness(#[from] HarnessError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{0}")]
    Failed(String),
}

pub struct BenchOptions {
    /// The model under test (its `chunk_tokens` is varied by the benchmark).
    pub model: ModelConfig,
    /// Tokens per paid stream in the ratio and stall runs.
    pub tokens: u32,
    /// Tokens per stream in the concurrency runs.
    pub concurrent_tokens: u32,
}

/// Runs of each side in the paid ÷ raw comparison (the machine's rate drifts by ~10 %).
const RATIO_RUNS: usize = 5;

const PROMPT: &str =
    "Write a short story about a lighthouse keeper who finds a message in a bottle.";

fn messages() -> Vec<ChatMessage> {
    vec![ChatMessage {
        role: "user".into(),
        content: PROMPT.into(),
    }]
}

fn request(model: &str, max_tokens: u32, window: u32) -> GenerateRequest {
    GenerateRequest {
        model: model.into(),
        messages: messages(),
        max_tokens,
        mode: PaymentMode::Bolt11 as i32,
        sampling: Some(SamplingParams {
            temperature: Some(0.0),
            ..Default::default()
        }),
        window_chunks: Some(window),
        ..Default::default()
    }
}

pub(crate) fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[((s.len() - 1) as f64 * p).round() as usize]
}

async fn connect(h: &Harness) -> Result<InferenceClient<Channel>, BenchError> {
    InferenceClient::connect(format!("http://{}", h.server().grpc_addr))
        .await
        .map_err(|e| BenchError::Failed(format!("connect: {e}")))
}

/// Raw engine rate: the same prompt and sampling, straight from the loaded engine.
async fn raw_rate(h: &Harness, model: &str, tokens: u32) -> Result<f64, BenchError> {
    let r = raw_stream(h, model, tokens).await?;
    Ok(r.tokens as f64 / r.done.as_secs_f64())
}

/// One raw stream, timed.
pub(crate) struct RawStream {
    pub first: Option<Duration>,
    pub done: Duration,
    pub tokens: u32,
}

/// The bench's greedy chat request straight from the loaded engine (no session, no payment).
pub(crate) async fn raw_stream(
    h: &Harness,
    model: &str,
    tokens: u32,
) -> Result<RawStream, BenchError> {
    let prompt = Prompt::Chat(vec![EngineMessage {
        role: "user".into(),
        content: PROMPT.into(),
    }]);
    let started = Instant::now();
    let mut g = h
        .server()
        .app
        .engine
        .generate(model, GenerateParams::new(prompt, tokens))
        .await
        .map_err(|e| BenchError::Failed(format!("raw generation: {e}")))?;
    let (mut first, mut n) = (None, 0u32);
    while let Some(ev) = g.events.recv().await {
        match ev {
            TokenEvent::Token { .. } => {
                first.get_or_insert_with(|| started.elapsed());
                n += 1;
            }
            TokenEvent::Finished { .. } => break,
            TokenEvent::Paused { .. } => {}
        }
    }
    Ok(RawStream {
        first,
        done: started.elapsed(),
        tokens: n,
    })
}

async fn paid(h: &Harness, model: &str, tokens: u32, window: u32) -> Result<Summary, BenchError> {
    let mut c = connect(h).await?;
    let s = client::generate(
        &mut c,
        &h.payer,
        request(model, tokens, window),
        None,
        |_| {},
    )
    .await?;
    if s.tokens == 0 || s.outcome.starts_with("halted") {
        return Err(BenchError::Failed(format!("paid stream failed: {s:?}")));
    }
    Ok(s)
}

async fn set_chunk(h: &mut Harness, chunk: u32, timeout_secs: u64) -> Result<(), BenchError> {
    h.config.models[0].chunk_tokens = chunk;
    h.config.payments.payment_timeout_secs = timeout_secs;
    h.restart_server().await?;
    Ok(())
}

/// Pays the first `paid_chunks` invoices, then stops paying and waits for the halt.
async fn halt_once(h: &Harness, model: &str, paid_chunks: usize) -> Result<(), BenchError> {
    let mut c = connect(h).await?;
    let mut s = c
        .generate(request(model, 1_000, 2))
        .await
        .map_err(ClientError::from)?
        .into_inner();
    let mut invoices = 0;
    loop {
        let ev = s.message().await.map_err(ClientError::from)?;
        match ev.and_then(|e| e.event) {
            Some(Ev::Invoice(inv)) => {
                if invoices < paid_chunks {
                    h.payer.send(&inv.bolt11)?;
                }
                invoices += 1;
            }
            Some(Ev::Halted(_)) => return Ok(()),
            Some(Ev::Done(_)) | None => {
                return Err(BenchError::Failed("expected a halt".into()));
            }
            Some(_) => {}
        }
    }
}

struct Concurrency {
    streams: usize,
    completed: usize,
    errors: usize,
    tok_s: f64,
    payments_s: f64,
    exact_ledger: bool,
    payments: u64,
    seconds: f64,
    /// Every payment's pay → settled time, all streams.
    pay_ms: Vec<f64>,
}

async fn concurrent(h: &Harness, model: &str, n: usize, tokens: u32) -> Concurrency {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..n {
        let addr = format!("http://{}", h.server().grpc_addr);
        let model = model.to_string();
        let payer = &h.payer;
        tasks.push(async move {
            let mut c = InferenceClient::connect(addr)
                .await
                .map_err(|e| BenchError::Failed(e.to_string()))?;
            let mut pay_ms = Vec::new();
            let s = client::generate(&mut c, payer, request(&model, tokens, 2), None, |e| {
                if let client::ClientEvent::Paid { ms, .. } = e {
                    pay_ms.push(*ms);
                }
            })
            .await?;
            Ok::<_, BenchError>((s, pay_ms))
        });
    }
    let results = futures_join_all(tasks).await;
    let wall = started.elapsed().as_secs_f64();
    let (mut completed, mut errors, mut tokens_total, mut payments, mut exact) =
        (0, 0, 0u64, 0u64, true);
    let mut pay_ms = Vec::new();
    for r in results {
        match r {
            Ok((s, ms)) if s.outcome == "length" || s.outcome == "stop" => {
                completed += 1;
                tokens_total += s.tokens as u64;
                payments += s.payments as u64;
                pay_ms.extend(ms);
                let sid: Option<[u8; 16]> = hex::decode(&s.session_id)
                    .ok()
                    .and_then(|b| b.try_into().ok());
                let audit = sid.and_then(|sid| h.server().app.store.audit_session(&sid).ok());
                exact &= matches!(audit, Some(a) if a.claimed_msat == a.delivered_msat
                    && a.unresolved_invoices == 0
                    && s.spent_msat == a.claimed_msat);
            }
            Ok((s, _)) => {
                tracing::warn!(?s, "stream did not complete");
                errors += 1;
            }
            Err(e) => {
                tracing::warn!(error = %e, "stream failed");
                errors += 1;
            }
        }
    }
    Concurrency {
        streams: n,
        completed,
        errors,
        tok_s: tokens_total as f64 / wall,
        payments_s: payments as f64 / wall,
        exact_ledger: exact,
        payments,
        seconds: wall,
        pay_ms,
    }
}

/// Paid streams on a fresh regtest world whose two ldk-node stores (server and payer) use
/// the given journal mode: how LDK's persistence paces payments.
pub struct StoreRun {
    pub wal: bool,
    pub streams: usize,
    pub payments: usize,
    pub seconds: f64,
    pub pay_ms: Vec<f64>,
    pub claim_ms: Vec<f64>,
    pub paused_share: f64,
}

impl StoreRun {
    fn describe(&self) -> String {
        format!(
            "{} payments in {:.1} s ({:.1}/s); pay → settled p50 {:.0} / p90 {:.0} / p99 {:.0} / \
             max {:.0} ms; claim p50 {:.2} ms; engine paused {:.0} %",
            self.payments,
            self.seconds,
            self.payments as f64 / self.seconds,
            pct(&self.pay_ms, 0.5),
            pct(&self.pay_ms, 0.9),
            pct(&self.pay_ms, 0.99),
            pct(&self.pay_ms, 1.0),
            pct(&self.claim_ms, 0.5),
            100.0 * self.paused_share,
        )
    }
}

/// `streams` concurrent streams of `tokens` tokens in chunks of `chunk` on `model`, window 2.
pub async fn store_run(
    model: &ModelConfig,
    wal: bool,
    streams: usize,
    tokens: u32,
    chunk: u32,
) -> Result<StoreRun, BenchError> {
    let mut model = model.clone();
    model.chunk_tokens = chunk;
    model.max_concurrent = streams as u32;
    let id = model.id.clone();
    let h = Harness::start(HarnessOptions {
        models: vec![model],
        sets: vec![format!("lightning.store_wal={wal}")],
        ..HarnessOptions::default()
    })
    .await?;
    h.server().app.metrics.take();
    let c = concurrent(&h, &id, streams, tokens).await;
    let m = h.server().app.metrics.take();
    h.stop().await;
    if c.completed != streams || !c.exact_ledger {
        return Err(BenchError::Failed(format!(
            "store run: {}/{streams} streams complete, ledger exact: {}",
            c.completed, c.exact_ledger
        )));
    }
    Ok(StoreRun {
        wal,
        streams,
        payments: c.payments as usize,
        seconds: c.seconds,
        pay_ms: c.pay_ms,
        claim_ms: m.claim_ms,
        paused_share: m.paused_ms / m.session_ms.max(1e-9),
    })
}

/// The LDK store comparison as Markdown rows: rollback journal (ldk-node's default) first,
/// then WAL (ours).
pub async fn store_comparison(model: &ModelConfig) -> Result<String, BenchError> {
    let chunk = 2;
    let mut md = format!(
        "| ldk-node SQLite store (model {}, chunk {chunk}, window 2) | Result |\n|---|---|\n",
        model.id
    );
    // One stream (400 tokens) and eight at once (128 tokens each) on one channel.
    for (streams, tokens) in [(1usize, 400u32), (8, 128)] {
        for wal in [false, true] {
            let r = store_run(model, wal, streams, tokens, chunk).await?;
            tracing::info!(wal = r.wal, result = %r.describe(), "store run");
            let name = if r.wal {
                "WAL (`lightning.store_wal = true`, the default)"
            } else {
                "rollback journal (ldk-node's own default)"
            };
            md.push_str(&format!(
                "| {name}, {} × {tokens} tokens | {} |\n",
                r.streams,
                r.describe()
            ));
        }
    }
    Ok(md)
}

/// Polls a set of futures to completion concurrently (on this task), keeping their order.
pub(crate) async fn futures_join_all<F: std::future::Future>(fs: Vec<F>) -> Vec<F::Output> {
    let mut fs: Vec<_> = fs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = fs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, o) in fs.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *o = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(|o| o.expect("all ready")).collect()
}

/// A line of /proc/self/status, in MB: "VmHWM" (peak RSS) or "VmRSS" (now).
pub(crate) fn status_mb(key: &str) -> f64 {
    proc_status_mb(None, key)
}

/// A memory figure (e.g. "VmRSS", "VmHWM") of a process (`None`: this one), MB.
pub(crate) fn proc_status_mb(pid: Option<u32>, key: &str) -> f64 {
    let path = pid.map_or("/proc/self/status".to_string(), |p| {
        format!("/proc/{p}/status")
    });
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.strip_prefix(key).is_some_and(|r| r.starts_with(':')))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// "now N MB, peak M MB" for the RSS profile.
fn rss() -> String {
    format!(
        "now {:.0} MB, peak {:.0} MB",
        status_mb("VmRSS"),
        status_mb("VmHWM")
    )
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{cpu}, {cores} cores")
}

/// Runs everything and returns the Markdown report.
pub async fn run(opts: BenchOptions) -> Result<String, BenchError> {
    let id = opts.model.id.clone();
    let mut rss_profile = vec![("before the regtest world starts", rss())];
    let mut model = opts.model.clone();
    model.max_concurrent = 40;
    model.max_queue = 64;
    model.chunk_tokens = 16;
    let mut h = Harness::start(HarnessOptions {
        models: vec![model],
        sets: vec![
            "limits.max_sessions=64".into(),
            "payments.window_chunks=4".into(),
        ],
        ..HarnessOptions::default()
    })
    .await?;
    let mut rows: Vec<(String, String, String)> = Vec::new();
    let mut row = |what: &str, value: String, goal: &str| {
        tracing::info!(what, value = %value, "measured");
        rows.push((what.into(), value, goal.into()));
    };

    // Cold start: the server alone (store, node, model load, gRPC serving).
    set_chunk(&mut h, 16, 30).await?;
    let ready = h.server_start;
    rss_profile.push((
        "ready (bitcoind is a separate process; server node, engine with the model, client wallet)",
        rss(),
    ));
    row(
        "Cold start to ready (store, node, model, gRPC)",
        format!("{:.2} s", ready.as_secs_f64()),
        "≤ 5 s",
    );

    // Paid vs raw, chunk 16, window 2: alternate to share the machine's state fairly.
    h.server().app.metrics.take();
    // One untimed stream first, so that neither side gets a cold prefix cache.
    raw_rate(&h, &id, opts.tokens).await?;
    let (mut raw, mut paid_rates) = (Vec::new(), Vec::new());
    for _ in 0..RATIO_RUNS {
        raw.push(raw_rate(&h, &id, opts.tokens).await?);
        paid_rates.push(paid(&h, &id, opts.tokens, 2).await?.tokens_per_sec);
    }
    let (raw_mid, paid_mid) = (pct(&raw, 0.5), pct(&paid_rates, 0.5));
    row(
        "Paid ÷ raw tok/s (chunk 16, window 2)",
        format!(
            "{:.3} (medians of {RATIO_RUNS} alternated runs: {paid_mid:.1} ÷ {raw_mid:.1} tok/s, \
             {} tokens; raw runs {:.1}–{:.1})",
            paid_mid / raw_mid,
            opts.tokens,
            pct(&raw, 0.0),
            pct(&raw, 1.0),
        ),
        "≥ 0.97",
    );
    rss_profile.push(("after single paid and raw streams", rss()));
    let m = h.server().app.metrics.take();
    let mut p2t = m.payment_to_tokens_ms.clone();
    let mut parts = (m.notice_ms, m.claim_ms, m.deliver_ms);

    // Concurrency on one channel (before any restart, so that the RSS profile shows one
    // engine).
    let mut best_payments = 0.0f64;
    for n in [1usize, 8, 40] {
        let c = concurrent(&h, &id, n, opts.concurrent_tokens).await;
        rss_profile.push((
            match n {
                1 => "after 1 stream",
                8 => "after 8 concurrent streams",
                _ => "after 40 concurrent streams",
            },
            rss(),
        ));
        best_payments = best_payments.max(c.payments_s);
        row(
            &format!("{} concurrent paid streams ({} tokens each)", c.streams, opts.concurrent_tokens),
            format!(
                "{}/{} complete, {} errors, {:.1} tok/s aggregate, {:.1} payments/s, ledger {}; pay → settled p50 {:.0} ms, max {:.0} ms",
                c.completed,
                c.streams,
                c.errors,
                c.tok_s,
                c.payments_s,
                if c.exact_ledger { "exact" } else { "NOT exact" },
                pct(&c.pay_ms, 0.5),
                pct(&c.pay_ms, 1.0)
            ),
            "all complete, exact ledger",
        );
    }
    row(
        "Highest sustained chunk payments/s (invoice issued and settled)",
        format!("{best_payments:.1} /s"),
        "",
    );

    // Stall share by chunk size and window.
    for chunk in [8u32, 16, 32] {
        set_chunk(&mut h, chunk, 30).await?;
        // Window 4 at chunk 8 keeps the default's 32-token lookahead: window sizing in tokens.
        let windows: &[u32] = if chunk == 8 { &[1, 2, 4] } else { &[1, 2] };
        for &window in windows {
            h.server().app.metrics.take();
            paid(&h, &id, opts.tokens, window).await?;
            let m = h.server().app.metrics.take();
            p2t.extend(m.payment_to_tokens_ms);
            parts.0.extend(m.notice_ms);
            parts.1.extend(m.claim_ms);
            parts.2.extend(m.deliver_ms);
            row(
                &format!("Stall share, chunk {chunk}, window {window}"),
                format!("{:.1} %", 100.0 * m.paused_ms / m.session_ms.max(1e-9)),
                "≤ 2 %",
            );
        }
    }
    row(
        "Stall share, window 0",
        "n/a: the server requires window ≥ 1 (a chunk is priced once it exists)".into(),
        "",
    );
    row(
        "Payment event → first token on the wire, p50 / p99",
        format!(
            "{:.2} / {:.2} ms (n = {})",
            pct(&p2t, 0.5),
            pct(&p2t, 0.99),
            p2t.len()
        ),
        "≤ 1 / ≤ 5 ms",
    );
    row(
        "… its parts, p50: notice to the session / claim (LDK + one ledger commit) / write to the stream",
        format!(
            "{:.2} / {:.2} / {:.2} ms",
            pct(&parts.0, 0.5),
            pct(&parts.1, 0.5),
            pct(&parts.2, 0.5)
        ),
        "",
    );

    // Halt precision: pay two chunks, then stop paying (timeout 1 s).
    set_chunk(&mut h, 16, 1).await?;
    h.server().app.metrics.take();
    for _ in 0..3 {
        halt_once(&h, &id, 2).await?;
    }
    let m = h.server().app.metrics.take();
    row(
        "Tokens generated after the payer stops (window 2 × chunk 16, adaptive lookahead)",
        format!(
            "max {:?} over {} halts",
            m.halt_overrun_tokens.iter().max(),
            m.halt_overrun_tokens.len()
        ),
        "≤ the lookahead: at least window × chunk = 32, at most the unpaid cap (default 256 tokens)",
    );
    row(
        "Timeout → engine free",
        format!("max {:.3} ms", pct(&m.halt_to_free_ms, 1.0)),
        "",
    );

    rss_profile.push((
        "after the stall and halt runs (each restarts the server in this process)",
        rss(),
    ));
    row(
        "Peak RSS (whole process: server, engine, client wallet; profile below)",
        format!("{:.0} MB", status_mb("VmHWM")),
        "≤ 600 MB",
    );
    h.stop().await;

    let mut md = String::new();
    md.push_str(&format!(
        "| Measurement ({id}) | Result | Goal |\n|---|---|---|\n"
    ));
    for (w, v, g) in rows {
        md.push_str(&format!("| {w} | {v} | {g} |\n"));
    }
    md.push_str(&format!(
        "\nRSS of the bench process ({id} run; peaks include earlier runs in the same process):\n\n"
    ));
    for (when, v) in rss_profile {
        md.push_str(&format!("- {when}: {v}\n"));
    }
    md.push_str(&format!(
        "\nMachine: {}. Date: {}. Model file: `{}`.\n",
        machine(),
        chrono_like_now(),
        opts.model.path.display()
    ));
    Ok(md)
}

fn chrono_like_now() -> String {
    std::process::Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Where the report is written by default.
pub fn default_report_path() -> PathBuf {
    PathBuf::from("docs/benchmarks.md")
}
