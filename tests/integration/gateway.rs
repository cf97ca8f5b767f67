//! satstream as a payment gateway in front of remote engines (`backend = "openai"`), tested
//! against real llama-cpp-python servers on the tiny model that the tests start themselves.
//! What the upstream computed is read from its own counters (`GET /satstream/stats`, see
//! scripts/upstream.py), not from the gateway.
//!
//! The paid-stream and engine tests in paid.rs and engine.rs also run on this backend; these
//! are the gateway's own: halts cancel upstream work, a dying upstream ends sessions cleanly,
//! routing across replicas.

use satstream::config::{BackendKind, ModelConfig};
use satstream::engine::tiny_model;
use satstream::engine::{Engine, EngineError, FinishReason, GenerateParams, Prompt, TokenEvent};
use satstream::harness::upstream::Upstream;
use satstream::harness::wait_until;
use satstream::wire::proto::{generate_event::Event as Ev, HaltReason, PaymentMode};

use super::engine::{tiny_upstreams, upstream_config};
use super::support::{assert_invariants, letters, next, open, request, world_remote, CHUNK, T};

/// Sum of the upstreams' sampled tokens once none is generating.
async fn sampled(upstreams: &[Upstream]) -> u64 {
    let mut n = 0;
    for u in upstreams {
        n += u.idle_stats(T).await.unwrap().sampled;
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_halt_cancels_the_upstream_request_within_one_chunk() {
    // 12 tokens of unpaid lookahead at most; the payer pays two chunks of a 2000-token request.
    let w = world_remote(
        1,
        &[
            "payments.payment_timeout_secs=2",
            "payments.max_unpaid_msat=12000",
        ],
    )
    .await;
    let before = w.upstreams[0].idle_stats(T).await.unwrap();
    let mut s = open(&w, request(2000, PaymentMode::Bolt11)).await;
    let Ev::Accepted(acc) = next(&mut s).await else {
        panic!("Accepted first")
    };
    let (mut text, mut paid) = (String::new(), 0);
    let halted = loop {
        match next(&mut s).await {
            Ev::Invoice(inv) => {
                if paid < 2 {
                    w.h.payer.send(&inv.bolt11).unwrap();
                    paid += 1;
                }
            }
            Ev::Tokens(t) => text.push_str(&t.text),
            Ev::Halted(h) => break h,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(halted.reason, HaltReason::PaymentTimeout as i32);
    assert_eq!(text, letters(8));
    // What the gateway let the engine generate: the paid tokens plus its lookahead.
    let overrun =
        *w.h.server()
            .app
            .metrics
            .take()
            .halt_overrun_tokens
            .last()
            .unwrap();
    let gateway_generated = 8 + overrun as u64;
    assert!(overrun <= 12, "lookahead within the cap: {overrun}");
    // What the upstream generated for it, counted on its side. Every pause of the lookahead
    // cancelled a request (a resume is a new one), so each request's stop counts.
    let after = w.upstreams[0].idle_stats(T).await.unwrap();
    let (upstream, requests) = (
        after.sampled - before.sampled,
        after.requests - before.requests,
    );
    println!(
        "upstream sampled {upstream} tokens in {requests} requests; the gateway took \
         {gateway_generated} (8 paid + {overrun} lookahead) of a 2000-token request"
    );
    assert!(
        upstream >= gateway_generated && upstream - gateway_generated <= CHUNK as u64 * requests,
        "each cancelled request stopped within one chunk ({CHUNK} tokens) of where the gateway \
         did: upstream {upstream} in {requests} requests, gateway {gateway_generated}"
    );
    assert_invariants(&w, &acc.session_id);
    w.h.stop().await;
}

/// Kills the only replica while it generates for a paid session in `mode`; checks the session
/// ends with UPSTREAM_FAILED, the books exact against LDK, and what was paid and not delivered
/// refundable. Returns the Halted event.
async fn kill_mid_stream(mode: PaymentMode) -> satstream::wire::proto::Halted {
    // A lookahead of up to 400 tokens keeps the upstream streaming while chunks are paid.
    let mut w = world_remote(1, &["payments.max_unpaid_msat=400000"]).await;
    let mut s = open(&w, request(20000, mode)).await;
    let Ev::Accepted(acc) = next(&mut s).await else {
        panic!("Accepted first")
    };
    if mode == PaymentMode::Keysend {
        let Ev::SessionOpened(so) = next(&mut s).await else {
            panic!("SessionOpened second")
        };
        // Credit for 20 000 tokens: far more than will be delivered.
        let sid = hex::decode(&so.session_id).unwrap();
        w.h.payer
            .keysend(&so.node_id, 20_000_000, vec![(so.tlv_type, sid)])
            .unwrap();
    }
    let url = w.upstreams[0].url.clone();
    let (mut text, mut chunks, mut killed) = (String::new(), 0, false);
    let halted = loop {
        match next(&mut s).await {
            Ev::Invoice(inv) => {
                w.h.payer.send(&inv.bolt11).unwrap();
            }
            Ev::Balance(_) => {}
            Ev::Tokens(t) => {
                text.push_str(&t.text);
                chunks += 1;
                if chunks == 3 && !killed {
                    // Kill it while it is generating (a request is active), as a crashed host.
                    let u = &w.upstreams[0];
                    wait_until("the upstream to be generating", T, || async {
                        u.stats().await.map(|s| s.active == 1).unwrap_or(false)
                    })
                    .await
                    .unwrap();
                    w.upstreams[0].kill();
                    killed = true;
                }
            }
            Ev::Halted(h) => break h,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(killed);
    assert_eq!(
        halted.reason,
        HaltReason::UpstreamFailed as i32,
        "{}",
        halted.message
    );
    assert!(
        halted.message.contains(&url),
        "the message names the upstream: {}",
        halted.message
    );
    let delivered = halted.completion_tokens_delivered as usize;
    assert!(delivered >= 3 * CHUNK as usize && delivered < 20000);
    assert_eq!(text, letters(delivered), "what was delivered is exact");
    // Nothing held or open is left, and claimed = delivered + refundable, per LDK's records.
    let sess = assert_invariants(&w, &acc.session_id);
    assert_eq!(sess.end_reason.as_deref(), Some("upstream_failed"));
    assert_eq!(
        halted.paid_msat,
        halted.completion_tokens_delivered as u64 * super::support::MSAT_PER_TOKEN
            + halted.refundable_msat,
        "paid and not delivered is refundable"
    );
    assert_eq!(sess.refundable_msat(), halted.refundable_msat);
    // With no replica left, a new session is refused up front, saying why.
    let err = super::support::client(&w)
        .await
        .generate(request(10, PaymentMode::Bolt11))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("no upstream replica is healthy"),
        "{err:?}"
    );
    w.h.stop().await;
    halted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upstream_killed_mid_stream_ends_a_bolt11_session_cleanly() {
    kill_mid_stream(PaymentMode::Bolt11).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upstream_killed_mid_stream_leaves_a_keysend_credit_refundable() {
    let h = kill_mid_stream(PaymentMode::Keysend).await;
    assert_eq!(h.paid_msat, 20_000_000);
    assert!(h.refundable_msat > 0, "{h:?}");
}

fn remote_model(path: &std::path::Path, upstreams: &[Upstream]) -> ModelConfig {
    let mut m = ModelConfig::new("tiny", path, 1000);
    m.backend = BackendKind::Openai;
    m.upstream = Some(upstream_config(upstreams));
    m
}

/// Generates `max_tokens` from the text prompt `prompt`: the text and how it finished.
async fn generate_text(engine: &Engine, prompt: &str, max_tokens: u32) -> (String, FinishReason) {
    let mut g = engine
        .generate(
            "tiny",
            GenerateParams::new(Prompt::Text(prompt.into()), max_tokens),
        )
        .await
        .unwrap();
    let mut text = String::new();
    loop {
        match tokio::time::timeout(T, g.events.recv()).await.unwrap() {
            Some(TokenEvent::Token { text: t, .. }) => text.push_str(&t),
            Some(TokenEvent::Finished { reason, .. }) => return (text, reason),
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// Reads `n` tokens (the generation is running on its replica by then).
async fn read_tokens(events: &mut satstream::engine::EventStream, n: u32) {
    for _ in 0..n {
        match tokio::time::timeout(T, events.recv()).await.unwrap() {
            Some(TokenEvent::Token { .. }) => {}
            other => panic!("expected a token, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_the_load_and_a_dead_one_is_routed_around() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_model::write_tiny_model(dir.path()).unwrap();
    let mut ups = tiny_upstreams(&path, 2).await;
    let engine = Engine::load(&[remote_model(&path, &ups)]).await.unwrap();
    let long = || GenerateParams::new(Prompt::Text("a".into()), 30000);

    // Two generations at once land on different replicas (least-loaded).
    let mut a = engine.generate("tiny", long()).await.unwrap();
    read_tokens(&mut a.events, 5).await;
    let mut b = engine.generate("tiny", long()).await.unwrap();
    read_tokens(&mut b.events, 5).await;
    for u in &ups {
        assert_eq!(u.stats().await.unwrap().active, 1, "{} serves one", u.url);
    }
    // A cancel stops the upstream's work within a chunk (counted on its side).
    for g in [&a, &b] {
        g.handle.cancel();
    }
    let frozen = a.handle.generated() as u64 + b.handle.generated() as u64;
    let upstream = sampled(&ups).await;
    println!("cancelled at {frozen} tokens; the upstreams sampled {upstream}");
    assert!(
        upstream >= frozen && upstream <= frozen + 2 * CHUNK as u64,
        "each upstream stopped within a chunk ({CHUNK} tokens): sampled {upstream}, taken {frozen}"
    );

    // Replica 0 dies. The next generation that picks it finds it unreachable before its first
    // token, so the other replica serves it, exactly.
    ups[0].kill();
    for letter in ["b", "c"] {
        let (text, end) = generate_text(&engine, letter, 6).await;
        assert_eq!(end, FinishReason::Length(6));
        let expect: String = (1..=6)
            .map(|i| (letter.as_bytes()[0] + i) as char)
            .collect();
        assert_eq!(text, expect);
    }

    // Both dead: a running generation ends with UpstreamFailed, a new one is refused.
    ups[1].kill();
    let mut g = engine
        .generate("tiny", GenerateParams::new(Prompt::Text("d".into()), 6))
        .await;
    if let Ok(g) = g.as_mut() {
        let end = match tokio::time::timeout(T, g.events.recv()).await.unwrap() {
            Some(TokenEvent::Finished { reason, .. }) => reason,
            other => panic!("no token from a dead upstream, the end at once: {other:?}"),
        };
        assert!(matches!(end, FinishReason::UpstreamFailed(_)), "{end:?}");
    }
    let err = engine
        .generate("tiny", GenerateParams::new(Prompt::Text("d".into()), 6))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, EngineError::Backend { reason, .. } if reason.contains("no upstream replica is healthy")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_upstream_ends_the_generation_at_its_idle_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_model::write_tiny_model(dir.path()).unwrap();
    let ups = tiny_upstreams(&path, 1).await;
    let mut m = remote_model(&path, &ups);
    m.upstream.as_mut().unwrap().idle_timeout_secs = 2;
    let engine = Engine::load(&[m]).await.unwrap();
    let mut g = engine
        .generate("tiny", GenerateParams::new(Prompt::Text("a".into()), 30000))
        .await
        .unwrap();
    read_tokens(&mut g.events, 5).await;
    // The host hangs: its connection stays open and says nothing.
    ups[0].freeze(true);
    let hung = std::time::Instant::now();
    let end = loop {
        match tokio::time::timeout(T, g.events.recv()).await.unwrap() {
            Some(TokenEvent::Finished { reason, .. }) => break reason,
            Some(_) => {}
            None => panic!("no Finished"),
        }
    };
    let waited = hung.elapsed();
    ups[0].freeze(false);
    assert!(
        matches!(&end, FinishReason::UpstreamFailed(m) if m.contains("sent nothing for 2 s") && m.contains(&ups[0].url)),
        "{end:?}"
    );
    assert!(
        waited >= std::time::Duration::from_secs(2),
        "not before the deadline: {waited:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_reads_only_the_tokenizer_of_its_model_file() {
    // The gateway's copy of the model is one no local engine here could run (an architecture
    // mistral.rs does not know): only its vocabulary and template are used; the upstream runs
    // the weights.
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_model::write_tiny_model(dir.path()).unwrap();
    let ups = tiny_upstreams(&path, 1).await;
    let opts = tiny_model::TinyModelOptions {
        file_name: "tokenizer.gguf".into(),
        architecture: "gemma".into(),
        ..Default::default()
    };
    let tokenizer = tiny_model::write_tiny_model_with(dir.path(), &opts).unwrap();
    let local = ModelConfig::new("tiny", &tokenizer, 1000);
    let err = Engine::load(&[local]).await.unwrap_err().to_string();
    assert!(err.contains("unsupported architecture"), "{err}");
    let engine = Engine::load(&[remote_model(&tokenizer, &ups)])
        .await
        .unwrap();
    assert_eq!(engine.models()[0].architecture, "gemma");
    assert_eq!(
        generate_text(&engine, "p", 4).await,
        ("qrst".into(), FinishReason::Length(4))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_serving_another_model_fails_the_load_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_model::write_tiny_model(dir.path()).unwrap();
    let ups = tiny_upstreams(&path, 1).await;
    let mut m = remote_model(&path, &ups);
    m.upstream.as_mut().unwrap().model = "llama-70b".into();
    let err = Engine::load(&[m]).await.unwrap_err().to_string();
    assert!(
        err.contains(&ups[0].url) && err.contains("\"tiny\"") && err.contains("upstream.model"),
        "{err}"
    );
    // An unreachable replica is not an error at load (the cluster may come up later), but
    // nothing is admitted until one is healthy.
    let mut m = remote_model(&path, &ups);
    m.upstream.as_mut().unwrap().urls = vec!["http://127.0.0.1:9/v1".into()];
    let engine = Engine::load(&[m]).await.unwrap();
    let err = engine
        .generate("tiny", GenerateParams::new(Prompt::Text("a".into()), 3))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("127.0.0.1:9"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_key_is_sent_and_a_wrong_one_fails_the_load() {
    // llama-cpp-python checks `Authorization: Bearer` when started with --api_key; the key
    // comes from the environment variable the config names.
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_model::write_tiny_model(dir.path()).unwrap();
    let ups = vec![
        Upstream::start_with(&path, "tiny", 4096, 1, &["--api_key", "s3cret"])
            .await
            .unwrap(),
    ];
    let mut m = remote_model(&path, &ups);
    let var = "SATSTREAM_TEST_UPSTREAM_KEY";
    std::env::set_var(var, "s3cret");
    m.upstream.as_mut().unwrap().api_key_env = var.into();
    let engine = Engine::load(&[m.clone()]).await.unwrap();
    assert_eq!(generate_text(&engine, "k", 3).await.0, "lmn");
    // From a file: it must be private, and then it is sent the same way.
    let key_file = dir.path().join("upstream.key");
    std::fs::write(&key_file, "s3cret\n").unwrap();
    let mut from_file = m.clone();
    let u = from_file.upstream.as_mut().unwrap();
    u.api_key_env = String::new();
    u.api_key_file = key_file.clone();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = Engine::load(&[from_file.clone()])
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("chmod 600"), "{err}");
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    Engine::load(&[from_file])
        .await
        .expect("the key file is read");
    // Without the key the replica answers 401: a configuration error, named at load.
    m.upstream.as_mut().unwrap().api_key_env = String::new();
    let err = Engine::load(&[m]).await.unwrap_err().to_string();
    assert!(err.contains("401") && err.contains("api_key"), "{err}");
}
