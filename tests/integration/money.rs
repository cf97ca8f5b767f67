//! Money paths under failure, in process (the crash tests kill a real process): a claim LDK
//! refuses, an invoice whose client is gone as it is sent, a second HTLC set for a claimed
//! chunk, a client that stops reading, a shutdown with such a client, and an event handler
//! that keeps failing. Each asserts what the payer's node and the server's node recorded.

use std::time::{Duration, Instant};

use satstream::harness::{wait_until, PayOutcome};
use satstream::store::InvoiceState;
use satstream::wire::proto::{generate_event::Event as Ev, HaltReason, PaymentMode, RefundRequest};

use super::support::{
    assert_invariants, client, letters, next, open, pay_until_done, payer_invoice, request,
    session_ended_within, sid, world, world_with, CHUNK, MSAT_PER_TOKEN, T,
};

async fn session_ended(w: &super::support::World, id: [u8; 16]) -> satstream::store::Session {
    session_ended_within(w, id, T).await
}

/// A claim LDK refuses fails the HTLC back at once (the payer is not kept waiting for a
/// timeout) and is recorded; no invoice stays held.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_claim_ldk_refuses_fails_the_htlc_back_at_once() {
    let w = world(&["payments.payment_timeout_secs=60"]).await;
    w.h.server().app.lightning.faults().arm_error("claim", 1);
    let mut s = open(&w, request(8, PaymentMode::Bolt11)).await;
    let Ev::Accepted(acc) = next(&mut s).await else {
        panic!("Accepted first")
    };
    let Ev::Invoice(inv) = next(&mut s).await else {
        panic!("an invoice")
    };
    let started = Instant::now();
    let out = w.h.payer.pay(&inv.bolt11, T).await.unwrap();
    assert!(matches!(out, PayOutcome::Failed { .. }), "{out:?}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "failed back at once, not after the payment timeout"
    );
    let halted = loop {
        match next(&mut s).await {
            Ev::Halted(h) => break h,
            Ev::Invoice(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(halted.reason, HaltReason::PaymentFailed as i32);
    assert_eq!(
        (halted.completion_tokens_delivered, halted.paid_msat),
        (0, 0)
    );
    let hash: [u8; 32] = hex::decode(&inv.payment_hash).unwrap().try_into().unwrap();
    let store = &w.h.server().app.store;
    assert_eq!(
        store.invoice(&hash).unwrap().unwrap().state,
        InvoiceState::Failed
    );
    let kinds: Vec<_> = store
        .ledger_for_payment(&hash)
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds,
        [
            "invoice_created",
            "htlc_held",
            // The delivery is committed with the decision, and taken back with the refusal.
            "claim_decided",
            "chunk_delivered",
            "htlc_failed",
            "chunk_undelivered"
        ]
    );
    let sess = assert_invariants(&w, &acc.session_id);
    assert_eq!((sess.spent_msat, sess.chunks_delivered), (0, 0));
    w.h.stop().await;
}

/// The client is gone just as a chunk's invoice is sent: the invoice is withdrawn and its
/// listener removed; nothing outlives the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_invoice_whose_send_fails_is_withdrawn() {
    let w = world(&[]).await;
    w.h.server()
        .app
        .lightning
        .faults()
        .arm_error("send_invoice", 1);
    let mut s = open(&w, request(8, PaymentMode::Bolt11)).await;
    let Ev::Accepted(acc) = next(&mut s).await else {
        panic!("Accepted first")
    };
    let sess = session_ended(&w, sid(&acc.session_id)).await;
    assert_eq!(sess.end_reason.as_deref(), Some("client_gone"));
    let ln = &w.h.server().app.lightning;
    assert_eq!(ln.listeners(), 0, "no listener outlives its session");
    let invoices =
        w.h.server()
            .app
            .store
            .list_invoices(10, "", None, Some(&sid(&acc.session_id)))
            .unwrap()
            .items;
    assert_eq!(invoices.len(), 1, "{invoices:?}");
    assert_eq!(invoices[0].state, InvoiceState::Canceled);
    // Paying it anyway is failed back.
    let out = w.h.payer.pay(&invoices[0].bolt11, T).await.unwrap();
    assert!(matches!(out, PayOutcome::Failed { .. }), "{out:?}");
    assert_invariants(&w, &acc.session_id);
    w.h.stop().await;
}

