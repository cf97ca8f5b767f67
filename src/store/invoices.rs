//! Invoices and their state machine.
//!
//! ```text
//!   open ──► held ──► claiming ──► claimed
//!    │         │          └──────► failed
//!    │         └─────────────────► failed
//!    ├──► expired
//!    └──► canceled
//! ```
//! `held`: the HTLC is locked in our channel and we have not decided yet. `claiming`: we
//! decided to claim and committed that decision *before* asking LDK to claim, so that after a
//! crash we know whether LDK may have claimed (a `held` invoice never was: LDK cannot claim
//! without our preimage, so it is safe to fail back). `claimed`: LDK reported the claim
//! (`PaymentReceived`); only then is the money counted as paid. `claiming → failed` happens
//! only when LDK refused the claim or never completed it. Final states never change, with one
//! logged exception ([`Store::record_settlement`]): LDK's own record of money received wins.
//! Re-applying the state an invoice is already in is a no-op (`Transition::Already`): LDK
//! replays events after a crash.

use rusqlite::{params, OptionalExtension, Row};
use std::fmt;

use super::{decode_page_token, ledger, now_unix, page, Page, Store, StoreError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InvoiceState {
    Open,
    Held,
    Claiming,
    Claimed,
    Failed,
    Expired,
    Canceled,
}

impl InvoiceState {
    pub const ALL: [InvoiceState; 7] = [
        InvoiceState::Open,
        InvoiceState::Held,
        InvoiceState::Claiming,
        InvoiceState::Claimed,
        InvoiceState::Failed,
        InvoiceState::Expired,
        InvoiceState::Canceled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            InvoiceState::Open => "open",
            InvoiceState::Held => "held",
            InvoiceState::Claiming => "claiming",
            InvoiceState::Claimed => "claimed",
            InvoiceState::Failed => "failed",
            InvoiceState::Expired => "expired",
            InvoiceState::Canceled => "canceled",
        }
    }

    pub fn parse(s: &str) -> Option<InvoiceState> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// The legal edges of the state machine.
    pub fn can_become(self, to: InvoiceState) -> bool {
        use InvoiceState::*;
        matches!(
            (self, to),
            (Open, Held)
                | (Open, Expired)
                | (Open, Canceled)
                | (Held, Claiming)
                | (Held, Failed)
                | (Claiming, Claimed)
                | (Claiming, Failed)
        )
    }

    pub fn is_final(self) -> bool {
        !matches!(
            self,
            InvoiceState::Open | InvoiceState::Held | InvoiceState::Claiming
        )
    }
}

impl fmt::Display for InvoiceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvoicePurpose {
    Chunk,
    Prompt,
    TopUp,
    /// Issued by tests and the harness, not tied to a generation.
    Test,
}

impl InvoicePurpose {
    pub fn as_str(self) -> &'static str {
        match self {
            InvoicePurpose::Chunk => "chunk",
            InvoicePurpose::Prompt => "prompt",
            InvoicePurpose::TopUp => "topup",
            InvoicePurpose::Test => "test",
        }
    }

    fn parse(s: &str) -> Option<InvoicePurpose> {
        [Self::Chunk, Self::Prompt, Self::TopUp, Self::Test]
            .into_iter()
            .find(|p| p.as_str() == s)
    }
}

#[derive(Debug, Clone)]
pub struct NewInvoice {
    pub payment_hash: [u8; 32],
    pub preimage: [u8; 32],
    pub bolt11: String,
    pub amount_msat: u64,
    pub session_id: Option<[u8; 16]>,
    /// TopUp invoices: the account credited when it is paid.
    pub account_id: Option<[u8; 16]>,
    pub chunk_index: Option<u32>,
    pub purpose: InvoicePurpose,
    pub expires_at_unix: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invoice {
    pub payment_hash: [u8; 32],
    pub preimage: [u8; 32],
    pub bolt11: String,
    pub amount_msat: u64,
    /// What the payer's HTLCs carried (≥ amount); set once held.
    pub received_msat: Option<u64>,
    pub session_id: Option<[u8; 16]>,
    pub account_id: Option<[u8; 16]>,
    pub chunk_index: Option<u32>,
    pub purpose: InvoicePurpose,
    pub state: InvoiceState,
    pub created_at_unix: u64,
    pub expires_at_unix: u64,
    pub held_at_unix: Option<u64>,
    pub claiming_at_unix: Option<u64>,
    pub paid_at_unix: Option<u64>,
    pub resolved_at_unix: Option<u64>,
}

/// Outcome of a state change request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// The invoice moved to the requested state (committed, with its ledger entry).
    Applied(Invoice),
    /// It was already in that state: nothing written (an event replay).
    Already(Invoice),
}

