//! Benchmarks of money under faults and load, outside CI (they take minutes):
//! - [`chaos`]: paid sessions in every mode against a server process killed with SIGKILL at
//!   random moments, restarted, and audited against the nodes' records each time;
//! - [`rpc_latency`]: an unrelated RPC's latency (ListModels) while 32 paid sessions run;
//! - [`soak`]: the server's RSS over 1 000 distinct paid generations (memory must stay flat).

use std::path::Path;
use std::time::{Duration, Instant};

use rand::Rng;

use super::{pct, BenchError};
use crate::client;
use crate::config::ModelConfig;
use crate::harness::audit::audit;
use crate::harness::process::{ProcessOptions, ProcessWorld};
use crate::harness::{Harness, HarnessOptions};
use crate::wire::proto::{
    inference_client::InferenceClient, ChatMessage, GenerateRequest, ListModelsRequest,
    PaymentMode, SamplingParams, TopUpRequest,
};

fn request(model: &str, prompt: &str, max_tokens: u32, mode: PaymentMode) -> GenerateRequest {
    GenerateRequest {
        model: model.into(),
        messages: vec![ChatMessage {
            role: "user".into(),
            content: prompt.into(),
        }],
        max_tokens,
        mode: mode as i32,
        sampling: Some(SamplingParams {
            temperature: Some(0.0),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// What a chaos run found.
#[derive(Debug, Default)]
pub struct Chaos {
    pub sessions: usize,
    pub kills: usize,
    pub payments_succeeded: usize,
    pub payments_failed: usize,
    pub force_closes: usize,
    pub unaccounted_msat: u64,
    pub unresolved_after_60s: usize,
    pub lost_msat: u64,
    pub problems: Vec<String>,
}

/// At least `sessions` paid sessions across modes; each is cut by a SIGKILL of the server at
/// a random moment within its first `max_delay`, the server restarts on the same data, the
/// payer reconnects, and the books are audited against both nodes' records.
pub async fn chaos(
    exe: &Path,
    model: &ModelConfig,
    sessions: usize,
    max_delay: Duration,
) -> Result<Chaos, BenchError> {
    let mut w = ProcessWorld::start(
        exe,
        ProcessOptions {
            models: vec![model.clone()],
            sets: vec![
                "payments.payment_timeout_secs=5".into(),
                "payments.first_payment_timeout_secs=5".into(),
                "payments.claim_confirm_timeout_secs=5".into(),
                "server.shutdown_timeout_secs=5".into(),
            ],
            channel_sat: 2_000_000,
            log: None,
        },
    )
    .await?;
    let modes = [
        PaymentMode::Bolt11,
        PaymentMode::Atomic,
        PaymentMode::Keysend,
        PaymentMode::Prepaid,
    ];
    let mut report = Chaos::default();
    for i in 0..sessions {
        let mode = modes[i % modes.len()];
        w.ensure_channel().await?;
        let mut c = w.inference().await?;
        let delay = rand::thread_rng().gen_range(Duration::ZERO..max_delay);
        let payer = &w.payer;
        let model_id = model.id.clone();
        let price = model.msat_per_token;
        let session = async move {
            let mut req = request(&model_id, &format!("chaos {i}"), 64, mode);
            if mode == PaymentMode::Prepaid {
                let t = c
                    .top_up(TopUpRequest {
                        account_token: String::new(),
                        amount_msat: 64 * price + 10_000,
                    })
                    .await
                    .ok()?
                    .into_inner();
                payer.pay(&t.bolt11, Duration::from_secs(30)).await.ok()?;
                req.account_token = t.account_token;
            }
            client::generate(&mut c, payer, req, None, |_| {})
                .await
                .ok()
        };
        tokio::select! {
            _ = session => {}
            _ = tokio::time::sleep(delay) => {}
        }
        w.server().kill().await?;
        report.kills += 1;
        report.sessions += 1;
        w.start_server(&[]).await?;
        let restarted = Instant::now();
        w.settle_payer(Duration::from_secs(300)).await?;
        let settled = w.wait_settled(Duration::from_secs(60)).await;
        if settled.is_err() || restarted.elapsed() > Duration::from_secs(60) {
            let b = audit(&w).await?;
            report.unresolved_after_60s += b.unresolved_invoices;
        }
        w.wait_settled(Duration::from_secs(240)).await?;
        tracing::info!(i, ?mode, ?delay, "chaos: killed and restarted");
    }
    let b = audit(&w).await?;
    report.payments_succeeded = b.payer_succeeded;
    report.payments_failed = b.payer_failed;
    report.force_closes = b.force_closes;
    report.unaccounted_msat = b.unaccounted_msat;
    report.lost_msat = b.lost_msat;
    report.problems = b.problems();
    w.stop().await;
    Ok(report)
}

/// ListModels latency while `sessions` paid sessions stream on one channel, against the
/// server binary `exe` (run it with an older binary to compare). Returns (p50, p99, max) ms
/// and the number of probes.
pub async fn rpc_latency(
    exe: &Path,
    model: &ModelConfig,
    sessions: usize,
    tokens: u32,
) -> Result<(f64, f64, f64, usize), BenchError> {
    let w = ProcessWorld::start(
        exe,
        ProcessOptions {
            models: vec![model.clone()],
            sets: vec![
                "limits.max_sessions=128".into(),
                "limits.max_unpaid_sessions_per_client=128".into(),
            ],
            channel_sat: 5_000_000,
            log: None,
        },
    )
    .await?;
    let done = tokio_util::sync::CancellationToken::new();
    let probe = {
        let (endpoint, done) = (w.endpoint(), done.clone());
        tokio::spawn(async move {
            let mut c = InferenceClient::connect(endpoint).await.ok()?;
            let mut ms = Vec::new();
            while !done.is_cancelled() {
                let t = Instant::now();
                let _ = c.list_models(ListModelsRequest {}).await;
                ms.push(t.elapsed().as_secs_f64() * 1e3);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Some(ms)
        })
    };
    let payer = &w.payer;
    let streams = (0..sessions).map(|i| {
        let endpoint = w.endpoint();
        let model = model.id.clone();
        async move {
            let mut c = InferenceClient::connect(endpoint).await.ok()?;
            let req = request(&model, &format!("load {i}"), tokens, PaymentMode::Bolt11);
            client::generate(&mut c, payer, req, None, |_| {})
                .await
                .ok()
        }
    });
    let _ = super::futures_join_all(streams.collect()).await;
    done.cancel();
    let ms = probe
        .await
        .ok()
        .flatten()
        .ok_or_else(|| BenchError::Failed("the probe could not connect".into()))?;
    w.stop().await;
    Ok((
        pct(&ms, 50.0),
        pct(&ms, 99.0),
        ms.iter().cloned().fold(0.0, f64::max),
        ms.len(),
    ))
}

/// RSS of the server (in process) after each `every` of `n` distinct paid generations of
/// `tokens` tokens: (generations, MB).
pub async fn soak(
    model: &ModelConfig,
    n: usize,
    every: usize,
    tokens: u32,
) -> Result<Vec<(usize, f64)>, BenchError> {
    let h = Harness::start(HarnessOptions {
        models: vec![model.clone()],
        channel_sat: 5_000_000,
        ..Default::default()
    })
    .await?;
    let mut c = InferenceClient::connect(format!("http://{}", h.server().grpc_addr))
        .await
        .map_err(|e| BenchError::Failed(e.to_string()))?;
    let mut curve = vec![(0, super::status_mb("VmRSS"))];
    for i in 1..=n {
        // Distinct prompts: every one would be a new prefix-cache entry.
        let prompt = format!(
            "Soak run {i}: name one thing about the number {}.",
            i * 7919
        );
        let req = request(&model.id, &prompt, tokens, PaymentMode::Bolt11);
        client::generate(&mut c, &h.payer, req, None, |_| {}).await?;
        if i % every == 0 {
            let mb = super::status_mb("VmRSS");
            tracing::info!(generations = i, rss_mb = mb, "soak");
            curve.push((i, mb));
        }
    }
    h.stop().await;
    Ok(curve)
}
