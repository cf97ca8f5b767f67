//! Refunds: a refundable balance (of a session or an account) paid back to an invoice of its
//! owner, exactly once.
//!
//! The amount is reserved in the transaction that records the attempt (so concurrent refunds,
//! top-ups and generations on one balance can never spend the same msat twice), released if
//! the payment fails, and consumed when LDK reports it succeeded. A refund is keyed by the
//! payment hash of the owner's invoice, which is also ldk-node's id of the outgoing payment:
//! one invoice is refunded at most once, and a retried request finds the first attempt.

use rusqlite::{params, OptionalExtension, Row};

use super::{ledger, now_unix, Store, StoreError};

/// Whose balance a refund draws on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    Session([u8; 16]),
    Account([u8; 16]),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefundState {
    Pending,
    Succeeded,
    Failed,
}

impl RefundState {
    pub fn as_str(self) -> &'static str {
        match self {
            RefundState::Pending => "pending",
            RefundState::Succeeded => "succeeded",
            RefundState::Failed => "failed",
        }
    }

    fn parse(s: &str) -> Option<RefundState> {
        [Self::Pending, Self::Succeeded, Self::Failed]
            .into_iter()
            .find(|x| x.as_str() == s)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refund {
    pub payment_hash: [u8; 32],
    pub owner: Owner,
    pub amount_msat: u64,
    /// Routing fee LDK reported (paid by the operator, on top of the amount).
    pub fee_msat: Option<u64>,
    pub bolt11: String,
    pub state: RefundState,
    /// "api" (Refund RPC) or "admin" (Admin PayInvoice on behalf of an owner).
    pub via: String,
    pub created_at_unix: u64,
    pub resolved_at_unix: Option<u64>,
    pub detail: String,
}

const COLUMNS: &str = "payment_hash, session_id, account_id, amount_msat, fee_msat, bolt11, \
     state, via, created_at, resolved_at, detail";

fn from_row(r: &Row<'_>) -> rusqlite::Result<Refund> {
    let bad = |what: &str| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Blob,
            format!("bad {what}").into(),
        )
    };
    let sid: Option<Vec<u8>> = r.get(1)?;
    let aid: Option<Vec<u8>> = r.get(2)?;
    let owner = match (sid, aid) {
        (Some(s), None) => Owner::Session(s.try_into().map_err(|_| bad("session_id"))?),
        (None, Some(a)) => Owner::Account(a.try_into().map_err(|_| bad("account_id"))?),
        _ => return Err(bad("owner")),
    };
    Ok(Refund {
        payment_hash: r
            .get::<_, Vec<u8>>(0)?
            .try_into()
            .map_err(|_| bad("payment_hash"))?,
        owner,
        amount_msat: r.get::<_, i64>(3)? as u64,
        fee_msat: r.get::<_, Option<i64>>(4)?.map(|v| v as u64),
        bolt11: r.get(5)?,
        state: RefundState::parse(&r.get::<_, String>(6)?).ok_or_else(|| bad("state"))?,
        via: r.get(7)?,
        created_at_unix: r.get::<_, i64>(8)? as u64,
        resolved_at_unix: r.get::<_, Option<i64>>(9)?.map(|v| v as u64),
        detail: r.get(10)?,
    })
}

fn refund_in(c: &rusqlite::Connection, hash: &[u8; 32]) -> Result<Option<Refund>, StoreError> {
    Ok(c.query_row(
        &format!("SELECT {COLUMNS} FROM refunds WHERE payment_hash = ?1"),
        [hash.as_slice()],
        from_row,
    )
    .optional()?)
}

/// The owner's table, its id, and the SQL of its available balance.
fn owner_sql(owner: &Owner) -> (&'static str, &[u8; 16], &'static str) {
    match owner {
        Owner::Session(id) => ("sessions", id, super::sessions::REFUNDABLE_SQL),
        Owner::Account(id) => (
            "accounts",
            id,
            "credited_msat - spent_msat - refunded_msat - reserved_msat",
        ),
    }
}

fn append(
    tx: &rusqlite::Transaction,
    owner: &Owner,
    kind: &str,
    hash: &[u8; 32],
    amount: i64,
    detail: &str,
) -> Result<(), StoreError> {
    match owner {
        Owner::Session(s) => ledger::append(tx, kind, Some(s), Some(hash), amount, detail),
        Owner::Account(a) => ledger::append_account(tx, kind, a, Some(hash), amount, detail),
    }
}

impl Store {
    /// What `owner` could have refunded now (0 if it does not exist).
    pub fn refundable_of(&self, owner: &Owner) -> Result<u64, StoreError> {
        let (table, id, available) = owner_sql(owner);
        let v: Option<i64> = self
            .lock()
            .query_row(
                &format!("SELECT {available} FROM {table} WHERE id = ?1"),
                [id.as_slice()],
                |r| r.get(0),
            )
            .optional()?;
        Ok(v.unwrap_or(0).max(0) as u64)
    }

