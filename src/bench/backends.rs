//! Both engines side by side in one run, on the same model file, machine and moment: raw
//! decode rate, time to first token, a pause/resume's cost, paid ÷ raw in every payment mode
//! (adaptive lookahead), the stall share with adaptive lookahead against fixed windows,
//! aggregate rates of 1/8/40 concurrent streams, and a server process's peak RSS under 40.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use candle_core::quantized::GgmlDType;

use super::{concurrent, connect, pct, raw_rate, request, BenchError, PROMPT};
use crate::client;
use crate::config::{BackendKind, ModelConfig};
use crate::engine::{ChatMessage as EngineMessage, Engine, GenerateParams, Prompt, TokenEvent};
use crate::harness::{Harness, HarnessOptions};
use crate::wire::proto::{GenerateRequest, PaymentMode, TopUpRequest};

/// The engine alone on `model`, and its load time in seconds.
async fn load(model: &ModelConfig) -> Result<(Engine, f64), BenchError> {
    let started = Instant::now();
    let engine = Engine::load(std::slice::from_ref(model))
        .await
        .map_err(|e| BenchError::Failed(e.to_string()))?;
    Ok((engine, started.elapsed().as_secs_f64()))
}

/// Alternated rounds of raw and paid streams per backend.
const ROUNDS: usize = 5;

