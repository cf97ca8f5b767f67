//! `satstream bench --model longrun`: months of traffic in minutes (issue 23.7). A server
//! process on the tiny model takes many concurrent paid BOLT11 streams of small chunks until
//! `invoices` invoices are paid, and reports what must stay flat with history: the server's RSS
//! and ldk-node's payment-record count every 10 000 invoices, the restart time at 10 000 and at
//! the end, p99 payment → tokens in the first and the last 10 000; then the paying client's
//! time to Done, quiet and under each abuse (from other loopback addresses).

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::BenchError;
use crate::client::{self, ClientEvent};
use crate::config::ModelConfig;
use crate::harness::process::{ProcessOptions, ProcessWorld};
use crate::wire::proto::inference_client::InferenceClient;
use crate::wire::proto::{
    ChatMessage, GenerateRequest, ListPaymentsRequest, PaymentMode, SamplingParams, TopUpRequest,
};

/// Invoices between two samples.
const EVERY: u64 = 10_000;
/// A block this often while paid streams run.
const BLOCK_EVERY: Duration = Duration::from_secs(10);

pub struct Options {
    /// Paid invoices to drive through.
    pub invoices: u64,
    /// Concurrent paid streams.
    pub streams: usize,
    /// Tokens per invoice (the model's chunk).
    pub chunk_tokens: u32,
    /// Tokens per generation.
    pub tokens: u32,
}