    /// Records a refund attempt and reserves its amount, in one transaction. `amount_msat`
    /// None takes the whole available balance. Refused (nothing written) when the balance
    /// cannot cover it, or when this invoice was used for a refund before
    /// ([`StoreError::DuplicateRefund`]: look it up with [`Store::refund`]).
    pub fn reserve_refund(
        &self,
        owner: Owner,
        amount_msat: Option<u64>,
        payment_hash: [u8; 32],
        bolt11: &str,
        via: &str,
    ) -> Result<Refund, StoreError> {
        self.write(|tx| {
            if let Some(r) = refund_in(tx, &payment_hash)? {
                return Err(StoreError::DuplicateRefund {
                    state: r.state.as_str().to_string(),
                });
            }
            let (table, id, available_sql) = owner_sql(&owner);
            let available: i64 = tx
                .query_row(
                    &format!("SELECT {available_sql} FROM {table} WHERE id = ?1"),
                    [id.as_slice()],
                    |r| r.get(0),
                )
                .optional()?
                .ok_or_else(|| StoreError::NotFound {
                    what: if table == "sessions" {
                        "session"
                    } else {
                        "account"
                    },
                    id: hex::encode(id),
                })?;
            let available = available.max(0) as u64;
            let amount = amount_msat.unwrap_or(available);
            if amount == 0 || amount > available {
                return Err(StoreError::InsufficientBalance {
                    what: "refundable balance",
                    available_msat: available,
                    needed_msat: amount.max(1),
                });
            }
            let (sid, aid) = match &owner {
                Owner::Session(s) => (Some(s.as_slice()), None),
                Owner::Account(a) => (None, Some(a.as_slice())),
            };
            tx.execute(
                "INSERT INTO refunds(payment_hash, session_id, account_id, amount_msat, bolt11,
                     state, via, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, 'pending', ?6, ?7)",
                params![
                    payment_hash.as_slice(),
                    sid,
                    aid,
                    amount as i64,
                    bolt11,
                    via,
                    now_unix() as i64
                ],
            )?;
            tx.execute(
                &format!("UPDATE {table} SET reserved_msat = reserved_msat + ?2 WHERE id = ?1"),
                params![id.as_slice(), amount as i64],
            )?;
            append(
                tx,
                &owner,
                "refund_reserved",
                &payment_hash,
                0,
                &format!("{amount} msat via {via}"),
            )?;
            refund_in(tx, &payment_hash)?
                .ok_or_else(|| StoreError::Corrupt("refund vanished".into()))
        })
    }

    /// Resolves a pending refund: succeeded consumes the reservation (the balance is refunded),
    /// failed releases it (the balance is back). Idempotent; None when `payment_hash` is not a
    /// refund (another outgoing payment of the node).
    pub fn finish_refund(
        &self,
        payment_hash: &[u8; 32],
        succeeded: bool,
        fee_msat: Option<u64>,
        detail: &str,
    ) -> Result<Option<Refund>, StoreError> {
        self.write(|tx| {
            let Some(r) = refund_in(tx, payment_hash)? else {
                return Ok(None);
            };
            let (table, id, _) = owner_sql(&r.owner);
            if r.state == RefundState::Failed && succeeded {
                // We released it, and LDK says it was paid after all: LDK's record wins. The
                // owner was refunded; its balance shows it (even below zero: the operator's
                // loss, never hidden).
                tracing::error!(
                    payment_hash = %hex::encode(payment_hash), amount_msat = r.amount_msat,
                    "LDK reports a refund paid that was released as failed: booked as refunded"
                );
                tx.execute(
                    "UPDATE refunds SET state = 'succeeded', fee_msat = ?2, resolved_at = ?3,
                         detail = ?4 WHERE payment_hash = ?1",
                    params![
                        payment_hash.as_slice(),
                        fee_msat.map(|f| f as i64),
                        now_unix() as i64,
                        format!("succeeded after it was released ({})", r.detail)
                    ],
                )?;
                tx.execute(
                    &format!("UPDATE {table} SET refunded_msat = refunded_msat + ?2 WHERE id = ?1"),
                    params![id.as_slice(), r.amount_msat as i64],
                )?;
                append(
                    tx,
                    &r.owner,
                    "refund_paid",
                    payment_hash,
                    -(r.amount_msat as i64),
                    "LDK reported it paid after it was released",
                )?;
                return refund_in(tx, payment_hash);
            }
            if r.state != RefundState::Pending {
                return Ok(Some(r));
            }
            let to = if succeeded {
                RefundState::Succeeded
            } else {
                RefundState::Failed
            };
            tx.execute(
                "UPDATE refunds SET state = ?2, fee_msat = ?3, resolved_at = ?4, detail = ?5
                 WHERE payment_hash = ?1",
                params![
                    payment_hash.as_slice(),
                    to.as_str(),
                    fee_msat.map(|f| f as i64),
                    now_unix() as i64,
                    detail
                ],
            )?;
            let refunded = if succeeded { r.amount_msat as i64 } else { 0 };
            tx.execute(
                &format!(
                    "UPDATE {table} SET reserved_msat = reserved_msat - ?2,
                         refunded_msat = refunded_msat + ?3 WHERE id = ?1"
                ),
                params![id.as_slice(), r.amount_msat as i64, refunded],
            )?;
            let (kind, amount) = if succeeded {
                ("refund_paid", -(r.amount_msat as i64))
            } else {
                ("refund_released", 0)
            };
            append(tx, &r.owner, kind, payment_hash, amount, detail)?;
            refund_in(tx, payment_hash)
        })
    }

    pub fn refund(&self, payment_hash: &[u8; 32]) -> Result<Option<Refund>, StoreError> {
        refund_in(&self.lock(), payment_hash)
    }

    /// Refunds not resolved yet (start-up reconciles them with LDK's payment records).
    pub fn pending_refunds(&self) -> Result<Vec<Refund>, StoreError> {
        let c = self.lock();
        let mut st = c.prepare(&format!(
            "SELECT {COLUMNS} FROM refunds WHERE state = 'pending' ORDER BY rowid"
        ))?;
        let rows = st.query_map([], from_row)?.collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// Total refunded (succeeded), msat.
    pub fn total_refunded_msat(&self) -> Result<u64, StoreError> {
        let v: i64 = self.lock().query_row(
            "SELECT COALESCE(SUM(amount_msat), 0) FROM refunds WHERE state = 'succeeded'",
            [],
            |r| r.get(0),
        )?;
        Ok(v as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::accounts::tests::funded_account;
    use crate::store::test_store;

    #[test]
    fn reserve_then_fail_restores_then_succeed_consumes_exactly_once() {
        let (s, _d) = test_store();
        funded_account(&s, 1, 10_000);
        let owner = Owner::Account([1; 16]);
        let r = s
            .reserve_refund(owner, Some(4_000), [9; 32], "lnbcrt1", "api")
            .unwrap();
        assert_eq!(r.state, RefundState::Pending);
        assert_eq!(s.refundable_of(&owner).unwrap(), 6_000, "reserved");
        // The same invoice again: refused, nothing reserved twice.
        assert!(matches!(
            s.reserve_refund(owner, Some(1_000), [9; 32], "lnbcrt1", "api"),
            Err(StoreError::DuplicateRefund { .. })
        ));
        // More than what is left: refused.
        assert!(matches!(
            s.reserve_refund(owner, Some(6_001), [8; 32], "lnbcrt2", "api"),
            Err(StoreError::InsufficientBalance {
                available_msat: 6_000,
                ..
            })
        ));
        s.finish_refund(&[9; 32], false, None, "no route").unwrap();
        assert_eq!(s.refundable_of(&owner).unwrap(), 10_000, "released");
        // Whole balance (amountless invoice), then success consumes it; replays change nothing.
        let r = s
            .reserve_refund(owner, None, [7; 32], "lnbcrt3", "api")
            .unwrap();
        assert_eq!(r.amount_msat, 10_000);
        for _ in 0..2 {
            s.finish_refund(&[7; 32], true, Some(12), "").unwrap();
        }
        let a = s.account(&[1; 16]).unwrap().unwrap();
        assert_eq!(
            (a.refunded_msat, a.reserved_msat, a.available_msat()),
            (10_000, 0, 0)
        );
        assert_eq!(s.total_refunded_msat().unwrap(), 10_000);
        // A late failure report for a succeeded refund does not give the money back again.
        s.finish_refund(&[7; 32], false, None, "").unwrap();
        assert_eq!(s.account(&[1; 16]).unwrap().unwrap().available_msat(), 0);
        assert!(s.finish_refund(&[1; 32], true, None, "").unwrap().is_none());
    }

    #[test]
    fn a_success_after_a_release_is_booked() {
        // Issue 22.4: a released refund that LDK then reports paid used to be ignored (the
        // owner kept the money twice). LDK's record wins.
        let (s, _d) = test_store();
        funded_account(&s, 1, 10_000);
        let owner = Owner::Account([1; 16]);
        s.reserve_refund(owner, Some(4_000), [9; 32], "lnbcrt1", "api")
            .unwrap();
        s.finish_refund(&[9; 32], false, None, "released").unwrap();
        assert_eq!(s.refundable_of(&owner).unwrap(), 10_000);
        for _ in 0..2 {
            let r = s
                .finish_refund(&[9; 32], true, Some(3), "")
                .unwrap()
                .unwrap();
            assert_eq!(r.state, RefundState::Succeeded);
        }
        let a = s.account(&[1; 16]).unwrap().unwrap();
        assert_eq!((a.refunded_msat, a.reserved_msat), (4_000, 0));
        assert_eq!(s.refundable_of(&owner).unwrap(), 6_000);
        assert_eq!(s.total_refunded_msat().unwrap(), 4_000);
    }
}
