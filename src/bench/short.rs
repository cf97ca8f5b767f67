//! `bench --model short` (issue 26): short answers, where paying per chunk costs most. For
//! answers of 32, 64, 128 and 512 tokens on both backends: the raw engine's time to first
//! token and to its end against paid BOLT11 / ATOMIC / KEYSEND / PREPAID streams, in
//! alternated rounds of one run, with the p50 payment round trip (the client's send →
//! settled) of the same run, and the goals checked per row.
//!
//! The goals: the first paid token within half a round trip of the raw first token (the
//! first payment overlaps the prefill), Done within 1.2 round trips of the raw end for the
//! invoiced modes (the last chunk's price is known only once it exists: one round trip is the
//! floor), within 3 % of it for the balance-funded ones (they pay ahead).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::backends::paid_request_watched;
use super::{pct, raw_stream, request, BenchError};
use crate::client::ClientEvent;
use crate::config::{BackendKind, ModelConfig};
use crate::harness::{Harness, HarnessOptions};
use crate::wire::proto::PaymentMode;

const LENGTHS: [u32; 4] = [32, 64, 128, 512];
const MODES: [(&str, PaymentMode); 4] = [
    ("BOLT11", PaymentMode::Bolt11),
    ("ATOMIC", PaymentMode::Atomic),
    ("KEYSEND", PaymentMode::Keysend),
    ("PREPAID", PaymentMode::Prepaid),
];

/// One stream's times: to the first token the user sees and to the end, in ms; its tokens;
/// and where the time to the first token went (paid streams).
#[derive(Clone, Copy, Default)]
struct Times {
    first_ms: f64,
    done_ms: f64,
    tokens: u32,
    /// Request → Accepted.
    accepted_ms: f64,
    /// Request → the first chunk's payment sent by the client.
    pay_sent_ms: f64,
    /// That payment's round trip (sent → settled, as the client's node reports it).
    pay_rtt_ms: f64,
}

/// The engine alone, the bench's greedy chat request.
async fn raw(h: &Harness, model: &str, tokens: u32) -> Result<Times, BenchError> {
    let r = raw_stream(h, model, tokens).await?;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    Ok(Times {
        first_ms: ms(r.first.unwrap_or(r.done)),
        done_ms: ms(r.done),
        tokens: r.tokens,
        ..Times::default()
    })
}

/// One paid stream through the client (PREPAID: on an account topped up beforehand, outside
/// the timing); the payment round trips it saw are added to `pay_ms`.
async fn paid(
    h: &Harness,
    model: &str,
    tokens: u32,
    mode: PaymentMode,
    pay_ms: &mut Vec<f64>,
) -> Result<Times, BenchError> {
    let mut req = request(model, tokens, 2);
    req.window_chunks = None;
    req.mode = mode as i32;
    let (s, w) = paid_request_watched(h, req).await?;
    pay_ms.extend(&w.pay_ms);
    Ok(Times {
        first_ms: w.first_text_ms.unwrap_or(s.stream_ms as f64),
        done_ms: s.stream_ms as f64,
        tokens: s.tokens,
        accepted_ms: w.accepted_ms.unwrap_or(0.0),
        pay_sent_ms: w.first_pay_sent_ms.unwrap_or(0.0),
        pay_rtt_ms: w.first_pay_rtt_ms.unwrap_or(0.0),
    })
}

/// When a client saw what, from its events (ms since the request).
pub(super) struct Watch {
    started: Instant,
    pub accepted_ms: Option<f64>,
    pub first_pay_sent_ms: Option<f64>,
    pub first_pay_rtt_ms: Option<f64>,
    pub first_text_ms: Option<f64>,
    /// Every chunk payment's round trip.
    pub pay_ms: Vec<f64>,
}

impl Watch {
    pub(super) fn new() -> Watch {
        Watch {
            started: Instant::now(),
            accepted_ms: None,
            first_pay_sent_ms: None,
            first_pay_rtt_ms: None,
            first_text_ms: None,
            pay_ms: Vec::new(),
        }
    }

    pub(super) fn see(&mut self, e: &ClientEvent) {
        let now = self.started.elapsed().as_secs_f64() * 1e3;
        match e {
            ClientEvent::Accepted { .. } => {
                self.accepted_ms.get_or_insert(now);
            }
            ClientEvent::Paying { chunk: Some(_), .. } => {
                self.first_pay_sent_ms.get_or_insert(now);
            }
            ClientEvent::Text { .. } => {
                self.first_text_ms.get_or_insert(now);
            }
            ClientEvent::Paid { ms, chunk, .. } if chunk.is_some() => {
                self.first_pay_rtt_ms.get_or_insert(*ms);
                self.pay_ms.push(*ms);
            }
            _ => {}
        }
    }
}

/// Per backend: rows of (tokens, raw, then each mode) medians, and the p50 round trip.
struct BackendTable {
    backend: &'static str,
    rows: Vec<(u32, Times, Vec<Times>)>,
    rtt_p50_ms: f64,
    /// The server's claim (the delivery commit and LDK's claim call), p50.
    claim_ms: f64,
}

