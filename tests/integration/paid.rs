//! Pay-per-chunk Generate over the real regtest harness and the tiny deterministic model
//! (a chat prompt yields "abcdefghij…", exactly one letter per token). Every test ends by
//! checking the SPEC invariants against the server node's payment records (see
//! `support::assert_books`).

use std::collections::BTreeMap;
use std::time::Duration;

use satstream::harness::PayOutcome;
use satstream::store::SessionState;
use satstream::wire::cipher;
use satstream::wire::proto::{
    generate_event::Event as Ev, inference_client::InferenceClient, HaltReason, PaymentMode,
};

use super::support::{
    assert_invariants, client, letters, next, on_every_backend, open, pay_until_done, request,
    session_ended_within, sid, world, world_on, Backend, CHUNK, MSAT_PER_TOKEN, T,
};

async fn bolt11_pays_each_chunk_and_gets_exact_text(backend: Backend) {
    let w = world_on(backend, &[]).await;
    let mut s = open(&w, request(10, PaymentMode::Bolt11)).await;
    let Ev::Accepted(acc) = next(&mut s).await else {
        panic!("Accepted first")
    };
    let (mut text, mut amounts, mut chunks) = (String::new(), Vec::new(), Vec::new());
    let done = loop {
        match next(&mut s).await {
            Ev::Invoice(inv) => {
                amounts.push(inv.amount_msat);
                assert_eq!(inv.amount_msat, inv.tokens as u64 * MSAT_PER_TOKEN);
                w.h.payer.send(&inv.bolt11).unwrap();
            }
            Ev::Tokens(t) => {
                chunks.push(t.chunk_index);
                text.push_str(&t.text);
            }
            Ev::Done(d) => break d,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(text, letters(10));
    assert_eq!(
        amounts,
        vec![4_000, 4_000, 2_000],
        "the short last chunk costs less"
    );
    assert_eq!(chunks, vec![0, 1, 2]);
    assert_eq!(done.completion_tokens, 10);
    assert_eq!(done.paid_msat, 10_000);
    assert_eq!(done.refundable_msat, 0);
    let sess = assert_invariants(&w, &acc.session_id);
    assert_eq!(sess.state, SessionState::Finished);
    w.h.stop().await;
}

async fn atomic_chunks_decrypt_with_the_payers_preimage(backend: Backend) {
    let w = world_on(backend, &[]).await;
    let mut s = open(&w, request(10, PaymentMode::Atomic)).await;
    let Ev::Accepted(acc) = next(&mut s).await else {
        panic!("Accepted first")
    };
    let (mut sealed, mut invoices) = (BTreeMap::new(), BTreeMap::new());
    let (mut plain, mut keys) = (BTreeMap::new(), BTreeMap::<u32, [u8; 32]>::new());
    let done = loop {
        // Chunk 0's invoice comes before its ciphertext (it is issued as the session opens);
        // like our client, pay each invoice once its ciphertext is held.
        let k = match next(&mut s).await {
            Ev::EncryptedChunk(c) => {
                let k = c.chunk_index;
                sealed.insert(k, c);
                k
            }
            Ev::Invoice(inv) => {
                let k = inv.chunk_index.unwrap();
                invoices.insert(k, inv);
                k
            }
            Ev::ChunkKey(ck) => {
                assert_eq!(ck.key, keys[&ck.chunk_index].to_vec());
                continue;
            }
            Ev::Done(d) => break d,
            other => panic!("unexpected {other:?}"),
        };
        if let (Some(c), Some(inv)) = (sealed.get(&k), invoices.get(&k)) {
            {
                assert_eq!(c.payment_hash, inv.payment_hash);
                // Pay and decrypt with what the payer's own node reports: the preimage.
                match w.h.payer.pay(&inv.bolt11, T).await.unwrap() {
                    PayOutcome::Succeeded { preimage, .. } => {
                        let p = cipher::open(&preimage, &c.nonce, &c.ciphertext)
                            .expect("the preimage is the key");
                        plain.insert(k, String::from_utf8(p).unwrap());
                        keys.insert(k, preimage);
                    }
                    o => panic!("payment failed: {o:?}"),
                }
            }
        }
    };
    assert_eq!(plain.values().cloned().collect::<String>(), letters(10));
    assert_eq!(done.paid_msat, 10_000);
    assert_invariants(&w, &acc.session_id);
    w.h.stop().await;
}

async fn keysend_balance_releases_chunks_and_keeps_the_rest_refundable(backend: Backend) {
    let w = world_on(backend, &[]).await;
    let mut s = open(&w, request(10, PaymentMode::Keysend)).await;
    let Ev::Accepted(acc) = next(&mut s).await else {
        panic!("Accepted first")
    };
    let Ev::SessionOpened(so) = next(&mut s).await else {
        panic!("SessionOpened second")
    };
    assert_eq!(so.session_id, acc.session_id);
    assert!(so.tlv_type >= 65_536 && so.tlv_type % 2 == 1);
    let sid = hex::decode(&so.session_id).unwrap();
    // 12 000 msat in two payments for 10 000 msat of tokens: 2 000 stay refundable.
    for _ in 0..2 {
        w.h.payer
            .keysend(&so.node_id, 6_000, vec![(so.tlv_type, sid.clone())])
            .unwrap();
    }
    // A keysend naming an unknown session is kept, unattributed, never credited to this one.
    w.h.payer
        .keysend(&so.node_id, 1_000, vec![(so.tlv_type, vec![7u8; 16])])
        .unwrap();
    let mut text = String::new();
    let done = loop {
        match next(&mut s).await {
            Ev::Tokens(t) => text.push_str(&t.text),
            Ev::Balance(_) => {}
            Ev::Done(d) => break d,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(text, letters(10));
    assert_eq!(done.paid_msat, 12_000);
    assert_eq!(done.refundable_msat, 2_000);
    let sess = assert_invariants(&w, &acc.session_id);
    assert_eq!(sess.refundable_msat(), 2_000);
    w.h.stop().await;
}

async fn payer_stops_paying_halts_and_late_payment_is_failed_back(backend: Backend) {
    // The cap on unpaid exposure: 12 tokens (3 chunks) at 1 000 msat a token.
    let w = world_on(
        backend,
        &[
            "payments.payment_timeout_secs=2",
            "payments.max_unpaid_msat=12000",
        ],
    )
    .await;
    let mut s = open(&w, request(40, PaymentMode::Bolt11)).await;
    let Ev::Accepted(acc) = next(&mut s).await else {
        panic!("Accepted first")
    };
    let window = acc.window_chunks;
    let (mut text, mut invoices) = (String::new(), Vec::new());
    let halted = loop {
        match next(&mut s).await {
            Ev::Invoice(inv) => {
                // Pay the first two chunks only.
                if invoices.len() < 2 {
                    w.h.payer.send(&inv.bolt11).unwrap();
                }
                invoices.push(inv);
            }
            Ev::Tokens(t) => text.push_str(&t.text),
            Ev::Halted(h) => break h,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(halted.reason, HaltReason::PaymentTimeout as i32);
    assert_eq!(text, letters(8), "no plaintext beyond the paid chunks");
    assert_eq!(halted.completion_tokens_delivered, 8);
    let unpaid_tokens: u32 = invoices[2..].iter().map(|i| i.tokens).sum();
    assert!(
        unpaid_tokens <= 12 + 2,
        "at most the cap (+2) generated beyond what was paid: {unpaid_tokens} tokens in {} invoices",
        invoices.len() - 2
    );
    assert!(window >= 1);
    let sess = assert_invariants(&w, &acc.session_id);
    assert_eq!(sess.end_reason.as_deref(), Some("payment_timeout"));
    // Paying a withdrawn invoice now fails back: nothing is kept.
    let late = &invoices[2];
    let out = w.h.payer.pay(&late.bolt11, T).await.unwrap();
    assert!(matches!(out, PayOutcome::Failed { .. }), "{out:?}");
    assert_invariants(&w, &acc.session_id);
    w.h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn before_its_first_payment_a_session_runs_ahead_as_far_as_the_nodes_payments_take() {
    // Window 2 chunks of 4 tokens; the cap on unpaid exposure 40 tokens.
    let w = world(&[
        "payments.payment_timeout_secs=2",
        "payments.max_unpaid_msat=40000",
    ])
    .await;
    // A paid stream first: the node has recent payment latencies now.
    let mut s = open(&w, request(12, PaymentMode::Bolt11)).await;
    let Ev::Accepted(first) = next(&mut s).await else {
        panic!("Accepted first")
    };
    let paid = pay_until_done(&w, &mut s).await;
    assert!(matches!(paid.end, Ev::Done(_)), "{:?}", paid.end);
    assert_invariants(&w, &first.session_id);
    // A new session whose client pays nothing. It has no latency of its own to plan with;
    // the node's (tens of ms at least) at the tiny model's rate is more than the window, so
    // the engine runs past the window (it used to stop there until the first payment, when
    // the lookahead was first planned with a known rate) and up to the cap.
    let mut s = open(&w, request(100, PaymentMode::Bolt11)).await;
    let Ev::Accepted(acc) = next(&mut s).await else {
        panic!("Accepted first")
    };
    let window = acc.window_chunks * CHUNK;
    let mut invoiced = 0;
    let halted = loop {
        match next(&mut s).await {
            Ev::Invoice(inv) => invoiced += inv.tokens,
            Ev::Halted(h) => break h,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(halted.reason, HaltReason::PaymentTimeout as i32);
    assert_eq!(halted.completion_tokens_delivered, 0);
    assert!(
        invoiced > window,
        "generated ahead of the first payment: {invoiced} tokens, the window is {window}"
    );
    assert!(invoiced <= 40 + 2, "at most the cap (+2): {invoiced}");
    let sess = assert_invariants(&w, &acc.session_id);
    assert_eq!(sess.end_reason.as_deref(), Some("payment_timeout"));
    w.h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_disconnect_ends_the_session_and_withdraws_invoices() {
    // Nothing paid yet: the session is not kept for Resume (default grace 60 s), it ends at
    // once.
    let w = world(&[]).await;
    let mut s = open(&w, request(40, PaymentMode::Bolt11)).await;
    let Ev::Accepted(acc) = next(&mut s).await else {
        panic!("Accepted first")
    };
    let Ev::Invoice(inv) = next(&mut s).await else {
        panic!("an invoice")
    };
    drop(s);
    // Well before the 60 s grace.
    session_ended_within(&w, sid(&acc.session_id), Duration::from_secs(20)).await;
    let sess = assert_invariants(&w, &acc.session_id);
    assert_eq!(sess.end_reason.as_deref(), Some("client_gone"));
    assert_eq!(w.h.server().app.live.count(), 0);
    // It does not go on: a Resume replays only its end (nothing was delivered).
    let mut r = client(&w)
        .await
        .resume(satstream::wire::proto::ResumeRequest {
            session_id: acc.session_id.clone(),
            session_token: acc.session_token.clone(),
            from_chunk: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let Ev::Halted(h) = next(&mut r).await else {
        panic!("only the end")
    };
    assert_eq!(h.reason, HaltReason::ClientGone as i32, "{h:?}");
    assert_eq!((h.completion_tokens_delivered, h.paid_msat), (0, 0));
    assert!(r.message().await.unwrap().is_none());
    let out = w.h.payer.pay(&inv.bolt11, T).await.unwrap();
    assert!(matches!(out, PayOutcome::Failed { .. }), "{out:?}");
    w.h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_requests_get_clear_statuses() {
    let w = world(&[]).await;
    let mut c = InferenceClient::connect(format!("http://{}", w.h.server().grpc_addr))
        .await
        .unwrap();
    let code = |r: Result<_, tonic::Status>| r.map(|_| ()).unwrap_err();
    let mut req = request(10, PaymentMode::Bolt11);
    req.model = "nope".into();
    let e = code(c.generate(req).await);
    assert_eq!(e.code(), tonic::Code::NotFound);
    assert!(e.message().contains("tiny"), "lists the models: {e}");
    let e = code(c.generate(request(0, PaymentMode::Bolt11)).await);
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("max_tokens"), "{e}");
    let mut req = request(10, PaymentMode::Bolt11);
    req.messages.clear();
    let e = code(c.generate(req).await);
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let mut req = request(10, PaymentMode::Bolt11);
    req.window_chunks = Some(99);
    assert_eq!(
        code(c.generate(req).await).code(),
        tonic::Code::InvalidArgument
    );

    let models = c
        .list_models(satstream::wire::proto::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(models.models.len(), 1);
    assert_eq!(models.models[0].chunk_tokens, CHUNK);
    let q = c
        .quote(satstream::wire::proto::QuoteRequest {
            model: "tiny".into(),
            prompt: "abc".into(),
            max_tokens: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(q.chunk_price_msat, CHUNK as u64 * MSAT_PER_TOKEN);
    assert_eq!(q.max_cost_msat, 10 * MSAT_PER_TOKEN);
    assert_eq!(q.node_id, w.h.server_node_id());
    assert!(q.inbound_liquidity_msat > 0);
    w.h.stop().await;
}

async fn eight_concurrent_sessions_on_one_channel_are_all_exact(backend: Backend) {
    let w = std::sync::Arc::new(world_on(backend, &[]).await);
    let mut tasks = Vec::new();
    for i in 0..8u32 {
        let w = w.clone();
        tasks.push(tokio::spawn(async move {
            let n = 6 + i; // different lengths: different short last chunks
            let mut s = open(&w, request(n, PaymentMode::Bolt11)).await;
            let Ev::Accepted(acc) = next(&mut s).await else {
                panic!("Accepted first")
            };
            let mut text = String::new();
            let done = loop {
                match next(&mut s).await {
                    Ev::Invoice(inv) => {
                        w.h.payer.send(&inv.bolt11).unwrap();
                    }
                    Ev::Tokens(t) => text.push_str(&t.text),
                    Ev::Done(d) => break d,
                    other => panic!("session {i}: unexpected {other:?}"),
                }
            };
            assert_eq!(text, letters(n as usize), "session {i}");
            assert_eq!(done.paid_msat, n as u64 * MSAT_PER_TOKEN, "session {i}");
            acc.session_id
        }));
    }
    for t in tasks {
        let sid = t.await.unwrap();
        assert_invariants(&w, &sid);
    }
    assert_eq!(w.h.server().app.live.count(), 0);
    match std::sync::Arc::try_unwrap(w) {
        Ok(w) => w.h.stop().await,
        Err(_) => panic!("sessions still hold the world"),
    }
}

/// LDK replays an event it was not told was handled (a crash between commit and ack). A
/// replayed keysend PaymentReceived must credit nothing a second time, live session or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replayed_keysend_credits_once() {
    let w = world(&[]).await;
    let mut s = open(&w, request(8, PaymentMode::Keysend)).await;
    let Ev::Accepted(acc) = next(&mut s).await else {
        panic!("Accepted first")
    };
    let Ev::SessionOpened(so) = next(&mut s).await else {
        panic!("SessionOpened second")
    };
    let sid = hex::decode(&so.session_id).unwrap();
    let records = vec![(so.tlv_type, sid.clone())];
    let hash =
        w.h.payer
            .keysend(&so.node_id, 4_000, records.clone())
            .unwrap();
    // Chunk 0 is released by the first credit.
    loop {
        match next(&mut s).await {
            Ev::Tokens(t) => {
                assert_eq!(t.chunk_index, 0);
                break;
            }
            Ev::Balance(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    let replay = ldk_node::Event::PaymentReceived {
        payment_id: Some(ldk_node::lightning::ln::channelmanager::PaymentId(hash)),
        payment_hash: ldk_node::lightning_types::payment::PaymentHash(hash),
        amount_msat: 4_000,
        custom_records: records
            .iter()
            .map(|(t, v)| ldk_node::CustomTlvRecord {
                type_num: *t,
                value: v.clone(),
            })
            .collect(),
    };
    let ln = &w.h.server().app.lightning;
    satstream::lightning::events::handle(ln, &replay).unwrap();
    satstream::lightning::events::handle(ln, &replay).unwrap();
    // Had the replay credited again, chunk 1 would be released now and the next keysend
    // would end up refundable.
    w.h.payer.keysend(&so.node_id, 4_000, records).unwrap();
    let done = loop {
        match next(&mut s).await {
            Ev::Tokens(t) => assert_eq!(t.chunk_index, 1),
            Ev::Balance(b) => assert!(b.credited_msat <= 8_000, "{b:?}"),
            Ev::Done(d) => break d,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!((done.paid_msat, done.refundable_msat), (8_000, 0));
    let sess = assert_invariants(&w, &acc.session_id);
    let audit =
        w.h.server()
            .app
            .store
            .audit_session(&sid.try_into().unwrap())
            .unwrap();
    assert_eq!(audit.credited_msat, 8_000);
    assert_eq!(sess.refundable_msat(), 0);
    // And after the session is over, a replay is still a no-op.
    satstream::lightning::events::handle(ln, &replay).unwrap();
    assert_eq!(assert_invariants(&w, &acc.session_id).paid_msat, 8_000);
    w.h.stop().await;
}

/// An HTLC below a chunk's price (ldk-node refuses to underpay, so the claimable event a
/// hand-rolled sender would cause is injected) is failed back, the invoice is dead, the chunk
/// is never delivered, and the session halts on the payment timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn underpaid_chunk_htlc_is_failed_back_and_nothing_delivered() {
    let w = world(&["payments.payment_timeout_secs=2"]).await;
    let mut s = open(&w, request(4, PaymentMode::Bolt11)).await;
    let Ev::Accepted(acc) = next(&mut s).await else {
        panic!("Accepted first")
    };
    let Ev::Invoice(inv) = next(&mut s).await else {
        panic!("Invoice second")
    };
    let hash: [u8; 32] = hex::decode(&inv.payment_hash).unwrap().try_into().unwrap();
    let underpaid = ldk_node::Event::PaymentClaimable {
        payment_id: ldk_node::lightning::ln::channelmanager::PaymentId(hash),
        payment_hash: ldk_node::lightning_types::payment::PaymentHash(hash),
        claimable_amount_msat: inv.amount_msat - 1,
        claim_deadline: None,
        custom_records: vec![],
    };
    let ln = &w.h.server().app.lightning;
    satstream::lightning::events::handle(ln, &underpaid).unwrap();
    let stored = w.h.server().app.store.invoice(&hash).unwrap().unwrap();
    assert_eq!(stored.state.to_string(), "failed");
    // The real payment of the (now dead) invoice is failed back too.
    let out = w.h.payer.pay(&inv.bolt11, T).await.unwrap();
    assert!(matches!(out, PayOutcome::Failed { .. }), "{out:?}");
    let halted = loop {
        match next(&mut s).await {
            Ev::Halted(h) => break h,
            Ev::Invoice(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(halted.reason, HaltReason::PaymentTimeout as i32);
    assert_eq!(
        (halted.completion_tokens_delivered, halted.paid_msat),
        (0, 0)
    );
    assert_eq!(assert_invariants(&w, &acc.session_id).paid_msat, 0);
    w.h.stop().await;
}

on_every_backend!(
    workers = 4;
    bolt11_pays_each_chunk_and_gets_exact_text,
    atomic_chunks_decrypt_with_the_payers_preimage,
    keysend_balance_releases_chunks_and_keeps_the_rest_refundable,
    payer_stops_paying_halts_and_late_payment_is_failed_back,
    eight_concurrent_sessions_on_one_channel_are_all_exact,
);
