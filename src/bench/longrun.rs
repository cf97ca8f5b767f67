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

/// What the paying streams of one window saw, per chunk, in ms; and what the server saw.
#[derive(Default)]
struct Latencies {
    /// Payment sent → the chunk's text.
    to_tokens: Vec<f64>,
    /// Payment sent → the payer's node saw it settle.
    settled: Vec<f64>,
    /// The server's own payment → tokens (HTLC held → tokens written): its histogram's
    /// counts over the window, per upper bound (seconds).
    server: Vec<(f64, f64)>,
}

/// The server's `satstream_payment_to_tokens_seconds` buckets (cumulative counts).
async fn server_buckets(metrics: &str) -> Result<Vec<(f64, f64)>, BenchError> {
    let text = reqwest::get(format!("http://{metrics}/metrics"))
        .await
        .map_err(failed)?
        .text()
        .await
        .map_err(failed)?;
    Ok(text
        .lines()
        .filter_map(|l| l.strip_prefix("satstream_payment_to_tokens_seconds_bucket{le=\""))
        .filter_map(|l| {
            let (le, count) = l.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect())
}

/// The q-quantile of a histogram's cumulative buckets, in ms, interpolated within its bucket
/// as Prometheus' `histogram_quantile` does.
fn bucket_quantile(buckets: &[(f64, f64)], q: f64) -> f64 {
    let Some(&(_, total)) = buckets.last() else {
        return f64::NAN;
    };
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank && count > below {
            if le.is_infinite() {
                return lower * 1e3;
            }
            return (lower + (le - lower) * (rank - below) / (count - below)) * 1e3;
        }
        (lower, below) = (le, count);
    }
    f64::NAN
}

/// `after - before`, bucket by bucket (the server's counters since `before`).
fn bucket_delta(before: &[(f64, f64)], after: &[(f64, f64)]) -> Vec<(f64, f64)> {
    after
        .iter()
        .map(|&(le, n)| {
            let was = before.iter().find(|b| b.0 == le).map_or(0.0, |b| b.1);
            (le, n - was)
        })
        .collect()
}

/// Paid streams until `until` invoices in all are paid; their latencies.
async fn drive(
    w: &ProcessWorld,
    model: &str,
    o: &Options,
    paid: &Arc<AtomicU64>,
    until: u64,
) -> Result<Latencies, BenchError> {
    let before = server_buckets(&w.config.server.metrics_listen).await?;
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
    let mut v = std::mem::take(&mut *latencies.lock().unwrap_or_else(|p| p.into_inner()));
    v.server = bucket_delta(
        &before,
        &server_buckets(&w.config.server.metrics_listen).await?,
    );
    Ok(v)
}

/// One row of the table: invoices paid, seconds, server RSS, ldk-node records, the channel
/// monitor's stored size, and the window's latencies (p50 / p99 payment → tokens at the
/// server and at the client, p99 payment → settled at the payer).
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
    let payer_kb = payer_manager_kb(w)?;
    let lat = window.map_or(" | | |".to_string(), |l| {
        format!(
            "{:.0} / {:.0} | {:.0} / {:.0} | {:.0} |",
            bucket_quantile(&l.server, 0.5),
            bucket_quantile(&l.server, 0.99),
            super::pct(&l.to_tokens, 0.5),
            super::pct(&l.to_tokens, 0.99),
            super::pct(&l.settled, 0.99)
        )
    });
    Ok(format!(
        "| {paid} | {:.0} | {rss:.0} | {n} | {kb:.0} | {lat} {payer_kb:.0} |",
        started.elapsed().as_secs_f64()
    ))
}

/// The stored size of the payer node's ChannelManager, KB. LDK keeps a sent payment in it for
/// 7 timer ticks (~7 minutes, for idempotency) and ldk-node rewrites it whole as payments go:
/// at this run's ~80 payments a second the payer's own cost grows for the first minutes.
fn payer_manager_kb(w: &ProcessWorld) -> Result<f64, BenchError> {
    let db = crate::lightning::compaction::ldk_store(&w.payer_dir()).map_err(failed)?;
    let len: i64 = db
        .query_row(
            &format!(
                "SELECT COALESCE(SUM(LENGTH(value)), 0) FROM {} WHERE primary_namespace = '' \
                 AND secondary_namespace = '' AND key = 'manager'",
                ldk_node::io::sqlite_store::KV_TABLE_NAME
            ),
            [],
            |r| r.get(0),
        )
        .map_err(failed)?;
    Ok(len as f64 / 1024.0)
}