async fn measure(
    model: &ModelConfig,
    backend: BackendKind,
    rounds: usize,
) -> Result<BackendTable, BenchError> {
    let mut m = model.clone();
    m.backend = backend;
    let h = Harness::start(HarnessOptions {
        models: vec![m.clone()],
        ..HarnessOptions::default()
    })
    .await?;
    let id = m.id.clone();
    // Warm: the engine, and the node's recent payment latencies a new session plans with.
    let mut pay_ms = Vec::new();
    raw(&h, &id, 32).await?;
    for (_, mode) in MODES {
        paid(&h, &id, 32, mode, &mut pay_ms).await?;
    }
    pay_ms.clear();
    // (tokens, variant) → samples; variant 0 is raw, then MODES in order.
    let mut samples: BTreeMap<(u32, usize), Vec<Times>> = BTreeMap::new();
    for round in 0..rounds {
        for &n in &LENGTHS {
            // Alternated, and the order turned each round, so drift falls on every variant.
            for i in 0..=MODES.len() {
                let v = (i + round) % (MODES.len() + 1);
                let t = if v == 0 {
                    raw(&h, &id, n).await?
                } else {
                    paid(&h, &id, n, MODES[v - 1].1, &mut pay_ms).await?
                };
                samples.entry((n, v)).or_default().push(t);
            }
        }
        tracing::info!(round, "short answers: round done");
    }
    let claim_ms = pct(&h.server().app.metrics.take().claim_ms, 0.5);
    h.stop().await;
    let median = |v: &[Times]| {
        let m = |f: fn(&Times) -> f64| pct(&v.iter().map(f).collect::<Vec<_>>(), 0.5);
        Times {
            first_ms: m(|t| t.first_ms),
            done_ms: m(|t| t.done_ms),
            tokens: v.iter().map(|t| t.tokens).min().unwrap_or(0),
            accepted_ms: m(|t| t.accepted_ms),
            pay_sent_ms: m(|t| t.pay_sent_ms),
            pay_rtt_ms: m(|t| t.pay_rtt_ms),
        }
    };
    let rows = LENGTHS
        .iter()
        .map(|&n| {
            let raw = median(&samples[&(n, 0)]);
            let paid = (1..=MODES.len())
                .map(|v| median(&samples[&(n, v)]))
                .collect();
            (n, raw, paid)
        })
        .collect();
    Ok(BackendTable {
        backend: match backend {
            BackendKind::Mistralrs => "mistral.rs",
            BackendKind::Llamacpp => "llama.cpp",
            BackendKind::Openai => "openai",
        },
        rows,
        rtt_p50_ms: pct(&pay_ms, 0.5),
        claim_ms,
    })
}

/// Both backends, `rounds` alternated rounds each: the table, with each goal checked.
pub async fn report(model: &ModelConfig, rounds: usize) -> Result<String, BenchError> {
    let mut out = String::new();
    for backend in [BackendKind::Mistralrs, BackendKind::Llamacpp] {
        let t = measure(model, backend, rounds).await?;
        let rtt = t.rtt_p50_ms;
        out.push_str(&format!(
            "\n{} on `{}`, chunk {}, greedy chat; medians of {rounds} alternated rounds; \
             p50 payment round trip (client send → settled) **{rtt:.0} ms**. Each cell: first \
             token / Done, ms; ✓ when within the goal (first ≤ raw first + 0.5 RT; Done ≤ raw + \
             1.2 RT for BOLT11/ATOMIC, ≤ raw × 1.03 for KEYSEND/PREPAID).\n\n\
             | tokens | raw | {} |\n|---|---|{}\n",
            t.backend,
            model.path.display(),
            model.chunk_tokens,
            MODES.map(|(name, _)| name).join(" | "),
            "---|".repeat(MODES.len()),
        ));
        for (n, raw, paid) in &t.rows {
            let mut line = format!(
                "| {n} ({}) | {:.0} / {:.0} |",
                raw.tokens, raw.first_ms, raw.done_ms
            );
            for ((name, _), p) in MODES.iter().zip(paid) {
                let first_ok = p.first_ms <= raw.first_ms + 0.5 * rtt;
                let done_ok = match *name {
                    "BOLT11" | "ATOMIC" => p.done_ms <= raw.done_ms + 1.2 * rtt,
                    _ => p.done_ms <= raw.done_ms * 1.03,
                };
                let mark = |ok: bool| if ok { " ✓" } else { "" };
                line.push_str(&format!(
                    " {:.0}{} / {:.0}{} |",
                    p.first_ms,
                    mark(first_ok),
                    p.done_ms,
                    mark(done_ok)
                ));
            }
            out.push_str(&line);
            out.push('\n');
        }
        out.push_str(&format!(
            "\nWhere a BOLT11 stream's first token goes (medians, ms from the request; the \
             server's claim p50 {:.1} ms):\n\n\
             | tokens | raw first token | Accepted | first payment sent | its round trip | \
             first paid token |\n|---|---|---|---|---|---|\n",
            t.claim_ms
        ));
        for (n, raw, paid) in &t.rows {
            let b = &paid[0];
            out.push_str(&format!(
                "| {n} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |\n",
                raw.first_ms, b.accepted_ms, b.pay_sent_ms, b.pay_rtt_ms, b.first_ms
            ));
        }
    }
    Ok(out)
}
