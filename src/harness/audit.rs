//! The books after a crash, checked against what the Lightning nodes themselves recorded:
//! the payer's node (what the customer paid) and the server's node (what LDK received), never
//! the store against itself. Used by the crash tests and the chaos bench.

use std::collections::HashMap;

use ldk_node::payment::{PaymentDirection, PaymentKind, PaymentStatus};

use super::process::ProcessWorld;
use super::HarnessError;
use crate::store::{SessionState, Store};
use crate::wire::proto::{ListPaymentsRequest, NodePayment};

/// What the audit found; [`Books::problems`] lists every broken promise.
#[derive(Debug, Default, Clone)]
pub struct Books {
    /// The payer's Lightning payments to the server, by outcome.
    pub payer_succeeded: usize,
    pub payer_failed: usize,
    pub payer_pending: usize,
    /// Booked more than once (payment hashes, hex).
    pub double_booked: Vec<String>,
    /// Booked, but the server's node does not report the payment received.
    pub booked_not_received: Vec<String>,
    /// The server's node received it, the ledger has no record.
    pub received_not_booked: Vec<String>,
    /// The payer paid it, the ledger has no record.
    pub paid_not_booked: Vec<String>,
    /// Booked with an amount other than LDK's.
    pub amount_mismatch: Vec<String>,
    /// ATOMIC chunks whose key (the preimage) the payer holds with no delivered chunk in the
    /// ledger: the customer can read them and is owed their price back (SPEC invariant 6).
    pub key_not_delivered: Vec<String>,
    /// Inbound Lightning payments the server's node still has pending.
    pub node_pending_inbound: usize,
    /// Invoices open, held or claiming.
    pub unresolved_invoices: usize,
    pub open_sessions: usize,
    /// Sessions whose books do not balance (claimed + credited + debited + written off ≠
    /// prompt + delivered + refundable).
    pub unbalanced_sessions: Vec<String>,
    /// Sum of the amounts of every mismatch above, msat (goal: 0).
    pub unaccounted_msat: u64,
    /// Force-closed channels the server recorded, and the msat it wrote off as lost.
    pub force_closes: usize,
    pub lost_msat: u64,
}

impl Books {
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        let mut list = |what: &str, v: &[String]| {
            if !v.is_empty() {
                p.push(format!("{what}: {v:?}"));
            }
        };
        list("booked twice", &self.double_booked);
        list(
            "booked, not received by the node",
            &self.booked_not_received,
        );
        list(
            "received by the node, not booked",
            &self.received_not_booked,
        );
        list("paid by the payer, not booked", &self.paid_not_booked);
        list("amounts differ from LDK's", &self.amount_mismatch);
        list(
            "ATOMIC keys held by the payer, chunk not delivered",
            &self.key_not_delivered,
        );
        list("unbalanced sessions", &self.unbalanced_sessions);
        if self.payer_pending > 0 {
            p.push(format!(
                "{} payer payments still in flight",
                self.payer_pending
            ));
        }
        if self.node_pending_inbound > 0 {
            p.push(format!(
                "{} inbound payments pending at the node",
                self.node_pending_inbound
            ));
        }
        if self.unresolved_invoices > 0 {
            p.push(format!(
                "{} invoices open, held or claiming",
                self.unresolved_invoices
            ));
        }
        if self.open_sessions > 0 {
            p.push(format!("{} sessions still open", self.open_sessions));
        }
        p
    }
}

fn lightning(kind: &PaymentKind) -> bool {
    matches!(
        kind,
        PaymentKind::Bolt11 { .. } | PaymentKind::Spontaneous { .. }
    )
}

/// Every payment record of the server's node, through Admin ListPayments.
pub async fn server_payments(w: &ProcessWorld) -> Result<Vec<NodePayment>, HarnessError> {
    let mut a = w.admin().await?;
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let r = a
            .list_payments(ListPaymentsRequest {
                page_size: 500,
                page_token: token,
            })
            .await
            .map_err(|e| HarnessError::Setup(format!("ListPayments: {e}")))?
            .into_inner();
        all.extend(r.payments);
        if r.next_page_token.is_empty() {
            return Ok(all);
        }
        token = r.next_page_token;
    }
}

