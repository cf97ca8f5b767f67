//! The foundation end to end: a hold invoice issued by the server is paid over a real channel
//! on a real regtest chain, held, claimed (or failed back) and recorded in SQLite; state
//! survives a server restart.

use sha2::{Digest, Sha256};
use std::time::Duration;
use tokio::sync::mpsc;

use satstream::harness::{wait_until, Harness, HarnessOptions, PayOutcome};
use satstream::lightning::invoices::HoldInvoice;
use satstream::store::{InvoicePurpose, InvoiceState};

const T: Duration = Duration::from_secs(60);

/// A test hold invoice of `amount_msat` whose held HTLC is announced on `tx`.
fn hold(
    ln: &satstream::lightning::Lightning,
    amount_msat: u64,
    chunk: u32,
    tx: mpsc::UnboundedSender<satstream::lightning::HeldHtlc>,
) -> Result<satstream::store::Invoice, satstream::lightning::LightningError> {
    ln.create_hold_invoice(
        &HoldInvoice {
            amount_msat,
            description: "chunk".into(),
            expiry_secs: 600,
            purpose: InvoicePurpose::Test,
            session_id: None,
            account_id: None,
            chunk_index: Some(chunk),
            preimage: None,
        },
        Some(tx),
    )
}

/// Waits until LDK's report of the claim is booked (`claimed`).
async fn booked(store: &satstream::store::Store, hash: [u8; 32]) {
    let store = store.clone();
    wait_until("the claim to be booked", T, || {
        let store = store.clone();
        async move { store.invoice(&hash).unwrap().unwrap().state == InvoiceState::Claimed }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hold_invoices_claim_fail_and_survive_restart() {
    super::support::init_tracing();
    let mut h = Harness::start(HarnessOptions::default()).await.unwrap();
    let (tx, mut held_rx) = mpsc::unbounded_channel();

    // 1. Paid, held, claimed: the payer learns our preimage; SQLite says claimed, exact amount.
    let ln = h.server().app.lightning.clone();
    let inv = hold(&ln, 21_000, 0, tx.clone()).unwrap();
    let events = h.payer.subscribe();
    let hash = h.payer.send(&inv.bolt11).unwrap();
    assert_eq!(hash, inv.payment_hash);
    let held = tokio::time::timeout(T, held_rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(held.payment_hash, hash);
    assert_eq!(held.received_msat, 21_000);
    let store = h.server().app.store.clone();
    assert_eq!(
        store.invoice(&hash).unwrap().unwrap().state,
        InvoiceState::Held
    );
    ln.claim(&[hash], None).unwrap();
    assert_eq!(
        store.invoice(&hash).unwrap().unwrap().state,
        InvoiceState::Claiming,
        "decided, not yet money until LDK reports the claim"
    );
    match h.payer.wait_outcome(events, hash, T).await.unwrap() {
        PayOutcome::Succeeded { preimage, .. } => {
            assert_eq!(
                preimage, inv.preimage,
                "payer got the server-chosen preimage"
            );
            assert_eq!(Sha256::digest(preimage).as_slice(), hash.as_slice());
        }
        other => panic!("payment should succeed: {other:?}"),
    }
    booked(&store, hash).await;
    let claimed = store.invoice(&hash).unwrap().unwrap();
    assert_eq!(claimed.state, InvoiceState::Claimed);
    assert_eq!(claimed.amount_msat, 21_000);
    assert_eq!(claimed.received_msat, Some(21_000));
    // The node's PaymentReceived for our claim is what books it, once.
    let claims = |s: &satstream::store::Store, h: &[u8; 32]| {
        s.ledger_for_payment(h)
            .unwrap()
            .iter()
            .filter(|e| e.kind == "invoice_claimed")
            .map(|e| e.amount_msat)
            .collect::<Vec<_>>()
    };
    assert_eq!(claims(&store, &hash), vec![21_000]);

    // 2. Failed back: the payer sees the failure and gets every msat back.
    let outbound_before = h.payer.outbound_msat();
    let inv2 = hold(&ln, 33_000, 1, tx.clone()).unwrap();
    let events = h.payer.subscribe();
    let hash2 = h.payer.send(&inv2.bolt11).unwrap();
    let held = tokio::time::timeout(T, held_rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(held.payment_hash, hash2);
    ln.fail(&hash2, "test: not delivering").unwrap();
    assert!(
        matches!(
            h.payer.wait_outcome(events, hash2, T).await.unwrap(),
            PayOutcome::Failed { .. }
        ),
        "payer must see the failure"
    );
    let payer = h.payer.node.clone();
    wait_until("payer balance restored", T, || {
        let payer = payer.clone();
        async move {
            payer
                .list_channels()
                .iter()
                .map(|c| c.outbound_capacity_msat)
                .sum::<u64>()
                == outbound_before
        }
    })
    .await
    .unwrap();
    assert_eq!(
        store.invoice(&hash2).unwrap().unwrap().state,
        InvoiceState::Failed
    );

    // 3. Nobody listening for an invoice (its issuer is gone): the event loop fails it back.
    let (gone_tx, gone_rx) = mpsc::unbounded_channel();
    let inv3 = hold(&ln, 5_000, 2, gone_tx).unwrap();
    drop(gone_rx);
    let out = h.payer.pay(&inv3.bolt11, T).await.unwrap();
    assert!(matches!(out, PayOutcome::Failed { .. }), "{out:?}");
    assert_eq!(
        store.invoice(&inv3.payment_hash).unwrap().unwrap().state,
        InvoiceState::Failed
    );

    // 4. Restart: the ledger is unchanged, and a new payment goes through.
    let money = |s: &satstream::store::Store| {
        s.ledger()
            .unwrap()
            .into_iter()
            .filter(|e| e.kind != "server_started")
            .collect::<Vec<_>>()
    };
    let ledger_before = money(&store);
    drop(store);
    h.restart_server().await.unwrap();
    let store = h.server().app.store.clone();
    assert_eq!(
        money(&store),
        ledger_before,
        "restart must not touch the money in the ledger"
    );
    assert_eq!(claims(&store, &hash), vec![21_000]);

    let ln = h.server().app.lightning.clone();
    let (tx, mut held_rx) = mpsc::unbounded_channel();
    let inv4 = hold(&ln, 8_000, 3, tx).unwrap();
    let events = h.payer.subscribe();
    let hash4 = h.payer.send(&inv4.bolt11).unwrap();
    tokio::time::timeout(T, held_rx.recv())
        .await
        .unwrap()
        .unwrap();
    ln.claim(&[hash4], None).unwrap();
    assert!(matches!(
        h.payer.wait_outcome(events, hash4, T).await.unwrap(),
        PayOutcome::Succeeded { .. }
    ));
    booked(&store, hash4).await;
    // Nothing is left held or open.
    assert!(store.unresolved_invoices().unwrap().is_empty());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restart_settles_what_was_left_unresolved() {
    super::support::init_tracing();
    let mut h = Harness::start(HarnessOptions::default()).await.unwrap();
    let ln = h.server().app.lightning.clone();
    let (tx, mut held_rx) = mpsc::unbounded_channel();
    // One invoice paid and held when the server goes down, one never paid.
    let held_inv = hold(&ln, 9_000, 0, tx.clone()).unwrap();
    let open_inv = hold(&ln, 4_000, 1, tx).unwrap();
    let events = h.payer.subscribe();
    let hash = h.payer.send(&held_inv.bolt11).unwrap();
    tokio::time::timeout(T, held_rx.recv())
        .await
        .unwrap()
        .unwrap();
    drop(ln);

    h.restart_server().await.unwrap();
    let store = h.server().app.store.clone();
    // The held HTLC went back to the payer; the unpaid invoice is withdrawn.
    assert!(matches!(
        h.payer.wait_outcome(events, hash, T).await.unwrap(),
        PayOutcome::Failed { .. }
    ));
    assert_eq!(
        store.invoice(&hash).unwrap().unwrap().state,
        InvoiceState::Failed
    );
    assert_eq!(
        store
            .invoice(&open_inv.payment_hash)
            .unwrap()
            .unwrap()
            .state,
        InvoiceState::Canceled
    );
    // A late payment of the withdrawn invoice is failed back, never kept.
    let out = h.payer.pay(&open_inv.bolt11, T).await.unwrap();
    assert!(matches!(out, PayOutcome::Failed { .. }), "{out:?}");
    let rejected = store
        .ledger_for_payment(&open_inv.payment_hash)
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "htlc_rejected")
        .count();
    assert_eq!(rejected, 1);
    assert!(store.unresolved_invoices().unwrap().is_empty());
    h.stop().await;
}
