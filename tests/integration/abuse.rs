//! Issue 23: paying clients served while others abuse the server. Unpaid sessions share what
//! is not kept for sessions that have paid; clients are counted by address prefix, and a
//! forwarded address only from a trusted proxy; unpaid TopUps are capped per client; silent
//! connections are capped and closed; a flood of chat messages is refused before rendering.

use std::time::Duration;

use satstream::wire::proto::{generate_event::Event as Ev, ChatMessage, PaymentMode, TopUpRequest};
use tokio::io::AsyncReadExt;

use super::support::{client, client_from, letters, next, request, world, World, T};

/// Opens a Generate stream (unpaid: nobody pays it) from `c`, optionally as forwarded for
/// `xff`; Ok(stream) once Accepted, or the refusal.
async fn unpaid(
    c: &mut satstream::wire::proto::inference_client::InferenceClient<tonic::transport::Channel>,
    xff: Option<&str>,
) -> Result<tonic::Streaming<satstream::wire::proto::GenerateEvent>, tonic::Status> {
    let mut r = tonic::Request::new(request(16, PaymentMode::Bolt11));
    if let Some(x) = xff {
        r.metadata_mut()
            .insert("x-forwarded-for", x.parse().unwrap());
    }
    let mut s = c.generate(r).await?.into_inner();
    assert!(matches!(next(&mut s).await, Ev::Accepted(_)));
    Ok(s)
}

fn refused_for_unpaid(
    r: &Result<tonic::Streaming<satstream::wire::proto::GenerateEvent>, tonic::Status>,
) -> String {
    match r {
        Ok(_) => panic!("accepted, expected a refusal"),
        Err(e) => {
            assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
            e.message().to_string()
        }
    }
}

/// 23.5: of `max_sessions` = 6, 2 are kept for sessions that have paid. A flood of unpaid
/// sessions from another address gets 4; a new unpaid session from anyone is then refused,
/// naming why; a PREPAID session with a funded account (it brings its money) still gets in
/// and completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slots_kept_for_paying_sessions_serve_a_payer_during_a_flood() {
    let w = world(&[
        "limits.max_sessions=6",
        "limits.reserved_paid_sessions=2",
        "limits.max_unpaid_sessions_per_client=64",
    ])
    .await;
    let token = super::prepaid::top_up(&w, "", 50_000).await;
    let mut flood = client_from(&w, "127.0.0.2").await;
    let mut held = Vec::new();
    let mut refusals = Vec::new();
    for _ in 0..8 {
        match unpaid(&mut flood, None).await {
            Ok(s) => held.push(s),
            Err(e) => refusals.push(e),
        }
    }
    assert_eq!((held.len(), refusals.len()), (4, 4), "{refusals:?}");
    for e in &refusals {
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
        assert!(
            e.message().contains("kept for sessions that have paid"),
            "{e}"
        );
    }
    // Anyone's new unpaid session: refused the same way.
    let mut c = client(&w).await;
    let m = refused_for_unpaid(&unpaid(&mut c, None).await);
    assert!(m.contains("kept for sessions that have paid"), "{m}");
    // A funded PREPAID session takes a kept slot and runs to Done.
    let mut req = request(8, PaymentMode::Prepaid);
    req.account_token = token;
    let mut s = c.generate(req).await.unwrap().into_inner();
    let mut text = String::new();
    let end = loop {
        match next(&mut s).await {
            Ev::Tokens(t) => text.push_str(&t.text),
            e @ (Ev::Done(_) | Ev::Halted(_)) => break e,
            _ => {}
        }
    };
    assert!(matches!(end, Ev::Done(_)), "{end:?}");
    assert_eq!(text, letters(8));
    drop(held);
    w.h.stop().await;
}

/// 23.5: a client is its address prefix (here /31: 127.0.0.8 and .9 are one client), and
/// `x-forwarded-for` names the client only on connections from a trusted proxy (its
/// right-most entry: what the client wrote itself further left is ignored).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_are_counted_by_prefix_and_by_forwarded_address_from_trusted_proxies_only() {
    let w = world(&[
        "limits.max_unpaid_sessions_per_client=1",
        "limits.client_prefix_v4=31",
        "server.trusted_proxies=[\"127.0.0.4\"]",
    ])
    .await;
    let mut held = Vec::new();
    // One prefix, two addresses: one unpaid session between them.
    held.push(
        unpaid(&mut client_from(&w, "127.0.0.8").await, None)
            .await
            .unwrap(),
    );
    let m = refused_for_unpaid(&unpaid(&mut client_from(&w, "127.0.0.9").await, None).await);
    assert!(m.contains("first payment"), "{m}");
    // The trusted proxy: each forwarded client is its own.
    let mut proxy = client_from(&w, "127.0.0.4").await;
    held.push(unpaid(&mut proxy, Some("198.51.100.1")).await.unwrap());
    held.push(unpaid(&mut proxy, Some("198.51.100.3")).await.unwrap());
    // A client that wrote its own header before the proxy appended the real address.
    let r = unpaid(&mut proxy, Some("203.0.113.7, 198.51.100.1")).await;
    refused_for_unpaid(&r);
    // An untrusted peer's header is its own words: it is counted as itself.
    let mut other = client_from(&w, "127.0.0.6").await;
    held.push(unpaid(&mut other, Some("198.51.100.5")).await.unwrap());
    refused_for_unpaid(&unpaid(&mut other, Some("198.51.100.7")).await);
    drop(held);
    w.h.stop().await;
}