/// A new HTLC set for a chunk hash that is already claimed is failed back, never claimed
/// again, and LDK's record of the first claim stays as it is. The second set is real: a
/// second payer node with its own channel pays the same invoice after the first one did.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_htlc_set_for_a_claimed_chunk_is_never_claimed() {
    let w = world(&[]).await;
    let second_payer = w.h.add_payer("payer2", 200_000).await.unwrap();
    let mut s = open(&w, request(4, PaymentMode::Bolt11)).await;
    let Ev::Accepted(acc) = next(&mut s).await else {
        panic!("Accepted first")
    };
    let Ev::Invoice(inv) = next(&mut s).await else {
        panic!("chunk 0's invoice")
    };
    let hash: [u8; 32] = hex::decode(&inv.payment_hash).unwrap().try_into().unwrap();
    let out = w.h.payer.pay(&inv.bolt11, T).await.unwrap();
    assert!(matches!(out, PayOutcome::Succeeded { .. }), "{out:?}");
    let paid = pay_until_done(&w, &mut s).await;
    let Ev::Done(d) = paid.end else {
        panic!("Done: {:?}", paid.end)
    };
    assert_eq!(d.paid_msat, 4_000);
    // The same invoice, from another node: a second HTLC set for a claimed hash.
    let again = second_payer.pay(&inv.bolt11, T).await.unwrap();
    assert!(
        matches!(again, PayOutcome::Failed { .. }),
        "a claimed chunk is never paid twice: {again:?}"
    );
    let store = &w.h.server().app.store;
    let ledger = store.ledger_for_payment(&hash).unwrap();
    assert_eq!(
        ledger
            .iter()
            .filter(|e| e.kind == "invoice_claimed")
            .count(),
        1,
        "{ledger:?}"
    );
    let p = super::support::server_payment(&w, hash);
    assert_eq!(p.status, ldk_node::payment::PaymentStatus::Succeeded);
    assert_eq!(
        p.amount_msat,
        Some(4_000),
        "LDK's record of the first claim"
    );
    assert_eq!(assert_invariants(&w, &acc.session_id).paid_msat, 4_000);
    second_payer.stop();
    w.h.stop().await;
}

/// A client that keeps the stream open but stops reading: every write to it is bounded in
/// time, so the session halts (its slot freed, nothing held kept) whatever the client does.
/// The session writes into a channel nobody reads: over gRPC, HTTP/2 windows and hyper's send
/// buffer absorb ~0.5 MB per stream first, more than the tiny model can say.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_stops_reading_is_halted() {
    use satstream::engine::{GenerateParams, Prompt};
    use satstream::session::{Mode, SessionSpec};
    let w = world(&[]).await;
    let app = w.h.server().app.clone();
    let id = [42u8; 16];
    app.store
        .insert_session(&satstream::store::NewSession {
            id,
            token_hash: [0; 32],
            model: "tiny".into(),
            mode: "BOLT11",
            prompt_tokens: 1,
            prompt_price_msat: 0,
            msat_per_token: super::support::MSAT_PER_TOKEN,
            chunk_tokens: super::support::CHUNK,
            max_tokens: 400,
            account_id: None,
            prompt_sha256: None,
        })
        .unwrap();
    let spec = SessionSpec {
        session_id: id,
        mode: Mode::Atomic,
        model: "tiny".into(),
        price: satstream::pricing::Price {
            msat_per_token: super::support::MSAT_PER_TOKEN,
            msat_per_prompt_token: 0,
            chunk_tokens: super::support::CHUNK,
        },
        window_chunks: 2,
        prompt_tokens: 1,
        prompt_price_msat: 0,
        payment_timeout: Duration::from_secs(600),
        first_payment_timeout: Duration::from_secs(600),
        send_timeout: Duration::from_secs(2),
        settle_timeout: Duration::from_secs(5),
        invoice_expiry_secs: 600,
        account_id: None,
        params: GenerateParams::new(Prompt::Text("a".into()), 400),
        pace: satstream::session::Pace::new(false, 2, super::support::CHUNK, 256),
        // A stalled reader is not a dropped stream: the grace for Resume does not apply.
        resume_grace: Duration::from_secs(60),
        max_resumes: 16,
        max_lifetime: Duration::from_secs(3_600),
        first_chunk_tokens: 0,
        accepted: Default::default(),
    };
    // Room for one event: chunk 0's invoice (sent as the session opens); its EncryptedChunk
    // then waits for a reader.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let admission = app.engine.admit("tiny").await.unwrap();
    let live = app.live.try_enter(64).unwrap();
    let started = Instant::now();
    satstream::session::run(
        app.clone(),
        spec,
        Some(admission),
        tx,
        app.shutdown.clone(),
        live,
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "halted by the send timeout, not the payment timeout: {:?}",
        started.elapsed()
    );
    let sess = app.store.session(&id).unwrap().unwrap();
    assert_eq!(sess.end_reason.as_deref(), Some("client_stalled"));
    assert_eq!(app.live.count(), 0, "the slot is free");
    assert_eq!(app.lightning.listeners(), 0);
    let invoices = app
        .store
        .list_invoices(10, "", None, Some(&id))
        .unwrap()
        .items;
    assert!(!invoices.is_empty());
    assert!(
        invoices.iter().all(|i| i.state == InvoiceState::Canceled),
        "its invoice withdrawn: {invoices:?}"
    );
    drop(rx);
    assert_invariants(&w, &hex::encode(id));
    w.h.stop().await;
}

