//! Resumable streams on the real harness: a client whose TCP connection is cut (through a
//! proxy the test controls) resumes on its own, gets exactly the text an uninterrupted run
//! gets, and pays each chunk once, checked against both nodes' payment records; the rules of
//! `Resume` (the owner only, one stream at a time, not after the session ended).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use ldk_node::payment::{PaymentDirection, PaymentStatus};
use satstream::client::ClientEvent;
use satstream::harness::wait_until;
use satstream::wire::proto::{
    generate_event::Event as Ev, inference_client::InferenceClient, Accepted, EndSessionRequest,
    GenerateEvent, HaltReason, Invoice, PaymentMode, RefundRequest, ResumeRequest,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tonic::Streaming;

use super::prepaid::{prepaid, top_up};
use super::support::{
    assert_invariants, client, letters, next, open, request, session_ended_within, sid, world,
    World, T,
};

/// A TCP proxy in front of the server whose connections the test can cut at once.
struct Proxy {
    addr: SocketAddr,
    generation: Arc<Mutex<CancellationToken>>,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let generation = Arc::new(Mutex::new(CancellationToken::new()));
        let g = generation.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = l.accept().await {
                let cut = g.lock().unwrap().clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.cancelled() => {}
                    }
                });
            }
        });
        Proxy { addr, generation }
    }

    /// Drops every connection open now (both sides see it closed); new ones are served.
    fn cut(&self) {
        let mut g = self.generation.lock().unwrap();
        g.cancel();
        *g = CancellationToken::new();
    }
}

/// What the payer's node sent and saw succeed (fees excluded).
fn payer_sent_msat(w: &World) -> u64 {
    w.h.payer
        .node
        .list_payments()
        .into_iter()
        .filter(|p| {
            p.direction == PaymentDirection::Outbound && p.status == PaymentStatus::Succeeded
        })
        .filter_map(|p| p.amount_msat)
        .sum()
}

