//! Spontaneous (keysend) payments: credited once each, by payment hash.

use rusqlite::{params, OptionalExtension};

use super::{ledger, now_unix, Store, StoreError};

impl Store {
    /// Credits a received keysend payment to `session_id` (None, or a session we do not know:
    /// kept as an unattributed credit). Returns false when this payment hash was already
    /// credited (an LDK replay): nothing is written then.
    pub fn record_keysend_credit(
        &self,
        payment_hash: &[u8; 32],
        session_id: Option<[u8; 16]>,
        amount_msat: u64,
    ) -> Result<bool, StoreError> {
        let mut c = self.lock();
        let tx = c.transaction()?;
        let known = match &session_id {
            Some(sid) => {
                tx.query_row(
                    "SELECT COUNT(*) FROM sessions WHERE id = ?1",
                    [sid.as_slice()],
                    |r| r.get::<_, i64>(0),
                )? > 0
            }
            None => false,
        };
        let sid = session_id.filter(|_| known);
        let inserted = tx.execute(
            "INSERT OR IGNORE INTO keysend_credits(payment_hash, session_id, amount_msat, received_at)
             VALUES (?1, ?2, ?3, ?4)",
            params![
                payment_hash.as_slice(),
                sid.as_ref().map(|s| s.as_slice()),
                amount_msat as i64,
                now_unix() as i64
            ],
        )?;
        if inserted == 0 {
            // Booked before. A replay of the same event, unless LDK's record of it was removed
            // (lightning::pruning): then LDK claimed a new payment of the same hash (a payer
            // repeating its preimage), and it is booked as well, to the same session.
            let repeat: Option<Option<Vec<u8>>> = tx
                .query_row(
                    "SELECT session_id FROM keysend_credits
                     WHERE payment_hash = ?1 AND ldk_pruned_at > 0",
                    [payment_hash.as_slice()],
                    |r| r.get(0),
                )
                .optional()?;
            let Some(first_session) = repeat else {
                return Ok(false);
            };
            tx.execute(
                "UPDATE keysend_credits SET amount_msat = amount_msat + ?2, ldk_pruned_at = NULL
                 WHERE payment_hash = ?1",
                params![payment_hash.as_slice(), amount_msat as i64],
            )?;
            let sid = first_session.and_then(|v| <[u8; 16]>::try_from(v).ok());
            if let Some(s) = &sid {
                tx.execute(
                    "UPDATE sessions SET paid_msat = paid_msat + ?2 WHERE id = ?1",
                    params![s.as_slice(), amount_msat as i64],
                )?;
            }
            ledger::append(
                &tx,
                "keysend_repeat",
                sid.as_ref(),
                Some(payment_hash),
                amount_msat as i64,
                "the same hash again, after its LDK record was removed",
            )?;
            tx.commit()?;
            return Ok(true);
        }
        if let Some(s) = &sid {
            tx.execute(
                "UPDATE sessions SET paid_msat = paid_msat + ?2 WHERE id = ?1",
                params![s.as_slice(), amount_msat as i64],
            )?;
        }
        let detail = match (&session_id, known) {
            (Some(_), true) | (None, _) => String::new(),
            (Some(s), false) => format!("unknown session {}", hex::encode(s)),
        };
        let kind = if sid.is_some() {
            "keysend_credited"
        } else {
            "keysend_unattributed"
        };
        ledger::append(
            &tx,
            kind,
            sid.as_ref(),
            Some(payment_hash),
            amount_msat as i64,
            &detail,
        )?;
        tx.commit()?;
        Ok(true)
    }

    /// Keysend credit of a session, in msat.
    pub fn keysend_credited_msat(&self, session_id: &[u8; 16]) -> Result<u64, StoreError> {
        let v: i64 = self.lock().query_row(
            "SELECT COALESCE(SUM(amount_msat), 0) FROM keysend_credits WHERE session_id = ?1",
            [session_id.as_slice()],
            |r| r.get(0),
        )?;
        Ok(v as u64)
    }
}

#[cfg(test)]
mod tests {
    use crate::store::test_store;

    #[test]
    fn credits_once_per_payment_hash() {
        let (s, _d) = test_store();
        s.insert_session(&crate::store::sessions::tests::new_session(1))
            .unwrap();
        assert!(s
            .record_keysend_credit(&[1; 32], Some([1; 16]), 5_000)
            .unwrap());
        assert!(!s
            .record_keysend_credit(&[1; 32], Some([1; 16]), 5_000)
            .unwrap());
        assert_eq!(s.keysend_credited_msat(&[1; 16]).unwrap(), 5_000);
        assert_eq!(s.session(&[1; 16]).unwrap().unwrap().paid_msat, 5_000);
        let credits = s
            .ledger()
            .unwrap()
            .into_iter()
            .filter(|e| e.kind == "keysend_credited")
            .count();
        assert_eq!(credits, 1);
    }

    #[test]
    fn unknown_session_is_kept_unattributed() {
        let (s, _d) = test_store();
        assert!(s
            .record_keysend_credit(&[2; 32], Some([9; 16]), 700)
            .unwrap());
        let e = s.ledger_for_payment(&[2; 32]).unwrap();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].kind, "keysend_unattributed");
        assert_eq!(e[0].amount_msat, 700);
    }
}
