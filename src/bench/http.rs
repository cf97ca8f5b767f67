//! `satstream bench --model http`: the HTTP face against gRPC, on the configured model, in one
//! run. The same greedy chat request is streamed from one funded PREPAID account, in
//! alternated rounds: through gRPC `Generate` (our client) and through
//! `POST /v1/chat/completions` with `stream: true` (SSE, read as any client would). Reported:
//! paid tok/s (completion tokens ÷ request → last event) and time to the first token, medians,
//! and HTTP ÷ gRPC per round.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};

use super::{pct, BenchError};
use crate::client::{self, ClientEvent};
use crate::config::ModelConfig;
use crate::harness::{Harness, HarnessOptions};
use crate::wire::proto::{PaymentMode, TopUpRequest};

const ROUNDS: usize = 7;

fn failed(e: impl std::fmt::Display) -> BenchError {
    BenchError::Failed(e.to_string())
}

/// One gRPC PREPAID stream: (tok/s, ms to the first token).
async fn grpc(
    h: &Harness,
    model: &str,
    tokens: u32,
    token: &str,
) -> Result<(f64, f64), BenchError> {
    let mut c = super::connect(h).await?;
    let mut req = super::request(model, tokens, 2);
    req.mode = PaymentMode::Prepaid as i32;
    req.window_chunks = None;
    req.account_token = token.into();
    let t = Instant::now();
    let mut first = None;
    let s = client::generate(&mut c, &h.payer, req, None, |e| {
        if matches!(e, ClientEvent::Text { .. }) && first.is_none() {
            first = Some(t.elapsed());
        }
    })
    .await?;
    let took = t.elapsed();
    if s.tokens != tokens {
        return Err(failed(format!(
            "gRPC stream gave {} tokens: {s:?}",
            s.tokens
        )));
    }
    Ok((
        s.tokens as f64 / took.as_secs_f64(),
        first.unwrap_or(took).as_secs_f64() * 1e3,
    ))
}

/// One HTTP SSE stream: (tok/s, ms to the first token).
async fn http(
    web: &reqwest::Client,
    base: &str,
    model: &str,
    tokens: u32,
    token: &str,
) -> Result<(f64, f64), BenchError> {
    use eventsource_stream::Eventsource;
    let t = Instant::now();
    let r = web
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(token)
        .json(&json!({
            "model": model,
            "messages": [{"role": "user", "content": super::PROMPT}],
            "max_tokens": tokens,
            "temperature": 0,
            "stream": true,
        }))
        .send()
        .await
        .map_err(failed)?;
    if !r.status().is_success() {
        return Err(failed(format!("HTTP {}", r.status())));
    }
    let mut events = r.bytes_stream().eventsource();
    let (mut first, mut n) = (None, 0u64);
    while let Some(e) = events.next().await {
        let e = e.map_err(failed)?;
        if e.data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(&e.data).map_err(failed)?;
        if v["choices"][0]["delta"]["content"]
            .as_str()
            .is_some_and(|s| !s.is_empty())
            && first.is_none()
        {
            first = Some(t.elapsed());
        }
        if let Some(c) = v["satstream"]["receipt"]["completion_tokens"].as_u64() {
            n = c;
        }
    }
    let took = t.elapsed();
    if n != tokens as u64 {
        return Err(failed(format!("HTTP stream gave {n} tokens")));
    }
    Ok((
        n as f64 / took.as_secs_f64(),
        first.unwrap_or(took).as_secs_f64() * 1e3,
    ))
}

/// Measures and returns the Markdown table.
pub async fn report(model: &ModelConfig, tokens: u32) -> Result<String, BenchError> {
    let h = Harness::start(HarnessOptions {
        models: vec![model.clone()],
        ..HarnessOptions::default()
    })
    .await?;
    let id = model.id.clone();
    // One account pays for every stream of both sides.
    let mut c = super::connect(&h).await?;
    let per =
        tokens as u64 * model.msat_per_token + tokens as u64 * 64 * model.msat_per_prompt_token;
    let t = c
        .top_up(TopUpRequest {
            account_token: String::new(),
            amount_msat: per * (2 * ROUNDS as u64 + 4),
        })
        .await
        .map_err(failed)?
        .into_inner();
    h.payer.pay(&t.bolt11, Duration::from_secs(60)).await?;
    let token = t.account_token;
    let base = format!(
        "http://{}",
        h.server()
            .http_addr
            .ok_or_else(|| failed("the HTTP face is off"))?
    );
    let web = reqwest::Client::new();
    crate::harness::wait_until("the top-up to be credited", Duration::from_secs(30), || {
        let (mut c, token) = (c.clone(), token.clone());
        async move {
            c.get_account(crate::wire::proto::GetAccountRequest {
                account_token: token,
            })
            .await
            .is_ok_and(|a| a.into_inner().credited_msat > 0)
        }
    })
    .await?;
    // Warm both paths.
    grpc(&h, &id, tokens, &token).await?;
    http(&web, &base, &id, tokens, &token).await?;
    let (mut g, mut w, mut gt, mut wt, mut ratio) = (vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..ROUNDS {
        let (a, at) = grpc(&h, &id, tokens, &token).await?;
        let (b, bt) = http(&web, &base, &id, tokens, &token).await?;
        g.push(a);
        w.push(b);
        gt.push(at);
        wt.push(bt);
        ratio.push(b / a);
    }
    h.stop().await;
    let med = |v: &[f64]| pct(v, 0.5);
    Ok(format!(
        "| {} PREPAID, {tokens} tokens, greedy (median of {ROUNDS} alternated rounds) | paid tok/s | \
         time to first token (ms) |\n|---|---|---|\n\
         | gRPC Generate | {:.1} | {:.1} |\n\
         | HTTP /v1/chat/completions (SSE) | {:.1} | {:.1} |\n\
         | HTTP ÷ gRPC (per-round median) | {:.3} | |\n",
        model.id,
        med(&g),
        med(&gt),
        med(&w),
        med(&wt),
        med(&ratio)
    ))
}
