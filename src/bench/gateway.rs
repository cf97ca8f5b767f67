//! `satstream bench --model gateway`: the gateway's overhead. One real upstream
//! (llama-cpp-python's server on the configured model, all cores) is measured on its own and
//! through satstream's `openai` backend, in alternated rounds of one run: the upstream's own
//! streamed rate, the gateway unpaid (engine API, no Lightning) and paid BOLT11 / PREPAID
//! streams, with how many upstream requests a paid stream cost (each pause is one). Then two
//! replicas (one thread each) under two concurrent streams: aggregate tok/s through the
//! gateway's least-loaded routing against the two upstreams driven directly.

use std::time::{Duration, Instant};

use super::{pct, BenchError, PROMPT};
use crate::config::{BackendKind, ModelConfig, UpstreamConfig};
use crate::engine::{GenerateParams, Prompt, TokenEvent};
use crate::harness::upstream::Upstream;
use crate::harness::{Harness, HarnessOptions};
use crate::wire::proto::PaymentMode;

const ROUNDS: usize = 5;

/// The chat prompt already rendered (ChatML, as SmolLM2's template renders one user message),
/// so that the upstream on its own and the gateway are sent the very same text.
fn prompt_text() -> String {
    format!("<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n")
}

fn failed(e: impl std::fmt::Display) -> BenchError {
    BenchError::Failed(e.to_string())
}

/// Unpaid, through the gateway's engine (tokenize, route, stream, detokenize).
async fn gateway_raw(h: &Harness, model: &str, tokens: u32) -> Result<(u32, f64), BenchError> {
    let started = Instant::now();
    let mut g = h
        .server()
        .app
        .engine
        .generate(
            model,
            GenerateParams::new(Prompt::Text(prompt_text()), tokens),
        )
        .await
        .map_err(failed)?;
    let mut n = 0;
    while let Some(ev) = g.events.recv().await {
        match ev {
            TokenEvent::Token { .. } => n += 1,
            TokenEvent::Finished { .. } => break,
            TokenEvent::Paused { .. } => {}
        }
    }
    Ok((n, n as f64 / started.elapsed().as_secs_f64()))
}

async fn gateway_paid(
    h: &Harness,
    model: &str,
    tokens: u32,
    mode: PaymentMode,
) -> Result<(u32, f64), BenchError> {
    let mut req = super::request(model, tokens, 2);
    req.messages.clear();
    req.prompt = prompt_text();
    req.window_chunks = None;
    req.mode = mode as i32;
    let s = super::backends::paid_request(h, req).await?;
    Ok((s.tokens, s.tokens_per_sec))
}

/// A regtest world selling `model` from the replicas `ups` (the `openai` backend, chunk 16),
/// `max_concurrent` generations at once.
async fn gateway_world(
    model: &ModelConfig,
    ups: &[Upstream],
    max_concurrent: u32,
) -> Result<Harness, BenchError> {
    let mut m = model.clone();
    m.backend = BackendKind::Openai;
    m.upstream = Some(UpstreamConfig {
        urls: ups.iter().map(|u| u.url.clone()).collect(),
        model: model.id.clone(),
        ..UpstreamConfig::default()
    });
    m.max_concurrent = max_concurrent;
    m.chunk_tokens = 16;
    Ok(Harness::start(HarnessOptions {
        models: vec![m],
        ..HarnessOptions::default()
    })
    .await?)
}

/// Requests each replica has served, once all are idle.
async fn requests_served(ups: &[Upstream]) -> Result<Vec<u64>, BenchError> {
    let stats = futures_util::future::try_join_all(
        ups.iter().map(|u| u.idle_stats(Duration::from_secs(60))),
    )
    .await?;
    Ok(stats.iter().map(|s| s.requests).collect())
}

