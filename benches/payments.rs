//! Lightning payment latency on the real regtest harness (not a test: prints numbers).
//!
//!   cargo bench --bench payments [-- N]
//!
//! For N hold invoices (default 40), one after another: payer `send` → the server's event
//! loop has committed the HTLC as held and told the issuer (PaymentClaimable), then
//! claim → payer `PaymentSuccessful`.

use std::time::{Duration, Instant};
use tokio::sync::mpsc;

use satstream::harness::{Harness, HarnessOptions, PayOutcome};
use satstream::store::InvoicePurpose;

fn pct(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn summary(name: &str, mut v: Vec<f64>) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "{name:<34} n={:<4} min {:>7.1} ms  p50 {:>7.1} ms  p90 {:>7.1} ms  max {:>7.1} ms",
        v.len(),
        v[0],
        pct(&v, 0.5),
        pct(&v, 0.9),
        v[v.len() - 1]
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(40);
    let t0 = Instant::now();
    let h = Harness::start(HarnessOptions::default()).await?;
    println!(
        "harness ready (bitcoind, 2 nodes, funded channel) in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let ln = h.server().app.lightning.clone();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (mut to_held, mut to_paid) = (Vec::new(), Vec::new());
    for i in 0..n {
        let inv = ln.create_hold_invoice(
            &satstream::lightning::invoices::HoldInvoice {
                amount_msat: 16_000,
                description: "bench".into(),
                expiry_secs: 600,
                purpose: InvoicePurpose::Test,
                session_id: None,
                account_id: None,
                chunk_index: Some(i as u32),
                preimage: None,
            },
            Some(tx.clone()),
        )?;
        let events = h.payer.subscribe();
        let start = Instant::now();
        let hash = h.payer.send(&inv.bolt11)?;
        let held = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await?
            .expect("held");
        to_held.push(start.elapsed().as_secs_f64() * 1e3);
        assert_eq!(held.payment_hash, hash);
        let claim_at = Instant::now();
        ln.claim(&[hash], None)?;
        match h
            .payer
            .wait_outcome(events, hash, Duration::from_secs(30))
            .await?
        {
            PayOutcome::Succeeded { .. } => to_paid.push(claim_at.elapsed().as_secs_f64() * 1e3),
            other => anyhow::bail!("payment {i} failed: {other:?}"),
        }
    }
    summary("send -> PaymentClaimable committed", to_held);
    summary("claim -> payer PaymentSuccessful", to_paid);
    h.stop().await;
    Ok(())
}
