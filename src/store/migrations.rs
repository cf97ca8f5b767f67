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
    // v2: crash-safe claims (the `claiming` intent), prepaid accounts and their debits, refunds
    // with reservations, parked events, channel closures and settlement losses.
    r#"
    CREATE TABLE invoices_v2 (
        payment_hash     BLOB PRIMARY KEY,
        session_id       BLOB REFERENCES sessions(id),
        account_id       BLOB REFERENCES accounts(id),
        chunk_index      INTEGER,
        purpose          TEXT NOT NULL CHECK (purpose IN ('chunk','prompt','topup','test')),
        amount_msat      INTEGER NOT NULL CHECK (amount_msat > 0),
        received_msat    INTEGER,
        state            TEXT NOT NULL CHECK (state IN
                         ('open','held','claiming','claimed','failed','expired','canceled')),
        preimage         BLOB NOT NULL,
        bolt11           TEXT NOT NULL,
        created_at       INTEGER NOT NULL,
        expires_at       INTEGER NOT NULL,
        held_at          INTEGER,
        claiming_at      INTEGER,                   -- our decision to claim, before LDK's call
        paid_at          INTEGER,                   -- LDK reported the claim (PaymentReceived)
        resolved_at      INTEGER
    );
    INSERT INTO invoices_v2(payment_hash, session_id, chunk_index, purpose, amount_msat,
        received_msat, state, preimage, bolt11, created_at, expires_at, held_at, paid_at,
        resolved_at)
    SELECT payment_hash, session_id, chunk_index, purpose, amount_msat, received_msat, state,
        preimage, bolt11, created_at, expires_at, held_at, paid_at, resolved_at FROM invoices;
    DROP TABLE invoices;
    ALTER TABLE invoices_v2 RENAME TO invoices;
    CREATE INDEX invoices_by_created ON invoices(created_at DESC, payment_hash);
    CREATE INDEX invoices_by_session ON invoices(session_id, chunk_index);
    CREATE INDEX invoices_by_state ON invoices(state);
    CREATE INDEX invoices_by_account ON invoices(account_id);

    ALTER TABLE sessions ADD COLUMN account_id BLOB REFERENCES accounts(id);
    -- Refunds in flight (reserved, not yet paid or released).
    ALTER TABLE sessions ADD COLUMN reserved_msat INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE accounts ADD COLUMN reserved_msat INTEGER NOT NULL DEFAULT 0;

    -- PREPAID: every draw on an account, once per (session, what).
    CREATE TABLE account_debits (
        session_id       BLOB NOT NULL REFERENCES sessions(id),
        what             TEXT NOT NULL,             -- 'prompt' or 'chunk <k>'
        account_id       BLOB NOT NULL REFERENCES accounts(id),
        amount_msat      INTEGER NOT NULL CHECK (amount_msat > 0),
        at               INTEGER NOT NULL,
        PRIMARY KEY (session_id, what)
    );

    -- Outgoing payments that give a refundable balance back, once per invoice.
    CREATE TABLE refunds (
        payment_hash     BLOB PRIMARY KEY,          -- = ldk-node's PaymentId of the payment
        session_id       BLOB REFERENCES sessions(id),
        account_id       BLOB REFERENCES accounts(id),
        amount_msat      INTEGER NOT NULL CHECK (amount_msat > 0),
        fee_msat         INTEGER,
        bolt11           TEXT NOT NULL,
        state            TEXT NOT NULL CHECK (state IN ('pending','succeeded','failed')),
        via              TEXT NOT NULL CHECK (via IN ('api','admin')),
        created_at       INTEGER NOT NULL,
        resolved_at      INTEGER,
        detail           TEXT NOT NULL DEFAULT '',
        CHECK ((session_id IS NULL) <> (account_id IS NULL))
    );
    CREATE INDEX refunds_by_state ON refunds(state);
    CREATE INDEX refunds_by_session ON refunds(session_id);
    CREATE INDEX refunds_by_account ON refunds(account_id);

    ALTER TABLE ledger ADD COLUMN account_id BLOB;
    CREATE INDEX ledger_by_account ON ledger(account_id, seq);

    -- LDK events whose handler kept failing: acknowledged so the loop goes on, kept here for
    -- the operator (Admin ListParkedEvents).
    CREATE TABLE parked_events (
        id               INTEGER PRIMARY KEY AUTOINCREMENT,
        at               INTEGER NOT NULL,
        kind             TEXT NOT NULL,
        payment_hash     BLOB,
        attempts         INTEGER NOT NULL,
        error            TEXT NOT NULL,
        event            TEXT NOT NULL
    );

    -- Channels LDK reported closed, and what their closure did to claims in flight.
    CREATE TABLE channel_closures (
        channel_id       BLOB PRIMARY KEY,
        counterparty     TEXT NOT NULL DEFAULT '',
        reason           TEXT NOT NULL,
        forced           INTEGER NOT NULL,
        closed_at        INTEGER NOT NULL,
        resolved_at      INTEGER,
        detail           TEXT NOT NULL DEFAULT ''
    );

    -- Claims that LDK reported but that did not settle in our favour (an HTLC below the dust
    -- limit in a force-closed channel goes to fees): the operator's loss, never income.
    --   never_settled: we delivered the chunk, LDK never completed the claim (the payer paid
    --                  nothing); lost_on_chain: LDK claimed, the channel closed before the HTLC
    --                  was settled and it was below the dust limit (the payer paid, we got nothing).
    CREATE TABLE settlement_losses (
        payment_hash     BLOB PRIMARY KEY REFERENCES invoices(payment_hash),
        session_id       BLOB,
        kind             TEXT NOT NULL CHECK (kind IN ('never_settled','lost_on_chain')),
        channel_id       BLOB,
        amount_msat      INTEGER NOT NULL,
        delivered        INTEGER NOT NULL,          -- its chunk had been delivered
        reason           TEXT NOT NULL,
        at               INTEGER NOT NULL
    );
    "#,
    // v3: receipts. Each delivered chunk keeps its text (a receipt hashes it; a resumed stream
    // replays it); NULL for chunks delivered before v3. The signed receipt itself goes in
    // `receipts` (v1) once, when its session ends.
    r#"
    ALTER TABLE chunks ADD COLUMN text TEXT;
    "#,
    // v4: one definition of refundable. A delivered chunk whose claim never settled is the
    // operator's loss: it counts as paid (by the operator) in the session's balance, so the
    // customer's other refundable money never pays for it, and Refund and the audit agree.
    r#"
    ALTER TABLE sessions ADD COLUMN written_off_msat INTEGER NOT NULL DEFAULT 0;
    UPDATE sessions SET written_off_msat = (
        SELECT COALESCE(SUM(l.amount_msat), 0) FROM settlement_losses l
        WHERE l.session_id = sessions.id AND l.kind = 'never_settled');
    -- A parked keysend keeps the session its TLV named, so the watchdog can book it to that
    -- session from LDK's record.
    ALTER TABLE parked_events ADD COLUMN session_id BLOB;
    -- What the receipt commits to as the prompt (SHA-256, see wire::receipt::prompt_sha256);
    -- NULL for sessions opened before v4 (their receipts stay v1).
    ALTER TABLE sessions ADD COLUMN prompt_sha256 BLOB;
    "#,
    // v5: ldk-node keeps every payment record in memory, so records of payments final here
    // and in LDK are removed from the node after a retention window (lightning::pruning). The
    // ledger keeps them; `ldk_pruned_at` says the node no longer has the record (the audit
    // checked it against LDK's before). The partial indexes hold only what is still to prune.
    r#"
    ALTER TABLE invoices ADD COLUMN ldk_pruned_at INTEGER;
    CREATE INDEX invoices_to_prune ON invoices(resolved_at)
        WHERE ldk_pruned_at IS NULL AND resolved_at IS NOT NULL;
    ALTER TABLE keysend_credits ADD COLUMN ldk_pruned_at INTEGER;
    CREATE INDEX keysend_credits_to_prune ON keysend_credits(received_at)
        WHERE ldk_pruned_at IS NULL;
    ALTER TABLE refunds ADD COLUMN ldk_pruned_at INTEGER;
    CREATE INDEX refunds_to_prune ON refunds(resolved_at)
        WHERE ldk_pruned_at IS NULL AND resolved_at IS NOT NULL;
    "#,
    // v6: a session's keysend credits and losses are summed when it ends (its receipt, its
    // audit) and on every keysend: found by the session, not by reading them all.
    r#"
    CREATE INDEX keysend_credits_by_session ON keysend_credits(session_id);
    CREATE INDEX settlement_losses_by_session ON settlement_losses(session_id);
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
