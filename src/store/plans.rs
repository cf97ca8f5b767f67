//! The store's statements on the paths that run for every payment, session and watchdog round
//! never walk history: each finds its rows through an index on what it asks for (a session,
//! a hash, a partial index of what is still to do), so their cost stays flat over months of
//! invoices. Without statistics (we never run ANALYZE) SQLite picks an index by shape, and
//! `state = 'claimed'` on the state index reads every claimed invoice ever; that is what this
//! test catches: it records every statement a session's life runs and asks SQLite for each
//! one's plan against a store with history.

use std::sync::Mutex;

use super::*;

/// The statements traced, as SQLite ran them (parameters expanded).
static TRACED: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn trace(sql: &str) {
    TRACED.lock().unwrap().push(sql.to_string());
}

/// Tables that grow with every invoice, session or payment.
const HISTORY: [&str; 11] = [
    "sessions",
    "invoices",
    "chunks",
    "ledger",
    "receipts",
    "keysend_credits",
    "accounts",
    "account_debits",
    "refunds",
    "settlement_losses",
    "parked_events",
];

/// States only a live record is in: a state index finds few rows for them.
const LIVE_STATES: [&str; 4] = ["'open'", "'held'", "'claiming'", "'pending'"];

/// What is wrong with `sql`'s plan, if anything.
fn history_walk(c: &Connection, sql: &str) -> Option<String> {
    let mut st = c.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).ok()?;
    let plan: Vec<String> = st
        .query_map([], |r| r.get::<_, String>(3))
        .ok()?
        .collect::<Result<_, _>>()
        .ok()?;
    let scans = plan.iter().any(|line| {
        HISTORY
            .iter()
            .any(|t| *line == format!("SCAN {t}") || line.starts_with(&format!("SCAN {t} ")))
    });
    let by_state = plan.iter().any(|line| line.contains("_by_state"))
        && !LIVE_STATES.iter().any(|s| sql.contains(s));
    (scans || by_state).then(|| plan.join("; "))
}

fn chunk_invoice(s: &Store, hash: [u8; 32], session: [u8; 16], index: u32) {
    s.insert_invoice(&NewInvoice {
        payment_hash: hash,
        preimage: [8; 32],
        bolt11: "lnbcrt".into(),
        amount_msat: 2_000,
        session_id: Some(session),
        account_id: None,
        chunk_index: Some(index),
        purpose: InvoicePurpose::Chunk,
        expires_at_unix: now_unix() + 60,
    })
    .unwrap();
}

fn delivery(session: [u8; 16], index: u32, hash: Option<[u8; 32]>) -> ChunkDelivery {
    ChunkDelivery {
        session_id: session,
        chunk_index: index,
        first_token: index * 2,
        tokens: 2,
        price_msat: 2_000,
        payment_hash: hash,
        prompt_msat: 0,
        account_id: None,
        text: "ab".into(),
    }
}

/// One BOLT11 session of `chunks` paid chunks, ended with its receipt, as the meter runs it.
fn bolt11_session(s: &Store, n: u32, chunks: u32) -> [u8; 16] {
    let mut sid = [0; 16];
    sid[..4].copy_from_slice(&n.to_be_bytes());
    let mut new = sessions::tests::new_session(0);
    new.id = sid;
    new.token_hash = [n as u8; 32];
    new.token_hash[..4].copy_from_slice(&n.to_be_bytes());
    s.insert_session(&new).unwrap();
    for k in 0..chunks {
        let mut hash = [0; 32];
        hash[..4].copy_from_slice(&n.to_be_bytes());
        hash[4..8].copy_from_slice(&k.to_be_bytes());
        chunk_invoice(s, hash, sid, k);
        s.transition_invoice(&hash, InvoiceState::Held, Some(2_000), "")
            .unwrap();
        s.begin_claim(&[hash], Some(&delivery(sid, k, Some(hash))))
            .unwrap();
        s.record_settlement(&hash, 2_000).unwrap();
    }
    s.end_session(&sid, SessionState::Finished, "done").unwrap();
    s.audit_session(&sid).unwrap();
    s.delivered_chunks(&sid).unwrap();
    s.insert_receipt(&sid, "text", "sig").unwrap();
    s.receipt(&sid).unwrap();
    sid
}