impl Transition {
    pub fn invoice(&self) -> &Invoice {
        match self {
            Transition::Applied(i) | Transition::Already(i) => i,
        }
    }
}

const COLUMNS: &str = "payment_hash, preimage, bolt11, amount_msat, received_msat, session_id, \
     chunk_index, purpose, state, created_at, expires_at, held_at, paid_at, resolved_at, \
     account_id, claiming_at";

fn blob<const N: usize>(v: Vec<u8>, what: &str) -> rusqlite::Result<[u8; N]> {
    v.try_into().map_err(|_| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Blob,
            format!("{what} has the wrong length").into(),
        )
    })
}

fn from_row(r: &Row<'_>) -> rusqlite::Result<Invoice> {
    let conv = |what: &str| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Text,
            format!("bad {what}").into(),
        )
    };
    let sid: Option<Vec<u8>> = r.get(5)?;
    let aid: Option<Vec<u8>> = r.get(14)?;
    Ok(Invoice {
        payment_hash: blob(r.get(0)?, "payment_hash")?,
        preimage: blob(r.get(1)?, "preimage")?,
        bolt11: r.get(2)?,
        amount_msat: r.get::<_, i64>(3)? as u64,
        received_msat: r.get::<_, Option<i64>>(4)?.map(|v| v as u64),
        session_id: sid.map(|v| blob(v, "session_id")).transpose()?,
        account_id: aid.map(|v| blob(v, "account_id")).transpose()?,
        chunk_index: r.get(6)?,
        purpose: InvoicePurpose::parse(&r.get::<_, String>(7)?).ok_or_else(|| conv("purpose"))?,
        state: InvoiceState::parse(&r.get::<_, String>(8)?).ok_or_else(|| conv("state"))?,
        created_at_unix: r.get::<_, i64>(9)? as u64,
        expires_at_unix: r.get::<_, i64>(10)? as u64,
        held_at_unix: r.get::<_, Option<i64>>(11)?.map(|v| v as u64),
        claiming_at_unix: r.get::<_, Option<i64>>(15)?.map(|v| v as u64),
        paid_at_unix: r.get::<_, Option<i64>>(12)?.map(|v| v as u64),
        resolved_at_unix: r.get::<_, Option<i64>>(13)?.map(|v| v as u64),
    })
}

pub(super) fn get_in(
    c: &rusqlite::Connection,
    hash: &[u8; 32],
) -> Result<Option<Invoice>, StoreError> {
    Ok(c.query_row(
        &format!("SELECT {COLUMNS} FROM invoices WHERE payment_hash = ?1"),
        [hash.as_slice()],
        from_row,
    )
    .optional()?)
}