/// 23.3: a client holds at most `limits.max_open_topups_per_client` unpaid TopUp invoices; a
/// paid one frees its place; other clients are not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unpaid_top_ups_are_capped_per_client() {
    let w = world(&["limits.max_open_topups_per_client=2"]).await;
    let mut c = client_from(&w, "127.0.0.3").await;
    let topup = |amount| TopUpRequest {
        account_token: String::new(),
        amount_msat: amount,
    };
    let first = c.top_up(topup(5_000)).await.unwrap().into_inner();
    c.top_up(topup(5_000)).await.unwrap();
    let e = c.top_up(topup(5_000)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
    assert!(e.message().contains("unpaid top-up invoices"), "{e}");
    // Another client is not affected.
    client(&w).await.top_up(topup(5_000)).await.unwrap();
    // Paying one frees its place.
    let out = w.h.payer.pay(&first.bolt11, T).await.unwrap();
    assert!(
        matches!(out, satstream::harness::PayOutcome::Succeeded { .. }),
        "{out:?}"
    );
    let store = w.h.server().app.store.clone();
    let hash: [u8; 32] = hex::decode(&first.payment_hash)
        .unwrap()
        .try_into()
        .unwrap();
    satstream::harness::wait_until("the top-up to be claimed", T, || {
        let store = store.clone();
        async move {
            store.invoice(&hash).unwrap().unwrap().state == satstream::store::InvoiceState::Claimed
        }
    })
    .await
    .unwrap();
    c.top_up(topup(5_000)).await.unwrap();
    w.h.stop().await;
}

/// Reads until the server closes the connection (EOF or reset); panics after `within`.
async fn closed_within(s: &mut tokio::net::TcpStream, within: Duration) {
    let mut b = [0u8; 64];
    let r = tokio::time::timeout(within, s.read(&mut b)).await;
    match r {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!("the server sent {n} bytes to a silent connection"),
        Err(_) => panic!("still open after {within:?}"),
    }
}

async fn tcp_from(w: &World, ip: &str) -> tokio::net::TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(std::net::SocketAddr::new(ip.parse().unwrap(), 0))
        .unwrap();
    sock.connect(w.h.server().grpc_addr).await.unwrap()
}

/// 23.6: connections are capped per client (here 3); one over the cap is closed at once, and
/// a connection that never starts its handshake is closed after `handshake_timeout_secs`,
/// freeing its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn silent_connections_are_capped_and_closed() {
    let w = world(&[
        "server.max_connections_per_client=3",
        "server.handshake_timeout_secs=2",
    ])
    .await;
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(tcp_from(&w, "127.0.0.5").await);
    }
    // A fourth from the same client: closed at once.
    let mut fourth = tcp_from(&w, "127.0.0.5").await;
    closed_within(&mut fourth, Duration::from_secs(1)).await;
    // Another client is served meanwhile.
    client(&w)
        .await
        .list_models(satstream::wire::proto::ListModelsRequest {})
        .await
        .unwrap();
    // The silent ones are closed at the handshake deadline...
    for s in &mut silent {
        closed_within(s, Duration::from_secs(10)).await;
    }
    // ...and their client can connect again.
    client_from(&w, "127.0.0.5")
        .await
        .list_models(satstream::wire::proto::ListModelsRequest {})
        .await
        .unwrap();
    w.h.stop().await;
}

/// 23.5: a flood of chat messages is refused before the template renders it: a cap on their
/// number, and the template's bytes around each counted in `max_prompt_bytes`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_chat_messages_is_refused_before_rendering() {
    let w = world(&["limits.max_messages=1000", "limits.max_prompt_bytes=20000"]).await;
    let mut c = client(&w).await;
    let msgs = |n: usize| {
        (0..n)
            .map(|_| ChatMessage {
                role: "user".into(),
                content: "a".into(),
            })
            .collect::<Vec<_>>()
    };
    let mut req = request(8, PaymentMode::Bolt11);
    req.messages = msgs(1001);
    let e = c.generate(req.clone()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert!(e.message().starts_with("messages: 1001 messages"), "{e}");
    // 600 one-byte messages: 600 bytes of content, but with what the template adds around
    // each (role tags) well over 20 000 bytes.
    req.messages = msgs(600);
    let e = c.generate(req).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert!(e.message().starts_with("prompt: "), "{e}");
    assert!(e.message().contains("at most 20000"), "{e}");
    w.h.stop().await;
}
