//! Money under faults (SPEC invariants 2–4): the server runs as its own OS process and kills
//! itself with SIGKILL at fault points (`SATSTREAM_FAULT`) in the middle of a paid session, in
//! every mode; it is restarted on the same data, the payer reconnects (blocks are mined where
//! a channel closed), and the ledger is checked against what the payer's node and the
//! server's own node recorded.

use std::collections::BTreeSet;
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use ldk_node::payment::{PaymentDirection, PaymentStatus};
use satstream::config::ModelConfig;
use satstream::engine::tiny_model::write_tiny_model;
use satstream::harness::process::{ProcessOptions, ProcessWorld};
use satstream::wire::proto::{
    generate_event::Event as Ev, ChatMessage, GenerateRequest, PaymentMode, SamplingParams,
    TopUpRequest,
};

const EXE: &str = env!("CARGO_BIN_EXE_satstream");
const T: Duration = Duration::from_secs(60);

async fn world() -> (ProcessWorld, tempfile::TempDir) {
    super::support::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let path = write_tiny_model(dir.path()).unwrap();
    let mut m = ModelConfig::new("tiny", path, 1_000);
    m.chunk_tokens = 4;
    let w = ProcessWorld::start(
        std::path::Path::new(EXE),
        ProcessOptions {
            models: vec![m],
            sets: vec![
                "payments.payment_timeout_secs=5".into(),
                "payments.first_payment_timeout_secs=5".into(),
                "payments.claim_confirm_timeout_secs=3".into(),
                "server.shutdown_timeout_secs=5".into(),
                // A killed server's sessions cannot be resumed: the client ends at the drop.
                "payments.resume_grace_secs=0".into(),
            ],
            channel_sat: 1_000_000,
            log: None,
        },
    )
    .await
    .unwrap();
    (w, dir)
}