/// Shutdown completes within its deadline even when a client stalls a stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_completes_within_its_deadline_with_a_stalled_client() {
    let w = world_with(
        &[
            "payments.client_send_timeout_secs=600",
            "payments.payment_timeout_secs=600",
            "server.shutdown_timeout_secs=2",
            "payments.window_chunks=16",
        ],
        0,
        0,
        1,
    )
    .await;
    let max = 24_000;
    // The client (and its connection) stays alive while it does not read.
    let mut client = super::support::client(&w).await;
    let mut s = client
        .generate(request(max, PaymentMode::Keysend))
        .await
        .unwrap()
        .into_inner();
    let Ev::Accepted(_) = next(&mut s).await else {
        panic!("Accepted first")
    };
    let Ev::SessionOpened(so) = next(&mut s).await else {
        panic!("SessionOpened second")
    };
    let id = hex::decode(&so.session_id).unwrap();
    w.h.payer
        .keysend(
            &so.node_id,
            max as u64 * super::support::MSAT_PER_TOKEN,
            vec![(so.tlv_type, id)],
        )
        .unwrap();
    // Wait until the server is stuck writing to us: deliveries stop advancing.
    let store = w.h.server().app.store.clone();
    let sid: [u8; 16] = hex::decode(&so.session_id).unwrap().try_into().unwrap();
    let delivered = || store.session(&sid).unwrap().unwrap().chunks_delivered;
    let mut last = u32::MAX;
    wait_until("the stream to stall", T, || {
        let now = delivered();
        let stalled = now == last && now > 0;
        last = now;
        async move { stalled }
    })
    .await
    .unwrap();
    assert!(delivered() < max, "the client's reading is what stopped it");
    let started = Instant::now();
    w.h.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "shutdown took {:?}",
        started.elapsed()
    );
    drop(s);
}

