//! Generation sessions: who asked for what, at which price, and what was paid and delivered.

use rusqlite::{params, OptionalExtension, Row};

use super::{decode_page_token, ledger, now_unix, page, Page, Store, StoreError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    Open,
    Finished,
    Halted,
}

impl SessionState {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Open => "open",
            SessionState::Finished => "finished",
            SessionState::Halted => "halted",
        }
    }

    pub fn parse(s: &str) -> Option<SessionState> {
        [Self::Open, Self::Finished, Self::Halted]
            .into_iter()
            .find(|st| st.as_str() == s)
    }
}

#[derive(Debug, Clone)]
pub struct NewSession {
    pub id: [u8; 16],
    pub token_hash: [u8; 32],
    pub model: String,
    /// "BOLT11", "ATOMIC", "KEYSEND" or "PREPAID".
    pub mode: &'static str,
    pub prompt_tokens: u32,
    pub prompt_price_msat: u64,
    pub msat_per_token: u64,
    pub chunk_tokens: u32,
    pub max_tokens: u32,
    /// PREPAID: the account the session draws on.
    pub account_id: Option<[u8; 16]>,
    /// What the receipt commits to as the prompt (`wire::receipt::prompt_sha256`).
    pub prompt_sha256: Option<[u8; 32]>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub id: [u8; 16],
    pub token_hash: [u8; 32],
    pub model: String,
    pub mode: String,
    pub state: SessionState,
    pub prompt_tokens: u32,
    pub prompt_price_msat: u64,
    pub msat_per_token: u64,
    pub chunk_tokens: u32,
    pub max_tokens: u32,
    pub completion_tokens: u32,
    pub chunks_delivered: u32,
    /// Claimed invoices, keysend credits and (PREPAID) account debits.
    pub paid_msat: u64,
    /// Prompt price and delivered chunks.
    pub spent_msat: u64,
    pub refunded_msat: u64,
    /// Refunds in flight: reserved, not yet paid or released.
    pub reserved_msat: u64,
    /// Delivered chunks whose claim never settled: the operator's loss, counted as paid.
    pub written_off_msat: u64,
    pub prompt_sha256: Option<[u8; 32]>,
    pub created_at_unix: u64,
    pub ended_at_unix: Option<u64>,
    pub end_reason: Option<String>,
    pub account_id: Option<[u8; 16]>,
}

/// One chunk handed to the client.
#[derive(Debug, Clone)]
pub struct ChunkDelivery {
    pub session_id: [u8; 16],
    pub chunk_index: u32,
    pub first_token: u32,
    pub tokens: u32,
    pub price_msat: u64,
    /// The invoice that paid it (BOLT11, ATOMIC); None when drawn from a balance.
    pub payment_hash: Option<[u8; 32]>,
    /// The prompt's price, charged with this chunk (BOLT11/ATOMIC paid prompts: the first
    /// chunk); 0 otherwise.
    pub prompt_msat: u64,
    /// PREPAID: debit the chunk (and prompt) from this account in the same transaction,
    /// refused if its balance cannot cover it.
    pub account_id: Option<[u8; 16]>,
    /// What the client gets (plaintext, ATOMIC too): kept for its receipt.
    pub text: String,
}

/// A delivered chunk as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveredChunk {
    pub chunk_index: u32,
    pub first_token: u32,
    pub tokens: u32,
    pub price_msat: u64,
    pub payment_hash: Option<[u8; 32]>,
    /// None for chunks delivered before the store kept their text (schema v3).
    pub text: Option<String>,
}

/// Money of one session, from the tables that record it independently (invoices, keysend
/// credits, account debits, chunks, refunds, losses, the ledger's prompt charges).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionAudit {
    /// Invoices LDK reported claimed (what their HTLCs carried).
    pub claimed_msat: u64,
    /// Keysend payments credited to the session.
    pub credited_msat: u64,
    /// PREPAID: drawn from the account.
    pub debited_msat: u64,
    /// Delivered chunks whose claim never settled (the operator's loss; see `settlement_losses`).
    pub written_off_msat: u64,
    pub prompt_msat: u64,
    pub delivered_msat: u64,
    pub delivered_tokens: u32,
    pub refunded_msat: u64,
    pub reserved_msat: u64,
    /// Invoices still open, held or claiming.
    pub unresolved_invoices: u32,
}

