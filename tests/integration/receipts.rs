//! Signed receipts on the real harness: every mode's Done carries a receipt signed by the
//! server's node key that verifies against the node the client paid, the text it received and
//! (per chunk) the payments the server's node itself recorded; GetReceipt returns the same
//! receipt to the session's owner only; a halted session's receipt lists exactly the chunks
//! delivered; `satstream receipt verify` checks a saved one offline and refuses a tampered one.

use std::process::Command;

use ldk_node::lightning::ln::channelmanager::PaymentId;
use ldk_node::payment::PaymentStatus;
use satstream::wire::proto::{
    generate_event::Event as Ev, GetReceiptRequest, PaymentMode, Receipt,
};
use satstream::wire::receipt::{self, ReceiptBody};

use super::prepaid::{prepaid, top_up};
use super::support::{client, letters, next, open, request, world, World, MSAT_PER_TOKEN};

async fn get_receipt(w: &World, session_id: &str, token: &str) -> Result<Receipt, tonic::Status> {
    client(w)
        .await
        .get_receipt(GetReceiptRequest {
            session_id: session_id.into(),
            session_token: token.into(),
        })
        .await
        .map(|r| r.into_inner())
}

/// The receipt's claims checked against the world: the payer's own node verifies the
/// signature (ldk-node's verify_signature), and every chunk paid by an invoice is a payment
/// the server's node recorded as received, for exactly the chunk's price.
fn check_against_nodes(w: &World, r: &Receipt) -> ReceiptBody {
    let server = w.h.server().app.lightning.node_id();
    let body = receipt::verify(r, Some(&server), None, None).expect("receipt verifies");
    let pk = server.parse().unwrap();
    assert!(w
        .h
        .payer
        .node
        .verify_signature(r.signed_text.as_bytes(), &r.signature, &pk));
    let node = w.h.server().app.lightning.node();
    for c in &body.chunks {
        assert_eq!(
            c.price_msat,
            c.tokens as u64 * MSAT_PER_TOKEN,
            "exact price"
        );
        if let Some(h) = c.payment_hash {
            let p = node
                .payment(&PaymentId(h))
                .expect("the node knows the payment");
            assert_eq!(p.status, PaymentStatus::Succeeded, "chunk {}", c.index);
            assert_eq!(p.amount_msat, Some(c.price_msat), "chunk {}", c.index);
        }
    }
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_mode_gets_a_receipt_that_verifies_and_only_its_owner_can_fetch() {
    let w = world(&[]).await;
    let account = top_up(&w, "", 40_000).await;
    for mode in [
        PaymentMode::Bolt11,
        PaymentMode::Atomic,
        PaymentMode::Keysend,
        PaymentMode::Prepaid,
    ] {
        let req = match mode {
            PaymentMode::Prepaid => prepaid(10, &account),
            m => request(10, m),
        };
        let mut c = client(&w).await;
        let s = satstream::client::generate(&mut c, &w.h.payer, req, None, |_| {})
            .await
            .unwrap();
        assert_eq!(s.outcome, "length", "{mode:?}");
        assert_eq!(s.receipt_check, "verified", "{mode:?}");
        let r = s.receipt.clone().expect("Done carries the receipt");
        let body = check_against_nodes(&w, &r);
        assert_eq!(
            body.mode,
            mode.as_str_name().trim_start_matches("PAYMENT_MODE_")
        );
        assert_eq!(body.session_id, s.session_id);
        assert_eq!(body.completion_tokens, 10);
        assert_eq!(
            body.chunks.len(),
            3,
            "{mode:?}: chunks of 4, 4 and 2 tokens"
        );
        assert_eq!(body.spent_msat, 10 * MSAT_PER_TOKEN);
        assert_eq!(body.output_sha256, receipt::sha256(letters(10).as_bytes()));
        assert_eq!(
            (body.state.as_str(), body.reason.as_str()),
            ("finished", "length")
        );
        let by_invoice = matches!(mode, PaymentMode::Bolt11 | PaymentMode::Atomic);
        assert!(
            body.chunks
                .iter()
                .all(|c| c.payment_hash.is_some() == by_invoice),
            "{mode:?}: chunks paid by their invoices, or drawn from a balance"
        );

        // Later, from SQLite: the same receipt, for the owner only.
        assert_eq!(
            get_receipt(&w, &s.session_id, &s.session_token)
                .await
                .unwrap(),
            r
        );
        let other = hex::encode([7u8; 32]);
        let e = get_receipt(&w, &s.session_id, &other).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
        let e = get_receipt(&w, &s.session_id, "").await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");
    }
    let e = get_receipt(&w, &hex::encode([1u8; 16]), &hex::encode([7u8; 32]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
    let e = get_receipt(&w, "not hex", &hex::encode([7u8; 32]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    w.h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_halted_session_has_a_receipt_for_what_was_delivered() {
    let w = world(&[
        "payments.payment_timeout_secs=2",
        "payments.max_unpaid_msat=12000",
    ])
    .await;
    let mut s = open(&w, request(40, PaymentMode::Bolt11)).await;
    let Ev::Accepted(acc) = next(&mut s).await else {
        panic!("Accepted first")
    };
    // While it runs there is no receipt yet.
    let e = get_receipt(&w, &acc.session_id, &acc.session_token)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    // Pay the first two chunks, then stop paying.
    let (mut paid, mut texts) = (0, Vec::new());
    let halted = loop {
        match next(&mut s).await {
            Ev::Invoice(inv) if paid < 2 => {
                paid += 1;
                w.h.payer.send(&inv.bolt11).unwrap();
            }
            Ev::Invoice(_) => {}
            Ev::Tokens(t) => texts.push(t.text),
            Ev::Halted(h) => break h,
            other => panic!("unexpected {other:?}"),
        }
    };
    let text = texts.concat();
    assert_eq!(texts.len(), 2, "the two paid chunks");
    assert_eq!(text, letters(text.len()));
    let r = halted.receipt.expect("Halted carries the receipt");
    let body = check_against_nodes(&w, &r);
    assert_eq!(body.chunks.len(), 2);
    assert_eq!(body.completion_tokens as usize, text.len());
    assert_eq!(halted.completion_tokens_delivered, body.completion_tokens);
    assert_eq!(
        (body.state.as_str(), body.reason.as_str()),
        ("halted", "payment_timeout")
    );
    receipt::verify(&r, None, Some(&text), Some(&texts)).unwrap();
    assert_eq!(
        get_receipt(&w, &acc.session_id, &acc.session_token)
            .await
            .unwrap(),
        r
    );

    // Offline: `satstream receipt verify` accepts the saved receipt and refuses a tampered one.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("receipt.txt");
    std::fs::write(&file, receipt::to_file(&r)).unwrap();
    let node = w.h.server().app.lightning.node_id();
    let verify = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_satstream"))
            .args(["receipt", "verify"])
            .arg(&file)
            .args(extra)
            .output()
            .unwrap()
    };
    let out = verify(&["--node-id", &node]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("valid receipt"), "{stdout}");
    assert!(stdout.contains("halted payment_timeout"), "{stdout}");
    let n = body.completion_tokens;
    let wrong = "03".to_string() + &"cd".repeat(32);
    let out = verify(&["--node-id", &wrong]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("INVALID"),
        "{out:?}"
    );
    // One delivered token fewer, say: the signature no longer covers the text.
    let tampered = receipt::to_file(&r).replace(
        &format!("completion_tokens: {n}"),
        &format!("completion_tokens: {}", n - 1),
    );
    std::fs::write(&file, tampered).unwrap();
    let out = verify(&[]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("INVALID"),
        "{out:?}"
    );
    w.h.stop().await;
}