/// An LDK event whose handler keeps failing is parked after bounded retries (its HTLC failed
/// back, visible through Admin), and the payments after it go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_event_is_parked_and_payments_go_on() {
    let w = world(&["payments.event_max_attempts=3"]).await;
    w.h.server().app.lightning.faults().arm_error("event", 3);
    let mut s = open(&w, request(4, PaymentMode::Bolt11)).await;
    let Ev::Accepted(_) = next(&mut s).await else {
        panic!("Accepted first")
    };
    let Ev::Invoice(inv) = next(&mut s).await else {
        panic!("an invoice")
    };
    let out = w.h.payer.pay(&inv.bolt11, T).await.unwrap();
    assert!(
        matches!(out, PayOutcome::Failed { .. }),
        "parked: failed back: {out:?}"
    );
    drop(s);
    let parked = w.h.server().app.store.parked_events(10, "").unwrap().items;
    assert_eq!(parked.len(), 1, "{parked:?}");
    assert_eq!(parked[0].kind, "payment_claimable");
    assert_eq!(parked[0].attempts, 3);
    assert_eq!(
        hex::encode(parked[0].payment_hash.unwrap()),
        inv.payment_hash
    );
    // Admin shows it.
    let mut admin = satstream::wire::proto::admin_client::AdminClient::with_interceptor(
        tonic::transport::Endpoint::from_shared(format!("http://{}", w.h.server().grpc_addr))
            .unwrap()
            .connect()
            .await
            .unwrap(),
        satstream::harness::process::Bearer(w.h.server().admin_token.clone()),
    );
    let listed = admin
        .list_parked_events(satstream::wire::proto::ListParkedEventsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(listed.len(), 1);
    // The next session is paid and served as usual.
    let mut s = open(&w, request(8, PaymentMode::Bolt11)).await;
    let Ev::Accepted(acc) = next(&mut s).await else {
        panic!("Accepted first")
    };
    let paid = pay_until_done(&w, &mut s).await;
    assert!(matches!(paid.end, Ev::Done(_)), "{:?}", paid.end);
    assert_eq!(paid.text, letters(8));
    assert_invariants(&w, &acc.session_id);
    w.h.stop().await;
}

/// Issue 22.3: Refund looped on a running BOLT11 session while it is paid chunk by chunk gets
/// nothing. Each chunk's delivery is committed with its claim decision, so a settlement LDK
/// reports before the chunk is sent never makes its price refundable (it used to, for the
/// moment between the settlement's commit and the delivery's).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn looping_refunds_while_paying_get_nothing_being_claimed() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let w = world_with(&["payments.adaptive_lookahead=false"], 0, 200_000, CHUNK).await;
    let mut s = open(&w, request(40, PaymentMode::Bolt11)).await;
    let Ev::Accepted(acc) = next(&mut s).await else {
        panic!("Accepted first")
    };
    let done = AtomicBool::new(false);
    let pay = async {
        let paid = pay_until_done(&w, &mut s).await;
        done.store(true, Ordering::SeqCst);
        paid
    };
    let refunds = async {
        let mut c = client(&w).await;
        let (mut attempts, mut refunded) = (0u32, 0u64);
        while !done.load(Ordering::SeqCst) {
            attempts += 1;
            // A chunk's price: what a successful race would take back.
            let bolt11 = payer_invoice(&w, Some(CHUNK as u64 * MSAT_PER_TOKEN));
            match c
                .refund(RefundRequest {
                    session_id: acc.session_id.clone(),
                    session_token: acc.session_token.clone(),
                    bolt11,
                    wait_secs: 5,
                    ..Default::default()
                })
                .await
            {
                Ok(r) => refunded += r.into_inner().refunded_msat,
                Err(e) => {
                    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
                    assert!(e.message().contains("nothing to refund"), "{e}");
                }
            }
        }
        (attempts, refunded)
    };
    let (paid, (attempts, refunded)) = tokio::join!(pay, refunds);
    eprintln!(
        "Refund looped {attempts} times during a 40-token BOLT11 session: {refunded} msat refunded"
    );
    assert!(
        attempts > 10,
        "the loop ran alongside the payments ({attempts})"
    );
    assert_eq!(
        refunded, 0,
        "no chunk's price is refundable while it is claimed"
    );
    assert!(matches!(paid.end, Ev::Done(_)), "{:?}", paid.end);
    assert_eq!(paid.text, letters(40));
    assert_eq!(paid.invoices.len(), 10, "one invoice per 4-token chunk");
    let sess = assert_invariants(&w, &acc.session_id);
    assert_eq!((sess.refunded_msat, sess.refundable_msat()), (0, 0));
    w.h.stop().await;
}