impl SessionAudit {
    /// In minus out: claimed + credited + debited + written off − prompt − delivered − refunded
    /// − reserved. SPEC invariant 3 says this is the refundable balance, never negative.
    pub fn balance_msat(&self) -> i128 {
        (self.claimed_msat + self.credited_msat + self.debited_msat + self.written_off_msat) as i128
            - (self.prompt_msat + self.delivered_msat + self.refunded_msat + self.reserved_msat)
                as i128
    }
}

impl Session {
    /// Money we hold for the owner: paid (or written off for it), not spent, not refunded or
    /// being refunded. The one definition: Refund ([`REFUNDABLE_SQL`]) and the audit use it.
    pub fn refundable_msat(&self) -> u64 {
        self.paid_msat
            .saturating_add(self.written_off_msat)
            .saturating_sub(self.spent_msat)
            .saturating_sub(self.refunded_msat)
            .saturating_sub(self.reserved_msat)
    }
}

const COLUMNS: &str = "id, token_hash, model, mode, state, prompt_tokens, prompt_price_msat, \
     msat_per_token, chunk_tokens, max_tokens, completion_tokens, chunks_delivered, paid_msat, \
     spent_msat, refunded_msat, created_at, ended_at, end_reason, reserved_msat, account_id, \
     written_off_msat, prompt_sha256";

/// A session's refundable balance in SQL (may be negative while a claim settles: read it
/// through `MAX(…, 0)`); the same sum as [`Session::refundable_msat`].
pub(crate) const REFUNDABLE_SQL: &str =
    "paid_msat + written_off_msat - spent_msat - refunded_msat - reserved_msat";

fn from_row(r: &Row<'_>) -> rusqlite::Result<Session> {
    let bad = |what: &str| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Blob,
            format!("bad {what}").into(),
        )
    };
    Ok(Session {
        id: r.get::<_, Vec<u8>>(0)?.try_into().map_err(|_| bad("id"))?,
        token_hash: r
            .get::<_, Vec<u8>>(1)?
            .try_into()
            .map_err(|_| bad("token_hash"))?,
        model: r.get(2)?,
        mode: r.get(3)?,
        state: SessionState::parse(&r.get::<_, String>(4)?).ok_or_else(|| bad("state"))?,
        prompt_tokens: r.get(5)?,
        prompt_price_msat: r.get::<_, i64>(6)? as u64,
        msat_per_token: r.get::<_, i64>(7)? as u64,
        chunk_tokens: r.get(8)?,
        max_tokens: r.get(9)?,
        completion_tokens: r.get(10)?,
        chunks_delivered: r.get(11)?,
        paid_msat: r.get::<_, i64>(12)? as u64,
        spent_msat: r.get::<_, i64>(13)? as u64,
        refunded_msat: r.get::<_, i64>(14)? as u64,
        created_at_unix: r.get::<_, i64>(15)? as u64,
        ended_at_unix: r.get::<_, Option<i64>>(16)?.map(|v| v as u64),
        end_reason: r.get(17)?,
        reserved_msat: r.get::<_, i64>(18)? as u64,
        account_id: r
            .get::<_, Option<Vec<u8>>>(19)?
            .map(|v| v.try_into().map_err(|_| bad("account_id")))
            .transpose()?,
        written_off_msat: r.get::<_, i64>(20)? as u64,
        prompt_sha256: r
            .get::<_, Option<Vec<u8>>>(21)?
            .map(|v| v.try_into().map_err(|_| bad("prompt_sha256")))
            .transpose()?,
    })
}