#[test]
fn per_payment_session_and_watchdog_statements_never_walk_history() {
    let (s, _d) = test_store();
    // History: 200 sessions of 8 claimed chunks, a keysend each, a prepaid account.
    for n in 0..200 {
        let sid = bolt11_session(&s, n, 8);
        let mut hash = [0xee; 32];
        hash[..4].copy_from_slice(&n.to_be_bytes());
        s.record_keysend_credit(&hash, Some(sid), 1_000).unwrap();
    }
    s.create_account([0xac; 16], [0xac; 32]).unwrap();

    s.lock().trace(Some(trace));
    s.read().trace(Some(trace));
    // A BOLT11 session, with an HTLC refused on the way; a KEYSEND one and its refund; an
    // account's refund; a PREPAID session; the watchdog's round.
    let sid = bolt11_session(&s, 10_000, 4);
    s.record_rejected_htlc(&[0xfe; 32], 1_000, "late").unwrap();
    let ks = bolt11_session(&s, 10_001, 1);
    s.record_keysend_credit(&[0xfd; 32], Some(ks), 5_000)
        .unwrap();
    s.keysend_credited_msat(&ks).unwrap();
    s.refundable_of(&Owner::Session(ks)).unwrap();
    s.reserve_refund(Owner::Session(ks), Some(1_000), [0xfc; 32], "lnbcrt", "api")
        .unwrap();
    s.finish_refund(&[0xfc; 32], true, Some(0), "").unwrap();
    let account = s.account_by_token(&[0xac; 32]).unwrap().unwrap();
    s.insert_invoice(&NewInvoice {
        payment_hash: [0xfb; 32],
        preimage: [8; 32],
        bolt11: "lnbcrt".into(),
        amount_msat: 50_000,
        session_id: None,
        account_id: Some(account.id),
        chunk_index: None,
        purpose: InvoicePurpose::TopUp,
        expires_at_unix: now_unix() + 60,
    })
    .unwrap();
    s.transition_invoice(&[0xfb; 32], InvoiceState::Held, Some(50_000), "")
        .unwrap();
    s.begin_claim(&[[0xfb; 32]], None).unwrap();
    s.record_settlement(&[0xfb; 32], 50_000).unwrap();
    let mut prepaid = sessions::tests::new_session(0xa1);
    prepaid.mode = "PREPAID";
    prepaid.account_id = Some(account.id);
    s.insert_session(&prepaid).unwrap();
    for k in 0..3 {
        s.deliver_chunk(&ChunkDelivery {
            account_id: Some(account.id),
            ..delivery(prepaid.id, k, None)
        })
        .unwrap();
    }
    s.end_session(&prepaid.id, SessionState::Finished, "done")
        .unwrap();
    s.audit_session(&prepaid.id).unwrap();
    s.account(&account.id).unwrap();
    s.refundable_of(&Owner::Account(account.id)).unwrap();
    s.session(&sid).unwrap();
    s.invoice(&[0; 32]).unwrap();
    s.expired_open_invoices(now_unix(), 500).unwrap();
    s.invoices_in(InvoiceState::Claiming).unwrap();
    s.pending_refunds().unwrap();
    s.prunable_payments(now_unix() + 1, 500).unwrap();
    s.ldk_pruned(&[0; 32]).unwrap();
    s.lock().trace(None);
    s.read().trace(None);

    let traced = std::mem::take(&mut *TRACED.lock().unwrap());
    assert!(traced.len() > 40, "the workload ran: {traced:?}");
    let c = s.read();
    let mut walks: Vec<String> = traced
        .iter()
        .filter(|q| !q.trim_start().starts_with("PRAGMA"))
        .filter_map(|q| history_walk(&c, q).map(|p| format!("{}\n    {p}", q.trim())))
        .collect();
    walks.dedup();
    assert!(
        walks.is_empty(),
        "statements that read history:\n{}",
        walks.join("\n")
    );
}