/// One paid generation of 40 tokens through the proxy, the connection cut after the second
/// chunk's text: the client resumes by itself and ends with the uninterrupted text, each
/// chunk paid once.
async fn a_cut_connection_resumes(mode: PaymentMode) {
    let w = world(&[]).await;
    let proxy = Proxy::start(w.h.server().grpc_addr).await;
    let mut c = InferenceClient::connect(format!("http://{}", proxy.addr))
        .await
        .unwrap();
    let before = payer_sent_msat(&w);
    let (mut shown, mut text, mut back_ms) = (0, String::new(), None);
    let s = satstream::client::generate(&mut c, &w.h.payer, request(40, mode), None, |e| {
        if let ClientEvent::Resumed { ms, .. } = e {
            back_ms = Some(*ms);
        }
        if let ClientEvent::Text { text: t, .. } = e {
            text.push_str(t);
            shown += 1;
            if shown == 2 {
                proxy.cut();
            }
        }
    })
    .await
    .unwrap();
    assert!(s.resumes >= 1, "{mode:?}: the cut was resumed ({s:?})");
    assert_eq!(s.outcome, "length", "{mode:?}");
    assert_eq!(
        text,
        letters(40),
        "{mode:?}: the text of an uninterrupted run"
    );
    assert_eq!(s.tokens, 40);
    assert_eq!(s.receipt_check, "verified", "{mode:?}");
    eprintln!(
        "{mode:?}: resumed {}x, drop → stream back {back_ms:?} ms, → first chunk after it {:?} ms",
        s.resumes, s.resume_first_chunk_ms
    );
    // Exactly once: what the payer's node paid is what the server's node received and booked
    // for this session, and that is the delivered text (plus, in KEYSEND, the refundable
    // leftover).
    let sess = assert_invariants(&w, &s.session_id);
    assert_eq!(payer_sent_msat(&w) - before, sess.paid_msat, "{mode:?}");
    assert_eq!(sess.spent_msat, 40 * super::support::MSAT_PER_TOKEN);
    assert_eq!(sess.paid_msat, sess.spent_msat + sess.refundable_msat());
    if mode != PaymentMode::Keysend {
        assert_eq!(sess.refundable_msat(), 0, "{mode:?}");
    }
    w.h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_connection_resumes_bolt11() {
    a_cut_connection_resumes(PaymentMode::Bolt11).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_connection_resumes_atomic() {
    a_cut_connection_resumes(PaymentMode::Atomic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_connection_resumes_keysend() {
    a_cut_connection_resumes(PaymentMode::Keysend).await;
}

async fn resume(
    w: &World,
    session_id: &str,
    token: &str,
    from_chunk: u32,
) -> Result<Streaming<GenerateEvent>, tonic::Status> {
    client(w)
        .await
        .resume(ResumeRequest {
            session_id: session_id.into(),
            session_token: token.into(),
            from_chunk,
        })
        .await
        .map(|r| r.into_inner())
}

/// Resumes a dropped session, waiting for the server to notice the drop (until then the
/// session still has a stream attached, and Resume says so).
async fn resume_when_detached(
    w: &World,
    sid: &str,
    token: &str,
    from_chunk: u32,
) -> (Streaming<GenerateEvent>, std::time::Instant) {
    let attached = Arc::new(tokio::sync::Mutex::new(None));
    wait_until("the session to take a resumed stream", T, || {
        let (sid, tk, attached) = (sid.to_string(), token.to_string(), attached.clone());
        async move {
            let called = std::time::Instant::now();
            match resume(w, &sid, &tk, from_chunk).await {
                Ok(s) => {
                    *attached.lock().await = Some((s, called));
                    true
                }
                Err(e) => {
                    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
                    assert!(e.message().contains("another stream"), "{e}");
                    false
                }
            }
        }
    })
    .await
    .unwrap();
    let s = attached.lock().await.take().unwrap();
    s
}

/// A 12-token BOLT11 session (chunks of 4, fixed window): pays chunk 0, reads its text and
/// chunk 1's invoice, then drops the stream. Returns Accepted, chunk 0's text, that invoice.
async fn pay_chunk_zero_then_drop(w: &World) -> (Accepted, String, Invoice) {
    let mut s = open(w, request(12, PaymentMode::Bolt11)).await;
    let Ev::Accepted(acc) = next(&mut s).await else {
        panic!("Accepted first")
    };
    let (mut text, mut second) = (String::new(), None);
    while second.is_none() || text.is_empty() {
        match next(&mut s).await {
            Ev::Invoice(inv) if inv.chunk_index == Some(0) => {
                w.h.payer.send(&inv.bolt11).unwrap();
            }
            Ev::Invoice(inv) => second = Some(inv),
            Ev::Tokens(t) => text.push_str(&t.text),
            other => panic!("unexpected {other:?}"),
        }
    }
    let second = second.unwrap();
    assert_eq!(second.chunk_index, Some(1));
    (acc, text, second)
}

/// BOLT11, dropped after paying chunk 0 with chunk 1's invoice out: Resume from chunk 1 sends
/// that same invoice again (its deadline paused while away), a second Resume is refused while this one
/// is attached, and paying the re-sent invoices finishes the text.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bolt11_resume_resends_the_same_invoice_and_allows_one_stream() {
    let w = world(&["payments.adaptive_lookahead=false"]).await;
    let (acc, first_text, second) = pay_chunk_zero_then_drop(&w).await;
    let (mut r, _) = resume_when_detached(&w, &acc.session_id, &acc.session_token, 1).await;
    // Chunk 1 waits for payment, so the session cannot end meanwhile: one stream at a time.
    let e = resume(&w, &acc.session_id, &acc.session_token, 1)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    assert!(e.message().contains("another stream"), "{e}");
    let Ev::Accepted(_) = next(&mut r).await else {
        panic!("Accepted again first")
    };
    let (mut text, mut invoices) = (first_text, Vec::new());
    let done = loop {
        match next(&mut r).await {
            Ev::Invoice(inv) => {
                invoices.push(inv.payment_hash.clone());
                w.h.payer.send(&inv.bolt11).unwrap();
            }
            Ev::Tokens(t) => text.push_str(&t.text),
            Ev::Done(d) => break d,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(
        invoices[0], second.payment_hash,
        "the same invoice, not a new one"
    );
    assert_eq!(
        text,
        letters(12),
        "chunk 0 once before the drop, the rest after"
    );
    assert_eq!(done.paid_msat, 12 * super::support::MSAT_PER_TOKEN);
    assert_invariants(&w, &acc.session_id);
    w.h.stop().await;
}

/// A session with a paid chunk whose client does not come back within the grace period ends
/// as a disconnect: the unpaid invoice is withdrawn, the books are exact. What it delivered
/// stays retrievable: a later Resume replays it and ends with Halted{CLIENT_GONE} and the
/// receipt (issue 22.5: it used to be refused, and the paid text was lost to the client).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paid_session_not_resumed_in_its_grace_ends_and_settles() {
    let w = world(&[
        "payments.resume_grace_secs=1",
        "payments.adaptive_lookahead=false",
    ])
    .await;
    let (acc, paid_text, second) = pay_chunk_zero_then_drop(&w).await;
    session_ended_within(&w, sid(&acc.session_id), T).await;
    let sess = assert_invariants(&w, &acc.session_id);
    assert_eq!(sess.end_reason.as_deref(), Some("client_gone"));
    assert_eq!(sess.completion_tokens as usize, paid_text.len());
    let mut r = resume(&w, &acc.session_id, &acc.session_token, 0)
        .await
        .unwrap();
    let Ev::Tokens(t) = next(&mut r).await else {
        panic!("the delivered chunk first")
    };
    assert_eq!((t.chunk_index, t.text.as_str()), (0, paid_text.as_str()));
    let Ev::Halted(h) = next(&mut r).await else {
        panic!("then the end")
    };
    assert_eq!(h.reason, HaltReason::ClientGone as i32, "{h:?}");
    assert_eq!(h.completion_tokens_delivered as usize, paid_text.len());
    let receipt = h.receipt.expect("the receipt");
    satstream::wire::receipt::verify(
        &receipt,
        Some(&w.h.server_node_id()),
        Some(&paid_text),
        Some(std::slice::from_ref(&paid_text)),
    )
    .unwrap();
    assert!(r.message().await.unwrap().is_none(), "and nothing more");
    // From chunk 1 on: nothing delivered, only the end.
    let mut r = resume(&w, &acc.session_id, &acc.session_token, 1)
        .await
        .unwrap();
    assert!(matches!(next(&mut r).await, Ev::Halted(_)));
    // Past what it delivered: a clear error.
    let e = resume(&w, &acc.session_id, &acc.session_token, 2)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert!(e.message().contains("from_chunk"), "{e}");
    let out = w.h.payer.pay(&second.bolt11, T).await.unwrap();
    assert!(
        matches!(out, satstream::harness::PayOutcome::Failed { .. }),
        "the withdrawn invoice cannot be paid: {out:?}"
    );
    w.h.stop().await;
}

/// PREPAID, dropped right after Accepted: while the client is away nothing more is drawn
/// from the account; Resume replays what was delivered and continues to Done. Only the owner
/// may resume, and not once the session has ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prepaid_resume_replays_and_continues_for_its_owner_only() {
    let w = world(&[]).await;
    // PREPAID never waits for a payment, so the generation must outlast the server's noticing
    // the drop (well under a millisecond): 2 000 tokens take the tiny model about a second.
    // Should it finish first anyway, Resume replays the ended session (no Accepted) and the
    // test fails loudly.
    const N: u32 = 2_000;
    let token = top_up(&w, "", N as u64 * super::support::MSAT_PER_TOKEN + 10_000).await;
    let mut s = open(&w, prepaid(N, &token)).await;
    let Ev::Accepted(acc) = next(&mut s).await else {
        panic!("Accepted first")
    };
    drop(s);
    let sid = acc.session_id.clone();
    let e = resume(&w, &sid, &hex::encode([7u8; 32]), 0)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    let e = resume(&w, &sid, "", 0).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");
    let (mut r, resumed_at) = resume_when_detached(&w, &sid, &acc.session_token, 0).await;
    let Ev::Accepted(again) = next(&mut r).await else {
        panic!("Accepted again first")
    };
    assert_eq!(again.session_id, sid);
    assert!(
        again.session_token.is_empty(),
        "the token is not sent again"
    );
    let mut chunks = Vec::new();
    let done = loop {
        match next(&mut r).await {
            Ev::Tokens(t) => {
                if chunks.is_empty() {
                    eprintln!(
                        "PREPAID: Resume called (new connection) → first replayed chunk {:.2} ms",
                        resumed_at.elapsed().as_secs_f64() * 1e3
                    );
                }
                chunks.push((t.chunk_index, t.text));
            }
            Ev::Balance(_) => {}
            Ev::Done(d) => break d,
            other => panic!("unexpected {other:?}"),
        }
    };
    let indices: Vec<u32> = chunks.iter().map(|c| c.0).collect();
    assert_eq!(
        indices,
        (0..N / super::support::CHUNK).collect::<Vec<_>>(),
        "each chunk once, in order"
    );
    let text: String = chunks.into_iter().map(|c| c.1).collect();
    assert_eq!(text, letters(N as usize));
    assert_eq!(done.completion_tokens, N);
    assert!(done.receipt.is_some());
    // Ended: Resume replays the delivered chunks from the store and the same Done.
    session_ended_within(&w, super::support::sid(&sid), T).await;
    let mut r = resume(&w, &sid, &acc.session_token, N / super::support::CHUNK - 1)
        .await
        .unwrap();
    let Ev::Tokens(t) = next(&mut r).await else {
        panic!("the last chunk")
    };
    assert_eq!(t.chunk_index, N / super::support::CHUNK - 1);
    let Ev::Done(again) = next(&mut r).await else {
        panic!("then Done")
    };
    assert_eq!(again.receipt, done.receipt, "the same receipt");
    assert_eq!(again.completion_tokens, N);
    let sess = assert_invariants(&w, &sid);
    assert_eq!(
        sess.spent_msat,
        N as u64 * super::support::MSAT_PER_TOKEN,
        "drawn once per chunk"
    );
    w.h.stop().await;
}

/// A client that stops at its budget ends the session on purpose (EndSession): it ends at
/// once, not after the grace for Resume, with the books exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_budget_stop_ends_the_session_at_once() {
    let w = world(&["payments.adaptive_lookahead=false"]).await;
    let mut c = client(&w).await;
    let s = satstream::client::generate(
        &mut c,
        &w.h.payer,
        request(40, PaymentMode::Bolt11),
        Some(8 * super::support::MSAT_PER_TOKEN),
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(s.outcome, "budget");
    // Well before the 60 s grace.
    session_ended_within(&w, sid(&s.session_id), std::time::Duration::from_secs(20)).await;
    let sess = assert_invariants(&w, &s.session_id);
    assert_eq!(sess.end_reason.as_deref(), Some("ended_by_owner"));
    assert_eq!(
        sess.paid_msat, s.spent_msat,
        "what the client paid, and no more"
    );
    // Ending it again is a no-op; another token may not.
    let end = |token: String| satstream::wire::proto::EndSessionRequest {
        session_id: s.session_id.clone(),
        session_token: token,
    };
    let again = c.end_session(end(s.session_token.clone())).await.unwrap();
    assert!(!again.into_inner().ended_now);
    let e = c
        .end_session(end(hex::encode([7u8; 32])))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    w.h.stop().await;
}

/// Issue 22.11: EndSession while the owner's stream is still attached ends that stream the
/// way every Generate stream ends: Halted{ENDED_BY_OWNER} with the receipt (it used to end
/// after Accepted with no final event).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn end_session_halts_the_attached_stream_with_its_receipt() {
    let w = world(&["payments.adaptive_lookahead=false"]).await;
    let (mut s, acc, text) = {
        let mut s = open(&w, request(40, PaymentMode::Bolt11)).await;
        let Ev::Accepted(acc) = next(&mut s).await else {
            panic!("Accepted first")
        };
        let mut text = String::new();
        while text.is_empty() {
            match next(&mut s).await {
                Ev::Invoice(inv) if inv.chunk_index == Some(0) => {
                    w.h.payer.send(&inv.bolt11).unwrap();
                }
                Ev::Invoice(_) => {}
                Ev::Tokens(t) => text.push_str(&t.text),
                other => panic!("unexpected {other:?}"),
            }
        }
        (s, acc, text)
    };
    let ended = client(&w)
        .await
        .end_session(EndSessionRequest {
            session_id: acc.session_id.clone(),
            session_token: acc.session_token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(ended.ended_now);
    let h = loop {
        match next(&mut s).await {
            Ev::Halted(h) => break h,
            Ev::Invoice(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(h.reason, HaltReason::EndedByOwner as i32, "{h:?}");
    assert_eq!(h.completion_tokens_delivered as usize, text.len());
    let receipt = h.receipt.expect("the receipt");
    satstream::wire::receipt::verify(
        &receipt,
        Some(&w.h.server_node_id()),
        Some(&text),
        Some(std::slice::from_ref(&text)),
    )
    .unwrap();
    assert!(
        s.message().await.unwrap().is_none(),
        "the stream ends there"
    );
    let sess = assert_invariants(&w, &acc.session_id);
    assert_eq!(sess.end_reason.as_deref(), Some("ended_by_owner"));
    w.h.stop().await;
}

/// Issue 22.11: bad inputs on Resume and Refund get a specific code and a message naming the
/// field, and change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resume_and_refund_name_the_field_that_is_wrong() {
    let w = world(&["payments.adaptive_lookahead=false"]).await;
    let (acc, _text, second) = pay_chunk_zero_then_drop(&w).await;
    let bad = |e: tonic::Status, field: &str| {
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        assert!(e.message().starts_with(field), "{field}: {e}");
    };
    // One chunk delivered: chunk 2 is past it.
    bad(
        resume(&w, &acc.session_id, &acc.session_token, 2)
            .await
            .unwrap_err(),
        "from_chunk",
    );
    // Malformed, not wrong: what a token looks like, without echoing it.
    let e = resume(&w, &acc.session_id, "not-hex", 0).await.unwrap_err();
    bad(e.clone(), "session_token");
    assert!(!e.message().contains("not-hex"), "{e}");
    bad(
        resume(&w, "xyz", &acc.session_token, 0).await.unwrap_err(),
        "session_id",
    );
    let mut c = client(&w).await;
    let e = c
        .refund(RefundRequest {
            session_id: acc.session_id.clone(),
            session_token: acc.session_token.clone(),
            bolt11: super::support::payer_invoice(&w, None),
            wait_secs: 1_000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    bad(e, "wait_secs");
    let e = c
        .refund(RefundRequest {
            session_id: acc.session_id.clone(),
            session_token: acc.session_token.clone(),
            bolt11: "lnbcrt1notaninvoice".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    bad(e, "bolt11");
    // Nothing changed: the session still resumes from chunk 1 with the same invoice.
    let (mut r, _) = resume_when_detached(&w, &acc.session_id, &acc.session_token, 1).await;
    let Ev::Accepted(_) = next(&mut r).await else {
        panic!("Accepted again first")
    };
    let Ev::Invoice(inv) = next(&mut r).await else {
        panic!("chunk 1's invoice again")
    };
    assert_eq!(inv.payment_hash, second.payment_hash);
    let sess =
        w.h.server()
            .app
            .store
            .session(&sid(&acc.session_id))
            .unwrap()
            .unwrap();
    assert_eq!((sess.reserved_msat, sess.refunded_msat), (0, 0));
    drop(r);
    w.h.stop().await;
}

/// Issue 22.5: with no grace period a cut connection ends the session at once, and the client
/// still gets everything it paid for: its Resume replays the ended session's delivered chunks
/// (some were committed as delivered but lost in the cut) and its end with the receipt.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_no_grace_a_cut_client_still_gets_what_it_paid_for() {
    let w = world(&["payments.resume_grace_secs=0"]).await;
    let proxy = Proxy::start(w.h.server().grpc_addr).await;
    let mut c = InferenceClient::connect(format!("http://{}", proxy.addr))
        .await
        .unwrap();
    let (mut shown, mut text) = (0, String::new());
    let s = satstream::client::generate(
        &mut c,
        &w.h.payer,
        request(40, PaymentMode::Bolt11),
        None,
        |e| {
            if let ClientEvent::Text { text: t, .. } = e {
                text.push_str(t);
                shown += 1;
                if shown == 2 {
                    proxy.cut();
                }
            }
        },
    )
    .await
    .unwrap();
    assert_eq!(s.outcome, "halted: client_gone", "{s:?}");
    assert_eq!(s.receipt_check, "verified", "{s:?}");
    let store = &w.h.server().app.store;
    let delivered: String = store
        .delivered_chunks(&sid(&s.session_id))
        .unwrap()
        .into_iter()
        .map(|c| c.text.unwrap())
        .collect();
    assert_eq!(
        text, delivered,
        "every delivered chunk reached the client, once"
    );
    assert!(text.len() >= 8 && letters(40).starts_with(&text), "{text}");
    let sess = assert_invariants(&w, &s.session_id);
    assert_eq!(sess.end_reason.as_deref(), Some("client_gone"));
    assert_eq!(sess.refundable_msat(), 0);
    w.h.stop().await;
}

/// Issue 23.4: a client that pays once and then drops and resumes in a loop cannot hold its
/// session (and engine slot) forever: Resume is refused past `max_resumes`, and the session
/// halts at `max_session_secs` whatever it is waiting for, with its books exact; a Resume
/// after that replays what it delivered and the halt.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resumes_are_capped_and_a_session_has_a_lifetime() {
    let w = world(&[
        "payments.adaptive_lookahead=false",
        "payments.max_resumes=1",
        "payments.max_session_secs=5",
    ])
    .await;
    let (acc, paid_text, _) = pay_chunk_zero_then_drop(&w).await;
    let (r, _) = resume_when_detached(&w, &acc.session_id, &acc.session_token, 1).await;
    drop(r);
    // The second resume: refused once the session has seen the drop (until then "another
    // stream is attached").
    let refused = Arc::new(Mutex::new(None));
    wait_until("Resume to be refused past the cap", T, || {
        let (sid, tk, refused) = (
            acc.session_id.clone(),
            acc.session_token.clone(),
            refused.clone(),
        );
        let w = &w;
        async move {
            match resume(w, &sid, &tk, 1).await {
                Ok(_) => panic!("a second resume was taken"),
                Err(e) if e.code() == tonic::Code::FailedPrecondition => false,
                Err(e) => {
                    *refused.lock().unwrap() = Some(e);
                    true
                }
            }
        }
    })
    .await
    .unwrap();
    let e = refused.lock().unwrap().take().unwrap();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
    assert!(e.message().contains("max_resumes"), "{e}");
    // Away with 60 s of grace left, it still ends at its 5 s lifetime.
    let sess = session_ended_within(&w, sid(&acc.session_id), T).await;
    assert_eq!(sess.end_reason.as_deref(), Some("session_lifetime"));
    assert_eq!(sess.completion_tokens as usize, paid_text.len());
    assert_invariants(&w, &acc.session_id);
    let mut r = resume(&w, &acc.session_id, &acc.session_token, 1)
        .await
        .unwrap();
    let Ev::Halted(h) = next(&mut r).await else {
        panic!("the end")
    };
    assert_eq!(h.reason, HaltReason::SessionLifetime as i32, "{h:?}");
    w.h.stop().await;
}
