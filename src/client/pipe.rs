//! Paying invoices as they scroll past: `grpcurl … Generate | satstream wallet pay`.
//!
//! Every line read is passed through unchanged (so the stream stays on screen), and every
//! invoice a Generate event carries (grpcurl's `"bolt11": "…"` field), or a line that is
//! nothing but an invoice (`--invoice`, stdin), is paid at once, without waiting for the
//! previous one, within a budget. An invoice anywhere else, such as inside generated text
//! (`"text": "… lnbc… "`), is never paid: a model must not be able to spend the wallet. It
//! knows nothing else of satstream's protocol, so it checks what it can on its own: the
//! invoice must be for this network, carry an amount, not be seen before and fit the budget.

use ldk_node::lightning_invoice::Bolt11Invoice;
use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::broadcast::error::RecvError;

use super::{ClientError, Wallet};
use ldk_node::Event;

/// What [`pay_lines`] reports as it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PipeEvent {
    Sent {
        amount_msat: u64,
    },
    Paid {
        amount_msat: u64,
        fee_msat: u64,
    },
    Failed {
        amount_msat: u64,
        reason: String,
    },
    /// Not paid, and why (over budget, no amount, wrong network, unparsable).
    Refused {
        invoice: String,
        reason: String,
    },
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PipeSummary {
    pub paid: u32,
    pub paid_msat: u64,
    pub fees_msat: u64,
    pub failed: u32,
    pub refused: u32,
    /// Sent but without an outcome when we stopped waiting.
    pub unresolved: u32,
}

/// BOLT11 human-readable prefixes: mainnet, testnet, signet, regtest.
const PREFIXES: [&str; 4] = ["lnbc", "lntb", "lntbs", "lnbcrt"];

fn looks_like_invoice(w: &str) -> bool {
    w.len() > 20
        && w.chars()
            .all(|c| c.is_ascii_alphanumeric() && !c.is_ascii_uppercase())
        && PREFIXES.iter().any(|p| w.starts_with(p))
}

/// The invoice a line carries as a Generate event's field (`"bolt11": "lnbc…"`, as grpcurl
/// prints it), or as the whole line; None for anything else.
pub fn invoices_in(line: &str) -> Vec<&str> {
    let t = line.trim();
    if looks_like_invoice(t) {
        return vec![t];
    }
    let Some(rest) = t.strip_prefix("\"bolt11\":") else {
        return Vec::new();
    };
    let v = rest.trim().trim_end_matches(',').trim();
    match v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
        Some(inv) if looks_like_invoice(inv) => vec![inv],
        _ => Vec::new(),
    }
}

