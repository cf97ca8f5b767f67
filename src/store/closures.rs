//! Channel closures and what they did to claims in flight, and claims that did not settle.
//!
//! Two kinds of loss, both the operator's and never income:
//! - `never_settled`: we delivered a chunk for a claim LDK never completed (the payer paid
//!   nothing). It balances the session's books (see `SessionAudit::written_off_msat`), and the
//!   invoice ends `failed`.
//! - `lost_on_chain`: LDK claimed (the payer paid), but the channel was force-closed before the
//!   HTLC left the commitment and it was below the dust limit: it went to miners' fees. The
//!   invoice stays `claimed` (the customer did pay); the operator's income is less by that much.

use rusqlite::{params, OptionalExtension, Row};

/// A closure LDK reports within this long of a start happened while starting.
const STARTUP_CLOSE_SECS: i64 = 60;

use super::invoices::{get_in, transition_in};
use super::{decode_page_token, ledger, now_unix, page, InvoiceState, Page, Store, StoreError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelClosure {
    pub channel_id: [u8; 32],
    pub counterparty: String,
    pub reason: String,
    pub forced: bool,
    pub closed_at_unix: u64,
    pub resolved_at_unix: Option<u64>,
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossKind {
    NeverSettled,
    LostOnChain,
}

impl LossKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LossKind::NeverSettled => "never_settled",
            LossKind::LostOnChain => "lost_on_chain",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettlementLoss {
    pub payment_hash: [u8; 32],
    pub session_id: Option<[u8; 16]>,
    pub kind: String,
    pub channel_id: Option<[u8; 32]>,
    pub amount_msat: u64,
    pub delivered: bool,
    pub reason: String,
    pub at_unix: u64,
}

fn closure_row(r: &Row<'_>) -> rusqlite::Result<ChannelClosure> {
    let id: Vec<u8> = r.get(0)?;
    Ok(ChannelClosure {
        channel_id: id.try_into().unwrap_or([0; 32]),
        counterparty: r.get(1)?,
        reason: r.get(2)?,
        forced: r.get::<_, i64>(3)? != 0,
        closed_at_unix: r.get::<_, i64>(4)? as u64,
        resolved_at_unix: r.get::<_, Option<i64>>(5)?.map(|v| v as u64),
        detail: r.get(6)?,
    })
}

fn loss_row(r: &Row<'_>) -> rusqlite::Result<SettlementLoss> {
    let hash: Vec<u8> = r.get(0)?;
    let sid: Option<Vec<u8>> = r.get(1)?;
    let cid: Option<Vec<u8>> = r.get(3)?;
    Ok(SettlementLoss {
        payment_hash: hash.try_into().unwrap_or([0; 32]),
        session_id: sid.and_then(|s| s.try_into().ok()),
        kind: r.get(2)?,
        channel_id: cid.and_then(|c| c.try_into().ok()),
        amount_msat: r.get::<_, i64>(4)? as u64,
        delivered: r.get::<_, i64>(5)? != 0,
        reason: r.get(6)?,
        at_unix: r.get::<_, i64>(7)? as u64,
    })
}

const CLOSURE_COLUMNS: &str =
    "channel_id, counterparty, reason, forced, closed_at, resolved_at, detail";
const LOSS_COLUMNS: &str =
    "payment_hash, session_id, kind, channel_id, amount_msat, delivered, reason, at";

impl Store {
    /// Records that LDK closed a channel. False when it was recorded before (a replay).
    pub fn record_closure(
        &self,
        channel_id: &[u8; 32],
        counterparty: &str,
        reason: &str,
        forced: bool,
    ) -> Result<bool, StoreError> {
        self.write(|tx| {
            let n = tx.execute(
                "INSERT OR IGNORE INTO channel_closures(channel_id, counterparty, reason, forced,
                     closed_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    channel_id.as_slice(),
                    counterparty,
                    reason,
                    forced as i64,
                    now_unix() as i64
                ],
            )?;
            if n > 0 {
                ledger::append(
                    tx,
                    if forced {
                        "channel_force_closed"
                    } else {
                        "channel_closed"
                    },
                    None,
                    None,
                    0,
                    &format!("{} with {counterparty}: {reason}", hex::encode(channel_id)),
                )?;
            }
            Ok(n > 0)
        })
    }

    pub fn unresolved_closures(&self) -> Result<Vec<ChannelClosure>, StoreError> {
        let c = self.lock();
        let mut st = c.prepare(&format!(
            "SELECT {CLOSURE_COLUMNS} FROM channel_closures WHERE resolved_at IS NULL ORDER BY rowid"
        ))?;
        let rows = st.query_map([], closure_row)?.collect::<Result<_, _>>()?;
        Ok(rows)
    }

    pub fn closures(&self) -> Result<Vec<ChannelClosure>, StoreError> {
        let c = self.lock();
        let mut st = c.prepare(&format!(
            "SELECT {CLOSURE_COLUMNS} FROM channel_closures ORDER BY rowid"
        ))?;
        let rows = st.query_map([], closure_row)?.collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// A closure's claims are all classified: records the losses found (in one transaction).
    pub fn resolve_closure(
        &self,
        channel_id: &[u8; 32],
        lost: &[([u8; 32], String)],
        detail: &str,
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            for (hash, reason) in lost {
                let Some(inv) = get_in(tx, hash)? else {
                    continue;
                };
                if inv.state != InvoiceState::Claimed {
                    continue;
                }
                let amount = inv.received_msat.unwrap_or(inv.amount_msat);
                let n = tx.execute(
                    "INSERT OR IGNORE INTO settlement_losses(payment_hash, session_id, kind,
                         channel_id, amount_msat, delivered, reason, at)
                     VALUES (?1, ?2, 'lost_on_chain', ?3, ?4, ?5, ?6, ?7)",
                    params![
                        hash.as_slice(),
                        inv.session_id.as_ref().map(|s| s.as_slice()),
                        channel_id.as_slice(),
                        amount as i64,
                        delivered_in(tx, &inv)? as i64,
                        reason,
                        now_unix() as i64
                    ],
                )?;
                if n > 0 {
                    ledger::append(
                        tx,
                        "settlement_lost",
                        inv.session_id.as_ref(),
                        Some(hash),
                        -(amount as i64),
                        reason,
                    )?;
                }
            }
            tx.execute(
                "UPDATE channel_closures SET resolved_at = ?2, detail = ?3
                 WHERE channel_id = ?1 AND resolved_at IS NULL",
                params![channel_id.as_slice(), now_unix() as i64, detail],
            )?;
            Ok(())
        })
    }

    /// A claim we decided and LDK never completed: `claiming → failed`, and when what it paid
    /// for was already delivered, the operator's loss (so the session's books balance: the
    /// customer paid nothing for it). One transaction.
    pub fn write_off_unsettled_claim(
        &self,
        hash: &[u8; 32],
        reason: &str,
    ) -> Result<Option<SettlementLoss>, StoreError> {
        self.write(|tx| {
            let Some(inv) = get_in(tx, hash)? else {
                return Ok(None);
            };
            if inv.state != InvoiceState::Claiming {
                return Ok(None);
            }
            transition_in(tx, hash, InvoiceState::Failed, None, reason)?;
            if !delivered_in(tx, &inv)? {
                return Ok(None);
            }
            tx.execute(
                "INSERT OR IGNORE INTO settlement_losses(payment_hash, session_id, kind,
                     amount_msat, delivered, reason, at)
                 VALUES (?1, ?2, 'never_settled', ?3, 1, ?4, ?5)",
                params![
                    hash.as_slice(),
                    inv.session_id.as_ref().map(|s| s.as_slice()),
                    inv.amount_msat as i64,
                    reason,
                    now_unix() as i64
                ],
            )?;
            // The operator pays for it: the customer's balance is as if it had been paid.
            tx.execute(
                "UPDATE sessions SET written_off_msat = written_off_msat + ?2 WHERE id = ?1",
                params![
                    inv.session_id.as_ref().map(|s| s.as_slice()),
                    inv.amount_msat as i64
                ],
            )?;
            ledger::append(
                tx,
                "settlement_lost",
                inv.session_id.as_ref(),
                Some(hash),
                -(inv.amount_msat as i64),
                reason,
            )?;
            Ok(tx
                .query_row(
                    &format!(
                        "SELECT {LOSS_COLUMNS} FROM settlement_losses WHERE payment_hash = ?1"
                    ),
                    [hash.as_slice()],
                    loss_row,
                )
                .ok())
        })
    }

    /// Records that the server started (the ledger's marker between runs).
    pub fn record_start(&self) -> Result<(), StoreError> {
        self.write(|tx| {
            ledger::append(
                tx,
                "server_started",
                None,
                None,
                0,
                env!("CARGO_PKG_VERSION"),
            )
        })
    }

    /// When money last moved before a channel's closure was recorded. For a closure LDK made
    /// while starting (a hard kill left its ChannelManager stale), that is the last activity
    /// of the previous run; for one during a run, the closure itself.
    pub fn last_activity_before_closure(&self, channel_id: &[u8; 32]) -> Result<u64, StoreError> {
        let c = self.lock();
        let closure: Option<(i64, i64)> = c
            .query_row(
                "SELECT seq, at FROM ledger WHERE kind LIKE 'channel%closed'
                 AND detail LIKE ?1 || '%' ORDER BY seq LIMIT 1",
                [hex::encode(channel_id)],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((seq, at)) = closure else {
            return Ok(now_unix());
        };
        let start: Option<(i64, i64)> = c
            .query_row(
                "SELECT seq, at FROM ledger WHERE kind = 'server_started' AND seq < ?1
                 ORDER BY seq DESC LIMIT 1",
                [seq],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        match start {
            // Closed while starting: look at the run before.
            Some((start_seq, start_at)) if at - start_at <= STARTUP_CLOSE_SECS => {
                let last: Option<i64> = c.query_row(
                    "SELECT MAX(at) FROM ledger WHERE seq < ?1 AND kind IN
                     ('invoice_claimed','chunk_delivered','claim_decided','htlc_held','keysend_credited')",
                    [start_seq],
                    |r| r.get(0),
                )?;
                Ok(last.unwrap_or(at) as u64)
            }
            _ => Ok(at as u64),
        }
    }

    /// Losses, newest first.
    pub fn settlement_losses(
        &self,
        page_size: u32,
        page_token: &str,
    ) -> Result<Page<SettlementLoss>, StoreError> {
        let offset = decode_page_token(page_token)?;
        let c = self.lock();
        let mut st = c.prepare(&format!(
            "SELECT {LOSS_COLUMNS} FROM settlement_losses ORDER BY at DESC, rowid DESC
             LIMIT ?1 OFFSET ?2"
        ))?;
        let rows = st
            .query_map(params![page_size as i64 + 1, offset as i64], loss_row)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(page(rows, offset, page_size))
    }

    /// Total of both kinds of loss, msat.
    pub fn total_lost_msat(&self) -> Result<u64, StoreError> {
        let v: i64 = self.read().query_row(
            "SELECT COALESCE(SUM(amount_msat), 0) FROM settlement_losses",
            [],
            |r| r.get(0),
        )?;
        Ok(v as u64)
    }
}

/// Whether what the invoice paid for was delivered: its chunk, or (a prompt invoice) the
/// prompt charge.
fn delivered_in(tx: &rusqlite::Transaction, inv: &super::Invoice) -> Result<bool, StoreError> {
    let n: i64 = match inv.purpose {
        super::InvoicePurpose::Prompt => tx.query_row(
            // Charges net of any taken back (a refused claim): charged if they sum below 0.
            "SELECT COALESCE(SUM(amount_msat) < 0, 0) FROM ledger
             WHERE session_id = ?1 AND kind = 'prompt_charged'",
            [inv.session_id.map(|s| s.to_vec())],
            |r| r.get(0),
        )?,
        _ => tx.query_row(
            "SELECT COUNT(*) FROM chunks WHERE payment_hash = ?1",
            [inv.payment_hash.as_slice()],
            |r| r.get(0),
        )?,
    };
    Ok(n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{test_store, ChunkDelivery, InvoicePurpose, NewInvoice};

    fn held_chunk(s: &Store, hash: [u8; 32], index: u32, received_msat: u64) -> ChunkDelivery {
        s.insert_invoice(&NewInvoice {
            payment_hash: hash,
            preimage: [6; 32],
            bolt11: "lnbcrt".into(),
            amount_msat: 16_000,
            session_id: Some([1; 16]),
            account_id: None,
            chunk_index: Some(index),
            purpose: InvoicePurpose::Chunk,
            expires_at_unix: now_unix() + 60,
        })
        .unwrap();
        s.transition_invoice(&hash, InvoiceState::Held, Some(received_msat), "")
            .unwrap();
        ChunkDelivery {
            session_id: [1; 16],
            chunk_index: index,
            first_token: index * 16,
            tokens: 16,
            price_msat: 16_000,
            payment_hash: Some(hash),
            prompt_msat: 0,
            account_id: None,
            text: String::new(),
        }
    }

    #[test]
    fn a_delivered_chunk_whose_claim_never_settles_is_written_off_and_books_balance() {
        let (s, _d) = test_store();
        s.insert_session(&crate::store::sessions::tests::new_session(1))
            .unwrap();
        // Chunk 0 overpaid by 5 000 msat and settled: the customer's refundable money.
        let d0 = held_chunk(&s, [4; 32], 0, 21_000);
        s.begin_claim(&[[4; 32]], Some(&d0)).unwrap();
        s.record_settlement(&[4; 32], 21_000).unwrap();
        let hash = [5; 32];
        let d1 = held_chunk(&s, hash, 1, 16_000);
        s.begin_claim(&[hash], Some(&d1)).unwrap();
        let loss = s
            .write_off_unsettled_claim(&hash, "claim never completed")
            .unwrap()
            .expect("a loss");
        assert_eq!((loss.amount_msat, loss.delivered), (16_000, true));
        assert_eq!(
            s.invoice(&hash).unwrap().unwrap().state,
            InvoiceState::Failed
        );
        let a = s.audit_session(&[1; 16]).unwrap();
        assert_eq!(a.balance_msat(), 5_000, "{a:?}");
        assert_eq!(s.total_lost_msat().unwrap(), 16_000);
        // One definition of refundable: the operator's loss is not paid from the customer's
        // overpayment (it was: Refund offered 0 while the audit said 5 000).
        let owner = crate::store::Owner::Session([1; 16]);
        assert_eq!(s.refundable_of(&owner).unwrap(), 5_000);
        assert_eq!(
            s.session(&[1; 16]).unwrap().unwrap().refundable_msat(),
            5_000
        );
        assert_eq!(s.total_refundable_msat().unwrap(), 5_000);
        // LDK reports the settlement after all: booked, and the write-off is undone.
        s.record_settlement(&hash, 16_000).unwrap();
        let a = s.audit_session(&[1; 16]).unwrap();
        assert_eq!(
            (a.claimed_msat, a.written_off_msat, a.balance_msat()),
            (37_000, 0, 5_000)
        );
        assert_eq!(s.refundable_of(&owner).unwrap(), 5_000);
    }
}
