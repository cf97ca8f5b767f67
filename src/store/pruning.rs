//! What ldk-node may forget: payments final in the ledger for longer than the retention
//! window, and the mark that it did forget them (see `lightning::pruning`).

use rusqlite::params;

use super::{now_unix, Store, StoreError};

/// Which of our records a payment is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaymentRecord {
    /// An invoice we issued (chunk, prompt, top-up), in a final state.
    Invoice,
    /// A keysend we received.
    Keysend,
    /// A refund we sent, succeeded or failed.
    Refund,
}

impl PaymentRecord {
    fn table(self) -> &'static str {
        match self {
            PaymentRecord::Invoice => "invoices",
            PaymentRecord::Keysend => "keysend_credits",
            PaymentRecord::Refund => "refunds",
        }
    }
}

/// A payment final in the ledger whose LDK record may be removed, with what LDK's record must
/// say for that to be safe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prunable {
    pub payment_hash: [u8; 32],
    pub record: PaymentRecord,
    /// Some(amount): LDK must report it succeeded with this amount (msat; for a refund, the
    /// amount we sent). None: LDK must report it failed (or not have it).
    pub succeeded_msat: Option<u64>,
}

/// Per kind: the final records older than ?1 not yet pruned (at most ?2, oldest first), as
/// (payment hash, what LDK must report received or sent; NULL: failed). Each WHERE clause is
/// its table's partial index's, so the query never scans history (`+state`: SQLite would
/// otherwise take the state index, every final record ever; see store::plans).
const PRUNABLE: [(PaymentRecord, &str); 3] = [
    (
        PaymentRecord::Invoice,
        "SELECT payment_hash, CASE WHEN state = 'claimed' THEN COALESCE(received_msat, 0) END
         FROM invoices
         WHERE ldk_pruned_at IS NULL AND resolved_at IS NOT NULL AND resolved_at < ?1
           AND +state IN ('claimed', 'failed', 'expired', 'canceled')
         ORDER BY resolved_at LIMIT ?2",
    ),
    (
        PaymentRecord::Keysend,
        "SELECT payment_hash, amount_msat FROM keysend_credits
         WHERE ldk_pruned_at IS NULL AND received_at < ?1 ORDER BY received_at LIMIT ?2",
    ),
    (
        PaymentRecord::Refund,
        "SELECT payment_hash, CASE WHEN state = 'succeeded' THEN amount_msat END FROM refunds
         WHERE ldk_pruned_at IS NULL AND resolved_at IS NOT NULL AND resolved_at < ?1
           AND +state IN ('succeeded', 'failed')
         ORDER BY resolved_at LIMIT ?2",
    ),
];

impl Store {
    /// Payments final before `before_unix` whose LDK record is not yet removed, oldest first,
    /// at most `limit` of each kind.
    pub fn prunable_payments(
        &self,
        before_unix: u64,
        limit: u32,
    ) -> Result<Vec<Prunable>, StoreError> {
        let c = self.read();
        let mut out = Vec::new();
        for (record, sql) in PRUNABLE {
            let rows = c
                .prepare(sql)?
                .query_map(params![before_unix as i64, limit as i64], |r| {
                    Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, Option<i64>>(1)?))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            for (h, succeeded) in rows {
                out.push(Prunable {
                    payment_hash: <[u8; 32]>::try_from(h)
                        .map_err(|_| StoreError::Corrupt("payment hash".into()))?,
                    record,
                    succeeded_msat: succeeded.map(|m| m as u64),
                });
            }
        }
        Ok(out)
    }

    /// LDK no longer has these records (one transaction).
    pub fn mark_pruned(&self, pruned: &[(PaymentRecord, [u8; 32])]) -> Result<(), StoreError> {
        self.mark(pruned, now_unix() as i64)
    }

    /// These records disagree with LDK's: kept in the node, never offered again (marked 0,
    /// which [`Store::ldk_pruned`] does not count as removed).
    pub fn mark_kept(&self, kept: &[(PaymentRecord, [u8; 32])]) -> Result<(), StoreError> {
        self.mark(kept, 0)
    }

    fn mark(&self, records: &[(PaymentRecord, [u8; 32])], now: i64) -> Result<(), StoreError> {
        let pruned = records;
        if pruned.is_empty() {
            return Ok(());
        }
        self.write(|tx| {
            for (record, hash) in pruned {
                tx.execute(
                    &format!(
                        "UPDATE {} SET ldk_pruned_at = ?2 WHERE payment_hash = ?1",
                        record.table()
                    ),
                    params![hash.as_slice(), now],
                )?;
            }
            Ok(())
        })
    }

    /// Whether LDK's record of this payment was removed (for audits: the ledger is then the
    /// only record, checked against LDK's before removal).
    pub fn ldk_pruned(&self, hash: &[u8; 32]) -> Result<bool, StoreError> {
        let c = self.read();
        for table in ["invoices", "keysend_credits", "refunds"] {
            let n: i64 = c.query_row(
                &format!(
                    "SELECT COUNT(*) FROM {table} WHERE payment_hash = ?1 AND ldk_pruned_at > 0"
                ),
                [hash.as_slice()],
                |r| r.get(0),
            )?;
            if n > 0 {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{InvoicePurpose, InvoiceState, NewInvoice};

    #[test]
    fn only_final_payments_past_the_window_are_offered_and_each_once() {
        let (s, _d) = crate::store::test_store();
        let inv = |b: u8| NewInvoice {
            payment_hash: [b; 32],
            preimage: [b + 100; 32],
            bolt11: format!("lnbcrt{b}"),
            amount_msat: 1000,
            session_id: None,
            account_id: None,
            chunk_index: None,
            purpose: InvoicePurpose::Test,
            expires_at_unix: now_unix() + 600,
        };
        for b in 1..=3 {
            s.insert_invoice(&inv(b)).unwrap();
        }
        // 1: canceled (final); 2: held (not final); 3: open.
        s.transition_invoice(&[1; 32], InvoiceState::Canceled, None, "t")
            .unwrap();
        s.transition_invoice(&[2; 32], InvoiceState::Held, Some(1000), "t")
            .unwrap();
        s.record_keysend_credit(&[9; 32], None, 5000).unwrap();
        let later = now_unix() + 10;
        let p = s.prunable_payments(later, 100).unwrap();
        let got: Vec<_> = p.iter().map(|p| (p.record, p.payment_hash[0])).collect();
        assert_eq!(
            got,
            vec![(PaymentRecord::Invoice, 1), (PaymentRecord::Keysend, 9)]
        );
        assert_eq!(p[0].succeeded_msat, None);
        assert_eq!(p[1].succeeded_msat, Some(5000));
        // Not yet past the window: nothing.
        assert!(s
            .prunable_payments(now_unix() - 10, 100)
            .unwrap()
            .is_empty());
        s.mark_pruned(&[(PaymentRecord::Invoice, [1; 32])]).unwrap();
        assert!(s.ldk_pruned(&[1; 32]).unwrap());
        assert!(!s.ldk_pruned(&[9; 32]).unwrap());
        let got: Vec<_> = s
            .prunable_payments(later, 100)
            .unwrap()
            .iter()
            .map(|p| p.payment_hash[0])
            .collect();
        assert_eq!(got, vec![9]);
        // A record that disagrees with LDK's is kept: never offered again (it would block the
        // head of the queue), and not counted as removed.
        s.mark_kept(&[(PaymentRecord::Keysend, [9; 32])]).unwrap();
        assert!(s.prunable_payments(later, 100).unwrap().is_empty());
        assert!(!s.ldk_pruned(&[9; 32]).unwrap());
    }
}
