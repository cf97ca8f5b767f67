//! Safe on a public address: TLS (a generated certificate, trusted by the client and by
//! grpcurl), plaintext refused off loopback, no free compute for a flood of unpaid sessions,
//! Prometheus metrics that agree with the ledger, private files, and no secret in a
//! debug-level log.

use std::time::{Duration, Instant};

use satstream::harness::process::{ProcessOptions, ProcessWorld};
use satstream::wire::proto::{
    generate_event::Event as Ev, inference_client::InferenceClient, ListModelsRequest, PaymentMode,
};

use super::support::{assert_invariants, letters, request, world, world_with, T};

const EXE: &str = env!("CARGO_BIN_EXE_satstream");

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_with_the_generated_certificate_for_the_client_and_grpcurl() {
    let w = world(&["server.tls=on"]).await;
    let tls = w.h.server().tls.clone().expect("TLS on");
    let port = w.h.server().grpc_addr.port();
    let https = format!("https://127.0.0.1:{port}");
    // The client, trusting the server's CA: a paid generation over TLS.
    let ch = satstream::client::connect(&https, Some(&tls.trust_path))
        .await
        .unwrap();
    let mut c = InferenceClient::new(ch);
    let mut s = c
        .generate(request(8, PaymentMode::Bolt11))
        .await
        .unwrap()
        .into_inner();
    let mut text = String::new();
    let mut session = String::new();
    loop {
        match s.message().await.unwrap().unwrap().event.unwrap() {
            Ev::Accepted(a) => session = a.session_id,
            Ev::Invoice(inv) => {
                w.h.payer.send(&inv.bolt11).unwrap();
            }
            Ev::Tokens(t) => text.push_str(&t.text),
            Ev::Done(_) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(text, letters(8));
    assert_invariants(&w, &session);
    // Not trusting it, or speaking plaintext to it, fails.
    let untrusted = match satstream::client::connect(&https, None).await {
        Err(_) => true,
        Ok(ch) => InferenceClient::new(ch)
            .list_models(ListModelsRequest {})
            .await
            .is_err(),
    };
    assert!(untrusted, "a certificate nobody vouches for is refused");
    let plain = format!("http://127.0.0.1:{port}");
    let mut p = InferenceClient::connect(plain).await.unwrap();
    assert!(p.list_models(ListModelsRequest {}).await.is_err());
    // grpcurl with -cacert, as the README shows.
    let out = std::process::Command::new(super::support::grpcurl())
        .args(["-cacert", tls.trust_path.to_str().unwrap()])
        .arg(format!("127.0.0.1:{port}"))
        .arg("satstream.v1.Inference/ListModels")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"tiny\""));
    let out = std::process::Command::new(super::support::grpcurl())
        .arg("-plaintext")
        .arg(format!("127.0.0.1:{port}"))
        .arg("list")
        .output()
        .unwrap();
    assert!(!out.status.success(), "plaintext to a TLS listener fails");
    w.h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn plaintext_is_refused_off_loopback_and_admin_never_served_there() {
    let e = satstream::config::Config::load(
        None,
        Vec::new(),
        &[
            "server.grpc_listen=0.0.0.0:50051".to_string(),
            "server.tls=off".to_string(),
        ],
    )
    .unwrap_err();
    assert!(e.to_string().contains("allow_plaintext"), "{e}");
    assert!(e.to_string().contains("server.tls"), "{e}");
    // Explicitly allowed: Inference is served, Admin is not.
    let w = world(&[
        "server.grpc_listen=0.0.0.0:0",
        "server.tls=off",
        "server.allow_plaintext=true",
    ])
    .await;
    let port = w.h.server().grpc_addr.port();
    let mut c = InferenceClient::connect(format!("http://127.0.0.1:{port}"))
        .await
        .unwrap();
    c.list_models(ListModelsRequest {}).await.unwrap();
    let mut admin = satstream::wire::proto::admin_client::AdminClient::with_interceptor(
        tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect()
            .await
            .unwrap(),
        satstream::harness::process::Bearer(w.h.server().admin_token.clone()),
    );
    let e = admin
        .get_info(satstream::wire::proto::GetInfoRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unimplemented, "{e}");
    w.h.stop().await;
}

/// One paid BOLT11 generation from 127.0.0.1; its time to Done.
async fn paid_run(w: &super::support::World) -> Duration {
    let started = Instant::now();
    let mut c = InferenceClient::connect(format!("http://{}", w.h.server().grpc_addr))
        .await
        .unwrap();
    let s = satstream::client::generate(
        &mut c,
        &w.h.payer,
        request(16, PaymentMode::Bolt11),
        None,
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(s.outcome, "length");
    assert_eq!(s.tokens, 16);
    started.elapsed()
}

/// A flood of unpaid Generate requests from one address gets at most its cap of sessions,
/// and a paying client (another address) still completes its generation.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_unpaid_sessions_does_not_stop_a_paying_client() {
    let w = world(&["limits.max_unpaid_sessions_per_client=4"]).await;
    let alone = paid_run(&w).await;
    // The flood: 40 Generate requests at once, none ever paid, kept open.
    let mut flood = super::support::client_from(&w, "127.0.0.2").await;
    let mut open_streams = Vec::new();
    let (mut accepted, mut refused) = (0, 0);
    for _ in 0..40 {
        match flood.generate(request(16, PaymentMode::Bolt11)).await {
            Ok(s) => {
                accepted += 1;
                open_streams.push(s.into_inner());
            }
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
                assert!(e.message().contains("first payment"), "{e}");
                refused += 1;
            }
        }
    }
    assert_eq!((accepted, refused), (4, 36));
    let flooded = paid_run(&w).await;
    eprintln!(
        "flood: 40 unpaid sessions attempted, {accepted} accepted, {refused} refused; \
         the paying client's time to Done: {alone:?} alone, {flooded:?} during the flood"
    );
    assert!(flooded < T, "the paying client completed during the flood");
    drop(open_streams);
    w.h.stop().await;
}