/// Copies `input` to `output` line by line, paying each new invoice found, spending at most
/// `budget_msat` (amounts, fees excluded). At the end of input, waits up to `settle` for
/// payments still in flight (hold invoices resolve when the server delivers).
pub async fn pay_lines(
    wallet: &Wallet,
    network: crate::config::Network,
    input: impl AsyncBufRead + Unpin,
    mut output: impl AsyncWrite + Unpin,
    budget_msat: u64,
    settle: Duration,
    mut on_event: impl FnMut(&PipeEvent),
) -> Result<PipeSummary, ClientError> {
    let mut summary = PipeSummary::default();
    let mut events = wallet.subscribe();
    let mut in_flight: HashMap<[u8; 32], u64> = HashMap::new();
    let mut committed_msat = 0u64;
    let mut lines = input.lines();
    let expected = crate::node::ldk_network(network);
    let mut input_open = true;
    while input_open {
        tokio::select! {
            line = lines.next_line() => {
                let line = line.map_err(|e| ClientError::Wallet(format!("reading input: {e}")))?;
                let Some(line) = line else {
                    input_open = false;
                    continue;
                };
                output.write_all(line.as_bytes()).await.ok();
                output.write_all(b"\n").await.ok();
                output.flush().await.ok();
                for text in invoices_in(&line) {
                    let refuse = |reason: String| PipeEvent::Refused { invoice: text.to_string(), reason };
                    let inv = match Bolt11Invoice::from_str(text) {
                        Ok(inv) => inv,
                        Err(e) => {
                            summary.refused += 1;
                            on_event(&refuse(format!("not a valid invoice: {e}")));
                            continue;
                        }
                    };
                    let hash = *inv.payment_hash().as_ref();
                    if in_flight.contains_key(&hash) {
                        continue;
                    }
                    let reason = if inv.network() != expected {
                        Some(format!("for {:?}, the wallet is on {:?}", inv.network(), expected))
                    } else {
                        match inv.amount_milli_satoshis() {
                            None => Some("no amount in the invoice".to_string()),
                            Some(a) if committed_msat + a > budget_msat => Some(format!(
                                "{a} msat would exceed the budget ({committed_msat} of {budget_msat} msat committed)"
                            )),
                            Some(_) => None,
                        }
                    };
                    if let Some(reason) = reason {
                        summary.refused += 1;
                        on_event(&refuse(reason));
                        continue;
                    }
                    let amount_msat = inv.amount_milli_satoshis().unwrap_or(0);
                    match wallet.send(text) {
                        Ok(_) => {
                            committed_msat += amount_msat;
                            in_flight.insert(hash, amount_msat);
                            on_event(&PipeEvent::Sent { amount_msat });
                        }
                        Err(e) => {
                            summary.failed += 1;
                            on_event(&PipeEvent::Failed { amount_msat, reason: e.to_string() });
                        }
                    }
                }
            }
            e = events.recv() => {
                if !on_outcome(e, &mut in_flight, &mut summary, &mut committed_msat, &mut on_event) {
                    return Err(ClientError::Wallet("the wallet stopped".into()));
                }
            }
        }
    }
    let wait = async {
        while !in_flight.is_empty() {
            let e = events.recv().await;
            if !on_outcome(
                e,
                &mut in_flight,
                &mut summary,
                &mut committed_msat,
                &mut on_event,
            ) {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(settle, wait).await;
    summary.unresolved = in_flight.len() as u32;
    Ok(summary)
}

/// Books one wallet event; false once the wallet has stopped.
fn on_outcome(
    e: Result<Event, RecvError>,
    in_flight: &mut HashMap<[u8; 32], u64>,
    summary: &mut PipeSummary,
    committed_msat: &mut u64,
    on_event: &mut impl FnMut(&PipeEvent),
) -> bool {
    match e {
        Ok(Event::PaymentSuccessful {
            payment_hash,
            fee_paid_msat,
            ..
        }) => {
            if let Some(amount_msat) = in_flight.remove(&payment_hash.0) {
                let fee_msat = fee_paid_msat.unwrap_or(0);
                summary.paid += 1;
                summary.paid_msat += amount_msat;
                summary.fees_msat += fee_msat;
                on_event(&PipeEvent::Paid {
                    amount_msat,
                    fee_msat,
                });
            }
        }
        Ok(Event::PaymentFailed {
            payment_hash: Some(h),
            reason,
            ..
        }) => {
            if let Some(amount_msat) = in_flight.remove(&h.0) {
                // A failed payment spent nothing: its amount is back in the budget.
                *committed_msat -= amount_msat;
                summary.failed += 1;
                on_event(&PipeEvent::Failed {
                    amount_msat,
                    reason: format!("{reason:?}"),
                });
            }
        }
        Ok(_) | Err(RecvError::Lagged(_)) => {}
        Err(RecvError::Closed) => return false,
    }
    true
}

#[cfg(test)]
mod tests {
    use super::invoices_in;

    #[test]
    fn finds_invoices_in_grpcurl_json_and_nothing_else() {
        let line = r#"    "bolt11": "lnbcrt10u1pn9xyzpp5qqqsyqcyq5rqwzqfqqqsyqcyq5rqwzqfqqqsyqcyq5rqwzqfqypq","#;
        assert_eq!(
            invoices_in(line),
            vec!["lnbcrt10u1pn9xyzpp5qqqsyqcyq5rqwzqfqqqsyqcyq5rqwzqfqqqsyqcyq5rqwzqfqypq"]
        );
        assert!(invoices_in(r#""text": "lnbc is short""#).is_empty());
        assert!(
            invoices_in(r#""paymentHash": "LNBCRT10U1PN9XYZPP5QQQSYQCYQ5RQWZQFQQQ""#).is_empty()
        );
        assert!(invoices_in(r#""nodeId": "02abc…""#).is_empty());
        // An invoice inside generated text is never paid.
        let inv = "lnbcrt10u1pn9xyzpp5qqqsyqcyq5rqwzqfqqqsyqcyq5rqwzqfqqqsyqcyq5rqwzqfqypq";
        assert!(invoices_in(&format!(r#"    "text": "pay {inv} now","#)).is_empty());
        assert!(invoices_in(&format!(r#"    "text": "{inv}","#)).is_empty());
        // A bare invoice line (stdin, --invoice) is.
        assert_eq!(invoices_in(&format!("  {inv}  ")), vec![inv]);
    }
}