fn request(mode: PaymentMode) -> GenerateRequest {
    GenerateRequest {
        model: "tiny".into(),
        messages: vec![ChatMessage {
            role: "user".into(),
            content: "hi".into(),
        }],
        max_tokens: 16,
        mode: mode as i32,
        sampling: Some(SamplingParams {
            temperature: Some(0.0),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// What one crash did, for the summary the test prints.
#[derive(Debug, Default)]
struct Outcome {
    payer_succeeded: usize,
    payer_failed: usize,
    force_closed: bool,
    /// What the server recorded as lost so far (claims that went to fees), msat.
    lost_msat: u64,
}

/// Runs a paid session on a server armed to SIGKILL itself at `point` (its `at`-th pass),
/// restarts it, settles, and checks the books.
async fn crash_at(w: &mut ProcessWorld, mode: PaymentMode, point: &str, at: u32) -> Outcome {
    let before: BTreeSet<[u8; 32]> = w
        .payer
        .node
        .list_payments()
        .iter()
        .map(|p| p.id.0)
        .collect();
    w.server().stop(T).await.unwrap();
    let fault = format!("{point}:{at}");
    w.start_server(&[("SATSTREAM_FAULT", fault.as_str())])
        .await
        .unwrap();
    w.ensure_channel().await.unwrap();
    let mut client = w.inference().await.unwrap();
    if mode == PaymentMode::Prepaid {
        run_prepaid(w, &mut client).await;
    } else {
        let run = satstream::client::generate(&mut client, &w.payer, request(mode), None, |_| {});
        // The server dies mid-stream: the call ends with an error (or, if the fault point is
        // reached only later, the session completes).
        let _ = tokio::time::timeout(T, run)
            .await
            .expect("the session ends");
    }
    let status = w.server().wait_exit(T).await.unwrap_or_else(|e| {
        panic!(
            "{point}:{at} did not kill the server ({e}):\n{}",
            w.server().log_tail(30)
        )
    });
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "{point}: killed by SIGKILL"
    );
    if std::env::var_os("SATSTREAM_TEST_VERBOSE").is_some() {
        eprintln!(
            "--- {point}:{at} killed server log ---\n{}",
            w.server().log_tail(60)
        );
    }

    w.start_server(&[]).await.unwrap();
    let force_closed = w.payer.node.list_channels().is_empty();
    w.settle_payer(Duration::from_secs(180)).await.unwrap();
    w.wait_settled(Duration::from_secs(120)).await.unwrap();
    let new: Vec<_> = w
        .payer
        .node
        .list_payments()
        .into_iter()
        .filter(|p| {
            p.direction == PaymentDirection::Outbound
                && lightning_kind(&p.kind)
                && !before.contains(&p.id.0)
        })
        .collect();
    let books = check_books(w).await;
    Outcome {
        lost_msat: books.lost_msat,
        payer_succeeded: new
            .iter()
            .filter(|p| p.status == PaymentStatus::Succeeded)
            .count(),
        payer_failed: new
            .iter()
            .filter(|p| p.status == PaymentStatus::Failed)
            .count(),
        force_closed,
    }
}

/// PREPAID: top up, wait for the credit, then generate from the account.
async fn run_prepaid(
    w: &ProcessWorld,
    client: &mut satstream::wire::proto::inference_client::InferenceClient<
        tonic::transport::Channel,
    >,
) {
    let t = client
        .top_up(TopUpRequest {
            account_token: String::new(),
            amount_msat: 40_000,
        })
        .await
        .unwrap()
        .into_inner();
    let paid = w.payer.pay(&t.bolt11, T).await;
    if !matches!(paid, Ok(satstream::harness::PayOutcome::Succeeded { .. })) {
        return; // the fault fired during the top-up
    }
    let mut req = request(PaymentMode::Prepaid);
    req.account_token = t.account_token;
    let Ok(s) = client.generate(req).await else {
        return;
    };
    let mut s = s.into_inner();
    while let Ok(Ok(Some(ev))) = tokio::time::timeout(T, s.message()).await {
        if matches!(ev.event, Some(Ev::Done(_)) | Some(Ev::Halted(_))) {
            break;
        }
    }
}

/// The checks after every crash, against the payer's and the server's own node records.
async fn check_books(w: &ProcessWorld) -> satstream::harness::audit::Books {
    let books = satstream::harness::audit::audit(w).await.unwrap();
    let problems = books.problems();
    assert!(problems.is_empty(), "{problems:#?}\n{books:#?}");
    assert_eq!(books.unaccounted_msat, 0);
    books
}

fn lightning_kind(k: &ldk_node::payment::PaymentKind) -> bool {
    matches!(
        k,
        ldk_node::payment::PaymentKind::Bolt11 { .. }
            | ldk_node::payment::PaymentKind::Spontaneous { .. }
    )
}

async fn crash_suite(mode: PaymentMode, cases: &[(&str, u32)]) {
    let (mut w, _dir) = world().await;
    let mut report = Vec::new();
    for &(point, at) in cases {
        let o = crash_at(&mut w, mode, point, at).await;
        report.push(format!(
            "{:?} {point}:{at}: payer succeeded {} failed {}{}; lost so far {} msat",
            mode,
            o.payer_succeeded,
            o.payer_failed,
            if o.force_closed {
                ", channel force-closed"
            } else {
                ""
            },
            o.lost_msat
        ));
    }
    eprintln!("{}", report.join("\n"));
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_bolt11_at_every_money_step() {
    crash_suite(
        PaymentMode::Bolt11,
        &[
            ("after_claim", 2),
            ("after_commit", 2),
            ("held", 2),
            ("invoice_in_ldk", 2),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_atomic_while_claiming_and_holding() {
    crash_suite(PaymentMode::Atomic, &[("after_claim", 1), ("held", 3)]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_keysend_while_crediting_and_delivering() {
    crash_suite(
        PaymentMode::Keysend,
        &[("keysend_credit", 2), ("after_commit", 2)],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_prepaid_while_topping_up_and_drawing() {
    crash_suite(
        PaymentMode::Prepaid,
        &[("after_claim", 1), ("after_commit", 2)],
    )
    .await;
}

/// A refund killed between its reservation and LDK, and between LDK and the reply: after the
/// restart the money is neither paid twice nor released while it may be in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_refund_between_reservation_and_payment() {
    use satstream::wire::proto::{GetAccountRequest, RefundRequest};
    let (mut w, _dir) = world().await;
    let mut c = w.inference().await.unwrap();
    // 30 000 sat: the server's side of the payer's channel then exceeds its reserve, so it
    // can pay refunds back over it.
    let t = c
        .top_up(TopUpRequest {
            account_token: String::new(),
            amount_msat: 30_000_000,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        w.payer.pay(&t.bolt11, T).await.unwrap(),
        satstream::harness::PayOutcome::Succeeded { .. }
    ));
    let token = t.account_token;
    let account = |w: &ProcessWorld| {
        let token = token.clone();
        let ep = w.endpoint();
        async move {
            satstream::wire::proto::inference_client::InferenceClient::connect(ep)
                .await
                .unwrap()
                .get_account(GetAccountRequest {
                    account_token: token,
                })
                .await
                .unwrap()
                .into_inner()
        }
    };
    satstream::harness::wait_until("the top-up to be credited", T, || async {
        account(&w).await.credited_msat == 30_000_000
    })
    .await
    .unwrap();
    let received = |w: &ProcessWorld, bolt11: &str| {
        let inv: ldk_node::lightning_invoice::Bolt11Invoice = bolt11.parse().unwrap();
        w.payer
            .node
            .payment(&ldk_node::lightning::ln::channelmanager::PaymentId(
                *inv.payment_hash().as_ref(),
            ))
            .filter(|p| p.status == PaymentStatus::Succeeded)
            .and_then(|p| p.amount_msat)
    };
    let invoice = |w: &ProcessWorld| {
        use ldk_node::lightning_invoice::{Bolt11InvoiceDescription, Description};
        let d = Bolt11InvoiceDescription::Direct(Description::new("refund".into()).unwrap());
        w.payer
            .node
            .bolt11_payment()
            .receive(1_000_000, &d, 3600)
            .unwrap()
            .to_string()
    };
    let refund = |w: &ProcessWorld, bolt11: String| {
        let (token, ep) = (token.clone(), w.endpoint());
        async move {
            satstream::wire::proto::inference_client::InferenceClient::connect(ep)
                .await
                .unwrap()
                .refund(RefundRequest {
                    account_token: token,
                    bolt11,
                    wait_secs: 30,
                    ..Default::default()
                })
                .await
        }
    };

    for point in ["refund_reserved", "refund_sent"] {
        let before = account(&w).await;
        w.server().stop(T).await.unwrap();
        let fault = format!("{point}:1");
        w.start_server(&[("SATSTREAM_FAULT", fault.as_str())])
            .await
            .unwrap();
        w.ensure_channel().await.unwrap();
        let bolt11 = invoice(&w);
        assert!(
            refund(&w, bolt11.clone()).await.is_err(),
            "{point}: the server dies before it answers"
        );
        let status = w.server().wait_exit(T).await.unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{point}");
        w.start_server(&[]).await.unwrap();
        w.ensure_channel().await.unwrap();
        if point == "refund_reserved" {
            // LDK never had it: the reservation stays (it is released only once it is an
            // orphan, lightning::refunds::ORPHAN_REFUND_SECS), nothing was paid, and a retry
            // with the same invoice is the first attempt, not a second payment.
            let a = account(&w).await;
            assert_eq!(a.reserved_msat, before.reserved_msat + 1_000_000, "{point}");
            assert_eq!(
                a.available_msat,
                before.available_msat - 1_000_000,
                "{point}"
            );
            let again = refund(&w, bolt11.clone()).await.unwrap().into_inner();
            assert_eq!(again.state, "pending", "{point}: {again:?}");
            assert_eq!(received(&w, &bolt11), None, "{point}: never paid");
        } else {
            // Killed after LDK took the payment. Whether its HTLC reached the payer depends
            // on how far LDK got: the restart may force-close the channel (a ChannelManager
            // older than its monitor), and the HTLC then resolves on chain. LDK reports the
            // outcome either way; until it does the refund stays reserved. Blocks are mined
            // meanwhile so that an on-chain resolution can happen.
            let deadline = std::time::Instant::now() + Duration::from_secs(240);
            let a = loop {
                let a = account(&w).await;
                if a.reserved_msat == before.reserved_msat {
                    break a;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "{point}: LDK never reported the refund's outcome: {a:?}"
                );
                w.mine(1).await.unwrap();
                tokio::time::sleep(Duration::from_millis(300)).await;
            };
            w.settle_payer(Duration::from_secs(180)).await.unwrap();
            let again = refund(&w, bolt11.clone()).await.unwrap().into_inner();
            if a.refunded_msat == before.refunded_msat + 1_000_000 {
                // Sent: booked once, and the payer received exactly the amount (its node
                // records the claim as it sends the preimage back).
                satstream::harness::wait_until("the payer's record of the refund", T, || async {
                    received(&w, &bolt11).is_some()
                })
                .await
                .unwrap();
                assert_eq!(received(&w, &bolt11), Some(1_000_000), "{point}");
                assert_eq!(again.state, "succeeded", "{point}: {again:?}");
                assert_eq!(a.available_msat, before.available_msat - 1_000_000);
            } else {
                // Failed: released, and the payer received nothing.
                assert_eq!(a.refunded_msat, before.refunded_msat, "{point}: {a:?}");
                assert_eq!(received(&w, &bolt11), None, "{point}: released but paid");
                assert_eq!(again.state, "failed", "{point}: {again:?}");
                assert_eq!(a.available_msat, before.available_msat, "{point}");
            }
            // The retry was the first attempt's answer, not a second payment.
            assert_eq!(account(&w).await.reserved_msat, before.reserved_msat);
        }
    }
    check_books(&w).await;
    w.stop().await;
}
