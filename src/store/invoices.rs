//! Invoices and their state machine.
//!
//! ```text
//!   open ──► held ──► claimed
//!    │         └────► failed
//!    ├──► expired
//!    └──► canceled
//! ```
//! `held` means the HTLC is locked in our channel and we have not decided yet. Only a held
//! invoice can be claimed or failed; final states never change. Re-applying the state an
//! invoice is already in is a no-op (`Transition::Already`): LDK replays events after a crash.

use rusqlite::{params, OptionalExtension, Row};
use std::fmt;

use super::{decode_page_token, ledger, now_unix, page, Page, Store, StoreError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InvoiceState {
    Open,
    Held,
    Claimed,
    Failed,
    Expired,
    Canceled,
}

impl InvoiceState {
    pub const ALL: [InvoiceState; 6] = [
        InvoiceState::Open,
        InvoiceState::Held,
        InvoiceState::Claimed,
        InvoiceState::Failed,
        InvoiceState::Expired,
        InvoiceState::Canceled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            InvoiceState::Open => "open",
            InvoiceState::Held => "held",
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
            (Open, Held) | (Open, Expired) | (Open, Canceled) | (Held, Claimed) | (Held, Failed)
        )
    }

    pub fn is_final(self) -> bool {
        !matches!(self, InvoiceState::Open | InvoiceState::Held)
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
    pub chunk_index: Option<u32>,
    pub purpose: InvoicePurpose,
    pub state: InvoiceState,
    pub created_at_unix: u64,
    pub expires_at_unix: u64,
    pub held_at_unix: Option<u64>,
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
     chunk_index, purpose, state, created_at, expires_at, held_at, paid_at, resolved_at";

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
    Ok(Invoice {
        payment_hash: blob(r.get(0)?, "payment_hash")?,
        preimage: blob(r.get(1)?, "preimage")?,
        bolt11: r.get(2)?,
        amount_msat: r.get::<_, i64>(3)? as u64,
        received_msat: r.get::<_, Option<i64>>(4)?.map(|v| v as u64),
        session_id: sid.map(|v| blob(v, "session_id")).transpose()?,
        chunk_index: r.get(6)?,
        purpose: InvoicePurpose::parse(&r.get::<_, String>(7)?).ok_or_else(|| conv("purpose"))?,
        state: InvoiceState::parse(&r.get::<_, String>(8)?).ok_or_else(|| conv("state"))?,
        created_at_unix: r.get::<_, i64>(9)? as u64,
        expires_at_unix: r.get::<_, i64>(10)? as u64,
        held_at_unix: r.get::<_, Option<i64>>(11)?.map(|v| v as u64),
        paid_at_unix: r.get::<_, Option<i64>>(12)?.map(|v| v as u64),
        resolved_at_unix: r.get::<_, Option<i64>>(13)?.map(|v| v as u64),
    })
}

fn get_in(c: &rusqlite::Connection, hash: &[u8; 32]) -> Result<Option<Invoice>, StoreError> {
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
                 chunk_index, purpose, state, created_at, expires_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'open', ?8, ?9)",
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

    /// Moves an invoice to `to` in one transaction with its ledger entry.
    ///
    /// `received_msat` is required for `Held` (what the HTLCs carry). Claiming credits the
    /// received amount to the invoice's session (`paid_msat`); an overpayment therefore shows
    /// up as refundable balance rather than vanishing.
    pub fn transition_invoice(
        &self,
        hash: &[u8; 32],
        to: InvoiceState,
        received_msat: Option<u64>,
        detail: &str,
    ) -> Result<Transition, StoreError> {
        let mut c = self.lock();
        let tx = c.transaction()?;
        let t = transition_in(&tx, hash, to, received_msat, detail)?;
        tx.commit()?;
        Ok(t)
    }

    /// Claims a held invoice and records the delivery of its chunk, if any, in one commit
    /// (one fsync on the payment path instead of two).
    pub fn claim_and_deliver(
        &self,
        hash: &[u8; 32],
        delivery: Option<&super::ChunkDelivery>,
    ) -> Result<Transition, StoreError> {
        let mut c = self.lock();
        let tx = c.transaction()?;
        let t = transition_in(&tx, hash, InvoiceState::Claimed, None, "claimed")?;
        if let Some(d) = delivery {
            super::sessions::deliver_in(&tx, d)?;
        }
        tx.commit()?;
        Ok(t)
    }

    /// Records that an HTLC for a payment hash we cannot honour (unknown, or its invoice is
    /// already final) was failed back. The invoice, if any, keeps its state.
    pub fn record_rejected_htlc(
        &self,
        hash: &[u8; 32],
        amount_msat: u64,
        reason: &str,
    ) -> Result<(), StoreError> {
        let mut c = self.lock();
        let tx = c.transaction()?;
        let sid = get_in(&tx, hash)?.and_then(|i| i.session_id);
        ledger::append(
            &tx,
            "htlc_rejected",
            sid.as_ref(),
            Some(hash),
            0,
            &format!("{amount_msat} msat: {reason}"),
        )?;
        tx.commit()?;
        Ok(())
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
        let c = self.lock();
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

    /// Invoices still open or held: what must be resolved at start-up and shutdown.
    pub fn unresolved_invoices(&self) -> Result<Vec<Invoice>, StoreError> {
        let c = self.lock();
        let mut st = c.prepare(&format!(
            "SELECT {COLUMNS} FROM invoices WHERE state IN ('open', 'held') ORDER BY rowid"
        ))?;
        let rows = st.query_map([], from_row)?.collect::<Result<_, _>>()?;
        Ok(rows)
    }
}

/// The state change of one invoice, inside the caller's transaction.
fn transition_in(
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
    if !inv.state.can_become(to) {
        return Err(StoreError::IllegalTransition {
            hash: hex::encode(hash),
            from: inv.state,
            to,
        });
    }
    let now = now_unix() as i64;
    let (kind, amount): (&str, i64) = match to {
        InvoiceState::Held => {
            let got = received_msat.unwrap_or(inv.amount_msat);
            tx.execute(
                "UPDATE invoices SET state = 'held', received_msat = ?2, held_at = ?3
                     WHERE payment_hash = ?1",
                params![hash.as_slice(), got as i64, now],
            )?;
            ("htlc_held", 0)
        }
        InvoiceState::Claimed => {
            let got = inv.received_msat.unwrap_or(inv.amount_msat) as i64;
            tx.execute(
                "UPDATE invoices SET state = 'claimed', paid_at = ?2, resolved_at = ?2
                     WHERE payment_hash = ?1",
                params![hash.as_slice(), now],
            )?;
            if let Some(sid) = &inv.session_id {
                tx.execute(
                    "UPDATE sessions SET paid_msat = paid_msat + ?2 WHERE id = ?1",
                    params![sid.as_slice(), got],
                )?;
            }
            ("invoice_claimed", got)
        }
        InvoiceState::Failed | InvoiceState::Expired | InvoiceState::Canceled => {
            tx.execute(
                "UPDATE invoices SET state = ?2, resolved_at = ?3 WHERE payment_hash = ?1",
                params![hash.as_slice(), to.as_str(), now],
            )?;
            match to {
                InvoiceState::Failed => ("htlc_failed", 0),
                InvoiceState::Expired => ("invoice_expired", 0),
                _ => ("invoice_canceled", 0),
            }
        }
        InvoiceState::Open => unreachable!("no edge leads back to open"),
    };
    ledger::append(
        tx,
        kind,
        inv.session_id.as_ref(),
        Some(hash),
        amount,
        detail,
    )?;
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
            (Held, Claimed),
            (Held, Failed),
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
    fn happy_path_open_held_claimed_with_ledger() {
        let (s, _d) = test_store();
        let inv = s.insert_invoice(&new_invoice(1, 16_000)).unwrap();
        assert_eq!(inv.state, Open);
        let t = s
            .transition_invoice(&inv.payment_hash, Held, Some(16_000), "")
            .unwrap();
        assert!(
            matches!(t, Transition::Applied(ref i) if i.state == Held && i.received_msat == Some(16_000))
        );
        let t = s
            .transition_invoice(&inv.payment_hash, Claimed, None, "")
            .unwrap();
        assert!(
            matches!(t, Transition::Applied(ref i) if i.state == Claimed && i.paid_at_unix.is_some())
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
        s.transition_invoice(&inv.payment_hash, Claimed, None, "")
            .unwrap();
        let again = s
            .transition_invoice(&inv.payment_hash, Claimed, None, "")
            .unwrap();
        assert!(matches!(again, Transition::Already(_)));
        assert_eq!(s.ledger().unwrap().len(), before + 1);
    }

    #[test]
    fn illegal_transitions_are_rejected_and_change_nothing() {
        let (s, _d) = test_store();
        let inv = s.insert_invoice(&new_invoice(3, 1_000)).unwrap();
        // Claiming what was never held.
        let err = s
            .transition_invoice(&inv.payment_hash, Claimed, None, "")
            .unwrap_err();
        assert!(matches!(
            err,
            StoreError::IllegalTransition {
                from: Open,
                to: Claimed,
                ..
            }
        ));
        s.transition_invoice(&inv.payment_hash, Held, Some(1_000), "")
            .unwrap();
        s.transition_invoice(&inv.payment_hash, Failed, None, "")
            .unwrap();
        // A failed HTLC can never become claimed, nor be held again.
        for to in [Claimed, Held, Open, Canceled] {
            assert!(
                s.transition_invoice(&inv.payment_hash, to, None, "")
                    .is_err(),
                "failed -> {to} must be rejected"
            );
        }
        assert_eq!(s.invoice(&inv.payment_hash).unwrap().unwrap().state, Failed);
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
