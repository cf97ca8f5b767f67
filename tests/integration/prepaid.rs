//! Every msat becomes tokens or comes back: PREPAID accounts (TopUp, draws per chunk),
//! refunds of session and account balances (exactly once, also under concurrency), paid
//! prompts, and the owner's secrets. Amounts are checked on the payer's node where money
//! comes back, and against the server node's records where it goes in.

use std::time::Instant;

use satstream::harness::{wait_until, PayOutcome};
use satstream::store::InvoiceState;
use satstream::wire::proto::{
    generate_event::Event as Ev, inference_client::InferenceClient, GenerateRequest,
    GetAccountRequest, HaltReason, PaymentMode, RefundRequest, TopUpRequest,
};

use super::support::{
    assert_invariants, client, letters, next, open, payer_invoice, request, world_with, World, T,
};

/// Tops up (a new account when `token` is empty), pays it, waits for the credit. Returns the
/// account token.
pub(super) async fn top_up(w: &World, token: &str, amount_msat: u64) -> String {
    let mut c = client(w).await;
    let before = account(w, token)
        .await
        .map(|a| a.credited_msat)
        .unwrap_or(0);
    let t = c
        .top_up(TopUpRequest {
            account_token: token.into(),
            amount_msat,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(t.amount_msat, amount_msat);
    let out = w.h.payer.pay(&t.bolt11, T).await.unwrap();
    assert!(matches!(out, PayOutcome::Succeeded { .. }), "{out:?}");
    let token = t.account_token;
    let tk = token.clone();
    wait_until("the top-up to be credited", T, || {
        let tk = tk.clone();
        async move {
            account(w, &tk).await.map(|a| a.credited_msat).unwrap_or(0) == before + amount_msat
        }
    })
    .await
    .unwrap();
    token
}

pub(super) async fn account(w: &World, token: &str) -> Option<satstream::wire::proto::Account> {
    if token.is_empty() {
        return None;
    }
    client(w)
        .await
        .get_account(GetAccountRequest {
            account_token: token.into(),
        })
        .await
        .ok()
        .map(|r| r.into_inner())
}

pub(super) fn prepaid(max_tokens: u32, token: &str) -> GenerateRequest {
    let mut r = request(max_tokens, PaymentMode::Prepaid);
    r.account_token = token.into();
    r
}

/// Waits for the payer's node to record `bolt11` settled (received, or paid); its amount.
pub(super) async fn payer_settled(w: &World, bolt11: &str) -> u64 {
    let inv: ldk_node::lightning_invoice::Bolt11Invoice = bolt11.parse().unwrap();
    let id = ldk_node::lightning::ln::channelmanager::PaymentId(*inv.payment_hash().as_ref());
    let node = w.h.payer.node.clone();
    wait_until("the payer's record of the payment", T, || {
        let node = node.clone();
        async move {
            node.payment(&id)
                .is_some_and(|p| p.status == ldk_node::payment::PaymentStatus::Succeeded)
        }
    })
    .await
    .unwrap();
    node.payment(&id).unwrap().amount_msat.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prepaid_draws_each_chunk_exactly_with_no_invoice() {
    let w = world_with(&[], 0, 0, 4).await;
    let token = top_up(&w, "", 40_000).await;
    let mut s = open(&w, prepaid(10, &token)).await;
    let Ev::Accepted(acc) = next(&mut s).await else {
        panic!("Accepted first")
    };
    let (mut text, mut balances) = (String::new(), Vec::new());
    let done = loop {
        match next(&mut s).await {
            Ev::Tokens(t) => text.push_str(&t.text),
            Ev::Balance(b) => balances.push(b.available_msat),
            Ev::Done(d) => break d,
            other => panic!("no invoice in PREPAID, got {other:?}"),
        }
    };
    assert_eq!(text, letters(10));
    assert_eq!(balances.last(), Some(&30_000));
    assert_eq!((done.paid_msat, done.balance_msat), (10_000, 30_000));
    let a = account(&w, &token).await.unwrap();
    assert_eq!(
        (a.credited_msat, a.spent_msat, a.available_msat),
        (40_000, 10_000, 30_000)
    );
    assert_invariants(&w, &acc.session_id);
    // The top-up is the node's money: LDK reports it received.
    let store = &w.h.server().app.store;
    let topups: Vec<_> = store
        .ledger()
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "account_credited")
        .collect();
    assert_eq!(topups.len(), 1);
    let p =
        w.h.server()
            .app
            .lightning
            .node()
            .payment(&ldk_node::lightning::ln::channelmanager::PaymentId(
                topups[0].payment_hash.unwrap(),
            ))
            .unwrap();
    assert_eq!(p.amount_msat, Some(40_000));
    // An existing account can be topped up again.
    top_up(&w, &token, 2_000).await;
    assert_eq!(account(&w, &token).await.unwrap().available_msat, 32_000);
    w.h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prepaid_running_out_halts_with_the_exact_remainder() {
    let w = world_with(&[], 0, 0, 4).await;
    let token = top_up(&w, "", 10_000).await;
    let started = w.h.server().app.engine.generations_started();
    let mut s = open(&w, prepaid(40, &token)).await;
    let Ev::Accepted(acc) = next(&mut s).await else {
        panic!("Accepted first")
    };
    let mut text = String::new();
    let halted = loop {
        match next(&mut s).await {
            Ev::Tokens(t) => text.push_str(&t.text),
            Ev::Balance(_) => {}
            Ev::Halted(h) => break h,
            other => panic!("unexpected {other:?}"),
        }
    };
    // 10 000 msat cover 10 tokens: two whole chunks of 4, then 2 000 msat cannot pay a chunk.
    assert_eq!(halted.reason, HaltReason::BalanceExhausted as i32);
    assert_eq!(text, letters(8));
    assert_eq!((halted.paid_msat, halted.balance_msat), (8_000, 2_000));
    assert!(halted.message.contains("2000 msat"), "{}", halted.message);
    assert_eq!(account(&w, &token).await.unwrap().available_msat, 2_000);
    assert_eq!(w.h.server().app.engine.generations_started(), started + 1);
    assert_invariants(&w, &acc.session_id);
    w.h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_keysend_leftover_is_refunded_to_the_payer() {
    let w = world_with(&[], 0, 200_000, 4).await;
    let mut s = open(&w, request(10, PaymentMode::Keysend)).await;
    let Ev::Accepted(acc) = next(&mut s).await else {
        panic!("Accepted first")
    };
    let Ev::SessionOpened(so) = next(&mut s).await else {
        panic!("SessionOpened second")
    };
    let id = hex::decode(&so.session_id).unwrap();
    w.h.payer
        .keysend(&so.node_id, 15_000, vec![(so.tlv_type, id)])
        .unwrap();
    let done = loop {
        match next(&mut s).await {
            Ev::Tokens(_) | Ev::Balance(_) => {}
            Ev::Done(d) => break d,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(done.refundable_msat, 5_000);
    let mut c = client(&w).await;
    let refund = |bolt11: String| RefundRequest {
        session_id: acc.session_id.clone(),
        session_token: acc.session_token.clone(),
        bolt11,
        ..Default::default()
    };
    // Part of it to an invoice with an amount, then the rest to an amountless one.
    let inv = payer_invoice(&w, Some(3_000));
    let t = Instant::now();
    let r = c.refund(refund(inv.clone())).await.unwrap().into_inner();
    // Refund answers once the server's node reports PaymentSuccessful.
    let answered = t.elapsed();
    assert_eq!(
        (r.state.as_str(), r.refunded_msat, r.balance_msat),
        ("succeeded", 3_000, 2_000)
    );
    assert_eq!(
        payer_settled(&w, &inv).await,
        3_000,
        "checked on the payer's node"
    );
    eprintln!(
        "Refund -> answered (server PaymentSuccessful): {answered:?}; -> payer PaymentReceived: {:?}",
        t.elapsed()
    );
    // A retry of the same request finds the first refund: nothing is paid twice.
    let again = c.refund(refund(inv)).await.unwrap().into_inner();
    assert_eq!(
        (again.state.as_str(), again.refunded_msat),
        ("succeeded", 3_000)
    );
    let inv = payer_invoice(&w, None);
    let r = c.refund(refund(inv.clone())).await.unwrap().into_inner();
    assert_eq!(
        (r.state.as_str(), r.refunded_msat, r.balance_msat),
        ("succeeded", 2_000, 0)
    );
    assert_eq!(payer_settled(&w, &inv).await, 2_000);
    let e = c.refund(refund(payer_invoice(&w, None))).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    let s = assert_invariants(&w, &acc.session_id);
    assert_eq!((s.refunded_msat, s.refundable_msat()), (5_000, 0));
    w.h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refund_that_cannot_be_paid_restores_the_balance() {
    let w = world_with(&[], 0, 200_000, 4).await;
    let token = top_up(&w, "", 20_000).await;
    // An invoice of a node nobody has a channel to: no route.
    let stranger = {
        let dir = tempfile::tempdir().unwrap();
        let chain = w.h.config.chain.clone();
        let listen = format!("127.0.0.1:{}", satstream::harness::free_port());
        let d = dir.path().to_path_buf();
        let wallet = tokio::task::spawn_blocking(move || {
            satstream::harness::Wallet::start(
                &d,
                satstream::config::Network::Regtest,
                &listen,
                &chain,
                true,
            )
        })
        .await
        .unwrap()
        .unwrap();
        (wallet, dir)
    };
    use ldk_node::lightning_invoice::{Bolt11InvoiceDescription, Description};
    let inv = stranger
        .0
        .node
        .bolt11_payment()
        .receive(
            5_000,
            &Bolt11InvoiceDescription::Direct(Description::new("x".into()).unwrap()),
            600,
        )
        .unwrap()
        .to_string();
    let r = client(&w)
        .await
        .refund(RefundRequest {
            account_token: token.clone(),
            bolt11: inv.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (r.state.as_str(), r.refunded_msat, r.balance_msat),
        ("failed", 0, 20_000),
        "{r:?}"
    );
    let a = account(&w, &token).await.unwrap();
    assert_eq!(
        (a.available_msat, a.reserved_msat, a.refunded_msat),
        (20_000, 0, 0)
    );
    let hash: [u8; 32] = *inv
        .parse::<ldk_node::lightning_invoice::Bolt11Invoice>()
        .unwrap()
        .payment_hash()
        .as_ref();
    let kinds: Vec<_> =
        w.h.server()
            .app
            .store
            .ledger_for_payment(&hash)
            .unwrap()
            .into_iter()
            .map(|e| e.kind)
            .collect();
    assert_eq!(kinds, ["refund_reserved", "refund_released"]);
    stranger.0.stop();
    w.h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn missing_or_wrong_secrets_move_nothing() {
    let w = world_with(&[], 0, 200_000, 4).await;
    let token = top_up(&w, "", 10_000).await;
    let mut c = client(&w).await;
    let code = |r: Result<
        tonic::Response<satstream::wire::proto::RefundResponse>,
        tonic::Status,
    >| { r.map(|_| ()).unwrap_err().code() };
    let inv = payer_invoice(&w, None);
    assert_eq!(
        code(
            c.refund(RefundRequest {
                bolt11: inv.clone(),
                ..Default::default()
            })
            .await
        ),
        tonic::Code::Unauthenticated
    );
    let wrong = "00".repeat(32);
    assert_eq!(
        code(
            c.refund(RefundRequest {
                account_token: wrong.clone(),
                bolt11: inv.clone(),
                ..Default::default()
            })
            .await
        ),
        tonic::Code::PermissionDenied
    );
    // A session's balance with another's token.
    let mut s = open(&w, request(4, PaymentMode::Keysend)).await;
    let Ev::Accepted(acc) = next(&mut s).await else {
        panic!("Accepted first")
    };
    drop(s);
    assert_eq!(
        code(
            c.refund(RefundRequest {
                session_id: acc.session_id.clone(),
                session_token: wrong.clone(),
                bolt11: inv.clone(),
                ..Default::default()
            })
            .await
        ),
        tonic::Code::PermissionDenied
    );
    assert_eq!(
        code(
            c.refund(RefundRequest {
                session_id: acc.session_id.clone(),
                bolt11: inv.clone(),
                ..Default::default()
            })
            .await
        ),
        tonic::Code::Unauthenticated
    );
    let e = c
        .get_account(GetAccountRequest {
            account_token: wrong.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    let e = c
        .top_up(TopUpRequest {
            account_token: wrong.clone(),
            amount_msat: 5_000,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    let e = c.generate(prepaid(4, "")).await.map(|_| ()).unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let e = c
        .generate(prepaid(4, &wrong))
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    let a = account(&w, &token).await.unwrap();
    assert_eq!(
        (
            a.credited_msat,
            a.spent_msat,
            a.refunded_msat,
            a.reserved_msat
        ),
        (10_000, 0, 0, 0)
    );
    assert!(w.h.server().app.store.pending_refunds().unwrap().is_empty());
    w.h.stop().await;
}

/// N rounds of Generate, TopUp and Refund at once on one account: every msat is accounted
/// for, against LDK's records of what came in and went out.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_refund_generate_and_topup_conserve_every_msat() {
    let w = std::sync::Arc::new(world_with(&[], 0, 300_000, 4).await);
    let token = top_up(&w, "", 60_000).await;
    let rounds = 5;
    for _ in 0..rounds {
        let gen = {
            let (w, token) = (w.clone(), token.clone());
            tokio::spawn(async move {
                let mut s = open(&w, prepaid(8, &token)).await;
                loop {
                    match next(&mut s).await {
                        Ev::Done(d) => return d.paid_msat,
                        Ev::Halted(h) => return h.paid_msat,
                        _ => {}
                    }
                }
            })
        };
        let topup = {
            let (w, token) = (w.clone(), token.clone());
            tokio::spawn(async move { top_up(&w, &token, 5_000).await })
        };
        let refund = {
            let (w, token) = (w.clone(), token.clone());
            tokio::spawn(async move {
                let inv = payer_invoice(&w, Some(3_000));
                let r = client(&w)
                    .await
                    .refund(RefundRequest {
                        account_token: token,
                        bolt11: inv.clone(),
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner();
                if r.state == "succeeded" {
                    assert_eq!(payer_settled(&w, &inv).await, 3_000);
                }
                r
            })
        };
        let spent = gen.await.unwrap();
        topup.await.unwrap();
        let r = refund.await.unwrap();
        assert_eq!(spent, 8_000);
        assert_eq!(r.state, "succeeded", "{r:?}");
    }
    let a = account(&w, &token).await.unwrap();
    let credited = 60_000 + rounds * 5_000;
    let (spent, refunded) = (rounds * 8_000, rounds * 3_000);
    assert_eq!(
        (
            a.credited_msat,
            a.spent_msat,
            a.refunded_msat,
            a.reserved_msat,
            a.available_msat
        ),
        (credited, spent, refunded, 0, credited - spent - refunded)
    );
    // What LDK says came in (top-ups) and went out (refunds).
    let node = w.h.server().app.lightning.node();
    let succeeded = |dir| {
        node.list_payments()
            .into_iter()
            .filter(|p| {
                p.direction == dir && p.status == ldk_node::payment::PaymentStatus::Succeeded
            })
            .filter(|p| matches!(p.kind, ldk_node::payment::PaymentKind::Bolt11 { .. }))
            .map(|p| p.amount_msat.unwrap())
            .collect::<Vec<_>>()
    };
    let out = succeeded(ldk_node::payment::PaymentDirection::Outbound);
    assert_eq!(out.iter().sum::<u64>(), refunded);
    let store = &w.h.server().app.store;
    let topup_hashes: Vec<_> = store
        .ledger()
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "account_credited")
        .map(|e| e.payment_hash.unwrap())
        .collect();
    let topups_in: u64 = topup_hashes
        .iter()
        .map(|h| {
            node.payment(&ldk_node::lightning::ln::channelmanager::PaymentId(*h))
                .unwrap()
                .amount_msat
                .unwrap()
        })
        .sum();
    assert_eq!(topups_in, credited);
    for s in store.list_sessions(100, "", None).unwrap().items {
        assert_invariants(&w, &hex::encode(s.id));
    }
    match std::sync::Arc::try_unwrap(w) {
        Ok(w) => w.h.stop().await,
        Err(_) => panic!("still shared"),
    }
}

/// Issue 22.10: two whole-balance refunds and a generation at once, on a balance that covers
/// only one of them: whichever order the store sees, one refund takes what is left, the other
/// is refused, the generation draws only what the refund did not take, and every msat is
/// accounted for against what the payer's node received.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refunds_and_a_draw_contesting_one_balance_never_spend_it_twice() {
    let w = std::sync::Arc::new(world_with(&[], 0, 300_000, 4).await);
    let token = top_up(&w, "", 10_000).await;
    let refund = |w: std::sync::Arc<World>, token: String| {
        tokio::spawn(async move {
            // Amountless: the whole balance as the store sees it at the reservation.
            let inv = payer_invoice(&w, None);
            let r = client(&w)
                .await
                .refund(RefundRequest {
                    account_token: token,
                    bolt11: inv.clone(),
                    ..Default::default()
                })
                .await;
            match r {
                Ok(r) => {
                    let r = r.into_inner();
                    assert_eq!(r.state, "succeeded", "{r:?}");
                    assert_eq!(payer_settled(&w, &inv).await, r.refunded_msat);
                    r.refunded_msat
                }
                Err(e) => {
                    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
                    0
                }
            }
        })
    };
    let gen = {
        let (w, token) = (w.clone(), token.clone());
        tokio::spawn(async move {
            let mut s = open(&w, prepaid(8, &token)).await;
            loop {
                match next(&mut s).await {
                    Ev::Done(d) => return d.paid_msat,
                    Ev::Halted(h) => {
                        assert_eq!(h.reason, HaltReason::BalanceExhausted as i32, "{h:?}");
                        return h.paid_msat;
                    }
                    _ => {}
                }
            }
        })
    };
    let (a, b) = (
        refund(w.clone(), token.clone()),
        refund(w.clone(), token.clone()),
    );
    let (a, b, spent) = (a.await.unwrap(), b.await.unwrap(), gen.await.unwrap());
    eprintln!("contested 10 000 msat: refunds {a} and {b} msat, generation drew {spent} msat");
    assert!(
        (a == 0) != (b == 0),
        "exactly one refund took the balance ({a}, {b})"
    );
    assert_eq!(a + b + spent, 10_000, "every msat once");
    let acc = account(&w, &token).await.unwrap();
    assert_eq!(
        (
            acc.spent_msat,
            acc.refunded_msat,
            acc.reserved_msat,
            acc.available_msat
        ),
        (spent, a + b, 0, 0)
    );
    for s in
        w.h.server()
            .app
            .store
            .list_sessions(10, "", None)
            .unwrap()
            .items
    {
        assert_invariants(&w, &hex::encode(s.id));
    }
    match std::sync::Arc::try_unwrap(w) {
        Ok(w) => w.h.stop().await,
        Err(_) => panic!("still shared"),
    }
}

/// A priced prompt: its hold invoice comes first and prefill starts only once it is held; an
/// unpaid one costs no compute. Paid, it is claimed with the first chunk; a session that ends
/// before any chunk is delivered fails it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_prompt_is_paid_before_prefill_and_claimed_with_the_first_chunk() {
    let w = world_with(
        &[
            "payments.first_payment_timeout_secs=2",
            "payments.payment_timeout_secs=2",
        ],
        100,
        0,
        4,
    )
    .await;
    let engine = w.h.server().app.engine.clone();
    // 1. Unpaid: no prefill, Halted.
    let started = engine.generations_started();
    let mut s = open(&w, request(8, PaymentMode::Bolt11)).await;
    let Ev::Accepted(acc) = next(&mut s).await else {
        panic!("Accepted first")
    };
    assert_eq!(acc.prompt_price_msat, acc.prompt_tokens as u64 * 100);
    let Ev::Invoice(pi) = next(&mut s).await else {
        panic!("the prompt's invoice second")
    };
    assert_eq!(
        (pi.chunk_index, pi.amount_msat),
        (None, acc.prompt_price_msat)
    );
    // The first chunk's, with it: paid together, they overlap the prefill.
    let Ev::Invoice(ci) = next(&mut s).await else {
        panic!("the first chunk's invoice third")
    };
    assert_eq!((ci.chunk_index, ci.amount_msat), (Some(0), 4_000));
    let Ev::Halted(h) = next(&mut s).await else {
        panic!("halted")
    };
    assert_eq!(h.reason, HaltReason::PaymentTimeout as i32);
    assert!(h.message.contains("prompt"), "{}", h.message);
    assert_eq!(
        engine.generations_started(),
        started,
        "no prefill for an unpaid prompt"
    );
    assert_invariants(&w, &acc.session_id);

    // 2. Paid: prompt + every chunk, claimed together with chunk 0.
    let mut s = open(&w, request(8, PaymentMode::Bolt11)).await;
    let Ev::Accepted(acc) = next(&mut s).await else {
        panic!("Accepted first")
    };
    let paid = super::support::pay_until_done(&w, &mut s).await;
    let Ev::Done(done) = paid.end else {
        panic!("Done: {:?}", paid.end)
    };
    assert_eq!(paid.text, letters(8));
    assert_eq!(done.paid_msat, acc.prompt_price_msat + 8_000);
    let sess = assert_invariants(&w, &acc.session_id);
    assert_eq!(sess.refundable_msat(), 0);

    // 3. Prompt paid, first chunk not: the prompt's HTLC goes back to the payer.
    let mut s = open(&w, request(8, PaymentMode::Bolt11)).await;
    let Ev::Accepted(acc) = next(&mut s).await else {
        panic!("Accepted first")
    };
    let Ev::Invoice(pi) = next(&mut s).await else {
        panic!("the prompt's invoice")
    };
    let events = w.h.payer.subscribe();
    let hash = w.h.payer.send(&pi.bolt11).unwrap();
    let halted = loop {
        match next(&mut s).await {
            Ev::Invoice(_) => {}
            Ev::Halted(h) => break h,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(halted.paid_msat, 0);
    let out = w.h.payer.wait_outcome(events, hash, T).await.unwrap();
    assert!(
        matches!(out, PayOutcome::Failed { .. }),
        "failed back: {out:?}"
    );
    let store = &w.h.server().app.store;
    assert_eq!(
        store.invoice(&hash).unwrap().unwrap().state,
        InvoiceState::Failed
    );
    assert_invariants(&w, &acc.session_id);
    w.h.stop().await;
}

/// KEYSEND pays its prompt from the balance before prefill; PREPAID from the account.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn balances_pay_their_prompt_before_prefill() {
    let w = world_with(&[], 100, 0, 4).await;
    let token = top_up(&w, "", 20_000).await;
    let mut s = open(&w, prepaid(4, &token)).await;
    let Ev::Accepted(acc) = next(&mut s).await else {
        panic!("Accepted first")
    };
    let done = loop {
        match next(&mut s).await {
            Ev::Done(d) => break d,
            Ev::Tokens(_) | Ev::Balance(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(done.paid_msat, acc.prompt_price_msat + 4_000);
    assert_eq!(
        account(&w, &token).await.unwrap().available_msat,
        20_000 - acc.prompt_price_msat - 4_000
    );
    assert_invariants(&w, &acc.session_id);
    w.h.stop().await;
}

/// config/mainnet.example.toml, with the network overridden to regtest (and the tiny model in
/// place of SmolLM2), serves a paid Generate with its prompt price.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_mainnet_example_config_serves_a_paid_generate() {
    super::support::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let tiny = satstream::engine::tiny_model::write_tiny_model(dir.path()).unwrap();
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/mainnet.example.toml");
    let h = satstream::harness::Harness::start(satstream::harness::HarnessOptions {
        config_file: Some(file),
        sets: vec![
            format!("models.0.path={}", tiny.display()),
            "lightning.public_address=".into(),
            // One recorder per process: the test binary's other servers do not export.
            "server.metrics_listen=".into(),
        ],
        ..Default::default()
    })
    .await
    .unwrap();
    let model = h.config.models[0].clone();
    assert!(
        model.msat_per_prompt_token > 0,
        "the example prices prompts"
    );
    let mut c = InferenceClient::connect(format!("http://{}", h.server().grpc_addr))
        .await
        .unwrap();
    let mut req = request(20, PaymentMode::Bolt11);
    req.model = model.id.clone();
    let mut s = c.generate(req).await.unwrap().into_inner();
    let mut text = String::new();
    let mut accepted = None;
    let done = loop {
        let ev = tokio::time::timeout(T, s.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        match ev.event.unwrap() {
            Ev::Accepted(a) => accepted = Some(a),
            Ev::Invoice(inv) => {
                h.payer.send(&inv.bolt11).unwrap();
            }
            Ev::Tokens(t) => text.push_str(&t.text),
            Ev::Done(d) => break d,
            other => panic!("unexpected {other:?}"),
        }
    };
    let acc = accepted.unwrap();
    assert_eq!(text, letters(20));
    assert_eq!(
        done.paid_msat,
        acc.prompt_tokens as u64 * model.msat_per_prompt_token + 20 * model.msat_per_token
    );
    super::support::assert_books(&h, &acc.session_id, model.msat_per_token);
    h.stop().await;
    drop(dir);
}
