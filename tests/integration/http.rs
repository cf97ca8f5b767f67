//! The HTTP face with outside clients: the official `openai` SDK (PyPI), Alby's L402 client
//! (`@getalby/lightning-tools`, npm) paying through the payer node, and curl for the raw cases.
//! Money is checked as everywhere: the account's debits against the tokens delivered, the
//! books of every session against the server node's payment records, the top-ups against the
//! payer's.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use satstream::harness::PayOutcome;
use satstream::wire::proto::generate_event::Event as Ev;
use serde_json::{json, Value};

use super::prepaid::{prepaid, top_up};
use super::support::{
    assert_invariants, letters, next, open, server_payment, session_ended_within, sid, world_with,
    World, MSAT_PER_TOKEN, T,
};

/// The outside clients (scripts/setup-clients.sh): the venv's python and the npm modules dir.
fn clients() -> (PathBuf, PathBuf) {
    let line = std::env::var("SATSTREAM_CLIENTS").unwrap_or_else(|_| {
        let cache =
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/satstream");
        format!(
            "{} {}",
            cache.join("clients-venv/bin/python").display(),
            cache.join("clients-node").display()
        )
    });
    let (py, node) = line.split_once(' ').expect("`<python> <node dir>`");
    let (py, node) = (PathBuf::from(py), PathBuf::from(node));
    assert!(
        py.is_file() && node.join("node_modules").is_dir(),
        "the outside clients are not installed ({line}): run scripts/setup-clients.sh"
    );
    (py, node)
}

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/clients")
        .join(name)
}

fn base(w: &World) -> String {
    format!(
        "http://{}",
        w.h.server().http_addr.expect("the HTTP face is on")
    )
}

async fn account(w: &World, token: &str) -> satstream::wire::proto::Account {
    super::prepaid::account(w, token)
        .await
        .expect("the account exists")
}