impl Store {
    pub fn insert_invoice(&self, new: &NewInvoice) -> Result<Invoice, StoreError> {
        let mut c = self.lock();
        let tx = c.transaction()?;
        tx.execute(
            "INSERT INTO invoices(payment_hash, preimage, bolt11, amount_msat, session_id,
                 chunk_index, purpose, state, created_at, expires_at, account_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'open', ?8, ?9, ?10)",
            params![
                new.payment_hash.as_slice(),
                new.preimage.as_slice(),
                new.bolt11,
                new.amount_msat as i64,
                new.session_id.as_ref().map(|s| s.as_slice()),
                new.chunk_index,
                new.purpose.as_str(),
                now_unix() as i64,
                new.expires_at_unix as i64,
                new.account_id.as_ref().map(|a| a.as_slice()),
            ],
        )?;
        ledger::append(
            &tx,
            "invoice_created",
            new.session_id.as_ref(),
            Some(&new.payment_hash),
            0,
            &format!("{} msat, {}", new.amount_msat, new.purpose.as_str()),
        )?;
        let inv = get_in(&tx, &new.payment_hash)?
            .ok_or_else(|| StoreError::Corrupt("invoice vanished".into()))?;
        tx.commit()?;
        Ok(inv)
    }

    pub fn invoice(&self, hash: &[u8; 32]) -> Result<Option<Invoice>, StoreError> {
        get_in(&self.lock(), hash)
    }

    /// Moves an invoice to `to` in one transaction with its ledger entry (the generic edge;
    /// the money-moving steps have their own functions below).
    ///
    /// `received_msat` is required for `Held` (what the HTLCs carry).
    pub fn transition_invoice(
        &self,
        hash: &[u8; 32],
        to: InvoiceState,
        received_msat: Option<u64>,
        detail: &str,
    ) -> Result<Transition, StoreError> {
        self.write(|tx| transition_in(tx, hash, to, received_msat, detail))
    }

    /// Commits the decision to claim these held invoices, and with it the delivery of what
    /// they pay for (one transaction), before LDK is asked to claim them. In ATOMIC the claim
    /// *is* the delivery (it reveals the chunk key), so the chunk is recorded delivered no
    /// later than the decision; in BOLT11 it also keeps a claimed chunk's price from ever
    /// looking refundable while the session runs (delivery is charged before LDK reports the
    /// money). Already `claiming` ones are left as they are (a retry).
    pub fn begin_claim(
        &self,
        hashes: &[[u8; 32]],
        delivery: Option<&super::ChunkDelivery>,
    ) -> Result<Vec<Invoice>, StoreError> {
        self.write(|tx| {
            let decided = hashes
                .iter()
                .map(|h| {
                    transition_in(tx, h, InvoiceState::Claiming, None, "claim decided")
                        .map(|t| t.invoice().clone())
                })
                .collect::<Result<Vec<_>, _>>()?;
            if let Some(d) = delivery {
                super::sessions::deliver_in(tx, d)?;
            }
            Ok(decided)
        })
    }

    /// LDK refused claims we had decided: `claiming → failed` for each, and the delivery
    /// committed with the decision is taken back (its text or key never left: the claim did
    /// not happen), in one transaction.
    pub fn claim_refused(
        &self,
        hashes: &[[u8; 32]],
        delivery: Option<&super::ChunkDelivery>,
        reason: &str,
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            for h in hashes {
                transition_in(tx, h, InvoiceState::Failed, None, reason)?;
            }
            if let Some(d) = delivery {
                super::sessions::undeliver_in(tx, d, reason)?;
            }
            Ok(())
        })
    }

    /// LDK reports money received for one of our invoices (`PaymentReceived`, after a claim):
    /// the one place where an invoice becomes `claimed` and its money is credited (to its
    /// session, or its account for a TopUp). Idempotent (events are replayed).
    ///
    /// What LDK recorded is the truth: a settlement of an invoice we never decided to claim, or
    /// had failed, is still booked (as refundable money of its owner), loudly.
    pub fn record_settlement(
        &self,
        hash: &[u8; 32],
        amount_msat: u64,
    ) -> Result<Settlement, StoreError> {
        self.write(|tx| {
            let inv = get_in(tx, hash)?.ok_or_else(|| StoreError::NotFound {
                what: "invoice",
                id: hex::encode(hash),
            })?;
            let unexpected = match inv.state {
                InvoiceState::Claimed => return Ok(Settlement::Already(inv)),
                InvoiceState::Claiming => None,
                InvoiceState::Open | InvoiceState::Held => {
                    Some("LDK claimed without a recorded decision")
                }
                InvoiceState::Failed | InvoiceState::Expired | InvoiceState::Canceled => {
                    Some("LDK settled an invoice we had resolved otherwise")
                }
            };
            let now = now_unix() as i64;
            tx.execute(
                "UPDATE invoices SET state = 'claimed', received_msat = ?2, paid_at = ?3,
                     resolved_at = ?3, claiming_at = COALESCE(claiming_at, ?3)
                 WHERE payment_hash = ?1",
                params![hash.as_slice(), amount_msat as i64, now],
            )?;
            credit_owner(tx, &inv, amount_msat)?;
            // A chunk written off as never paid turns out paid after all.
            let written_off: Option<i64> = tx
                .query_row(
                    "DELETE FROM settlement_losses WHERE payment_hash = ?1 AND kind = 'never_settled'
                     RETURNING amount_msat",
                    [hash.as_slice()],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(amount) = written_off {
                tx.execute(
                    "UPDATE sessions SET written_off_msat = written_off_msat - ?2 WHERE id = ?1",
                    params![inv.session_id.as_ref().map(|s| s.as_slice()), amount],
                )?;
                ledger::append(
                    tx,
                    "loss_recovered",
                    inv.session_id.as_ref(),
                    Some(hash),
                    0,
                    "",
                )?;
            }
            let detail = unexpected
                .map(|u| format!("{u} (was {})", inv.state))
                .unwrap_or_default();
            ledger::append(
                tx,
                if unexpected.is_some() {
                    "settled_against_decision"
                } else {
                    "invoice_claimed"
                },
                inv.session_id.as_ref(),
                Some(hash),
                amount_msat as i64,
                &detail,
            )?;
            let updated =
                get_in(tx, hash)?.ok_or_else(|| StoreError::Corrupt("invoice vanished".into()))?;
            Ok(match unexpected {
                None => Settlement::Recorded(updated),
                Some(_) => Settlement::Unexpected {
                    was: inv.state,
                    invoice: updated,
                },
            })
        })
    }

    /// Records that an HTLC for a payment hash we cannot honour (unknown, or its invoice is
    /// already final) was failed back. The invoice, if any, keeps its state.
    pub fn record_rejected_htlc(
        &self,
        hash: &[u8; 32],
        amount_msat: u64,
        reason: &str,
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            let sid = get_in(tx, hash)?.and_then(|i| i.session_id);
            ledger::append(
                tx,
                "htlc_rejected",
                sid.as_ref(),
                Some(hash),
                0,
                &format!("{amount_msat} msat: {reason}"),
            )
        })
    }

    /// Invoices, newest first, optionally filtered by state and session.
    pub fn list_invoices(
        &self,
        page_size: u32,
        page_token: &str,
        state: Option<InvoiceState>,
        session_id: Option<&[u8; 16]>,
    ) -> Result<Page<Invoice>, StoreError> {
        let offset = decode_page_token(page_token)?;
        let c = self.read();
        let mut st = c.prepare(&format!(
            "SELECT {COLUMNS} FROM invoices
             WHERE (?1 IS NULL OR state = ?1) AND (?2 IS NULL OR session_id = ?2)
             ORDER BY created_at DESC, rowid DESC LIMIT ?3 OFFSET ?4"
        ))?;
        let rows = st
            .query_map(
                params![
                    state.map(|s| s.as_str()),
                    session_id.map(|s| s.as_slice()),
                    page_size as i64 + 1,
                    offset as i64
                ],
                from_row,
            )?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(page(rows, offset, page_size))
    }

    /// How many invoices are in each state.
    pub fn invoice_counts(&self) -> Result<Vec<(InvoiceState, u64)>, StoreError> {
        let c = self.read();
        let mut st = c.prepare("SELECT state, COUNT(*) FROM invoices GROUP BY state")?;
        let rows = st
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(InvoiceState::ALL
            .iter()
            .map(|s| {
                let n = rows
                    .iter()
                    .find(|(k, _)| k == s.as_str())
                    .map_or(0, |r| r.1);
                (*s, n as u64)
            })
            .collect())
    }

    /// Invoices still open, held or claiming: what must be resolved at start-up.
    pub fn unresolved_invoices(&self) -> Result<Vec<Invoice>, StoreError> {
        self.invoices_where("state IN ('open', 'held', 'claiming')", &[])
    }

    /// Open invoices whose expiry has passed (`now_unix` > expires_at), oldest first, at most
    /// `limit`: what the sweeper withdraws.
    pub fn expired_open_invoices(
        &self,
        now_unix: u64,
        limit: u32,
    ) -> Result<Vec<Invoice>, StoreError> {
        let c = self.lock();
        let mut st = c.prepare(&format!(
            "SELECT {COLUMNS} FROM invoices WHERE state = 'open' AND expires_at < ?1
             ORDER BY rowid LIMIT ?2"
        ))?;
        let rows = st
            .query_map(params![now_unix as i64, limit as i64], from_row)?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// Invoices in `state`, oldest first.
    pub fn invoices_in(&self, state: InvoiceState) -> Result<Vec<Invoice>, StoreError> {
        self.invoices_where("state = ?1", &[&state.as_str()])
    }

    /// Invoices LDK reported claimed since `since_unix` (settlements a force close may undo).
    pub fn claimed_since(&self, since_unix: u64) -> Result<Vec<Invoice>, StoreError> {
        self.invoices_where(
            "state = 'claimed' AND paid_at >= ?1",
            &[&(since_unix as i64)],
        )
    }

    fn invoices_where(
        &self,
        filter: &str,
        args: &[&dyn rusqlite::ToSql],
    ) -> Result<Vec<Invoice>, StoreError> {
        let c = self.lock();
        let mut st = c.prepare(&format!(
            "SELECT {COLUMNS} FROM invoices WHERE {filter} ORDER BY rowid"
        ))?;
        let rows = st.query_map(args, from_row)?.collect::<Result<_, _>>()?;
        Ok(rows)
    }
}