/// Issue 22.7: a keysend whose PaymentReceived handler keeps failing is parked (LDK has it
/// settled); the watchdog books it from LDK's record to the session its TLV named, and the
/// session goes on. It used to be lost to the books until someone read the parked events.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_parked_keysend_is_booked_from_ldks_record() {
    let w = world(&[
        "payments.event_max_attempts=3",
        "payments.claim_confirm_timeout_secs=2",
    ])
    .await;
    w.h.server()
        .app
        .lightning
        .faults()
        .arm_error("keysend_credit", 3);
    let mut s = open(&w, request(8, PaymentMode::Keysend)).await;
    let Ev::Accepted(acc) = next(&mut s).await else {
        panic!("Accepted first")
    };
    let Ev::SessionOpened(so) = next(&mut s).await else {
        panic!("SessionOpened second")
    };
    let sid_bytes = hex::decode(&so.session_id).unwrap();
    w.h.payer
        .keysend(
            &so.node_id,
            8 * MSAT_PER_TOKEN,
            vec![(so.tlv_type, sid_bytes)],
        )
        .unwrap();
    let paid = pay_until_done(&w, &mut s).await;
    let Ev::Done(done) = paid.end else {
        panic!("Done: {:?}", paid.end)
    };
    assert_eq!(paid.text, letters(8));
    assert_eq!(done.paid_msat, 8 * MSAT_PER_TOKEN);
    let parked = w.h.server().app.store.parked_events(10, "").unwrap().items;
    assert_eq!(parked.len(), 1, "{parked:?}");
    assert_eq!(parked[0].kind, "payment_received");
    let sess = assert_invariants(&w, &acc.session_id);
    assert_eq!(sess.paid_msat, 8 * MSAT_PER_TOKEN, "booked to its session");
    w.h.stop().await;
}

/// Issue 23.2: an invoice nobody pays does not stay open until a restart: once past its
/// expiry the watchdog marks it expired in the store and failed in LDK's payment store, and
/// a late payment is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unpaid_invoice_is_swept_when_it_expires() {
    use satstream::lightning::invoices::HoldInvoice;
    use satstream::store::InvoicePurpose;
    let w = world(&["payments.claim_confirm_timeout_secs=2"]).await;
    let ln = w.h.server().app.lightning.clone();
    let inv = tokio::task::spawn_blocking(move || {
        ln.create_hold_invoice(
            &HoldInvoice {
                amount_msat: 5_000,
                description: "swept".into(),
                expiry_secs: 1,
                purpose: InvoicePurpose::Test,
                session_id: None,
                account_id: None,
                chunk_index: None,
                preimage: None,
            },
            None,
        )
    })
    .await
    .unwrap()
    .unwrap();
    let store = w.h.server().app.store.clone();
    let hash = inv.payment_hash;
    // The sweeper commits `expired` first and then tells LDK: wait for both.
    let ln = w.h.server().app.lightning.clone();
    wait_until(
        "the sweeper to expire the invoice, in the store and in LDK",
        T,
        || {
            let (store, ln) = (store.clone(), ln.clone());
            async move {
                let ldk = ln
                    .node()
                    .payment(&ldk_node::lightning::ln::channelmanager::PaymentId(hash))
                    .map(|p| p.status);
                store.invoice(&hash).unwrap().unwrap().state == InvoiceState::Expired
                    && ldk == Some(ldk_node::payment::PaymentStatus::Failed)
            }
        },
    )
    .await
    .unwrap();
    // Paid anyway (a payer ignoring the expiry): failed back, nothing booked.
    let out = w.h.payer.pay(&inv.bolt11, T).await;
    assert!(
        !matches!(out, Ok(PayOutcome::Succeeded { .. })),
        "an expired invoice is never paid: {out:?}"
    );
    assert_eq!(
        store.invoice(&hash).unwrap().unwrap().state,
        InvoiceState::Expired
    );
    assert!(store
        .ledger_for_payment(&hash)
        .unwrap()
        .iter()
        .all(|e| e.amount_msat == 0));
    w.h.stop().await;
}