async fn scrape(addr: std::net::SocketAddr) -> String {
    reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of the series whose line starts with `series` (name and labels).
fn value(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in:\n{metrics}"))
}

/// Prometheus metrics after paid sessions, with names and values checked against the ledger.
/// The server runs as its own process: the metrics recorder is process-wide.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_after_paid_sessions_agree_with_the_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let path = satstream::engine::tiny_model::write_tiny_model(dir.path()).unwrap();
    let mut m = satstream::config::ModelConfig::new("tiny", path, 1_000);
    m.chunk_tokens = 4;
    let metrics_addr: std::net::SocketAddr =
        format!("127.0.0.1:{}", satstream::harness::free_port())
            .parse()
            .unwrap();
    let w = ProcessWorld::start(
        std::path::Path::new(EXE),
        ProcessOptions {
            models: vec![m],
            sets: vec![format!("server.metrics_listen={metrics_addr}")],
            channel_sat: 1_000_000,
            log: None,
        },
    )
    .await
    .unwrap();
    let mut c = w.inference().await.unwrap();
    for _ in 0..2 {
        let s = satstream::client::generate(
            &mut c,
            &w.payer,
            request(10, PaymentMode::Bolt11),
            None,
            |_| {},
        )
        .await
        .unwrap();
        assert_eq!(s.server_paid_msat, 10_000);
    }
    let store = satstream::store::Store::open(&w.config.store_path()).unwrap();
    let claimed: i64 = store
        .ledger()
        .unwrap()
        .iter()
        .filter(|e| e.kind == "invoice_claimed")
        .map(|e| e.amount_msat)
        .sum();
    assert_eq!(claimed, 20_000);
    // Gauges refresh every 2 s: wait for the settled state.
    let mut text = String::new();
    satstream::harness::wait_until("gauges to refresh", T, || {
        let addr = metrics_addr;
        async move {
            let t = scrape(addr).await;
            // Two sessions of 10 tokens: chunks of 1, 4, 4 and 1 each.
            t.contains("satstream_invoices{state=\"claimed\"} 8")
        }
    })
    .await
    .unwrap();
    text.push_str(&scrape(metrics_addr).await);
    assert_eq!(
        value(
            &text,
            "satstream_sessions_total{mode=\"BOLT11\",end=\"length\"}"
        ),
        2.0
    );
    assert_eq!(
        value(&text, "satstream_msat_total{kind=\"claimed\"}"),
        claimed as f64
    );
    assert_eq!(value(&text, "satstream_tokens_delivered_total"), 20.0);
    assert_eq!(
        value(&text, "satstream_payment_to_tokens_seconds_count"),
        8.0
    );
    assert_eq!(value(&text, "satstream_htlcs_held"), 0.0);
    assert!(value(&text, "satstream_inbound_liquidity_msat") > 0.0);
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let name = line.split(['{', ' ']).next().unwrap();
        assert!(name.starts_with("satstream_"), "{line}");
        assert!(
            !line.contains("payment_hash=") && !line.contains("session_id="),
            "no ids as labels: {line}"
        );
    }
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn files_are_private_and_exposed_secrets_refused() {
    use std::os::unix::fs::PermissionsExt;
    let data = tempfile::tempdir().unwrap();
    let h = satstream::harness::Harness::start(satstream::harness::HarnessOptions {
        data_dir: Some(data.path().to_path_buf()),
        channel_sat: 0,
        ..Default::default()
    })
    .await
    .unwrap();
    let c = h.config.clone();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&c.server.data_dir), 0o700);
    assert_eq!(mode(&c.admin_token_path()), 0o600);
    assert_eq!(mode(&c.store_path()), 0o600);
    assert_eq!(mode(&c.ldk_dir().join("keys_seed")), 0o600);
    h.stop().await;
    // A token anyone can read: the server refuses to start and says what to chmod.
    std::fs::set_permissions(c.admin_token_path(), std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = satstream::server::start(c.clone())
        .await
        .err()
        .expect("refused");
    assert!(e.to_string().contains("chmod 600"), "{e}");
    assert!(e.to_string().contains("admin token"), "{e}");
    std::fs::set_permissions(c.admin_token_path(), std::fs::Permissions::from_mode(0o600)).unwrap();
    let seed = c.ldk_dir().join("keys_seed");
    std::fs::set_permissions(&seed, std::fs::Permissions::from_mode(0o640)).unwrap();
    let e = satstream::server::start(c).await.err().expect("refused");
    assert!(e.to_string().contains("seed"), "{e}");
    assert!(e.to_string().contains("its group"), "{e}");
}

