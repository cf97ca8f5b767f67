//! Versioned schema migrations. `PRAGMA user_version` holds the number of migrations applied;
//! each runs in its own transaction, so a crash mid-migration leaves the previous version.
//! Never edit a released migration: append a new one.

use rusqlite::Connection;

use super::StoreError;

const MIGRATIONS: &[&str] = &[
    // v1: the whole money model.
    r#"
    CREATE TABLE sessions (
        id               BLOB PRIMARY KEY,          -- 16 random bytes
        token_hash       BLOB NOT NULL,             -- SHA-256 of the owner's session token
        model            TEXT NOT NULL,
        mode             TEXT NOT NULL CHECK (mode IN ('BOLT11','ATOMIC','KEYSEND','PREPAID')),
        state            TEXT NOT NULL CHECK (state IN ('open','finished','halted')),
        prompt_tokens    INTEGER NOT NULL,
        prompt_price_msat INTEGER NOT NULL,
        msat_per_token   INTEGER NOT NULL,
        chunk_tokens     INTEGER NOT NULL,
        max_tokens       INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL DEFAULT 0,  -- delivered
        chunks_delivered INTEGER NOT NULL DEFAULT 0,
        paid_msat        INTEGER NOT NULL DEFAULT 0,   -- claimed invoices + credits
        spent_msat       INTEGER NOT NULL DEFAULT 0,   -- prompt + delivered chunks
        refunded_msat    INTEGER NOT NULL DEFAULT 0,
        created_at       INTEGER NOT NULL,
        ended_at         INTEGER,
        end_reason       TEXT
    );
    CREATE INDEX sessions_by_created ON sessions(created_at DESC, id);

    CREATE TABLE invoices (
        payment_hash     BLOB PRIMARY KEY,
        session_id       BLOB REFERENCES sessions(id),
        chunk_index      INTEGER,
        purpose          TEXT NOT NULL CHECK (purpose IN ('chunk','prompt','topup','test')),
        amount_msat      INTEGER NOT NULL CHECK (amount_msat > 0),
        received_msat    INTEGER,
        state            TEXT NOT NULL
                         CHECK (state IN ('open','held','claimed','failed','expired','canceled')),
        preimage         BLOB NOT NULL,             -- server-chosen: we decide at claim time
        bolt11           TEXT NOT NULL,
        created_at       INTEGER NOT NULL,
        expires_at       INTEGER NOT NULL,
        held_at          INTEGER,
        paid_at          INTEGER,                   -- claimed
        resolved_at      INTEGER                    -- claimed, failed, expired or canceled
    );
    CREATE INDEX invoices_by_created ON invoices(created_at DESC, payment_hash);
    CREATE INDEX invoices_by_session ON invoices(session_id, chunk_index);
    CREATE INDEX invoices_by_state ON invoices(state);

    CREATE TABLE chunks (
        session_id       BLOB NOT NULL REFERENCES sessions(id),
        chunk_index      INTEGER NOT NULL,
        first_token      INTEGER NOT NULL,
        tokens           INTEGER NOT NULL,
        price_msat       INTEGER NOT NULL,
        payment_hash     BLOB,                      -- the invoice that paid it, if any
        delivered_at     INTEGER NOT NULL,
        PRIMARY KEY (session_id, chunk_index)
    );

    -- Spontaneous (keysend) payments, once each by payment hash.
    CREATE TABLE keysend_credits (
        payment_hash     BLOB PRIMARY KEY,
        session_id       BLOB,                      -- NULL: no (known) session in the TLV
        amount_msat      INTEGER NOT NULL,
        received_at      INTEGER NOT NULL
    );

    -- Prepaid accounts.
    CREATE TABLE accounts (
        id               BLOB PRIMARY KEY,
        token_hash       BLOB NOT NULL UNIQUE,
        credited_msat    INTEGER NOT NULL DEFAULT 0,
        spent_msat       INTEGER NOT NULL DEFAULT 0,
        refunded_msat    INTEGER NOT NULL DEFAULT 0,
        created_at       INTEGER NOT NULL
    );

    CREATE TABLE receipts (
        session_id       BLOB PRIMARY KEY REFERENCES sessions(id),
        signed_text      TEXT NOT NULL,
        signature        TEXT NOT NULL,
        created_at       INTEGER NOT NULL
    );

    -- Append-only: every state change of money or of an invoice, in commit order.
    CREATE TABLE ledger (
        seq              INTEGER PRIMARY KEY AUTOINCREMENT,
        at               INTEGER NOT NULL,
        kind             TEXT NOT NULL,
        session_id       BLOB,
        payment_hash     BLOB,
        amount_msat      INTEGER NOT NULL DEFAULT 0,
        detail           TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX ledger_by_session ON ledger(session_id, seq);
    CREATE INDEX ledger_by_hash ON ledger(payment_hash, seq);
    CREATE TRIGGER ledger_no_update BEFORE UPDATE ON ledger
        BEGIN SELECT RAISE(ABORT, 'ledger is append-only'); END;
    CREATE TRIGGER ledger_no_delete BEFORE DELETE ON ledger
        BEGIN SELECT RAISE(ABORT, 'ledger is append-only'); END;
    "#,
];

/// Schema version this build writes.
pub const LATEST: u32 = MIGRATIONS.len() as u32;

pub fn migrate(conn: &mut Connection) -> Result<u32, StoreError> {
    let current: u32 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if current > LATEST {
        return Err(StoreError::SchemaTooNew {
            found: current,
            supported: LATEST,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        // PRAGMA takes no parameters; the value is our own integer.
        tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1))?;
        tx.commit()?;
        tracing::info!(version = i + 1, "applied store migration");
    }
    Ok(LATEST)
}
