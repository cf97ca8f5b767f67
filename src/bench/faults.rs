//! Benchmarks of money under faults and load, outside CI (they take minutes):
//! - [`chaos`]: paid sessions in every mode against a server process killed with SIGKILL at
//!   random moments, restarted, and audited against the nodes' records each time;
//! - [`load`]: concurrent paid streams against a server process: an unrelated RPC's latency
//!   (ListModels) meanwhile, completions, aggregate rate and the server's peak RSS;
//! - [`soak`]: a server process's RSS over 1 000 distinct paid generations (memory must stay
//!   flat).

use std::path::Path;
use std::time::{Duration, Instant};

use rand::Rng;

use super::BenchError;
use crate::client;
use crate::config::ModelConfig;
use crate::harness::audit::audit;
use crate::harness::process::{ProcessOptions, ProcessWorld};
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
                // A killed server's sessions cannot be resumed: the client ends at the drop.
                "payments.resume_grace_secs=0".into(),
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

/// What a server process did under [`load`].
#[derive(Debug, Clone, Default)]
pub struct LoadRun {
    /// ListModels latencies (ms) probed every 10 ms while the streams ran.
    pub probe_ms: Vec<f64>,
    pub completed: usize,
    pub tokens: u64,
    pub elapsed_s: f64,
    /// The server process's peak resident memory (VmHWM), MB.
    pub peak_rss_mb: f64,
}

/// `sessions` concurrent paid BOLT11 streams of `tokens` tokens against a server process
/// (`exe`), with an unrelated RPC (ListModels) probed throughout and the server's own peak
/// RSS read from /proc.
pub async fn load(
    exe: &Path,
    model: &ModelConfig,
    sessions: usize,
    tokens: u32,
) -> Result<LoadRun, BenchError> {
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
    let mut w = w;
    let pid = w.server().pid();
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
    let started = Instant::now();
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
    let results = super::futures_join_all(streams.collect()).await;
    let elapsed_s = started.elapsed().as_secs_f64();
    done.cancel();
    let peak_rss_mb = super::proc_status_mb(Some(pid), "VmHWM");
    let probe_ms = probe
        .await
        .ok()
        .flatten()
        .ok_or_else(|| BenchError::Failed("the probe could not connect".into()))?;
    w.stop().await;
    let ok: Vec<_> = results
        .into_iter()
        .flatten()
        .filter(|s| s.tokens > 0 && !s.outcome.starts_with("halted"))
        .collect();
    Ok(LoadRun {
        probe_ms,
        completed: ok.len(),
        tokens: ok.iter().map(|s| s.tokens as u64).sum(),
        elapsed_s,
        peak_rss_mb,
    })
}

/// RSS of a server process (`exe`) after each `every` of `n` distinct paid generations of
/// `tokens` tokens: (generations, MB).
pub async fn soak(
    exe: &Path,
    model: &ModelConfig,
    n: usize,
    every: usize,
    tokens: u32,
) -> Result<Vec<(usize, f64)>, BenchError> {
    let mut w = ProcessWorld::start(
        exe,
        ProcessOptions {
            models: vec![model.clone()],
            channel_sat: 5_000_000,
            log: Some("warn".into()),
            ..Default::default()
        },
    )
    .await?;
    let pid = w.server().pid();
    let rss = || super::proc_status_mb(Some(pid), "VmRSS");
    let mut c = InferenceClient::connect(w.endpoint())
        .await
        .map_err(|e| BenchError::Failed(e.to_string()))?;
    let mut curve = vec![(0, rss())];
    for i in 1..=n {
        // Distinct prompts: every one would be a new prefix-cache entry.
        let prompt = format!(
            "Soak run {i}: name one thing about the number {}.",
            i * 7919
        );
        let req = request(&model.id, &prompt, tokens, PaymentMode::Bolt11);
        client::generate(&mut c, &w.payer, req, None, |_| {}).await?;
        if i % every == 0 {
            let mb = rss();
            tracing::info!(generations = i, rss_mb = mb, "soak");
            curve.push((i, mb));
        }
    }
    w.stop().await;
    Ok(curve)
}