/// Waits (mining, so the payer's node persists) until the payer's ChannelManager is back to
/// `kb`: LDK has dropped the sent payments it keeps for idempotency. The last window then
/// starts from a payer in the state the first started from, and the two compare the server.
async fn drain_payer(w: &ProcessWorld, kb: f64) -> Result<Duration, BenchError> {
    let t = Instant::now();
    with_blocks(
        w,
        crate::harness::wait_until(
            "the payer's ChannelManager to drop its sent payments",
            Duration::from_secs(15 * 60),
            || async { payer_manager_kb(w).is_ok_and(|now| now <= kb + 8.0) },
        ),
    )
    .await
    .map_err(failed)?;
    Ok(t.elapsed())
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
                // The server's own payment → tokens histogram, read per window.
                format!(
                    "server.metrics_listen=127.0.0.1:{}",
                    crate::harness::free_port()
                ),
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
    let payer_kb = payer_manager_kb(&w)?;
    // The first 10 000: p99 at the start, then a restart.
    let first = with_blocks(&w, drive(&w, &m.id, &o, &paid, EVERY.min(o.invoices))).await?;
    rows.push(sample(&w, paid.load(Ordering::SeqCst), started, Some(&first)).await?);
    let restart_10k = restart(&mut w).await?;
    let mut last = Latencies::default();
    let mut target = EVERY;
    let mut drained = Duration::ZERO;
    while target < o.invoices {
        target = (target + EVERY).min(o.invoices);
        if target == o.invoices {
            drained = drain_payer(&w, payer_kb).await?;
        }
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
         server: payment → tokens p50 / p99, ms | client: payment sent → tokens p50 / p99, ms | \
         client: sent → settled p99, ms | payer's ChannelManager KB |\n|---|---|---|---|---|---|---|---|---|\n",
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
        "\nBefore the last window the run waited {:.0} s for the payer's node to drop the sent \
         payments LDK keeps ~7 minutes for idempotency (its ChannelManager back to {payer_kb:.0} KB), \
         so that both windows start from the same payer and compare the server.\n",
        drained.as_secs_f64()
    ));
    out.push_str(&format!(
        "\n| | first 10 000 | last 10 000 | ratio |\n|---|---|---|---|\n\
         | restart, s | {restart_10k:.2} | {restart_end:.2} | {:.2} |\n\
         | p99 payment → tokens, server (HTLC held → tokens written), ms | {:.1} | {:.1} | {:.2} |\n\
         | p99 payment sent → tokens, client (its LDK node's send included), ms | {:.1} | {:.1} | {:.2} |\n",
        restart_end / restart_10k,
        bucket_quantile(&first.server, 0.99),
        bucket_quantile(&last.server, 0.99),
        bucket_quantile(&last.server, 0.99) / bucket_quantile(&first.server, 0.99).max(1e-9),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_of_window_buckets_interpolate_like_prometheus() {
        // 100 observations: 50 at most 10 ms, 40 more by 20 ms, the last 10 by 100 ms.
        let before = [(0.01, 5.0), (0.02, 5.0), (0.1, 5.0), (f64::INFINITY, 5.0)];
        let after = [
            (0.01, 55.0),
            (0.02, 95.0),
            (0.1, 105.0),
            (f64::INFINITY, 105.0),
        ];
        let w = bucket_delta(&before, &after);
        assert_eq!(
            w,
            [
                (0.01, 50.0),
                (0.02, 90.0),
                (0.1, 100.0),
                (f64::INFINITY, 100.0)
            ]
        );
        assert!((bucket_quantile(&w, 0.5) - 10.0).abs() < 1e-9);
        assert!((bucket_quantile(&w, 0.7) - 15.0).abs() < 1e-9);
        assert!((bucket_quantile(&w, 0.99) - 92.0).abs() < 1e-9);
        assert!(bucket_quantile(&[], 0.99).is_nan());
    }
}