/// Issue 23.1: ldk-node keeps every payment record in memory. Records of payments final in
/// the ledger for `lightning.payment_retention_secs` (here 0) are removed from the node once
/// LDK's record is seen to agree; the books still balance against LDK's records and the
/// ledger; a second payer paying a removed, claimed invoice again is failed back; and a
/// keysend repeating a removed keysend's preimage (which LDK, without its record, claims) is
/// booked to its session as refundable money rather than lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn final_payment_records_are_pruned_from_the_node_and_repeats_are_safe() {
    use ldk_node::lightning::ln::channelmanager::PaymentId;
    use ldk_node::lightning_types::payment::PaymentPreimage;
    let w = world(&[
        "lightning.payment_retention_secs=0",
        "payments.claim_confirm_timeout_secs=2",
    ])
    .await;
    let node = w.h.server().app.lightning.node().clone();
    let store = w.h.server().app.store.clone();
    // A BOLT11 session, paid to the end.
    let mut s = open(&w, request(8, PaymentMode::Bolt11)).await;
    let Ev::Accepted(acc) = next(&mut s).await else {
        panic!("Accepted first")
    };
    let paid = pay_until_done(&w, &mut s).await;
    assert!(matches!(paid.end, Ev::Done(_)), "{:?}", paid.end);
    let hashes: Vec<[u8; 32]> = paid
        .invoices
        .iter()
        .map(|h| hex::decode(h).unwrap().try_into().unwrap())
        .collect();
    // A KEYSEND session paid with a preimage of the payer's choosing.
    let mut k = open(&w, request(8, PaymentMode::Keysend)).await;
    let Ev::Accepted(kacc) = next(&mut k).await else {
        panic!("Accepted first")
    };
    let Ev::SessionOpened(so) = next(&mut k).await else {
        panic!("SessionOpened second")
    };
    let server_id = satstream::lightning::parse_node_id(&so.node_id).unwrap();
    let tlv = || {
        vec![ldk_node::CustomTlvRecord {
            type_num: so.tlv_type,
            value: hex::decode(&so.session_id).unwrap(),
        }]
    };
    let preimage = PaymentPreimage([42u8; 32]);
    let kid = w
        .h
        .payer
        .node
        .spontaneous_payment()
        .send_with_preimage_and_custom_tlvs(8 * MSAT_PER_TOKEN, server_id, tlv(), preimage, None)
        .unwrap();
    let kpaid = pay_until_done(&w, &mut k).await;
    assert!(matches!(kpaid.end, Ev::Done(_)), "{:?}", kpaid.end);
    assert_eq!(kpaid.text, letters(8));
    let all: Vec<[u8; 32]> = hashes.iter().copied().chain([kid.0]).collect();
    let records_before = node.list_payments().len();
    {
        let (store, all) = (store.clone(), all.clone());
        wait_until("the watchdog to prune the final records", T, move || {
            let (store, all) = (store.clone(), all.clone());
            async move { all.iter().all(|h| store.ldk_pruned(h).unwrap()) }
        })
        .await
        .unwrap();
    }
    for h in &all {
        assert!(
            node.payment(&PaymentId(*h)).is_none(),
            "LDK's record of {} is gone",
            hex::encode(h)
        );
    }
    assert!(node.list_payments().len() <= records_before - all.len());
    // The books still balance, the removed records standing on the ledger's figures.
    assert_invariants(&w, &acc.session_id);
    assert_invariants(&w, &kacc.session_id);

    // A second payer pays the first (claimed, removed) chunk invoice again.
    let second = w.h.add_payer("second", 200_000).await.unwrap();
    let bolt11 = store.invoice(&hashes[0]).unwrap().unwrap().bolt11;
    let out = second.pay(&bolt11, T).await;
    assert!(
        !matches!(out, Ok(PayOutcome::Succeeded { .. })),
        "a removed, claimed invoice is never paid twice: {out:?}"
    );
    let claimed = |h: &[u8; 32]| {
        store
            .ledger_for_payment(h)
            .unwrap()
            .iter()
            .filter(|e| e.kind == "invoice_claimed")
            .count()
    };
    assert_eq!(claimed(&hashes[0]), 1);

    // The second payer repeats the keysend's preimage: LDK (without its record) claims it; the
    // server books it to the session it names, refundable.
    let refundable_before = store.session(&sid(&kacc.session_id)).unwrap().unwrap();
    let (rx, id) = (
        second.subscribe(),
        second
            .node
            .spontaneous_payment()
            .send_with_preimage_and_custom_tlvs(3_000, server_id, tlv(), preimage, None)
            .unwrap(),
    );
    let out = second.wait_outcome(rx, id.0, T).await.unwrap();
    assert!(matches!(out, PayOutcome::Succeeded { .. }), "{out:?}");
    {
        let store = store.clone();
        wait_until("the repeat to be booked", T, move || {
            let store = store.clone();
            async move {
                store
                    .ledger_for_payment(&kid.0)
                    .unwrap()
                    .iter()
                    .any(|e| e.kind == "keysend_repeat")
            }
        })
        .await
        .unwrap();
    }
    let after = store.session(&sid(&kacc.session_id)).unwrap().unwrap();
    assert_eq!(
        after.refundable_msat(),
        refundable_before.refundable_msat() + 3_000,
        "the repeat is the customer's refundable money"
    );
    // LDK's record is now the repeat's, and the books balance against it.
    assert_eq!(
        node.payment(&PaymentId(kid.0)).and_then(|p| p.amount_msat),
        Some(3_000)
    );
    assert!(!store.ldk_pruned(&kid.0).unwrap());
    second.stop();
    w.h.stop().await;
}