impl Store {
    pub fn insert_session(&self, s: &NewSession) -> Result<Session, StoreError> {
        let mut c = self.lock();
        let tx = c.transaction()?;
        tx.execute(
            "INSERT INTO sessions(id, token_hash, model, mode, state, prompt_tokens,
                 prompt_price_msat, msat_per_token, chunk_tokens, max_tokens, created_at, account_id,
                 prompt_sha256)
             VALUES (?1, ?2, ?3, ?4, 'open', ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            params![
                s.id.as_slice(),
                s.token_hash.as_slice(),
                s.model,
                s.mode,
                s.prompt_tokens,
                s.prompt_price_msat as i64,
                s.msat_per_token as i64,
                s.chunk_tokens,
                s.max_tokens,
                now_unix() as i64,
                s.account_id.as_ref().map(|a| a.as_slice()),
                s.prompt_sha256.as_ref().map(|h| h.as_slice()),
            ],
        )?;
        ledger::append(&tx, "session_opened", Some(&s.id), None, 0, &s.model)?;
        let row = tx.query_row(
            &format!("SELECT {COLUMNS} FROM sessions WHERE id = ?1"),
            [s.id.as_slice()],
            from_row,
        )?;
        tx.commit()?;
        Ok(row)
    }

    pub fn session(&self, id: &[u8; 16]) -> Result<Option<Session>, StoreError> {
        Ok(self
            .lock()
            .query_row(
                &format!("SELECT {COLUMNS} FROM sessions WHERE id = ?1"),
                [id.as_slice()],
                from_row,
            )
            .optional()?)
    }

    /// Sessions, newest first, optionally filtered by state.
    pub fn list_sessions(
        &self,
        page_size: u32,
        page_token: &str,
        state: Option<SessionState>,
    ) -> Result<Page<Session>, StoreError> {
        let offset = decode_page_token(page_token)?;
        let c = self.read();
        let mut st = c.prepare(&format!(
            "SELECT {COLUMNS} FROM sessions WHERE (?1 IS NULL OR state = ?1)
             ORDER BY created_at DESC, rowid DESC LIMIT ?2 OFFSET ?3"
        ))?;
        let rows = st
            .query_map(
                params![
                    state.map(|s| s.as_str()),
                    page_size as i64 + 1,
                    offset as i64
                ],
                from_row,
            )?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(page(rows, offset, page_size))
    }

    /// Records chunk `chunk_index` as delivered and charges its price to the session, in one
    /// transaction. Idempotent: delivering the same chunk twice charges once.
    pub fn deliver_chunk(&self, d: &ChunkDelivery) -> Result<bool, StoreError> {
        let mut c = self.lock();
        let tx = c.transaction()?;
        let new = deliver_in(&tx, d)?;
        tx.commit()?;
        Ok(new)
    }

    /// Charges the prompt price (once) before prefill, from the session's KEYSEND balance or
    /// (PREPAID) its account. Refused, changing nothing, when the balance cannot cover it.
    pub fn charge_prompt(&self, session_id: &[u8; 16], price_msat: u64) -> Result<(), StoreError> {
        self.write(|tx| {
            let s = session_in(tx, session_id)?;
            if let Some(aid) = &s.account_id {
                debit_account_in(tx, aid, session_id, "prompt", price_msat)?;
                tx.execute(
                    "UPDATE sessions SET paid_msat = paid_msat + ?2 WHERE id = ?1",
                    params![session_id.as_slice(), price_msat as i64],
                )?;
            } else {
                let available = s.refundable_msat();
                if available < price_msat {
                    return Err(StoreError::InsufficientBalance {
                        what: "session balance",
                        available_msat: available,
                        needed_msat: price_msat,
                    });
                }
            }
            prompt_in(tx, session_id, price_msat)
        })
    }

    /// Whether a delivered chunk was paid by the invoice with this payment hash.
    pub fn chunk_paid_by(&self, payment_hash: &[u8; 32]) -> Result<bool, StoreError> {
        let n: i64 = self.lock().query_row(
            "SELECT COUNT(*) FROM chunks WHERE payment_hash = ?1",
            [payment_hash.as_slice()],
            |r| r.get(0),
        )?;
        Ok(n > 0)
    }