/// The text of a greedy gRPC PREPAID stream (chat "hi", or the raw prompt "hi").
async fn grpc_text(w: &World, token: &str, max_tokens: u32, chat: bool) -> String {
    let mut r = prepaid(max_tokens, token);
    if !chat {
        r.messages.clear();
        r.prompt = "hi".into();
    }
    let mut s = open(w, r).await;
    let mut text = String::new();
    loop {
        match next(&mut s).await {
            Ev::Tokens(t) => text.push_str(&t.text),
            Ev::Done(_) => return text,
            Ev::Halted(h) => panic!("halted: {h:?}"),
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_openai_sdk_buys_tokens_with_an_account_token_as_its_api_key() {
    let (py, _) = clients();
    let w = world_with(&[], 0, 0, 4).await;
    let token = top_up(&w, "", 200_000).await;
    let n = 10u32;
    let cfg = json!({
        "base_url": format!("{}/v1", base(&w)),
        "api_key": token,
        "model": "tiny",
        "max_tokens": n,
    });
    let out = tokio::task::spawn_blocking(move || {
        Command::new(py)
            .arg(script("openai_client.py"))
            .arg(cfg.to_string())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "openai client failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cases: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let case = |name: &str| {
        cases
            .iter()
            .find(|c| c["case"] == name)
            .unwrap_or_else(|| panic!("no case {name} in {cases:?}"))
            .clone()
    };
    assert_eq!(case("models")["ids"], json!(["tiny"]));
    let chat_text = grpc_text(&w, &token, n, true).await;
    let raw_text = grpc_text(&w, &token, n, false).await;
    assert_eq!(chat_text, letters(n as usize));
    let mut sessions = Vec::new();
    for (name, expect) in [
        ("chat", &chat_text),
        ("chat_stream", &chat_text),
        ("text", &raw_text),
        ("text_stream", &raw_text),
    ] {
        let c = case(name);
        assert_eq!(c["text"], json!(expect), "{name}: the gRPC stream's text");
        assert_eq!(c["finish_reason"], "length", "{name}");
        let ext = &c["satstream"];
        let r = &ext["receipt"];
        assert_eq!(r["completion_tokens"], n, "{name}: {c}");
        assert_eq!(r["paid_msat"], n as u64 * MSAT_PER_TOKEN, "{name}");
        assert!(!r["signature"].as_str().unwrap().is_empty(), "{name}");
        assert_eq!(r["session_id"], ext["session_id"], "{name}");
        sessions.push(ext["session_id"].as_str().unwrap().to_string());
    }
    for name in ["chat", "chat_stream"] {
        let c = case(name);
        assert_eq!(c["session"], c["satstream"]["session_id"], "{name}: header");
        assert_eq!(c["usage"]["completion_tokens"], n, "{name}: {c}");
        assert_eq!(
            c["usage"]["total_tokens"].as_u64().unwrap(),
            c["usage"]["prompt_tokens"].as_u64().unwrap() + n as u64
        );
    }
    assert_eq!(case("chat_stream")["roles"], json!(["assistant"]));
    // The receipt is also served on its own, to the same API key only.
    let r: Value = reqwest::Client::new()
        .get(format!("{}/v1/receipts/{}", base(&w), sessions[0]))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r, case("chat")["satstream"]["receipt"]);
    // Refusals as the SDK's own exceptions.
    for (name, class, status) in [
        ("wrong_key", "AuthenticationError", 401),
        ("unknown_model", "NotFoundError", 404),
        ("two_choices", "BadRequestError", 400),
    ] {
        let c = case(name);
        assert_eq!(
            (c["error"].as_str(), c["status"].as_u64()),
            (Some(class), Some(status)),
            "{c}"
        );
    }
    // Every token was paid from the account, exactly: 4 HTTP and 2 gRPC sessions of n tokens,
    // nothing for the refused ones.
    let a = account(&w, &token).await;
    assert_eq!(a.spent_msat, 6 * n as u64 * MSAT_PER_TOKEN);
    assert_eq!(a.available_msat, 200_000 - a.spent_msat);
    for s in &sessions {
        assert_invariants(&w, s);
    }
    // The only Lightning money that moved is the top-up, per both nodes' own records (the
    // channel's funding is an on-chain record).
    let succeeded = |node: &ldk_node::Node, dir: ldk_node::payment::PaymentDirection| -> u64 {
        node.list_payments()
            .iter()
            .filter(|p| {
                p.direction == dir
                    && p.status == ldk_node::payment::PaymentStatus::Succeeded
                    && matches!(p.kind, ldk_node::payment::PaymentKind::Bolt11 { .. })
            })
            .filter_map(|p| p.amount_msat)
            .sum()
    };
    use ldk_node::payment::PaymentDirection::{Inbound, Outbound};
    assert_eq!(succeeded(&w.h.payer.node, Outbound), a.credited_msat);
    assert_eq!(
        succeeded(w.h.server().app.lightning.node(), Inbound),
        a.credited_msat
    );
    w.h.stop().await;
}

/// Pays `bolt11` from the payer node; the preimage.
async fn pay(w: &World, bolt11: &str) -> [u8; 32] {
    match w.h.payer.pay(bolt11, T).await.unwrap() {
        PayOutcome::Succeeded { preimage, .. } => preimage,
        other => panic!("payment failed: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_l402_client_pays_the_challenge_then_streams_and_reuses_its_credential() {
    let (_, node_dir) = clients();
    let w = world_with(&[], 0, 0, 4).await;
    let body = json!({
        "model": "tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 8,
        "temperature": 0,
        "stream": true,
    });
    let mut child = Command::new("node")
        .arg(script("l402_client.mjs"))
        .arg(&node_dir)
        .arg(format!("{}/v1/chat/completions", base(&w)))
        .arg(body.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("node");
    let mut stdin = child.stdin.take().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines() {
            if tx.send(l.unwrap()).is_err() {
                break;
            }
        }
    });
    async fn line(rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>) -> String {
        tokio::time::timeout(T, rx.recv()).await.unwrap().unwrap()
    }
    let l = line(&mut rx).await;
    let bolt11 = l.strip_prefix("PAY ").unwrap_or_else(|| panic!("{l}"));
    let paid_at = Instant::now();
    let preimage = pay(&w, bolt11).await;
    let pay_ms = paid_at.elapsed().as_secs_f64() * 1e3;
    writeln!(stdin, "{}", hex::encode(preimage)).unwrap();
    let paid: Value = serde_json::from_str(&line(&mut rx).await).unwrap();
    let again: Value = serde_json::from_str(&line(&mut rx).await).unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(
        (paid["status"].as_u64(), paid["paid"].as_bool()),
        (Some(200), Some(true)),
        "{paid}"
    );
    let text = sse_text(paid["body"].as_str().unwrap());
    assert_eq!(text, letters(8));
    assert_eq!(again["status"], 200, "{again}");
    assert_eq!(sse_text(again["body"].as_str().unwrap()), letters(8));
    eprintln!(
        "L402 round trip: 402 after {:.0} ms, paid in {pay_ms:.0} ms, first token {:.0} ms after the preimage",
        paid["challenge_ms"].as_f64().unwrap(),
        paid["first_token_after_paid_ms"].as_f64().unwrap_or(f64::NAN)
    );
    // The challenge's invoice topped up a new account by the configured amount; both
    // completions were drawn from it; the node received exactly the top-up.
    let store = w.h.server().app.store.clone();
    let inv: ldk_node::lightning_invoice::Bolt11Invoice = bolt11.parse().unwrap();
    let hash: [u8; 32] = *inv.payment_hash().as_ref();
    let row = store.invoice(&hash).unwrap().unwrap();
    let acc = store.account(&row.account_id.unwrap()).unwrap().unwrap();
    let topup = w.h.server().app.config.payments.l402_topup_msat;
    assert_eq!(acc.credited_msat, topup);
    assert_eq!(acc.spent_msat, 2 * 8 * MSAT_PER_TOKEN);
    assert_eq!(server_payment(&w, hash).amount_msat, Some(topup));
    assert_invariants(&w, paid["session"].as_str().unwrap());
    w.h.stop().await;
}

/// The text of an SSE body of chat chunks; asserts it ends with `[DONE]`.
fn sse_text(body: &str) -> String {
    let datas: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(datas.last(), Some(&"[DONE]"), "{body}");
    datas[..datas.len() - 1]
        .iter()
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect()
}

/// One curl request: (status, headers, body).
fn curl(url: &str, auth: Option<&str>, body: Option<&str>) -> (u16, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let (hfile, bfile) = (dir.path().join("h"), dir.path().join("b"));
    let mut c = Command::new("curl");
    c.args(["-sS", "-o"])
        .arg(&bfile)
        .arg("-D")
        .arg(&hfile)
        .args(["-w", "%{http_code}"]);
    if let Some(a) = auth {
        c.args(["-H", &format!("Authorization: {a}")]);
    }
    if let Some(b) = body {
        let f = dir.path().join("req");
        std::fs::write(&f, b).unwrap();
        c.args(["-H", "Content-Type: application/json", "--data-binary"])
            .arg(format!("@{}", f.display()));
    }
    let out = c.arg(url).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8(out.stdout).unwrap().parse().unwrap(),
        std::fs::read_to_string(hfile).unwrap(),
        std::fs::read_to_string(bfile).unwrap_or_default(),
    )
}

/// The L402 challenge of a 402's headers: (macaroon, invoice), parsed per bLIP-26.
fn challenge(headers: &str) -> (String, String) {
    let v = headers
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("www-authenticate")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_else(|| panic!("no WWW-Authenticate in {headers}"));
    let rest = v.strip_prefix("L402 ").unwrap_or_else(|| panic!("{v}"));
    let mut parts = rest.split(", ");
    let m = parts.next().unwrap().strip_prefix("macaroon=\"").unwrap();
    let i = parts.next().unwrap().strip_prefix("invoice=\"").unwrap();
    (
        m.strip_suffix('"').unwrap().to_string(),
        i.strip_suffix('"').unwrap().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn raw_requests_get_the_right_status_and_move_nothing() {
    let w = world_with(&[], 0, 0, 4).await;
    let token = top_up(&w, "", 50_000).await;
    let url = format!("{}/v1/chat/completions", base(&w));
    let ok = |extra: Value| {
        let mut b = json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b.to_string()
    };
    // No credentials: a 402 whose challenge parses, whose macaroon commits to its invoice.
    let (st, h, b) = curl(&url, None, Some(&ok(json!({}))));
    assert_eq!(st, 402, "{b}");
    let (mac_a, inv_a) = challenge(&h);
    let body: Value = serde_json::from_str(&b).unwrap();
    assert_eq!(body["error"]["type"], "payment_required");
    assert_eq!(body["l402"]["invoice"], inv_a.as_str());
    let inv: ldk_node::lightning_invoice::Bolt11Invoice = inv_a.parse().unwrap();
    let hash_a: [u8; 32] = *inv.payment_hash().as_ref();
    use base64::Engine as _;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(&mac_a)
        .unwrap();
    let m = libmacaroon::Macaroon::deserialize_binary(&raw).unwrap();
    assert_eq!(&m.identifier()[..2], &[0, 0], "Aperture's version 0");
    assert_eq!(
        &m.identifier()[2..34],
        &hash_a,
        "the invoice's payment hash"
    );
    assert_eq!(
        inv.amount_milli_satoshis(),
        Some(w.h.server().app.config.payments.l402_topup_msat)
    );
    let (_, h_b, _) = curl(&url, None, Some(&ok(json!({}))));
    let (mac_b, _) = challenge(&h_b);
    let pre_a = hex::encode(pay(&w, &inv_a).await);

    let store = w.h.server().app.store.clone();
    let sessions = || store.list_sessions(1000, "", None).unwrap().items.len();
    let before = (sessions(), account(&w, &token).await);
    let bearer = format!("Bearer {token}");
    // Just over the body limit (twice the prompt cap).
    let limit = 2 * w.h.server().app.config.limits.max_prompt_bytes as usize;
    let big = "x".repeat(limit.max(64 * 1024) + 1000);
    let key = std::fs::read(w.h.server().app.config.server.data_dir.join("l402.key")).unwrap();
    let expired = satstream::http::l402::L402::from_key(key.try_into().unwrap()).mint(&hash_a, 1);
    let mut tampered = base64::engine::general_purpose::STANDARD
        .decode(&mac_a)
        .unwrap();
    let at = tampered.windows(32).position(|w| w == hash_a).unwrap() + 40;
    tampered[at] ^= 1;
    let tampered = base64::engine::general_purpose::STANDARD.encode(tampered);
    let table: Vec<(&str, Option<String>, String, u16, &str)> = vec![
        ("bad JSON", Some(bearer.clone()), "{".into(), 400, "JSON"),
        (
            "wrong type",
            Some(bearer.clone()),
            ok(json!({"max_tokens": "x"})),
            400,
            "max_tokens",
        ),
        (
            "unknown model",
            Some(bearer.clone()),
            ok(json!({"model": "nope"})),
            404,
            "\"nope\"",
        ),
        (
            "max_tokens 0",
            Some(bearer.clone()),
            ok(json!({"max_tokens": 0})),
            400,
            "max_tokens",
        ),
        (
            "beyond the context",
            Some(bearer.clone()),
            ok(json!({"max_tokens": 40000})),
            400,
            "context",
        ),
        (
            "empty messages",
            Some(bearer.clone()),
            ok(json!({"messages": []})),
            400,
            "messages",
        ),
        (
            "tools",
            Some(bearer.clone()),
            ok(json!({"tools": [{"type": "function"}]})),
            400,
            "tools",
        ),
        (
            "seeded sampling on mistral.rs",
            Some(bearer.clone()),
            ok(json!({"temperature": 0.7, "seed": 7})),
            400,
            "seed",
        ),
        (
            "negative seed",
            Some(bearer.clone()),
            ok(json!({"seed": -1})),
            400,
            "seed",
        ),
        (
            "repetition penalty out of range",
            Some(bearer.clone()),
            ok(json!({"repetition_penalty": 5})),
            400,
            "repetition_penalty",
        ),
        (
            "oversize body",
            Some(bearer.clone()),
            ok(json!({"messages": [{"role": "user", "content": big}]})),
            413,
            "larger",
        ),
        (
            "wrong key",
            Some(format!("Bearer {}", "00".repeat(32))),
            ok(json!({})),
            401,
            "no account",
        ),
        (
            "malformed key",
            Some("Bearer abc".into()),
            ok(json!({})),
            401,
            "64 hex",
        ),
        (
            "other scheme",
            Some("Basic dXNlcg==".into()),
            ok(json!({})),
            401,
            "Bearer",
        ),
        (
            "tampered macaroon",
            Some(format!("L402 {tampered}:{pre_a}")),
            ok(json!({})),
            401,
            "altered",
        ),
        (
            "another macaroon's preimage",
            Some(format!("L402 {mac_b}:{pre_a}")),
            ok(json!({})),
            401,
            "does not match",
        ),
        (
            "expired macaroon",
            Some(format!("L402 {expired}:{pre_a}")),
            ok(json!({})),
            401,
            "expired",
        ),
        (
            "no such endpoint",
            Some(bearer.clone()),
            ok(json!({})),
            404,
            "endpoint",
        ),
    ];
    for (name, auth, body, status, says) in table {
        let u = if name == "no such endpoint" {
            format!("{}/v1/embeddings", base(&w))
        } else {
            url.clone()
        };
        let (st, _, b) = curl(&u, auth.as_deref(), Some(&body));
        assert_eq!(st, status, "{name}: {b}");
        let e: Value = serde_json::from_str(&b).unwrap_or_else(|_| panic!("{name}: not JSON: {b}"));
        let msg = e["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(says), "{name}: {msg:?} should name {says:?}");
    }
    // Nothing moved: no session, no debit.
    assert_eq!(sessions(), before.0);
    assert_eq!(account(&w, &token).await, before.1);
    // The paid credential works.
    let (st, h, b) = curl(
        &url,
        Some(&format!("L402 {mac_a}:{pre_a}")),
        Some(&ok(json!({}))),
    );
    assert_eq!(st, 200, "{b}");
    let v: Value = serde_json::from_str(&b).unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], letters(4));
    assert!(h.to_ascii_lowercase().contains("x-satstream-session-id"));
    w.h.stop().await;
}

/// An SSE stream's data events, as they arrive.
async fn sse(
    w: &World,
    token: &str,
    max_tokens: u32,
) -> (
    String,
    std::pin::Pin<Box<dyn futures_util::Stream<Item = String> + Send>>,
) {
    let r = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", base(w)))
        .bearer_auth(token)
        .json(&json!({
            "model": "tiny",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": true,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let session = r.headers()["x-satstream-session-id"]
        .to_str()
        .unwrap()
        .to_string();
    use eventsource_stream::Eventsource;
    (
        session,
        Box::pin(r.bytes_stream().eventsource().map(|e| e.unwrap().data)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_spent_balance_ends_the_stream_cleanly_and_a_gone_client_ends_its_session() {
    let w = world_with(&[], 0, 0, 4).await;
    // 6 000 msat: one chunk of 4 tokens (4 000), not two.
    let small = top_up(&w, "", 6_000).await;
    let (session, events) = sse(&w, &small, 20).await;
    let datas: Vec<String> = tokio::time::timeout(T, events.collect()).await.unwrap();
    assert_eq!(datas.last().map(String::as_str), Some("[DONE]"));
    let last: Value = serde_json::from_str(&datas[datas.len() - 2]).unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    assert_eq!(last["satstream"]["halted"], "balance_exhausted");
    assert_eq!(last["satstream"]["balance_msat"], 2_000);
    assert_eq!(last["satstream"]["receipt"]["completion_tokens"], 4);
    let text: String = datas[..datas.len() - 1]
        .iter()
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(text, letters(4));
    assert_eq!(account(&w, &small).await.spent_msat, 4_000);
    assert_invariants(&w, &session);

    // A client that reads one chunk and goes away: the session ends then, not at its end.
    let big = top_up(&w, "", 10_000_000).await;
    let (session, mut events) = sse(&w, &big, 8_000).await;
    let first = tokio::time::timeout(T, events.next())
        .await
        .unwrap()
        .unwrap();
    assert!(first.contains("\"delta\""), "{first}");
    drop(events);
    let s = session_ended_within(&w, sid(&session), Duration::from_secs(10)).await;
    assert_eq!(s.end_reason.as_deref(), Some("client_gone"), "{s:?}");
    assert!(s.completion_tokens < 8_000, "{s:?}");
    // Debited exactly what was delivered.
    assert_eq!(
        account(&w, &big).await.spent_msat,
        s.completion_tokens as u64 * MSAT_PER_TOKEN
    );
    assert_invariants(&w, &session);
    w.h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_account_is_opened_topped_up_and_refunded_over_http() {
    // A channel server → payer, for the refund.
    let w = world_with(&[], 0, 200_000, 4).await;
    let http = reqwest::Client::new();
    let post = |path: &str, auth: Option<&str>, body: Value| {
        let mut r = http.post(format!("{}{path}", base(&w))).json(&body);
        if let Some(a) = auth {
            r = r.bearer_auth(a);
        }
        r.send()
    };
    // Without credentials: a new account, its token shown once.
    let r = post("/v1/account/topup", None, json!({"amount_msat": 30_000}))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let t: Value = r.json().await.unwrap();
    let token = t["account_token"].as_str().unwrap().to_string();
    assert_eq!(t["amount_msat"], 30_000);
    pay(&w, t["bolt11"].as_str().unwrap()).await;
    let get = || async {
        let r = http
            .get(format!("{}/v1/account", base(&w)))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json::<Value>().await.unwrap()
    };
    satstream::harness::wait_until("the top-up to be credited", T, || async {
        get().await["available_msat"] == 30_000
    })
    .await
    .unwrap();
    // Topping up an existing account returns no new token.
    let r = post("/v1/account/topup", Some(&token), json!({"amount_msat": 0}))
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["param"], "amount_msat", "{e}");
    let t2: Value = post(
        "/v1/account/topup",
        Some(&token),
        json!({"amount_msat": 2_000}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(t2["account_token"], Value::Null);
    // No credentials for the balance: 401 saying how.
    let r = http
        .get(format!("{}/v1/account", base(&w)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // A refund of 10 000 msat to the payer's invoice: the payer's node receives it.
    let inv = super::support::payer_invoice(&w, Some(10_000));
    let r: Value = post(
        "/v1/account/refund",
        Some(&token),
        json!({"bolt11": inv, "wait_secs": 60}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(
        (r["state"].as_str(), r["refunded_msat"].as_u64()),
        (Some("succeeded"), Some(10_000)),
        "{r}"
    );
    assert_eq!(r["available_msat"], 20_000);
    let parsed: ldk_node::lightning_invoice::Bolt11Invoice = inv.parse().unwrap();
    let id = ldk_node::lightning::ln::channelmanager::PaymentId(*parsed.payment_hash().as_ref());
    let p = w.h.payer.node.payment(&id).unwrap();
    assert_eq!(
        (p.status, p.amount_msat),
        (ldk_node::payment::PaymentStatus::Succeeded, Some(10_000))
    );
    assert_eq!(get().await["refunded_msat"], 10_000);
    w.h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_tls_on_the_http_face_serves_the_grpc_certificate() {
    let w = world_with(&["server.tls=on"], 0, 0, 4).await;
    let tls = w.h.server().tls.clone().expect("TLS on");
    let ca = std::fs::read(&tls.trust_path).unwrap();
    let port = w.h.server().http_addr.unwrap().port();
    let https = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .build()
        .unwrap();
    let r = https
        .get(format!("https://localhost:{port}/v1/models"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["data"][0]["id"], "tiny");
    assert_eq!(v["data"][0]["satstream"]["msat_per_token"], MSAT_PER_TOKEN);
    // Plaintext to the TLS port is not served.
    assert!(reqwest::get(format!("http://127.0.0.1:{port}/v1/models"))
        .await
        .is_err());
    w.h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_gone_from_a_whole_response_ends_its_session_too() {
    let w = world_with(&[], 0, 0, 4).await;
    let token = top_up(&w, "", 10_000_000).await;
    let mut r = reqwest::Client::new()
        .post(format!("{}/v1/completions", base(&w)))
        .bearer_auth(&token)
        .json(&json!({"model": "tiny", "prompt": "hi", "max_tokens": 8_000, "temperature": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let session = r.headers()["x-satstream-session-id"]
        .to_str()
        .unwrap()
        .to_string();
    // The body begins before the answer ends; read a little of it and go.
    let first = tokio::time::timeout(T, r.chunk())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(first.starts_with(b"{\"id\""), "{first:?}");
    drop(r);
    let s = session_ended_within(&w, sid(&session), Duration::from_secs(10)).await;
    assert_eq!(s.end_reason.as_deref(), Some("client_gone"), "{s:?}");
    assert!(s.completion_tokens < 8_000, "{s:?}");
    assert_eq!(
        account(&w, &token).await.spent_msat,
        s.completion_tokens as u64 * MSAT_PER_TOKEN
    );
    assert_invariants(&w, &session);
    w.h.stop().await;
}
