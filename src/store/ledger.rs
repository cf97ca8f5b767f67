//! The append-only ledger. Entries are only ever written inside the transaction of the state
//! change they record (see the other store modules), never on their own.

use rusqlite::{params, Row, Transaction};

use super::{now_unix, Store, StoreError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerEntry {
    pub seq: u64,
    pub at_unix: u64,
    pub kind: String,
    pub session_id: Option<[u8; 16]>,
    /// Prepaid account the entry concerns (credits, debits, refunds), if any.
    pub account_id: Option<[u8; 16]>,
    pub payment_hash: Option<[u8; 32]>,
    /// Signed change this entry records (0 for pure state changes).
    pub amount_msat: i64,
    pub detail: String,
}

pub(super) fn append(
    tx: &Transaction<'_>,
    kind: &str,
    session_id: Option<&[u8; 16]>,
    payment_hash: Option<&[u8; 32]>,
    amount_msat: i64,
    detail: &str,
) -> Result<(), StoreError> {
    insert(
        tx,
        kind,
        session_id,
        None,
        payment_hash,
        amount_msat,
        detail,
    )
}

/// [`append`] for an entry about a prepaid account.
pub(super) fn append_account(
    tx: &Transaction<'_>,
    kind: &str,
    account_id: &[u8; 16],
    payment_hash: Option<&[u8; 32]>,
    amount_msat: i64,
    detail: &str,
) -> Result<(), StoreError> {
    insert(
        tx,
        kind,
        None,
        Some(account_id),
        payment_hash,
        amount_msat,
        detail,
    )
}

fn insert(
    tx: &Transaction<'_>,
    kind: &str,
    session_id: Option<&[u8; 16]>,
    account_id: Option<&[u8; 16]>,
    payment_hash: Option<&[u8; 32]>,
    amount_msat: i64,
    detail: &str,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO ledger(at, kind, session_id, account_id, payment_hash, amount_msat, detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            now_unix() as i64,
            kind,
            session_id.map(|s| s.as_slice()),
            account_id.map(|s| s.as_slice()),
            payment_hash.map(|h| h.as_slice()),
            amount_msat,
            detail
        ],
    )?;
    Ok(())
}

fn from_row(r: &Row<'_>) -> rusqlite::Result<LedgerEntry> {
    let sid: Option<Vec<u8>> = r.get(3)?;
    let hash: Option<Vec<u8>> = r.get(4)?;
    let aid: Option<Vec<u8>> = r.get(7)?;
    Ok(LedgerEntry {
        seq: r.get::<_, i64>(0)? as u64,
        at_unix: r.get::<_, i64>(1)? as u64,
        kind: r.get(2)?,
        session_id: sid.and_then(|v| v.try_into().ok()),
        account_id: aid.and_then(|v| v.try_into().ok()),
        payment_hash: hash.and_then(|v| v.try_into().ok()),
        amount_msat: r.get(5)?,
        detail: r.get(6)?,
    })
}

const COLUMNS: &str = "seq, at, kind, session_id, payment_hash, amount_msat, detail, account_id";

impl Store {
    /// The whole ledger in commit order (tests and audits; small databases).
    pub fn ledger(&self) -> Result<Vec<LedgerEntry>, StoreError> {
        let c = self.read();
        let mut st = c.prepare(&format!("SELECT {COLUMNS} FROM ledger ORDER BY seq"))?;
        let rows = st.query_map([], from_row)?.collect::<Result<_, _>>()?;
        Ok(rows)
    }

    pub fn ledger_for_session(
        &self,
        session_id: &[u8; 16],
    ) -> Result<Vec<LedgerEntry>, StoreError> {
        let c = self.read();
        let mut st = c.prepare(&format!(
            "SELECT {COLUMNS} FROM ledger WHERE session_id = ?1 ORDER BY seq"
        ))?;
        let rows = st
            .query_map([session_id.as_slice()], from_row)?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    pub fn ledger_for_account(
        &self,
        account_id: &[u8; 16],
    ) -> Result<Vec<LedgerEntry>, StoreError> {
        let c = self.read();
        let mut st = c.prepare(&format!(
            "SELECT {COLUMNS} FROM ledger WHERE account_id = ?1 ORDER BY seq"
        ))?;
        let rows = st
            .query_map([account_id.as_slice()], from_row)?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    pub fn ledger_for_payment(&self, hash: &[u8; 32]) -> Result<Vec<LedgerEntry>, StoreError> {
        let c = self.read();
        let mut st = c.prepare(&format!(
            "SELECT {COLUMNS} FROM ledger WHERE payment_hash = ?1 ORDER BY seq"
        ))?;
        let rows = st
            .query_map([hash.as_slice()], from_row)?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }
}