/// Audits the world's books (the server may be running: SQLite readers do not block it).
pub async fn audit(w: &ProcessWorld) -> Result<Books, HarnessError> {
    let server = server_payments(w).await?;
    let store = Store::open(&w.config.store_path())
        .map_err(|e| HarnessError::Setup(format!("store: {e}")))?;
    let err = |e: crate::store::StoreError| HarnessError::Setup(format!("store: {e}"));
    let mut b = Books::default();
    // Money booked per payment hash: settled invoices and keysend credits.
    let mut booked: HashMap<[u8; 32], (usize, u64)> = HashMap::new();
    for e in store.ledger().map_err(err)? {
        match e.kind.as_str() {
            "invoice_claimed"
            | "settled_against_decision"
            | "keysend_credited"
            | "keysend_unattributed" => {
                if let Some(h) = e.payment_hash {
                    let x = booked.entry(h).or_default();
                    x.0 += 1;
                    x.1 += e.amount_msat.max(0) as u64;
                }
            }
            // LDK forgot the hash and claimed it again: its record is now of this payment.
            "keysend_repeat" => {
                if let Some(h) = e.payment_hash {
                    booked.insert(h, (1, e.amount_msat.max(0) as u64));
                }
            }
            "channel_force_closed" => b.force_closes += 1,
            _ => {}
        }
    }
    for (h, (n, amount)) in &booked {
        if *n > 1 {
            b.double_booked.push(hex::encode(h));
            b.unaccounted_msat += amount / *n as u64 * (*n as u64 - 1);
        }
    }
    let inbound: HashMap<String, &NodePayment> = server
        .iter()
        .filter(|p| p.direction == "inbound" && p.kind != "onchain")
        .map(|p| (p.payment_id.clone(), p))
        .collect();
    for p in inbound.values() {
        let Some(h) = hex::decode(&p.payment_id)
            .ok()
            .and_then(|v| <[u8; 32]>::try_from(v).ok())
        else {
            continue;
        };
        match (p.status.as_str(), booked.get(&h)) {
            ("pending", _) => b.node_pending_inbound += 1,
            ("succeeded", None) => {
                b.received_not_booked.push(p.payment_id.clone());
                b.unaccounted_msat += p.amount_msat;
            }
            ("succeeded", Some((n, amount))) if amount / *n as u64 != p.amount_msat => {
                b.amount_mismatch.push(p.payment_id.clone());
                b.unaccounted_msat += p.amount_msat.abs_diff(amount / *n as u64);
            }
            _ => {}
        }
    }
    for (h, (_, amount)) in &booked {
        let ok = inbound
            .get(&hex::encode(h))
            .is_some_and(|p| p.status == "succeeded");
        // A record the node no longer has was checked against the ledger before it was
        // removed (lightning::pruning keeps any that disagree).
        if !ok && !store.ldk_pruned(h).map_err(err)? {
            b.booked_not_received.push(hex::encode(h));
            b.unaccounted_msat += amount;
        }
    }
    for p in w.payer.node.list_payments() {
        if p.direction != PaymentDirection::Outbound || !lightning(&p.kind) {
            continue;
        }
        match p.status {
            PaymentStatus::Pending => b.payer_pending += 1,
            PaymentStatus::Failed => b.payer_failed += 1,
            PaymentStatus::Succeeded => {
                b.payer_succeeded += 1;
                // The payer holds this preimage: for an ATOMIC chunk, that is its key.
                if let Some(inv) = store.invoice(&p.id.0).map_err(err)? {
                    let atomic = match &inv.session_id {
                        Some(sid) => store
                            .session(sid)
                            .map_err(err)?
                            .is_some_and(|s| s.mode == "ATOMIC"),
                        None => false,
                    };
                    if atomic
                        && inv.purpose == crate::store::InvoicePurpose::Chunk
                        && !store.chunk_paid_by(&p.id.0).map_err(err)?
                    {
                        b.key_not_delivered.push(hex::encode(p.id.0));
                        b.unaccounted_msat += p.amount_msat.unwrap_or(0);
                    }
                }
                if !booked.contains_key(&p.id.0) {
                    b.paid_not_booked.push(hex::encode(p.id.0));
                    b.unaccounted_msat += p.amount_msat.unwrap_or(0);
                }
            }
        }
    }
    b.unresolved_invoices = store.unresolved_invoices().map_err(err)?.len();
    let mut token = String::new();
    loop {
        let page = store.list_sessions(500, &token, None).map_err(err)?;
        for s in &page.items {
            if s.state == SessionState::Open {
                b.open_sessions += 1;
            }
            let a = store.audit_session(&s.id).map_err(err)?;
            if a.balance_msat() != s.refundable_msat() as i128 {
                b.unbalanced_sessions
                    .push(format!("{} {a:?}", hex::encode(s.id)));
                b.unaccounted_msat +=
                    (a.balance_msat() - s.refundable_msat() as i128).unsigned_abs() as u64;
            }
        }
        match page.next_page_token {
            Some(t) => token = t,
            None => break,
        }
    }
    b.lost_msat = store.total_lost_msat().map_err(err)?;
    Ok(b)
}