/// Issue 23.4: a priced prompt's HTLC is held while its session waits for the first chunk's
/// payment. Held until within CLAIM_MARGIN_BLOCKS of LDK's claim deadline (blocks mined while
/// the client dawdles), it is failed back with the chunk's rather than claimed that late (LDK
/// could have to go on chain for it): the session ends, nothing is booked, and both of the
/// payer's payments fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_prompt_held_near_its_claim_deadline_is_failed_back_not_claimed() {
    use satstream::lightning::invoices::CLAIM_MARGIN_BLOCKS;
    let w = world_with(
        &[
            "payments.payment_timeout_secs=300",
            "payments.first_payment_timeout_secs=300",
        ],
        100,
        0,
        CHUNK,
    )
    .await;
    let mut s = open(&w, request(8, PaymentMode::Bolt11)).await;
    let Ev::Accepted(acc) = next(&mut s).await else {
        panic!("Accepted first")
    };
    assert!(acc.prompt_price_msat > 0);
    let Ev::Invoice(prompt) = next(&mut s).await else {
        panic!("the prompt's invoice")
    };
    assert!(prompt.chunk_index.is_none());
    let prompt_hash: [u8; 32] = hex::decode(&prompt.payment_hash)
        .unwrap()
        .try_into()
        .unwrap();
    let Ev::Invoice(chunk) = next(&mut s).await else {
        panic!("the first chunk's invoice, with the prompt's")
    };
    let prompt_pay = w.h.payer.send(&prompt.bolt11).unwrap();
    let ln = w.h.server().app.lightning.clone();
    let l = ln.clone();
    wait_until("the prompt's HTLC to be held", T, move || {
        let l = l.clone();
        async move { l.claim_deadline(&prompt_hash).is_some() }
    })
    .await
    .unwrap();
    let deadline = ln
        .claim_deadline(&prompt_hash)
        .expect("the held prompt has a claim deadline");
    let height = ln.node().status().current_best_block.height;
    assert!(
        deadline > height + CLAIM_MARGIN_BLOCKS,
        "{deadline} vs {height}"
    );
    // The client dawdles while blocks come: to within the margin of the deadline.
    w.h.mine(deadline - CLAIM_MARGIN_BLOCKS - height)
        .await
        .unwrap();
    let chunk_pay = w.h.payer.send(&chunk.bolt11).unwrap();
    let end = loop {
        match next(&mut s).await {
            e @ (Ev::Done(_) | Ev::Halted(_)) => break e,
            Ev::Tokens(t) => panic!("a chunk was delivered: {t:?}"),
            _ => {}
        }
    };
    let Ev::Halted(h) = end else {
        panic!("Halted: {end:?}")
    };
    assert_eq!(h.completion_tokens_delivered, 0);
    let sess = session_ended(&w, sid(&acc.session_id)).await;
    assert_eq!(sess.paid_msat, 0, "nothing booked: {sess:?}");
    for hash in [prompt_pay, chunk_pay] {
        use ldk_node::lightning::ln::channelmanager::PaymentId;
        use ldk_node::payment::PaymentStatus;
        let node = w.h.payer.node.clone();
        let status = move || node.payment(&PaymentId(hash)).map(|p| p.status);
        let st = status.clone();
        wait_until("the payer's payment to resolve", T, move || {
            let st = st.clone();
            async move { st().is_some_and(|s| s != PaymentStatus::Pending) }
        })
        .await
        .unwrap();
        assert_eq!(status(), Some(PaymentStatus::Failed), "failed back");
    }
    assert_invariants(&w, &acc.session_id);
    w.h.stop().await;
}