/// A debug-level log of paid sessions in every mode, a top-up and a refund holds none of the
/// secrets they handled: session and account tokens, the admin token, preimages and chunk keys,
/// the node's seed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_secret_in_a_debug_log() {
    let dir = tempfile::tempdir().unwrap();
    let path = satstream::engine::tiny_model::write_tiny_model(dir.path()).unwrap();
    let mut m = satstream::config::ModelConfig::new("tiny", path, 1_000);
    m.chunk_tokens = 4;
    let w = ProcessWorld::start(
        std::path::Path::new(EXE),
        ProcessOptions {
            models: vec![m],
            sets: vec![],
            channel_sat: 1_000_000,
            log: Some("debug".into()),
        },
    )
    .await
    .unwrap();
    let mut secrets: Vec<(&str, String)> = vec![("admin token", w.admin_token.clone())];
    let seed = std::fs::read(w.config.ldk_dir().join("keys_seed")).unwrap();
    secrets.push(("seed", hex::encode(&seed)));
    let mut c = w.inference().await.unwrap();
    for mode in [
        PaymentMode::Bolt11,
        PaymentMode::Atomic,
        PaymentMode::Keysend,
    ] {
        let mut s = c.generate(request(8, mode)).await.unwrap().into_inner();
        loop {
            match s.message().await.unwrap().unwrap().event.unwrap() {
                Ev::Accepted(a) => secrets.push(("session token", a.session_token)),
                Ev::Invoice(inv) => {
                    w.payer.send(&inv.bolt11).unwrap();
                }
                Ev::SessionOpened(so) => {
                    let id = hex::decode(&so.session_id).unwrap();
                    w.payer
                        .keysend(&so.node_id, 8_000, vec![(so.tlv_type, id)])
                        .unwrap();
                }
                Ev::ChunkKey(k) => secrets.push(("chunk key", hex::encode(k.key))),
                Ev::Done(_) => break,
                _ => {}
            }
        }
    }
    for p in w.payer.node.list_payments() {
        if let ldk_node::payment::PaymentKind::Bolt11 {
            preimage: Some(pre),
            ..
        }
        | ldk_node::payment::PaymentKind::Spontaneous {
            preimage: Some(pre),
            ..
        } = p.kind
        {
            secrets.push(("preimage", hex::encode(pre.0)));
        }
    }
    let t = c
        .top_up(satstream::wire::proto::TopUpRequest {
            account_token: String::new(),
            amount_msat: 10_000,
        })
        .await
        .unwrap()
        .into_inner();
    secrets.push(("account token", t.account_token.clone()));
    w.payer.pay(&t.bolt11, T).await.unwrap();
    assert!(secrets.len() >= 10, "{} secrets collected", secrets.len());
    let logs = w.server.as_ref().unwrap().all_logs();
    assert!(logs.contains("DEBUG"), "a debug-level log");
    let lower = logs.to_lowercase();
    for (what, s) in &secrets {
        assert!(!s.is_empty());
        if let Some(at) = lower.find(&s.to_lowercase()) {
            let line_start = lower[..at].rfind('\n').map_or(0, |i| i + 1);
            let line_end = lower[at..].find('\n').map_or(lower.len(), |i| at + i);
            panic!(
                "a {what} is in the log:\n{}",
                logs[line_start..line_end].replace(s.as_str(), "<SECRET>")
            );
        }
    }
    w.stop().await;
}

