//! SQLite persistence: the only place that speaks SQL.
//!
//! One connection in WAL mode with `synchronous = FULL` (money: a commit survives power loss),
//! behind a mutex. Every state change of an invoice, session or balance is one transaction that
//! also appends its ledger entry, so the ledger and the state can never disagree.
//!
//! Reports that scan history (gauges, Admin listings) read through a second, read-only
//! connection: in WAL mode a reader sees the last commit and never waits for the writer, so a
//! long scan does not hold up the money commits behind the writer's mutex.

mod accounts;
mod closures;
mod credits;
mod invoices;
mod ledger;
mod migrations;
mod parked;
#[cfg(test)]
mod plans;
mod pruning;
mod refunds;
mod sessions;

pub use accounts::{Account, AccountTotals};
pub use closures::{ChannelClosure, LossKind, SettlementLoss};
pub use invoices::{Invoice, InvoicePurpose, InvoiceState, NewInvoice, Settlement, Transition};
pub use ledger::LedgerEntry;
pub use parked::ParkedEvent;
pub use pruning::{PaymentRecord, Prunable};
pub use refunds::{Owner, Refund, RefundState};
pub use sessions::{
    ChunkDelivery, DeliveredChunk, NewSession, Session, SessionAudit, SessionState,
};

use rusqlite::Connection;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("cannot create the directory of the database {path}: {source}")]
    Dir {
        path: String,
        source: std::io::Error,
    },
    #[error("database schema version {found} is newer than this build supports ({supported}): upgrade satstream")]
    SchemaTooNew { found: u32, supported: u32 },
    #[error("invoice {hash} cannot go from {from} to {to}")]
    IllegalTransition {
        hash: String,
        from: InvoiceState,
        to: InvoiceState,
    },
    #[error("{what} {id} not found")]
    NotFound { what: &'static str, id: String },
    #[error("invalid page token")]
    BadPageToken,
    #[error("corrupt row: {0}")]
    Corrupt(String),
    /// A balance cannot cover what is asked of it (refund, prepaid chunk, prompt).
    #[error("{what}: {available_msat} msat available, {needed_msat} msat needed")]
    InsufficientBalance {
        what: &'static str,
        available_msat: u64,
        needed_msat: u64,
    },
    /// The same refund invoice was used before (refunds are once per invoice).
    #[error("this invoice was already used for a refund ({state})")]
    DuplicateRefund { state: String },
}

/// A page of results and the token of the next page (None: last page).
#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_page_token: Option<String>,
}

#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
    /// Read-only: scans of history (see the module doc).
    reader: Arc<Mutex<Connection>>,
}

impl Store {
    /// Opens (creating if needed) the database and applies pending migrations.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
                path: dir.display().to_string(),
                source,
            })?;
        }
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        migrations::migrate(&mut conn)?;
        let reader = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        reader.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(Store {
            conn: Arc::new(Mutex::new(conn)),
            reader: Arc::new(Mutex::new(reader)),
        })
    }

    /// Schema version of the open database.
    pub fn schema_version(&self) -> Result<u32, StoreError> {
        Ok(self
            .lock()
            .query_row("PRAGMA user_version", [], |r| r.get(0))?)
    }

    /// Runs `f` in one transaction, committed if it returns Ok (rolled back otherwise).
    fn write<T>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut c = self.lock();
        let tx = c.transaction()?;
        let v = f(&tx)?;
        tx.commit()?;
        Ok(v)
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave a half transaction behind (rusqlite
        // rolls back on drop), so a poisoned lock is still a consistent database.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The read-only connection, for scans that must not hold up the writer.
    fn read(&self) -> MutexGuard<'_, Connection> {
        self.reader.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Flushes the WAL into the main file; used at shutdown so the file is self-contained.
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        self.lock()
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        Ok(())
    }
}

pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Page tokens are opaque to clients; inside they are the offset of the next page.
fn decode_page_token(token: &str) -> Result<u64, StoreError> {
    if token.is_empty() {
        return Ok(0);
    }
    token.parse().map_err(|_| StoreError::BadPageToken)
}

fn page<T>(mut rows: Vec<T>, offset: u64, size: u32) -> Page<T> {
    // We fetched size + 1 rows: the extra one tells whether a next page exists.
    let next = if rows.len() > size as usize {
        rows.truncate(size as usize);
        Some((offset + size as u64).to_string())
    } else {
        None
    };
    Page {
        items: rows,
        next_page_token: next,
    }
}

#[cfg(test)]
pub(crate) fn test_store() -> (Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("t.sqlite")).unwrap();
    (store, dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reopen_keeps_schema_and_data_in_wal_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db/s.sqlite");
        {
            let s = Store::open(&path).unwrap();
            assert_eq!(s.schema_version().unwrap(), migrations::LATEST);
            let mode: String = s
                .lock()
                .query_row("PRAGMA journal_mode", [], |r| r.get(0))
                .unwrap();
            assert_eq!(mode, "wal");
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.schema_version().unwrap(), migrations::LATEST);
    }

    #[test]
    fn refuses_a_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sqlite");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch("PRAGMA user_version = 99").unwrap();
        }
        match Store::open(&path) {
            Err(StoreError::SchemaTooNew { found: 99, .. }) => {}
            other => panic!("expected SchemaTooNew, got {:?}", other.err()),
        }
    }

    #[test]
    fn ledger_rejects_updates_and_deletes() {
        let (s, _d) = test_store();
        let c = s.lock();
        c.execute("INSERT INTO ledger(at, kind) VALUES (1, 'x')", [])
            .unwrap();
        assert!(c.execute("UPDATE ledger SET kind = 'y'", []).is_err());
        assert!(c.execute("DELETE FROM ledger", []).is_err());
    }
}