/// What one backend measured.
#[derive(Debug, Default, Clone)]
pub struct BackendRun {
    pub backend: &'static str,
    pub load_s: f64,
    pub raw_tok_s: f64,
    pub ttft_ms: f64,
    pub resume_ms: f64,
    /// (mode, paid tok/s, paid ÷ raw) with adaptive lookahead: medians over [`ROUNDS`].
    pub paid: Vec<(&'static str, f64, f64)>,
    pub stall_adaptive_pct: f64,
    pub stall_fixed_pct: f64,
    /// (streams, aggregate tok/s, complete, exact ledger).
    pub concurrency: Vec<(usize, f64, usize, bool)>,
    /// BOLT11 on a 4× longer stream: (raw tok/s, paid tok/s). The last chunk's payment round
    /// trip is a fixed cost per stream, so the ratio rises with length.
    pub long: (f64, f64),
    /// A server process under 40 concurrent paid streams: (done, aggregate tok/s, peak RSS MB).
    pub process_40: (usize, f64, f64),
}

/// Time to first token and the cost of one pause/resume, straight from the engine: a
/// generation paused at `pause_at` tokens is resumed, and the time from the allowance raise
/// to the next token is the resume's cost (mistral.rs re-prefills; llama.cpp keeps the KV).
async fn engine_timings(model: &ModelConfig) -> Result<(f64, f64, f64), BenchError> {
    let fail = |e: &dyn std::fmt::Display| BenchError::Failed(e.to_string());
    let (engine, load_s) = load(model).await?;
    let prompt = || {
        Prompt::Chat(vec![EngineMessage {
            role: "user".into(),
            content: PROMPT.into(),
        }])
    };
    let (mut ttft, mut resume, mut gaps) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..3 {
        let mut p = GenerateParams::new(prompt(), 96);
        p.allowance = 48;
        let t = Instant::now();
        let mut g = engine.generate(&model.id, p).await.map_err(|e| fail(&e))?;
        let mut raised: Option<Instant> = None;
        let mut last: Option<Instant> = None;
        while let Some(ev) = g.events.recv().await {
            match ev {
                TokenEvent::Token { .. } => {
                    let now = Instant::now();
                    match (last, raised.take()) {
                        (None, _) => ttft.push(t.elapsed().as_secs_f64() * 1e3),
                        (Some(_), Some(r)) => {
                            resume.push(now.duration_since(r).as_secs_f64() * 1e3)
                        }
                        (Some(l), None) => gaps.push(now.duration_since(l).as_secs_f64() * 1e3),
                    }
                    last = Some(now);
                }
                TokenEvent::Paused { .. } => {
                    raised = Some(Instant::now());
                    g.handle.set_allowance(u32::MAX);
                }
                TokenEvent::Finished { .. } => break,
            }
        }
    }
    // What a resume costs beyond generating the next token anyway.
    let overhead = (pct(&resume, 0.5) - pct(&gaps, 0.5)).max(0.0);
    Ok((load_s, pct(&ttft, 0.5), overhead))
}

async fn paid_mode(
    h: &Harness,
    model: &str,
    tokens: u32,
    mode: PaymentMode,
) -> Result<f64, BenchError> {
    let mut req = request(model, tokens, 2);
    req.window_chunks = None;
    req.mode = mode as i32;
    Ok(paid_request(h, req).await?.tokens_per_sec)
}

/// Runs one paid stream of `req` to its end (a PREPAID one on a fresh account topped up for
/// all its tokens); fails unless it completes.
pub(super) async fn paid_request(
    h: &Harness,
    req: GenerateRequest,
) -> Result<client::Summary, BenchError> {
    Ok(paid_request_watched(h, req).await?.0)
}

/// [`paid_request`], and what its client saw when (a PREPAID top-up is before the request,
/// outside the timing).
pub(super) async fn paid_request_watched(
    h: &Harness,
    mut req: GenerateRequest,
) -> Result<(client::Summary, super::short::Watch), BenchError> {
    let mut c = connect(h).await?;
    let mode = req.mode();
    if mode == PaymentMode::Prepaid {
        let price = h.config.models[0].msat_per_token;
        let t = c
            .top_up(TopUpRequest {
                account_token: String::new(),
                amount_msat: req.max_tokens as u64 * price + 50_000,
            })
            .await
            .map_err(client::ClientError::from)?
            .into_inner();
        h.payer.pay(&t.bolt11, Duration::from_secs(60)).await?;
        req.account_token = t.account_token;
    }
    let mut watch = super::short::Watch::new();
    let s = client::generate(&mut c, &h.payer, req, None, |e| watch.see(e)).await?;
    if s.tokens == 0 || s.outcome.starts_with("halted") {
        return Err(BenchError::Failed(format!("{mode:?} stream failed: {s:?}")));
    }
    Ok((s, watch))
}

/// Stall share of BOLT11 streams on a server with `sets`.
async fn stall(h: &Harness, model: &str, tokens: u32) -> Result<f64, BenchError> {
    h.server().app.metrics.take();
    for _ in 0..2 {
        paid_mode(h, model, tokens, PaymentMode::Bolt11).await?;
    }
    let m = h.server().app.metrics.take();
    Ok(100.0 * m.paused_ms / m.session_ms.max(1e-9))
}

/// `bench --model stall`: `streams` BOLT11 streams of `tokens` tokens (chunk 16, adaptive
/// lookahead) on `model` after one warm-up stream, alternated with raw ones: the stall share,
/// the part of it before each session's first payment, and paid ÷ raw. Quicker than
/// `backends` and on more streams, for the one goal that moves with the meter.
pub async fn stall_report(
    model: &ModelConfig,
    streams: usize,
    tokens: u32,
) -> Result<String, BenchError> {
    let mut m = model.clone();
    m.chunk_tokens = 16;
    let h = Harness::start(HarnessOptions {
        models: vec![m.clone()],
        ..HarnessOptions::default()
    })
    .await?;
    let id = m.id.clone();
    // Warm: the engine, and the node's recent payment latencies a new session plans with.
    raw_rate(&h, &id, tokens).await?;
    paid_mode(&h, &id, tokens, PaymentMode::Bolt11).await?;
    h.server().app.metrics.take();
    let (mut raws, mut ratios) = (Vec::new(), Vec::new());
    for _ in 0..streams.max(1) {
        let raw = raw_rate(&h, &id, tokens).await?;
        raws.push(raw);
        ratios.push(paid_mode(&h, &id, tokens, PaymentMode::Bolt11).await? / raw);
    }
    let s = h.server().app.metrics.take();
    h.stop().await;
    let share = |ms: f64| 100.0 * ms / s.session_ms.max(1e-9);
    Ok(format!(
        "| {} on `{}`, {} BOLT11 streams of {tokens} tokens, chunk 16 | value |\n|---|---|\n\
         | raw tok/s (median) | {:.1} |\n| paid ÷ raw (median of per-stream ratios) | {:.3} |\n\
         | stall share, adaptive lookahead | {:.1} % |\n\
         | of which before a session's first payment | {:.1} % |\n",
        m.backend.as_str(),
        m.path.display(),
        streams.max(1),
        pct(&raws, 0.5),
        pct(&ratios, 0.5),
        share(s.paused_ms),
        share(s.paused_first_ms),
    ))
}

/// One backend, measured on a regtest world of its own.
pub async fn measure(
    model: &ModelConfig,
    backend: BackendKind,
    tokens: u32,
) -> Result<BackendRun, BenchError> {
    let mut m = model.clone();
    m.backend = backend;
    m.max_concurrent = 40;
    m.max_queue = 64;
    m.chunk_tokens = 16;
    let (load_s, ttft_ms, resume_ms) = engine_timings(&m).await?;
    let mut h = Harness::start(HarnessOptions {
        models: vec![m.clone()],
        sets: vec!["limits.max_sessions=64".into()],
        ..HarnessOptions::default()
    })
    .await?;
    let id = m.id.clone();
    let mut run = BackendRun {
        backend: match backend {
            BackendKind::Mistralrs => "mistral.rs",
            BackendKind::Llamacpp => "llama.cpp",
            BackendKind::Openai => "openai",
        },
        load_s,
        ttft_ms,
        resume_ms,
        ..Default::default()
    };
    // Alternated rounds (raw, then each mode), so that the machine's drift (±10 % between
    // minutes) falls on both sides; a mode's ratio is the median of its per-round ratios.
    raw_rate(&h, &id, tokens).await?;
    const MODES: [(&str, PaymentMode); 4] = [
        ("BOLT11", PaymentMode::Bolt11),
        ("ATOMIC", PaymentMode::Atomic),
        ("KEYSEND", PaymentMode::Keysend),
        ("PREPAID", PaymentMode::Prepaid),
    ];
    let mut raws = Vec::new();
    let mut rates = vec![Vec::new(); MODES.len()];
    let mut ratios = vec![Vec::new(); MODES.len()];
    for _ in 0..ROUNDS {
        let raw = raw_rate(&h, &id, tokens).await?;
        raws.push(raw);
        for (i, (_, mode)) in MODES.iter().enumerate() {
            let r = paid_mode(&h, &id, tokens, *mode).await?;
            rates[i].push(r);
            ratios[i].push(r / raw);
        }
    }
    run.raw_tok_s = pct(&raws, 0.5);
    for (i, (name, _)) in MODES.iter().enumerate() {
        run.paid
            .push((name, pct(&rates[i], 0.5), pct(&ratios[i], 0.5)));
    }
    run.stall_adaptive_pct = stall(&h, &id, tokens).await?;
    h.config.payments.adaptive_lookahead = false;
    h.config.payments.window_chunks = 2;
    h.restart_server().await?;
    run.stall_fixed_pct = stall(&h, &id, tokens).await?;
    h.config.payments.adaptive_lookahead = true;
    h.restart_server().await?;
    for n in [1usize, 8, 40] {
        let c = concurrent(&h, &id, n, 64).await;
        run.concurrency
            .push((n, c.tok_s, c.completed, c.exact_ledger));
    }
    let long = tokens * 4;
    run.long = (
        raw_rate(&h, &id, long).await?,
        paid_mode(&h, &id, long, PaymentMode::Bolt11).await?,
    );
    h.stop().await;
    let exe = std::env::current_exe().map_err(|e| BenchError::Failed(e.to_string()))?;
    let l = super::faults::load(&exe, &m, 40, 64).await?;
    run.process_40 = (l.completed, l.tokens as f64 / l.elapsed_s, l.peak_rss_mb);
    tracing::info!(?run, "backend measured");
    Ok(run)
}

/// Both backends on `model`, and the tiny model's paid ÷ raw; the Markdown report.
pub async fn compare(
    model: &ModelConfig,
    tiny: &ModelConfig,
    tokens: u32,
) -> Result<String, BenchError> {
    let mut runs = Vec::new();
    for b in [BackendKind::Mistralrs, BackendKind::Llamacpp] {
        runs.push(measure(model, b, tokens).await?);
    }
    let mut md = format!(
        "| {} ({tokens} tokens, chunk 16) | {} | {} |\n|---|---|---|\n",
        model.id, runs[0].backend, runs[1].backend
    );
    let mut row = |what: String, f: &dyn Fn(&BackendRun) -> String| {
        md.push_str(&format!("| {what} | {} | {} |\n", f(&runs[0]), f(&runs[1])));
    };
    row("Load".into(), &|r| format!("{:.2} s", r.load_s));
    row(
        format!("Raw, tok/s (median of {ROUNDS}; prefill included, as in paid)"),
        &|r| format!("{:.1}", r.raw_tok_s),
    );
    row("Time to first token (median of 3)".into(), &|r| {
        format!("{:.0} ms", r.ttft_ms)
    });
    row(
        "Pause/resume cost: raise → next token, minus a token's time (median of 3)".into(),
        &|r| format!("{:.1} ms", r.resume_ms),
    );
    for (i, mode) in ["BOLT11", "ATOMIC", "KEYSEND", "PREPAID"]
        .iter()
        .enumerate()
    {
        row(
            format!("Paid {mode}, tok/s (median) and paid ÷ raw (median of per-round ratios)"),
            &|r| format!("{:.1} ({:.3})", r.paid[i].1, r.paid[i].2),
        );
    }
    row("Stall share, adaptive lookahead".into(), &|r| {
        format!("{:.1} %", r.stall_adaptive_pct)
    });
    row("Stall share, fixed window 2 × 16".into(), &|r| {
        format!("{:.1} %", r.stall_fixed_pct)
    });
    for (i, n) in [1usize, 8, 40].iter().enumerate() {
        row(
            format!("{n} concurrent paid streams (64 tokens): aggregate tok/s"),
            &|r| {
                let (_, tok_s, done, exact) = r.concurrency[i];
                format!(
                    "{tok_s:.1} ({done}/{n} complete, ledger {})",
                    if exact { "exact" } else { "NOT exact" }
                )
            },
        );
    }
    row(
        format!(
            "Paid BOLT11 on {} tokens: raw, paid, paid ÷ raw",
            tokens * 4
        ),
        &|r| {
            let (raw, paid) = r.long;
            format!("{raw:.1}, {paid:.1} ({:.3})", paid / raw)
        },
    );
    row(
        "Server process, 40 paid streams (64 tokens): done, aggregate tok/s, peak RSS (VmHWM)"
            .into(),
        &|r| {
            let (done, tok_s, mb) = r.process_40;
            format!("{done}/40, {tok_s:.1}, {mb:.0} MB")
        },
    );
    md.push_str(&format!(
        "\nllama.cpp raw ÷ mistral.rs raw: **{:.2}** (goal ≥ 3).\n",
        runs[1].raw_tok_s / runs[0].raw_tok_s
    ));
    // The tiny model: an engine far faster than one stream's payments; the operator allows
    // 1 024 tokens unpaid.
    let mut t = tiny.clone();
    t.chunk_tokens = 4;
    let cap = 1024 * t.msat_per_token;
    let h = Harness::start(HarnessOptions {
        models: vec![t.clone()],
        sets: vec![format!("payments.max_unpaid_msat={cap}")],
        ..HarnessOptions::default()
    })
    .await?;
    raw_rate(&h, &t.id, 2000).await?;
    let raw = raw_rate(&h, &t.id, 2000).await?;
    let paid = paid_mode(&h, &t.id, 2000, PaymentMode::Bolt11).await?;
    h.stop().await;
    md.push_str(&format!(
        "\nTiny model, 2 000 tokens, chunk 4, adaptive lookahead (unpaid cap 1 024 tokens): paid {paid:.0} tok/s ÷ raw {raw:.0} tok/s = **{:.3}** (goal ≥ 0.5).\n",
        paid / raw
    ));
    Ok(md)
}

/// Raw decode of `tokens` tokens straight from an engine (no payment, no server), median of
/// `runs` after one warm-up: (load s, tok/s).
pub async fn raw_engine(
    model: &ModelConfig,
    tokens: u32,
    runs: usize,
) -> Result<(f64, f64), BenchError> {
    let fail = |e: &dyn std::fmt::Display| BenchError::Failed(e.to_string());
    let (engine, load_s) = load(model).await?;
    let mut rates = Vec::new();
    for i in 0..=runs {
        let prompt = Prompt::Chat(vec![EngineMessage {
            role: "user".into(),
            content: PROMPT.into(),
        }]);
        let mut g = engine
            .generate(&model.id, GenerateParams::new(prompt, tokens))
            .await
            .map_err(|e| fail(&e))?;
        let (mut first, mut n) = (None, 0u32);
        while let Some(ev) = g.events.recv().await {
            match ev {
                TokenEvent::Token { .. } => {
                    n += 1;
                    first.get_or_insert_with(Instant::now);
                }
                TokenEvent::Finished { .. } => break,
                TokenEvent::Paused { .. } => {}
            }
        }
        // Decode rate: tokens after the first over the time since it (prefill excluded).
        if let (Some(f), true) = (first, i > 0 && n > 1) {
            rates.push((n - 1) as f64 / f.elapsed().as_secs_f64());
        }
    }
    Ok((load_s, pct(&rates, 0.5)))
}

/// The weights: raw decode of each backend on the configured file's Q4_1 / Q8_0 siblings
/// (scripts/setup-model.sh installs both) and on a Q4_0 derived from the Q4_1 here, with each
/// file's quality; then llama.cpp on the configured file beside a second, idle llama.cpp
/// model in the process.
pub async fn engines(m: &ModelConfig) -> Result<String, BenchError> {
    let fail = |e: &dyn std::fmt::Display| BenchError::Failed(e.to_string());
    let tmp = tempfile::tempdir().map_err(|e| fail(&e))?;
    let name = m.path.file_name().unwrap_or_default().to_string_lossy();
    // Siblings are named like the configured file with its type tag replaced.
    const TAGS: [&str; 3] = ["Q4_1", "Q8_0", "Q4_0"];
    let tag = TAGS.iter().find(|t| name.contains(*t));
    let sibling = |q: &str| tag.map(|t| m.path.with_file_name(name.replace(t, q)));
    let q4_1 = sibling("Q4_1").filter(|p| p.exists());
    let mut files: Vec<PathBuf> = [q4_1.clone(), sibling("Q8_0"), sibling("Q4_0")]
        .into_iter()
        .flatten()
        .filter(|p| p.exists())
        .collect();
    if files.is_empty() {
        files.push(m.path.clone());
    }
    // Q4_0 is what llama.cpp repacks for its AVX2 kernels; derived here from the Q4_1 (the
    // only weights a machine of this kind can get), so it is quantized twice.
    let installed_q4_0 = sibling("Q4_0").filter(|p| p.exists());
    if let (Some(q4_1), None, Some(t)) = (&q4_1, installed_q4_0, tag) {
        let q4_0 = tmp.path().join(name.replace(t, "Q4_0"));
        let (src, dst) = (q4_1.clone(), q4_0.clone());
        tokio::task::spawn_blocking(move || {
            crate::engine::requantize::requantize(&src, &dst, GgmlDType::Q4_0)
        })
        .await
        .map_err(|e| fail(&e))?
        .map_err(BenchError::Failed)?;
        files.push(q4_0);
    }
    // Quality on one text, scored by llama.cpp (the weights are the same for either engine):
    // perplexity, and how often a file's most likely next token is the shipped Q4_1's.
    let score = |f: PathBuf| async move {
        tokio::task::spawn_blocking(move || {
            crate::engine::llamacpp::predictions(&f, include_str!("quality.txt"))
        })
        .await
        .map_err(|e| fail(&e))?
        .map_err(BenchError::Failed)
    };
    let reference = match &q4_1 {
        Some(f) => Some(score(f.clone()).await?),
        None => None,
    };
    let mut md = String::from(
        "| file | backend | load | decode tok/s (median of 3) | perplexity | top-1 = Q4_1's |\n\
         |---|---|---|---|---|---|\n",
    );
    for f in files {
        let p = score(f.clone()).await?;
        let agree = reference.as_ref().map_or(String::new(), |r| {
            let same = r.top1.iter().zip(&p.top1).filter(|(a, b)| a == b).count();
            format!("{:.1} %", 100.0 * same as f64 / r.top1.len().max(1) as f64)
        });
        for b in [BackendKind::Mistralrs, BackendKind::Llamacpp] {
            let mut mc = m.clone();
            mc.path = f.clone();
            mc.backend = b;
            let (load, rate) = raw_engine(&mc, 128, 3).await?;
            md.push_str(&format!(
                "| {} | {} | {load:.2} s | {rate:.1} | {:.2} | {agree} |\n",
                f.file_name().unwrap_or_default().to_string_lossy(),
                b.as_str(),
                p.perplexity
            ));
        }
    }
    // A second llama.cpp model in the process (the tiny one, idle after one generation).
    let mut own = m.clone();
    own.backend = BackendKind::Llamacpp;
    let alone = raw_engine(&own, 128, 3).await?.1;
    let tiny_path =
        crate::engine::tiny_model::write_tiny_model(tmp.path()).map_err(|e| fail(&e))?;
    let mut tiny = ModelConfig::new("tiny", tiny_path, m.msat_per_token);
    tiny.backend = BackendKind::Llamacpp;
    let (other, _) = load(&tiny).await?;
    let mut g = other
        .generate(
            &tiny.id,
            GenerateParams::new(Prompt::Text("hello".into()), 8),
        )
        .await
        .map_err(|e| fail(&e))?;
    while let Some(ev) = g.events.recv().await {
        if matches!(ev, TokenEvent::Finished { .. }) {
            break;
        }
    }
    let beside = raw_engine(&own, 128, 3).await?.1;
    drop(other);
    md.push_str(&format!(
        "\nllama.cpp on {name} beside a second, idle llama.cpp model in the process: \
         {beside:.1} tok/s (alone, just before: {alone:.1}).\n"
    ));
    Ok(md)
}