    /// The delivered chunks of a session, in order.
    pub fn delivered_chunks(&self, id: &[u8; 16]) -> Result<Vec<DeliveredChunk>, StoreError> {
        let c = self.lock();
        let mut st = c.prepare(
            "SELECT chunk_index, first_token, tokens, price_msat, payment_hash, text
             FROM chunks WHERE session_id = ?1 ORDER BY chunk_index",
        )?;
        let rows = st
            .query_map([id.as_slice()], |r| {
                Ok((
                    r.get::<_, u32>(0)?,
                    r.get::<_, u32>(1)?,
                    r.get::<_, u32>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, Option<Vec<u8>>>(4)?,
                    r.get::<_, Option<String>>(5)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter()
            .map(|(chunk_index, first_token, tokens, price, hash, text)| {
                Ok(DeliveredChunk {
                    chunk_index,
                    first_token,
                    tokens,
                    price_msat: price as u64,
                    payment_hash: hash
                        .map(|h| h.try_into())
                        .transpose()
                        .map_err(|_| StoreError::Corrupt("chunk payment_hash".into()))?,
                    text,
                })
            })
            .collect()
    }

    /// The signed receipt of a session, once issued: (signed text, signature).
    pub fn receipt(&self, id: &[u8; 16]) -> Result<Option<(String, String)>, StoreError> {
        Ok(self
            .lock()
            .query_row(
                "SELECT signed_text, signature FROM receipts WHERE session_id = ?1",
                [id.as_slice()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
    }

    /// Keeps a session's signed receipt. A session has one receipt: if one was stored first
    /// (a concurrent GetReceipt), that one is kept and returned.
    pub fn insert_receipt(
        &self,
        id: &[u8; 16],
        signed_text: &str,
        signature: &str,
    ) -> Result<(String, String), StoreError> {
        self.write(|tx| {
            tx.execute(
                "INSERT OR IGNORE INTO receipts(session_id, signed_text, signature, created_at)
                 VALUES (?1, ?2, ?3, ?4)",
                params![id.as_slice(), signed_text, signature, now_unix() as i64],
            )?;
            Ok(tx.query_row(
                "SELECT signed_text, signature FROM receipts WHERE session_id = ?1",
                [id.as_slice()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?)
        })
    }

    /// Ends an open session (finished or halted). Ending an ended session is a no-op.
    pub fn end_session(
        &self,
        id: &[u8; 16],
        state: SessionState,
        reason: &str,
    ) -> Result<(), StoreError> {
        let mut c = self.lock();
        let tx = c.transaction()?;
        let n = tx.execute(
            "UPDATE sessions SET state = ?2, ended_at = ?3, end_reason = ?4
             WHERE id = ?1 AND state = 'open'",
            params![id.as_slice(), state.as_str(), now_unix() as i64, reason],
        )?;
        if n > 0 {
            let kind = match state {
                SessionState::Finished => "session_finished",
                _ => "session_halted",
            };
            ledger::append(&tx, kind, Some(id), None, 0, reason)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The money of one session recomputed from the tables that record it independently
    /// (see [`SessionAudit::balance_msat`] for the invariant).
    pub fn audit_session(&self, id: &[u8; 16]) -> Result<SessionAudit, StoreError> {
        let c = self.lock();
        let one = |sql: &str| -> Result<u64, StoreError> {
            Ok(c.query_row(sql, [id.as_slice()], |r| r.get::<_, i64>(0))? as u64)
        };
        Ok(SessionAudit {
            // `+state`: found by the session's index, never by the state's (every claimed
            // invoice ever), see store::plans.
            claimed_msat: one("SELECT COALESCE(SUM(received_msat), 0) FROM invoices
                 WHERE session_id = ?1 AND +state = 'claimed'")?,
            credited_msat: one(
                "SELECT COALESCE(SUM(amount_msat), 0) FROM keysend_credits WHERE session_id = ?1",
            )?,
            debited_msat: one(
                "SELECT COALESCE(SUM(amount_msat), 0) FROM account_debits WHERE session_id = ?1",
            )?,
            written_off_msat: one("SELECT COALESCE(SUM(amount_msat), 0) FROM settlement_losses
                 WHERE session_id = ?1 AND kind = 'never_settled'")?,
            prompt_msat: one("SELECT COALESCE(-SUM(amount_msat), 0) FROM ledger
                 WHERE session_id = ?1 AND kind = 'prompt_charged'")?,
            delivered_msat: one(
                "SELECT COALESCE(SUM(price_msat), 0) FROM chunks WHERE session_id = ?1",
            )?,
            delivered_tokens: one(
                "SELECT COALESCE(SUM(tokens), 0) FROM chunks WHERE session_id = ?1",
            )? as u32,
            refunded_msat: one("SELECT COALESCE(SUM(amount_msat), 0) FROM refunds
                 WHERE session_id = ?1 AND state = 'succeeded'")?,
            reserved_msat: one("SELECT COALESCE(SUM(amount_msat), 0) FROM refunds
                 WHERE session_id = ?1 AND state = 'pending'")?,
            unresolved_invoices: one("SELECT COUNT(*) FROM invoices
                 WHERE session_id = ?1 AND state IN ('open','held','claiming')")?
                as u32,
        })
    }

    /// Marks every still-open session halted (they cannot outlive the process that ran them).
    pub fn halt_open_sessions(&self, reason: &str) -> Result<usize, StoreError> {
        let mut c = self.lock();
        let tx = c.transaction()?;
        let ids: Vec<Vec<u8>> = {
            let mut st = tx.prepare("SELECT id FROM sessions WHERE state = 'open'")?;
            let rows = st.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
            rows
        };
        for id in &ids {
            tx.execute(
                "UPDATE sessions SET state = 'halted', ended_at = ?2, end_reason = ?3 WHERE id = ?1",
                params![id, now_unix() as i64, reason],
            )?;
            let sid: Option<[u8; 16]> = id.clone().try_into().ok();
            ledger::append(&tx, "session_halted", sid.as_ref(), None, 0, reason)?;
        }
        tx.commit()?;
        Ok(ids.len())
    }

    /// Sum of refundable balances over all sessions and accounts (what the operator owes
    /// customers).
    pub fn total_refundable_msat(&self) -> Result<u64, StoreError> {
        let v: i64 = self.read().query_row(
            &format!("SELECT (SELECT COALESCE(SUM(MAX({REFUNDABLE_SQL}, 0)), 0) FROM sessions)
                  + (SELECT COALESCE(SUM(MAX(credited_msat - spent_msat - refunded_msat - reserved_msat, 0)), 0)
                     FROM accounts)"),
            [],
            |r| r.get(0),
        )?;
        Ok(v as u64)
    }
}

pub(super) fn session_in(tx: &rusqlite::Transaction, id: &[u8; 16]) -> Result<Session, StoreError> {
    tx.query_row(
        &format!("SELECT {COLUMNS} FROM sessions WHERE id = ?1"),
        [id.as_slice()],
        from_row,
    )
    .optional()?
    .ok_or_else(|| StoreError::NotFound {
        what: "session",
        id: hex::encode(id),
    })
}

/// Charges the prompt to the session inside the caller's transaction.
fn prompt_in(tx: &rusqlite::Transaction, id: &[u8; 16], price_msat: u64) -> Result<(), StoreError> {
    if price_msat == 0 {
        return Ok(());
    }
    tx.execute(
        "UPDATE sessions SET spent_msat = spent_msat + ?2 WHERE id = ?1",
        params![id.as_slice(), price_msat as i64],
    )?;
    ledger::append(
        tx,
        "prompt_charged",
        Some(id),
        None,
        -(price_msat as i64),
        "",
    )
}

/// Draws `amount_msat` from an account for `what` of a session, or refuses (changing nothing)
/// when its available balance cannot cover it. Once per (session, what).
fn debit_account_in(
    tx: &rusqlite::Transaction,
    account: &[u8; 16],
    session: &[u8; 16],
    what: &str,
    amount_msat: u64,
) -> Result<(), StoreError> {
    let a = super::accounts::account_in(tx, account)?;
    if a.available_msat() < amount_msat {
        return Err(StoreError::InsufficientBalance {
            what: "account balance",
            available_msat: a.available_msat(),
            needed_msat: amount_msat,
        });
    }
    tx.execute(
        "INSERT INTO account_debits(session_id, what, account_id, amount_msat, at)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            session.as_slice(),
            what,
            account.as_slice(),
            amount_msat as i64,
            now_unix() as i64
        ],
    )?;
    tx.execute(
        "UPDATE accounts SET spent_msat = spent_msat + ?2 WHERE id = ?1",
        params![account.as_slice(), amount_msat as i64],
    )?;
    ledger::append_account(
        tx,
        "account_debited",
        account,
        None,
        -(amount_msat as i64),
        &format!("session {} {what}", hex::encode(session)),
    )
}

/// Records one delivered chunk inside the caller's transaction; false if it already was.
/// With a prompt price, the prompt is charged in the same transaction; with an account, the
/// chunk is drawn from it (refused when its balance cannot cover it).
pub(super) fn deliver_in(
    tx: &rusqlite::Transaction,
    d: &ChunkDelivery,
) -> Result<bool, StoreError> {
    let inserted = tx.execute(
        "INSERT OR IGNORE INTO chunks(session_id, chunk_index, first_token, tokens, price_msat,
                 payment_hash, delivered_at, text)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            d.session_id.as_slice(),
            d.chunk_index,
            d.first_token,
            d.tokens,
            d.price_msat as i64,
            d.payment_hash.as_ref().map(|h| h.as_slice()),
            now_unix() as i64,
            d.text
        ],
    )?;
    if inserted == 0 {
        return Ok(false);
    }
    if d.payment_hash.is_none() && d.account_id.is_none() {
        // Drawn from the session's own balance (KEYSEND): it must cover the chunk, whatever
        // a concurrent refund reserved.
        let available = session_in(tx, &d.session_id)?.refundable_msat();
        if available < d.price_msat {
            return Err(StoreError::InsufficientBalance {
                what: "session balance",
                available_msat: available,
                needed_msat: d.price_msat,
            });
        }
    }
    if let Some(aid) = &d.account_id {
        let what = format!("chunk {}", d.chunk_index);
        debit_account_in(tx, aid, &d.session_id, &what, d.price_msat)?;
        tx.execute(
            "UPDATE sessions SET paid_msat = paid_msat + ?2 WHERE id = ?1",
            params![d.session_id.as_slice(), d.price_msat as i64],
        )?;
    }
    let n = tx.execute(
        "UPDATE sessions SET completion_tokens = completion_tokens + ?2,
                 chunks_delivered = chunks_delivered + 1, spent_msat = spent_msat + ?3
             WHERE id = ?1",
        params![d.session_id.as_slice(), d.tokens, d.price_msat as i64],
    )?;
    if n == 0 {
        return Err(StoreError::NotFound {
            what: "session",
            id: hex::encode(d.session_id),
        });
    }
    ledger::append(
        tx,
        "chunk_delivered",
        Some(&d.session_id),
        d.payment_hash.as_ref(),
        -(d.price_msat as i64),
        &format!("chunk {} ({} tokens)", d.chunk_index, d.tokens),
    )?;
    prompt_in(tx, &d.session_id, d.prompt_msat)?;
    Ok(true)
}

/// Takes back a delivery committed with a claim decision that LDK then refused (inside the
/// caller's transaction): the chunk row, its charge, and the prompt charged with it. Nothing
/// left the server for it (BOLT11 sends the text, ATOMIC the key, only after the claim).
pub(super) fn undeliver_in(
    tx: &rusqlite::Transaction,
    d: &ChunkDelivery,
    reason: &str,
) -> Result<(), StoreError> {
    let removed = tx.execute(
        "DELETE FROM chunks WHERE session_id = ?1 AND chunk_index = ?2 AND payment_hash IS ?3",
        params![
            d.session_id.as_slice(),
            d.chunk_index,
            d.payment_hash.as_ref().map(|h| h.as_slice())
        ],
    )?;
    if removed == 0 {
        return Ok(());
    }
    tx.execute(
        "UPDATE sessions SET completion_tokens = completion_tokens - ?2,
                 chunks_delivered = chunks_delivered - 1, spent_msat = spent_msat - ?3
             WHERE id = ?1",
        params![d.session_id.as_slice(), d.tokens, d.price_msat as i64],
    )?;
    ledger::append(
        tx,
        "chunk_undelivered",
        Some(&d.session_id),
        d.payment_hash.as_ref(),
        d.price_msat as i64,
        &format!("chunk {}: {reason}", d.chunk_index),
    )?;
    if d.prompt_msat > 0 {
        tx.execute(
            "UPDATE sessions SET spent_msat = spent_msat - ?2 WHERE id = ?1",
            params![d.session_id.as_slice(), d.prompt_msat as i64],
        )?;
        // The prompt's charges net out in the ledger (the audit sums them).
        ledger::append(
            tx,
            "prompt_charged",
            Some(&d.session_id),
            None,
            d.prompt_msat as i64,
            &format!("taken back with chunk {}: {reason}", d.chunk_index),
        )?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::store::{test_store, InvoicePurpose, InvoiceState, NewInvoice};

    pub(crate) fn new_session(n: u8) -> NewSession {
        NewSession {
            id: [n; 16],
            token_hash: [n; 32],
            model: "tiny".into(),
            mode: "BOLT11",
            prompt_tokens: 3,
            prompt_price_msat: 0,
            msat_per_token: 1_000,
            chunk_tokens: 16,
            max_tokens: 64,
            account_id: None,
            prompt_sha256: None,
        }
    }

    /// A 16 000 msat invoice for chunk `index` of session [1; 16], held with `received_msat`.
    fn held_chunk_invoice(s: &Store, hash: [u8; 32], index: u32, received_msat: u64) {
        s.insert_invoice(&NewInvoice {
            payment_hash: hash,
            preimage: [8; 32],
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
    }

    fn delivery(index: u32, hash: Option<[u8; 32]>) -> ChunkDelivery {
        ChunkDelivery {
            session_id: [1; 16],
            chunk_index: index,
            first_token: index * 16,
            tokens: 16,
            price_msat: 16_000,
            payment_hash: hash,
            prompt_msat: 0,
            account_id: None,
            text: String::new(),
        }
    }

    #[test]
    fn settled_overpayment_becomes_refundable() {
        let (s, _d) = test_store();
        s.insert_session(&new_session(1)).unwrap();
        let hash = [7; 32];
        held_chunk_invoice(&s, hash, 0, 16_500);
        s.begin_claim(&[hash], None).unwrap();
        assert_eq!(
            s.session(&[1; 16]).unwrap().unwrap().paid_msat,
            0,
            "a decided claim is not money until LDK reports it"
        );
        s.record_settlement(&hash, 16_500).unwrap();
        let sess = s.session(&[1; 16]).unwrap().unwrap();
        assert_eq!(sess.paid_msat, 16_500);
        assert_eq!(sess.refundable_msat(), 16_500, "nothing delivered yet");
        assert_eq!(s.total_refundable_msat().unwrap(), 16_500);
        s.deliver_chunk(&delivery(0, Some(hash))).unwrap();
        let a = s.audit_session(&[1; 16]).unwrap();
        assert_eq!((a.claimed_msat, a.delivered_msat), (16_500, 16_000));
        assert_eq!(a.balance_msat(), 500);
        assert_eq!(s.session(&[1; 16]).unwrap().unwrap().refundable_msat(), 500);
    }

    #[test]
    fn a_chunk_being_claimed_is_never_refundable() {
        // Issue 22.3: the delivery used to be committed after LDK's claim, so a settlement
        // reported in between made the chunk's price refundable while the session ran.
        let (s, _d) = test_store();
        s.insert_session(&new_session(1)).unwrap();
        let owner = crate::store::Owner::Session([1; 16]);
        let hash = [7; 32];
        held_chunk_invoice(&s, hash, 0, 16_500);
        s.begin_claim(&[hash], Some(&delivery(0, Some(hash))))
            .unwrap();
        // LDK settles before anything else happens (the event loop is another thread).
        s.record_settlement(&hash, 16_500).unwrap();
        assert_eq!(
            s.refundable_of(&owner).unwrap(),
            500,
            "only the overpayment"
        );
        assert!(matches!(
            s.reserve_refund(owner, Some(16_000), [1; 32], "lnbcrt1", "api"),
            Err(StoreError::InsufficientBalance {
                available_msat: 500,
                ..
            })
        ));
        let a = s.audit_session(&[1; 16]).unwrap();
        assert_eq!((a.delivered_msat, a.balance_msat()), (16_000, 500));
    }

    #[test]
    fn a_refused_claim_takes_its_delivery_and_prompt_back() {
        let (s, _d) = test_store();
        s.insert_session(&new_session(1)).unwrap();
        let hash = [7; 32];
        held_chunk_invoice(&s, hash, 0, 16_000);
        let mut d = delivery(0, Some(hash));
        d.prompt_msat = 3_000;
        s.begin_claim(&[hash], Some(&d)).unwrap();
        assert_eq!(s.session(&[1; 16]).unwrap().unwrap().spent_msat, 19_000);
        s.claim_refused(&[hash], Some(&d), "LDK refused").unwrap();
        let sess = s.session(&[1; 16]).unwrap().unwrap();
        assert_eq!(
            (
                sess.spent_msat,
                sess.completion_tokens,
                sess.chunks_delivered
            ),
            (0, 0, 0)
        );
        assert!(s.delivered_chunks(&[1; 16]).unwrap().is_empty());
        assert_eq!(
            s.invoice(&hash).unwrap().unwrap().state,
            InvoiceState::Failed
        );
        let a = s.audit_session(&[1; 16]).unwrap();
        assert_eq!(
            (a.prompt_msat, a.delivered_msat, a.balance_msat()),
            (0, 0, 0)
        );
    }

    #[test]
    fn a_delivery_charges_its_prompt_once_with_it() {
        let (s, _d) = test_store();
        s.insert_session(&new_session(1)).unwrap();
        let mut d = delivery(0, Some([3; 32]));
        d.prompt_msat = 3_000;
        assert!(s.deliver_chunk(&d).unwrap());
        assert!(!s.deliver_chunk(&d).unwrap(), "a replay charges nothing");
        let a = s.audit_session(&[1; 16]).unwrap();
        assert_eq!((a.prompt_msat, a.delivered_msat), (3_000, 16_000));
        assert_eq!(s.session(&[1; 16]).unwrap().unwrap().spent_msat, 19_000);
    }

    #[test]
    fn a_failed_delivery_changes_nothing() {
        let (s, _d) = test_store();
        s.insert_session(&new_session(1)).unwrap();
        let mut d = delivery(0, Some([3; 32]));
        d.session_id = [2; 16];
        assert!(s.deliver_chunk(&d).is_err());
        assert_eq!(s.audit_session(&[2; 16]).unwrap().delivered_msat, 0);
        let mut d = delivery(0, None);
        d.account_id = Some([5; 16]);
        // No balance of its own either: a KEYSEND chunk the balance cannot cover is refused.
        assert!(matches!(
            s.deliver_chunk(&delivery(0, None)),
            Err(StoreError::InsufficientBalance { .. })
        ));
        assert!(matches!(
            s.deliver_chunk(&d),
            Err(StoreError::NotFound {
                what: "account",
                ..
            })
        ));
        assert_eq!(s.audit_session(&[1; 16]).unwrap().delivered_msat, 0);
    }

    #[test]
    fn list_filters_by_state() {
        let (s, _d) = test_store();
        for n in 0..3 {
            s.insert_session(&new_session(n)).unwrap();
        }
        let open = s.list_sessions(10, "", Some(SessionState::Open)).unwrap();
        assert_eq!(open.items.len(), 3);
        let halted = s.list_sessions(10, "", Some(SessionState::Halted)).unwrap();
        assert!(halted.items.is_empty());
    }
}