/// Two replicas (one thread each) under two concurrent streams: aggregate tok/s driven
/// directly and through the gateway, and how the gateway split the requests.
async fn two_replicas(model: &ModelConfig, tokens: u32) -> Result<String, BenchError> {
    let ups = vec![
        Upstream::start(&model.path, &model.id, 2048, 1).await?,
        Upstream::start(&model.path, &model.id, 2048, 1).await?,
    ];
    let h = gateway_world(model, &ups, 2).await?;
    let id = model.id.clone();
    let aggregate = |n: u64, started: Instant| n as f64 / started.elapsed().as_secs_f64();
    for u in &ups {
        u.complete(&prompt_text(), tokens).await?;
    }
    let (mut direct, mut raw, mut paid) = (vec![], vec![], vec![]);
    let text = prompt_text();
    let before = requests_served(&ups).await?;
    for _ in 0..3 {
        let t = Instant::now();
        let outs =
            futures_util::future::try_join_all(ups.iter().map(|u| u.complete(&text, tokens)))
                .await?;
        direct.push(aggregate(outs.iter().map(|(t, _)| t.len() as u64).sum(), t));
        let t = Instant::now();
        let outs = futures_util::future::try_join_all((0..2).map(|_| gateway_raw(&h, &id, tokens)))
            .await?;
        raw.push(aggregate(outs.iter().map(|(n, _)| *n as u64).sum(), t));
        let t = Instant::now();
        let outs = futures_util::future::try_join_all(
            (0..2).map(|_| gateway_paid(&h, &id, tokens, PaymentMode::Bolt11)),
        )
        .await?;
        paid.push(aggregate(outs.iter().map(|(n, _)| *n as u64).sum(), t));
    }
    let after = requests_served(&ups).await?;
    h.stop().await;
    let served: Vec<String> = before
        .iter()
        .zip(&after)
        .map(|(b, a)| (a - b).to_string())
        .collect();
    let med = |v: &[f64]| pct(v, 0.5);
    Ok(format!(
        "| two replicas (1 thread each), two concurrent streams (median of 3) | aggregate tok/s | ÷ direct |\n\
         |---|---|---|\n\
         | Both upstreams driven directly | {:.1} | 1 |\n\
         | Through the gateway, unpaid | {:.1} | {:.3} |\n\
         | Through the gateway, paid BOLT11 | {:.1} | {:.3} |\n\n\
         Upstream requests each replica served through the gateway: {}.\n",
        med(&direct),
        med(&raw),
        med(&raw) / med(&direct),
        med(&paid),
        med(&paid) / med(&direct),
        served.join(" and ")
    ))
}

/// Measures and returns the Markdown table.
pub async fn overhead(model: &ModelConfig, tokens: u32) -> Result<String, BenchError> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()) as u32;
    let up = Upstream::start(&model.path, &model.id, 2048, threads).await?;
    // llama-cpp-python runs one request at a time.
    let h = gateway_world(model, std::slice::from_ref(&up), 1).await?;
    let id = model.id.clone();
    // Warm-up: the upstream's first request loads pages and fills its prompt cache.
    up.complete(&prompt_text(), tokens).await?;
    gateway_paid(&h, &id, tokens, PaymentMode::Bolt11).await?;

    let (mut direct, mut raw, mut bolt11, mut prepaid) = (vec![], vec![], vec![], vec![]);
    let (mut r_raw, mut r_bolt11, mut r_prepaid) = (vec![], vec![], vec![]);
    let mut requests_per_paid = vec![];
    let mut counts = vec![];
    for _ in 0..ROUNDS {
        let (texts, took) = up.complete(&prompt_text(), tokens).await?;
        let d = texts.len() as f64 / took.as_secs_f64();
        let (n_raw, g) = gateway_raw(&h, &id, tokens).await?;
        let before = up.idle_stats(Duration::from_secs(60)).await?.requests;
        let (n_b, b) = gateway_paid(&h, &id, tokens, PaymentMode::Bolt11).await?;
        let after = up.idle_stats(Duration::from_secs(60)).await?.requests;
        let (_, p) = gateway_paid(&h, &id, tokens, PaymentMode::Prepaid).await?;
        counts.push((texts.len(), n_raw, n_b));
        requests_per_paid.push((after - before) as f64);
        direct.push(d);
        raw.push(g);
        bolt11.push(b);
        prepaid.push(p);
        r_raw.push(g / d);
        r_bolt11.push(b / d);
        r_prepaid.push(p / d);
    }
    h.stop().await;
    drop(up);
    let med = |v: &[f64]| pct(v, 0.5);
    let (n_d, n_r, n_b) = counts[0];
    let mut md = format!(
        "| {} through the gateway ({tokens} tokens, chunk 16, greedy; median of {ROUNDS} \
         alternated rounds) | tok/s | ÷ upstream (per-round median) |\n|---|---|---|\n",
        model.id
    );
    md.push_str(&format!(
        "| Upstream on its own (llama-cpp-python {threads} threads, streamed /v1/completions) | {:.1} | 1 |\n",
        med(&direct)
    ));
    md.push_str(&format!(
        "| Gateway, unpaid (tokenize, route, stream, map tokens back) | {:.1} | {:.3} |\n",
        med(&raw),
        med(&r_raw)
    ));
    md.push_str(&format!(
        "| Gateway, paid BOLT11 (adaptive lookahead) | {:.1} | {:.3} |\n",
        med(&bolt11),
        med(&r_bolt11)
    ));
    md.push_str(&format!(
        "| Gateway, paid PREPAID | {:.1} | {:.3} |\n",
        med(&prepaid),
        med(&r_prepaid)
    ));
    md.push_str(&format!(
        "\nTokens per stream: upstream {n_d} events, gateway {n_r} (unpaid) and {n_b} (BOLT11). \
         Upstream requests per paid BOLT11 stream (1 + one per pause of the lookahead): median {:.0}.\n",
        med(&requests_per_paid)
    ));
    md.push('\n');
    md.push_str(&two_replicas(model, tokens).await?);
    Ok(md)
}