/// Bad input anywhere gets the right status and a message naming what to fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_clear_statuses_everywhere() {
    let w = world_with(&["limits.max_prompt_tokens=4096"], 0, 0, 4).await;
    let mut c = InferenceClient::connect(format!("http://{}", w.h.server().grpc_addr))
        .await
        .unwrap();
    let code = |s: tonic::Status, field: &str| {
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s}");
        assert!(s.message().contains(field), "{field}: {s}");
    };
    // A whitespace-only prompt, for Generate and Quote alike.
    let mut req = request(8, PaymentMode::Bolt11);
    req.messages.clear();
    req.prompt = "  \n\t ".into();
    code(
        c.generate(req.clone()).await.map(|_| ()).unwrap_err(),
        "prompt",
    );
    let quote =
        |r: &satstream::wire::proto::GenerateRequest| satstream::wire::proto::QuoteRequest {
            model: r.model.clone(),
            messages: r.messages.clone(),
            prompt: r.prompt.clone(),
            max_tokens: r.max_tokens,
            mode: r.mode,
        };
    code(c.quote(quote(&req)).await.unwrap_err(), "prompt");
    // max_tokens far above the context.
    let mut req = request(1_000_000, PaymentMode::Bolt11);
    code(c.quote(quote(&req)).await.unwrap_err(), "max_tokens");
    code(
        c.generate(req.clone()).await.map(|_| ()).unwrap_err(),
        "max_tokens",
    );
    // A 205 KB prompt that can never fit.
    req.max_tokens = 8;
    req.messages[0].content = "a ".repeat(105_000);
    code(c.quote(quote(&req)).await.unwrap_err(), "prompt");
    code(c.generate(req).await.map(|_| ()).unwrap_err(), "prompt");
    // An unknown mode, stop strings, sampling.
    let mut req = request(8, PaymentMode::Bolt11);
    req.mode = 42;
    code(c.generate(req).await.map(|_| ()).unwrap_err(), "mode");
    let mut req = request(8, PaymentMode::Bolt11);
    req.sampling.as_mut().unwrap().stop = vec![String::new()];
    code(
        c.generate(req).await.map(|_| ()).unwrap_err(),
        "sampling.stop",
    );
    // A repetition penalty out of range; a seed for a sampled answer on mistral.rs (the tiny
    // model's backend here), which cannot seed one request: each named, nothing opened.
    let sessions = w.h.server().app.engine.generations_started();
    for (edit, field) in [
        (
            (|s: &mut satstream::wire::proto::SamplingParams| s.repetition_penalty = Some(0.0))
                as fn(&mut satstream::wire::proto::SamplingParams),
            "sampling.repetition_penalty",
        ),
        (
            |s| {
                s.temperature = Some(0.7);
                s.seed = Some(7);
            },
            "sampling.seed",
        ),
        (|s| s.top_p = Some(1.5), "sampling.top_p"),
    ] {
        let mut req = request(8, PaymentMode::Bolt11);
        edit(req.sampling.as_mut().unwrap());
        let e = c.generate(req).await.map(|_| ()).unwrap_err();
        code(e, field);
    }
    assert_eq!(
        w.h.server().app.engine.generations_started(),
        sessions,
        "no refused request started a generation"
    );
    // Greedy with a seed is reproducible anywhere: accepted.
    let mut req = request(8, PaymentMode::Bolt11);
    req.sampling.as_mut().unwrap().seed = Some(7);
    assert!(c.generate(req).await.is_ok());
    // TopUp out of bounds.
    let e = c
        .top_up(satstream::wire::proto::TopUpRequest {
            account_token: String::new(),
            amount_msat: 1,
        })
        .await
        .unwrap_err();
    code(e, "amount_msat");
    // Admin: closing a channel that does not exist is NotFound.
    let mut admin = satstream::wire::proto::admin_client::AdminClient::with_interceptor(
        tonic::transport::Endpoint::from_shared(format!("http://{}", w.h.server().grpc_addr))
            .unwrap()
            .connect()
            .await
            .unwrap(),
        satstream::harness::process::Bearer(w.h.server().admin_token.clone()),
    );
    let e = admin
        .close_channel(satstream::wire::proto::CloseChannelRequest {
            user_channel_id: "abcd".into(),
            counterparty_node_id: w.h.payer.node_id(),
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
    let e = admin
        .pay_invoice(satstream::wire::proto::PayInvoiceRequest {
            bolt11: "lnbcrt1nope".into(),
            session_id: "00".repeat(16),
            ..Default::default()
        })
        .await
        .unwrap_err();
    code(e, "bolt11");
    w.h.stop().await;
}