/// What [`Store::record_settlement`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    /// `claiming → claimed`, money credited to the owner.
    Recorded(Invoice),
    /// Already claimed: a replayed event, nothing written.
    Already(Invoice),
    /// LDK settled an invoice we had not decided to claim (state `was`): booked anyway.
    Unexpected { was: InvoiceState, invoice: Invoice },
}

/// Credits money LDK received for `inv` to its owner: the session (paid) or the account
/// (credited).
fn credit_owner(
    tx: &rusqlite::Transaction,
    inv: &Invoice,
    amount_msat: u64,
) -> Result<(), StoreError> {
    if let Some(aid) = &inv.account_id {
        tx.execute(
            "UPDATE accounts SET credited_msat = credited_msat + ?2 WHERE id = ?1",
            params![aid.as_slice(), amount_msat as i64],
        )?;
        ledger::append_account(
            tx,
            "account_credited",
            aid,
            Some(&inv.payment_hash),
            amount_msat as i64,
            "",
        )?;
    } else if let Some(sid) = &inv.session_id {
        tx.execute(
            "UPDATE sessions SET paid_msat = paid_msat + ?2 WHERE id = ?1",
            params![sid.as_slice(), amount_msat as i64],
        )?;
    }
    Ok(())
}

/// The state change of one invoice, inside the caller's transaction. Money is never moved
/// here: `claimed` is reached only through [`Store::record_settlement`].
pub(super) fn transition_in(
    tx: &rusqlite::Transaction,
    hash: &[u8; 32],
    to: InvoiceState,
    received_msat: Option<u64>,
    detail: &str,
) -> Result<Transition, StoreError> {
    let inv = get_in(tx, hash)?.ok_or_else(|| StoreError::NotFound {
        what: "invoice",
        id: hex::encode(hash),
    })?;
    if inv.state == to {
        return Ok(Transition::Already(inv));
    }
    if !inv.state.can_become(to) || to == InvoiceState::Claimed {
        return Err(StoreError::IllegalTransition {
            hash: hex::encode(hash),
            from: inv.state,
            to,
        });
    }
    let now = now_unix() as i64;
    let kind = match to {
        InvoiceState::Held => {
            let got = received_msat.unwrap_or(inv.amount_msat);
            tx.execute(
                "UPDATE invoices SET state = 'held', received_msat = ?2, held_at = ?3
                     WHERE payment_hash = ?1",
                params![hash.as_slice(), got as i64, now],
            )?;
            "htlc_held"
        }
        InvoiceState::Claiming => {
            tx.execute(
                "UPDATE invoices SET state = 'claiming', claiming_at = ?2 WHERE payment_hash = ?1",
                params![hash.as_slice(), now],
            )?;
            "claim_decided"
        }
        InvoiceState::Failed | InvoiceState::Expired | InvoiceState::Canceled => {
            tx.execute(
                "UPDATE invoices SET state = ?2, resolved_at = ?3 WHERE payment_hash = ?1",
                params![hash.as_slice(), to.as_str(), now],
            )?;
            match to {
                InvoiceState::Failed => "htlc_failed",
                InvoiceState::Expired => "invoice_expired",
                _ => "invoice_canceled",
            }
        }
        InvoiceState::Open | InvoiceState::Claimed => unreachable!("checked above"),
    };
    ledger::append(tx, kind, inv.session_id.as_ref(), Some(hash), 0, detail)?;
    let updated =
        get_in(tx, hash)?.ok_or_else(|| StoreError::Corrupt("invoice vanished".into()))?;
    Ok(Transition::Applied(updated))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_store;
    use InvoiceState::*;

    fn new_invoice(n: u8, amount: u64) -> NewInvoice {
        NewInvoice {
            payment_hash: [n; 32],
            preimage: [n.wrapping_add(100); 32],
            bolt11: format!("lnbcrt{n}"),
            amount_msat: amount,
            session_id: None,
            account_id: None,
            chunk_index: Some(n as u32),
            purpose: InvoicePurpose::Test,
            expires_at_unix: now_unix() + 600,
        }
    }

    #[test]
    fn state_machine_edges_are_exactly_the_documented_ones() {
        let legal = [
            (Open, Held),
            (Open, Expired),
            (Open, Canceled),
            (Held, Claiming),
            (Held, Failed),
            (Claiming, Claimed),
            (Claiming, Failed),
        ];
        for from in InvoiceState::ALL {
            for to in InvoiceState::ALL {
                assert_eq!(
                    from.can_become(to),
                    legal.contains(&(from, to)),
                    "{from} -> {to}"
                );
            }
        }
    }

    #[test]
    fn happy_path_open_held_claiming_claimed_with_ledger() {
        let (s, _d) = test_store();
        let inv = s.insert_invoice(&new_invoice(1, 16_000)).unwrap();
        assert_eq!(inv.state, Open);
        let t = s
            .transition_invoice(&inv.payment_hash, Held, Some(16_000), "")
            .unwrap();
        assert!(
            matches!(t, Transition::Applied(ref i) if i.state == Held && i.received_msat == Some(16_000))
        );
        let c = s.begin_claim(&[inv.payment_hash], None).unwrap();
        assert_eq!(c[0].state, Claiming);
        assert!(c[0].claiming_at_unix.is_some() && c[0].paid_at_unix.is_none());
        let t = s.record_settlement(&inv.payment_hash, 16_000).unwrap();
        assert!(
            matches!(t, Settlement::Recorded(ref i) if i.state == Claimed && i.paid_at_unix.is_some())
        );
        let kinds: Vec<_> = s
            .ledger_for_payment(&inv.payment_hash)
            .unwrap()
            .into_iter()
            .map(|e| (e.kind, e.amount_msat))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("invoice_created".to_string(), 0),
                ("htlc_held".to_string(), 0),
                ("claim_decided".to_string(), 0),
                ("invoice_claimed".to_string(), 16_000)
            ]
        );
    }

    #[test]
    fn replays_are_noops_and_write_nothing() {
        let (s, _d) = test_store();
        let inv = s.insert_invoice(&new_invoice(2, 5_000)).unwrap();
        s.transition_invoice(&inv.payment_hash, Held, Some(5_000), "")
            .unwrap();
        let before = s.ledger().unwrap().len();
        let again = s
            .transition_invoice(&inv.payment_hash, Held, Some(5_000), "")
            .unwrap();
        assert!(matches!(again, Transition::Already(_)));
        s.begin_claim(&[inv.payment_hash], None).unwrap();
        s.begin_claim(&[inv.payment_hash], None).unwrap();
        s.record_settlement(&inv.payment_hash, 5_000).unwrap();
        let again = s.record_settlement(&inv.payment_hash, 5_000).unwrap();
        assert!(matches!(again, Settlement::Already(_)));
        assert_eq!(s.ledger().unwrap().len(), before + 2);
    }

    #[test]
    fn illegal_transitions_are_rejected_and_change_nothing() {
        let (s, _d) = test_store();
        let inv = s.insert_invoice(&new_invoice(3, 1_000)).unwrap();
        // Deciding to claim what was never held; claiming by transition (only LDK's report
        // of the settlement makes an invoice claimed).
        for to in [Claiming, Claimed] {
            let err = s
                .transition_invoice(&inv.payment_hash, to, None, "")
                .unwrap_err();
            assert!(matches!(
                err,
                StoreError::IllegalTransition { from: Open, .. }
            ));
        }
        s.transition_invoice(&inv.payment_hash, Held, Some(1_000), "")
            .unwrap();
        s.transition_invoice(&inv.payment_hash, Failed, None, "")
            .unwrap();
        // A failed HTLC can never be decided for a claim, nor be held again.
        for to in [Claiming, Claimed, Held, Open, Canceled] {
            assert!(
                s.transition_invoice(&inv.payment_hash, to, None, "")
                    .is_err(),
                "failed -> {to} must be rejected"
            );
        }
        assert_eq!(s.invoice(&inv.payment_hash).unwrap().unwrap().state, Failed);
    }

    /// LDK is the truth: money it reports received for an invoice we had failed is booked
    /// (as the owner's refundable money), never dropped and never booked as something else.
    #[test]
    fn a_settlement_against_our_decision_is_still_booked_to_its_owner() {
        let (s, _d) = test_store();
        s.insert_session(&crate::store::sessions::tests::new_session(1))
            .unwrap();
        let mut n = new_invoice(4, 2_000);
        n.session_id = Some([1; 16]);
        let inv = s.insert_invoice(&n).unwrap();
        s.transition_invoice(&inv.payment_hash, Held, Some(2_000), "")
            .unwrap();
        s.transition_invoice(&inv.payment_hash, Failed, None, "restart")
            .unwrap();
        let t = s.record_settlement(&inv.payment_hash, 2_000).unwrap();
        assert!(
            matches!(t, Settlement::Unexpected { was: Failed, .. }),
            "{t:?}"
        );
        let sess = s.session(&[1; 16]).unwrap().unwrap();
        assert_eq!((sess.paid_msat, sess.refundable_msat()), (2_000, 2_000));
        assert_eq!(s.audit_session(&[1; 16]).unwrap().claimed_msat, 2_000);
        assert!(s
            .ledger()
            .unwrap()
            .iter()
            .all(|e| !e.kind.starts_with("keysend")));
    }

    #[test]
    fn unknown_invoice_is_not_found() {
        let (s, _d) = test_store();
        let err = s
            .transition_invoice(&[9; 32], Held, Some(1), "")
            .unwrap_err();
        assert!(matches!(err, StoreError::NotFound { .. }));
    }

    #[test]
    fn list_pages_and_filters() {
        let (s, _d) = test_store();
        for n in 0..5 {
            s.insert_invoice(&new_invoice(n, 1_000 + n as u64)).unwrap();
        }
        s.transition_invoice(&[0; 32], Held, Some(1_000), "")
            .unwrap();
        let p1 = s.list_invoices(2, "", None, None).unwrap();
        assert_eq!(p1.items.len(), 2);
        let p2 = s
            .list_invoices(2, p1.next_page_token.as_deref().unwrap(), None, None)
            .unwrap();
        let p3 = s
            .list_invoices(2, p2.next_page_token.as_deref().unwrap(), None, None)
            .unwrap();
        assert_eq!(p3.items.len(), 1);
        assert!(p3.next_page_token.is_none());
        let mut all: Vec<_> = [p1.items, p2.items, p3.items].concat();
        all.sort_by_key(|i| i.payment_hash);
        all.dedup_by_key(|i| i.payment_hash);
        assert_eq!(all.len(), 5, "pages overlap or miss rows");
        let held = s.list_invoices(10, "", Some(Held), None).unwrap();
        assert_eq!(held.items.len(), 1);
        assert_eq!(held.items[0].payment_hash, [0; 32]);
        assert!(matches!(
            s.list_invoices(2, "nope", None, None),
            Err(StoreError::BadPageToken)
        ));
    }
}