fn request(model: &str, i: u64, tokens: u32) -> GenerateRequest {
    GenerateRequest {
        model: model.into(),
        messages: vec![ChatMessage {
            role: "user".into(),
            content: format!("long run {i}"),
        }],
        max_tokens: tokens,
        mode: PaymentMode::Bolt11 as i32,
        sampling: Some(SamplingParams {
            temperature: Some(0.0),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn failed(e: impl std::fmt::Display) -> BenchError {
    BenchError::Failed(e.to_string())
}

/// ldk-node's payment records, through Admin ListPayments.
async fn records(w: &ProcessWorld) -> Result<usize, BenchError> {
    let mut a = w.admin().await.map_err(failed)?;
    let (mut n, mut token) = (0, String::new());
    loop {
        let r = a
            .list_payments(ListPaymentsRequest {
                page_size: 1000,
                page_token: token,
            })
            .await
            .map_err(failed)?
            .into_inner();
        n += r.payments.len();
        if r.next_page_token.is_empty() {
            return Ok(n);
        }
        token = r.next_page_token;
    }
}

/// What the paying streams of one window saw, per chunk, in ms.
#[derive(Default)]
struct Latencies {
    /// Payment sent → the chunk's text.
    to_tokens: Vec<f64>,
    /// Payment sent → the payer's node saw it settle.
    settled: Vec<f64>,
}

/// Paid streams until `until` invoices in all are paid; their latencies.
async fn drive(
    w: &ProcessWorld,
    model: &str,
    o: &Options,
    paid: &Arc<AtomicU64>,
    until: u64,
) -> Result<Latencies, BenchError> {
    let latencies = Arc::new(Mutex::new(Latencies::default()));
    let next = Arc::new(AtomicU64::new(0));
    let server: std::net::SocketAddr = w.config.server.grpc_listen.parse().map_err(failed)?;
    let tasks =
        (0..o.streams).map(|k| {
            // Four streams per address (127.0.0.100…): within the default cap on a client's
            // unpaid sessions, which the abuse runs below keep too.
            let ip = IpAddr::from([127, 0, 0, 100 + (k / 4) as u8]);
            let (model, paid, latencies, next) = (
                model.to_string(),
                paid.clone(),
                latencies.clone(),
                next.clone(),
            );
            let payer = &w.payer;
            let tokens = o.tokens;
            async move {
                let mut c = crate::harness::client_from(server, ip).await?;
                while paid.load(Ordering::SeqCst) < until {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let mut sent: HashMap<u32, Instant> = HashMap::new();
                    let mut mine = Latencies::default();
                    let s =
                        client::generate(&mut c, payer, request(&model, i, tokens), None, |e| {
                            match e {
                                ClientEvent::Paying { chunk: Some(k), .. } => {
                                    sent.insert(*k, Instant::now());
                                }
                                ClientEvent::Paid {
                                    chunk: Some(_), ms, ..
                                } => mine.settled.push(*ms),
                                ClientEvent::Text { chunk, .. } => {
                                    if let Some(t) = sent.remove(chunk) {
                                        mine.to_tokens.push(t.elapsed().as_secs_f64() * 1e3);
                                    }
                                }
                                _ => {}
                            }
                        })
                        .await
                        .map_err(failed)?;
                    paid.fetch_add(s.payments as u64, Ordering::SeqCst);
                    let mut all = latencies.lock().unwrap_or_else(|p| p.into_inner());
                    all.to_tokens.extend(mine.to_tokens);
                    all.settled.extend(mine.settled);
                }
                Ok::<_, BenchError>(())
            }
        });
    for r in super::futures_join_all(tasks.collect()).await {
        r?;
    }
    let v = std::mem::take(&mut *latencies.lock().unwrap_or_else(|p| p.into_inner()));
    Ok(v)
}

/// One row of the table: invoices paid, seconds, server RSS, ldk-node records, the channel
/// monitor's stored size, and the window's latencies (p50 / p99 payment → tokens, p99
/// payment → settled at the payer).
async fn sample(
    w: &ProcessWorld,
    paid: u64,
    started: Instant,
    window: Option<&Latencies>,
) -> Result<String, BenchError> {
    let rss = super::proc_status_mb(w.server.as_ref().map(|s| s.pid()), "VmRSS");
    let n = records(w).await?;
    let monitors =
        crate::lightning::compaction::stored_monitor_sizes(&w.config.ldk_dir()).map_err(failed)?;
    let kb = monitors.values().sum::<u64>() as f64 / 1024.0;
    let lat = window.map_or(" | |".to_string(), |l| {
        format!(
            "{:.0} / {:.0} | {:.0} |",
            super::pct(&l.to_tokens, 0.5),
            super::pct(&l.to_tokens, 0.99),
            super::pct(&l.settled, 0.99)
        )
    });
    Ok(format!(
        "| {paid} | {:.0} | {rss:.0} | {n} | {kb:.0} | {lat}",
        started.elapsed().as_secs_f64()
    ))
}

/// Runs `f` while a block is mined every [`BLOCK_EVERY`]: a chain that moves, as a real one
/// does (a splice that compacts a channel's monitor locks after confirmations).
async fn with_blocks<F: std::future::Future>(w: &ProcessWorld, f: F) -> F::Output {
    let miner = async {
        loop {
            tokio::time::sleep(BLOCK_EVERY).await;
            if let Err(e) = w.mine(1).await {
                tracing::warn!(error = %e, "mining a block");
            }
        }
    };
    tokio::select! {
        r = f => r,
        _ = miner => unreachable!("the miner never ends"),
    }
}

/// Stops the server and starts it again: seconds until it serves.
async fn restart(w: &mut ProcessWorld) -> Result<f64, BenchError> {
    w.server()
        .stop(Duration::from_secs(60))
        .await
        .map_err(failed)?;
    let t = Instant::now();
    w.start_server(&[]).await.map_err(failed)?;
    let s = t.elapsed().as_secs_f64();
    w.ensure_channel().await.map_err(failed)?;
    Ok(s)
}

/// One paying client's 64-token BOLT11 generation: its time to Done.
async fn paying_client(w: &ProcessWorld, model: &str) -> Result<Duration, BenchError> {
    let t = Instant::now();
    let mut c = InferenceClient::connect(w.endpoint())
        .await
        .map_err(failed)?;
    let s = client::generate(&mut c, &w.payer, request(model, 0, 64), None, |_| {})
        .await
        .map_err(failed)?;
    if s.outcome.starts_with("halted") {
        return Err(failed(format!(
            "the paying client was halted: {}",
            s.message
        )));
    }
    Ok(t.elapsed())
}

/// Runs the long run; the report (markdown).
pub async fn long_run(exe: &Path, tiny: &Path, o: Options) -> Result<String, BenchError> {
    let mut m = ModelConfig::new("tiny", tiny.to_path_buf(), 1_000);
    m.chunk_tokens = o.chunk_tokens;
    m.max_concurrent = 32;
    m.max_queue = 64;
    let mut w = ProcessWorld::start(
        exe,
        ProcessOptions {
            models: vec![m.clone()],
            sets: vec![
                "limits.max_sessions=128".into(),
                "limits.reserved_paid_sessions=32".into(),
                // At most 8 unpaid tokens (4 invoices) per stream: the streams together stay
                // under the 50 HTLCs one channel carries, so the run measures the server, not
                // the payer's queue.
                "payments.max_unpaid_msat=8000".into(),
                // Records of final payments leave the node after a minute (a day by default).
                "lightning.payment_retention_secs=60".into(),
                // A channel monitor is spliced at 1 MB (~7 000 invoices here; 16 MB by default):
                // the run sees it compacted many times.
                "lightning.compact_monitor_bytes=1000000".into(),
            ],
            channel_sat: 16_000_000,
            log: Some("warn".into()),
        },
    )
    .await
    .map_err(failed)?;
    let paid = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut rows = Vec::new();
    rows.push(sample(&w, 0, started, None).await?);
    // The first 10 000: p99 at the start, then a restart.
    let first = with_blocks(&w, drive(&w, &m.id, &o, &paid, EVERY.min(o.invoices))).await?;
    rows.push(sample(&w, paid.load(Ordering::SeqCst), started, Some(&first)).await?);
    let restart_10k = restart(&mut w).await?;
    let mut last = Latencies::default();
    let mut target = EVERY;
    while target < o.invoices {
        target = (target + EVERY).min(o.invoices);
        last = with_blocks(&w, drive(&w, &m.id, &o, &paid, target)).await?;
        rows.push(sample(&w, paid.load(Ordering::SeqCst), started, Some(&last)).await?);
    }
    let restart_end = restart(&mut w).await?;
    rows.push(sample(&w, paid.load(Ordering::SeqCst), started, None).await?);

    // The paying client, quiet and under each abuse.
    let quiet = paying_client(&w, &m.id).await?;
    let server: std::net::SocketAddr = w.config.server.grpc_listen.parse().map_err(failed)?;
    let mut abuse = Vec::new();
    {
        // Unpaid sessions from 8 addresses, as many as each may hold, kept open.
        let mut held = Vec::new();
        for a in 10..18u8 {
            let mut c = crate::harness::client_from(server, IpAddr::from([127, 0, 0, a])).await?;
            for i in 0..16 {
                match c.generate(request(&m.id, 1_000_000 + i, 64)).await {
                    Ok(s) => held.push(s.into_inner()),
                    Err(_) => break,
                }
            }
        }
        let t = paying_client(&w, &m.id).await?;
        abuse.push((
            format!("{} unpaid sessions held from 8 addresses", held.len()),
            t,
        ));
    }
    {
        // TopUp spam: 200 anonymous top-ups from one address.
        let mut c = crate::harness::client_from(server, IpAddr::from([127, 0, 0, 20])).await?;
        let mut issued = 0;
        for _ in 0..200 {
            let r = c
                .top_up(TopUpRequest {
                    account_token: String::new(),
                    amount_msat: 10_000,
                })
                .await;
            issued += r.is_ok() as u32;
        }
        let t = paying_client(&w, &m.id).await?;
        abuse.push((format!("200 TopUps from one address ({issued} issued)"), t));
    }
    {
        // Silent connections: 300 sockets from 3 addresses that never speak.
        let mut socks = Vec::new();
        for a in 30..33u8 {
            for _ in 0..100 {
                let s = tokio::net::TcpSocket::new_v4().map_err(failed)?;
                s.bind(std::net::SocketAddr::new(IpAddr::from([127, 0, 0, a]), 0))
                    .map_err(failed)?;
                if let Ok(c) = s.connect(server).await {
                    socks.push(c);
                }
            }
        }
        let t = paying_client(&w, &m.id).await?;
        abuse.push((
            format!("{} silent connections from 3 addresses", socks.len()),
            t,
        ));
    }
    w.stop().await;

    let p99 = |v: &[f64]| super::pct(v, 0.99);
    let mut out = format!(
        "Long run: {} paid invoices of {} tokens, {} concurrent streams of {} tokens (tiny \
         model, ldk-node records retained 60 s). Machine: {}.\n\n\
         | invoices paid | s | server RSS MB | ldk-node payment records | channel monitor KB | \
         payment → tokens p50 / p99, ms | payment → settled p99, ms |\n|---|---|---|---|---|---|---|\n",
        paid.load(Ordering::SeqCst),
        o.chunk_tokens,
        o.streams,
        o.tokens,
        super::machine()
    );
    for r in &rows {
        out.push_str(r);
        out.push('\n');
    }
    out.push_str(&format!(
        "\n| | first 10 000 | last 10 000 | ratio |\n|---|---|---|---|\n\
         | restart, s | {restart_10k:.2} | {restart_end:.2} | {:.2} |\n\
         | p99 payment → tokens, ms | {:.1} | {:.1} | {:.2} |\n",
        restart_end / restart_10k,
        p99(&first.to_tokens),
        p99(&last.to_tokens),
        p99(&last.to_tokens) / p99(&first.to_tokens).max(1e-9),
    ));
    out.push_str(&format!(
        "\nThe paying client's time to Done (64 tokens): quiet {:.2} s.\n\n\
         | abuse | time to Done, s | × quiet |\n|---|---|---|\n",
        quiet.as_secs_f64()
    ));
    for (what, t) in &abuse {
        out.push_str(&format!(
            "| {what} | {:.2} | {:.2} |\n",
            t.as_secs_f64(),
            t.as_secs_f64() / quiet.as_secs_f64()
        ));
    }
    Ok(out)
}
