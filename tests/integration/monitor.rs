//! A channel's monitor keeps every past commitment until its funding output is spent: the
//! server splices a channel whose monitor passed `lightning.compact_monitor_bytes`, with the
//! operator's own balance only, and the monitor starts small again (lightning::compaction).

use std::path::Path;

use ldk_node::payment::{PaymentDirection, PaymentKind};
use satstream::harness::wait_until;
use satstream::lightning::compaction::stored_monitor_sizes;
use satstream::wire::proto::{generate_event::Event as Ev, PaymentMode};

use super::prepaid::{account, top_up};
use super::support::{assert_invariants, open, pay_until_done, request, world, World, T};

/// A fresh channel's monitor is ~5 KB; 16-token sessions add ~1 KB each.
const LIMIT: u64 = 40_000;
const SPLICE_SAT: u64 = 20_000;

fn monitor_bytes(ldk: &Path) -> u64 {
    stored_monitor_sizes(ldk).unwrap().values().sum()
}

/// One paid BOLT11 session of 16 tokens; its id.
async fn paid_session(w: &World) -> String {
    let mut s = open(w, request(16, PaymentMode::Bolt11)).await;
    let Ev::Accepted(acc) = super::support::next(&mut s).await else {
        panic!("Accepted first")
    };
    let p = pay_until_done(w, &mut s).await;
    assert!(matches!(p.end, Ev::Done(_)), "{:?}", p.end);
    acc.session_id
}

/// Sessions until the stored monitor is above (`above`) or below `bytes`; the sessions.
async fn sessions_until(w: &World, ldk: &Path, above: bool, bytes: u64) -> Vec<String> {
    let mut ids = Vec::new();
    while (monitor_bytes(ldk) > bytes) != above {
        assert!(
            ids.len() < 120,
            "the monitor stayed at {}",
            monitor_bytes(ldk)
        );
        ids.push(paid_session(w).await);
    }
    ids
}

/// Waits for the watchdog's splice to reach the mempool, pays sessions while it confirms,
/// mines it and waits for the lock; the splice's txid and the sessions paid meanwhile.
async fn splice_locks(w: &World) -> (ldk_node::bitcoin::Txid, Vec<String>) {
    let node = w.h.server().app.lightning.node().clone();
    let funding = node.list_channels()[0].funding_txo;
    let b = &w.h.bitcoind;
    wait_until("the splice to be broadcast", T, || async {
        b.mempool_len().unwrap_or(0) > 0
    })
    .await
    .unwrap();
    let during = vec![paid_session(w).await, paid_session(w).await];
    w.h.mine(6).await.unwrap();
    let n = node.clone();
    wait_until("the splice to lock", T, || {
        let n = n.clone();
        async move {
            n.list_channels()
                .first()
                .is_some_and(|c| c.funding_txo != funding && c.is_usable)
        }
    })
    .await
    .unwrap();
    (node.list_channels()[0].funding_txo.unwrap().txid, during)
}

/// The server's node's record of the on-chain side of splice `txid`.
fn splice_record(w: &World, txid: ldk_node::bitcoin::Txid) -> (PaymentDirection, Option<u64>) {
    let node = w.h.server().app.lightning.node();
    let r: Vec<_> = node
        .list_payments()
        .into_iter()
        .filter(|p| matches!(p.kind, PaymentKind::Onchain { txid: t, .. } if t == txid))
        .collect();
    assert_eq!(r.len(), 1, "{r:?}");
    (r[0].direction, r[0].amount_msat)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_grown_channel_monitor_is_spliced_with_the_operators_money_and_starts_small() {
    let w = world(&[
        &format!("lightning.compact_monitor_bytes={LIMIT}"),
        &format!("lightning.compact_splice_sat={SPLICE_SAT}"),
    ])
    .await;
    let node = w.h.server().app.lightning.node().clone();
    let ldk = w.h.server().app.config.ldk_dir();
    let capacity = || node.list_channels()[0].channel_value_sats;
    let sat0 = capacity();
    // Customers' money on the server's side of the channel: 60 000 sat on an account. The
    // operator's own balance in the channel is only what the sessions below pay.
    let token = top_up(&w, "", 60_000_000).await;
    let mut sessions = sessions_until(&w, &ldk, true, LIMIT).await;

    // 1. The monitor passed its limit; the channel holds no operator money beyond what the
    // account may be refunded, so the splice comes from the node's wallet, into the channel.
    let before = monitor_bytes(&ldk);
    let (txid, during) = splice_locks(&w).await;
    sessions.extend(during);
    assert_eq!(capacity(), sat0 + SPLICE_SAT, "spliced in");
    assert_eq!(splice_record(&w, txid).0, PaymentDirection::Outbound);
    // Once ldk-node writes the monitor whole again, the old funding's history is gone.
    sessions.extend(sessions_until(&w, &ldk, false, LIMIT / 2).await);
    let small = monitor_bytes(&ldk);

    // 2. The operator's own money arrives (a tip: a keysend naming no session); the next
    // compaction moves part of it out, to the node's wallet.
    let server_id = satstream::lightning::parse_node_id(&w.h.server_node_id()).unwrap();
    w.h.payer
        .node
        .spontaneous_payment()
        .send(90_000_000, server_id, None)
        .unwrap();
    sessions.extend(sessions_until(&w, &ldk, true, LIMIT).await);
    let (txid, during) = splice_locks(&w).await;
    sessions.extend(during);
    // Out of the channel: what went to the wallet, and the splice's on-chain fee.
    let fee = (sat0 + SPLICE_SAT) - capacity() - SPLICE_SAT;
    assert!(fee < 10_000, "spliced out: {} sat left", capacity());
    assert_eq!(
        splice_record(&w, txid),
        (PaymentDirection::Inbound, Some(SPLICE_SAT * 1000)),
        "the operator's wallet received exactly what was spliced out"
    );
    eprintln!(
        "monitor: {before} bytes before the first splice, {small} after; {} sessions; \
         splice-out fee {fee} sat",
        sessions.len()
    );

    // The customers' money stayed: the account's whole balance is refunded over Lightning.
    let a = account(&w, &token).await.unwrap();
    assert_eq!(a.credited_msat - a.spent_msat, 60_000_000);
    let refund_to = super::support::payer_invoice(&w, Some(60_000_000));
    let r = super::support::client(&w)
        .await
        .refund(satstream::wire::proto::RefundRequest {
            account_token: token.clone(),
            bolt11: refund_to,
            ..Default::default()
        })
        .await;
    assert!(
        r.is_ok(),
        "the account is refunded after the splices: {r:?}"
    );
    // Every session's books, before, during and after the splices, against both nodes.
    for id in &sessions {
        assert_invariants(&w, id);
    }
}
