//! The real grpcurl binary against the real server: reflection, health, admin auth.

use std::process::Command;

use satstream::harness::{Harness, HarnessOptions};

fn grpcurl(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(super::support::grpcurl())
        .args(args)
        .output()
        .expect("run grpcurl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpcurl_lists_describes_and_is_authenticated() {
    super::support::init_tracing();
    let h = Harness::start(HarnessOptions {
        channel_sat: 0,
        ..HarnessOptions::default()
    })
    .await
    .unwrap();
    let addr = h.server().grpc_addr.to_string();
    let token = h.server().admin_token.clone();

    let (ok, out, err) = grpcurl(&["-plaintext", &addr, "list"]);
    assert!(ok, "{err}");
    for svc in [
        "satstream.v1.Inference",
        "satstream.v1.Admin",
        "grpc.health.v1.Health",
    ] {
        assert!(
            out.lines().any(|l| l.trim() == svc),
            "{svc} missing from:\n{out}"
        );
    }

    let (ok, out, err) = grpcurl(&[
        "-plaintext",
        &addr,
        "describe",
        "satstream.v1.GenerateEvent",
    ]);
    assert!(ok, "{err}");
    for field in ["invoice", "tokens", "encrypted_chunk", "halted", "done"] {
        assert!(out.contains(field), "{field} missing from:\n{out}");
    }

    let (ok, out, err) = grpcurl(&[
        "-plaintext",
        "-d",
        r#"{"service":"satstream.v1.Admin"}"#,
        &addr,
        "grpc.health.v1.Health/Check",
    ]);
    assert!(ok && out.contains("SERVING"), "{out}{err}");

    let bearer = format!("authorization: Bearer {token}");
    let (ok, out, err) = grpcurl(&[
        "-plaintext",
        "-H",
        &bearer,
        &addr,
        "satstream.v1.Admin/GetInfo",
    ]);
    assert!(ok, "{err}");
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(info["nodeId"], h.server_node_id());
    assert_eq!(info["network"], "regtest");

    let (ok, _, err) = grpcurl(&["-plaintext", &addr, "satstream.v1.Admin/GetInfo"]);
    assert!(!ok);
    assert!(err.contains("Unauthenticated"), "{err}");

    let (ok, _, err) = grpcurl(&[
        "-plaintext",
        "-H",
        "authorization: Bearer wrong",
        &addr,
        "satstream.v1.Admin/GetInfo",
    ]);
    assert!(!ok);
    assert!(err.contains("PermissionDenied"), "{err}");

    // Bad input gets InvalidArgument with a message naming the field.
    let (ok, _, err) = grpcurl(&[
        "-plaintext",
        "-H",
        &bearer,
        "-d",
        r#"{"state":"paid"}"#,
        &addr,
        "satstream.v1.Admin/ListInvoices",
    ]);
    assert!(!ok);
    assert!(
        err.contains("InvalidArgument") && err.contains("state"),
        "{err}"
    );
    h.stop().await;
}

/// A paid BOLT11 generation driven by the real grpcurl: grpcurl prints the events as they
/// stream, the test pays each invoice from the payer node as it appears, and grpcurl's output
/// holds the exact text.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpcurl_generate_bolt11_paid_from_the_payer_node() {
    use std::io::BufReader;
    use std::process::Stdio;
    super::support::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let path = satstream::engine::tiny_model::write_tiny_model(dir.path()).unwrap();
    let h = Harness::start(HarnessOptions {
        models: vec![satstream::config::ModelConfig {
            id: "tiny".into(),
            path,
            context_length: 0,
            msat_per_token: 1000,
            msat_per_prompt_token: 0,
            chunk_tokens: 4,
            max_concurrent: 4,
            max_queue: 4,
            backend: Default::default(),
            upstream: None,
        }],
        ..HarnessOptions::default()
    })
    .await
    .unwrap();
    let addr = h.server().grpc_addr.to_string();
    let request = r#"{"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 10, "mode": "PAYMENT_MODE_BOLT11", "sampling": {"temperature": 0}}"#;
    let mut child = Command::new(super::support::grpcurl())
        .args([
            "-plaintext",
            "-d",
            request,
            &addr,
            "satstream.v1.Inference/Generate",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run grpcurl");
    let stdout = child.stdout.take().unwrap();
    let h = std::sync::Arc::new(h);
    let payer = h.clone();
    // grpcurl prints one JSON object per event; read them as they come, paying invoices.
    let events = tokio::task::spawn_blocking(move || {
        let mut events = Vec::new();
        let stream = serde_json::Deserializer::from_reader(BufReader::new(stdout))
            .into_iter::<serde_json::Value>();
        for ev in stream {
            let ev = ev.expect("grpcurl prints JSON");
            if let Some(bolt11) = ev["invoice"]["bolt11"].as_str() {
                payer.payer.send(bolt11).expect("pay the invoice");
            }
            events.push(ev);
        }
        events
    })
    .await
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text: String = events
        .iter()
        .filter_map(|e| e["tokens"]["text"].as_str())
        .collect();
    assert_eq!(text, "abcdefghij");
    let invoices = events.iter().filter(|e| e["invoice"].is_object()).count();
    assert_eq!(
        invoices, 4,
        "chunks of 1 (the first word, invoiced as the session opens), 4, 4 and 1 tokens"
    );
    let done = &events.last().unwrap()["done"];
    assert_eq!(done["completionTokens"], 10);
    assert_eq!(done["paidMsat"], "10000", "uint64 is a JSON string");
    assert!(events[0]["accepted"].is_object());
    match std::sync::Arc::try_unwrap(h) {
        Ok(h) => h.stop().await,
        Err(_) => panic!("the harness is still shared"),
    }
}

/// The README's grpcurl walkthrough, command for command and over TLS (the server's generated
/// certificate, trusted with `--cacert` / `-cacert`): a fresh client wallet (the real
/// `satstream wallet` binary) is funded, opens a channel to the server from Quote's node
/// address, and pays `grpcurl … Generate` by running it under `satstream wallet pay`, which
/// pays each invoice in grpcurl's output as it is printed. A second run with a budget below the price shows the wallet
/// refusing the rest, and the server halting after exactly what was paid for.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readme_walkthrough_grpcurl_generate_paid_by_satstream_wallet_pay() {
    super::support::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let mut model = satstream::config::ModelConfig::new(
        "tiny",
        satstream::engine::tiny_model::write_tiny_model(dir.path()).unwrap(),
        1000,
    );
    model.chunk_tokens = 4;
    let h = Harness::start(HarnessOptions {
        models: vec![model],
        channel_sat: 0,
        // The budget run ends by the server's payment timeout: keep it short.
        sets: vec![
            "payments.payment_timeout_secs=8".into(),
            "server.tls=on".into(),
        ],
        ..HarnessOptions::default()
    })
    .await
    .unwrap();
    let addr = h.server().grpc_addr.to_string();
    let ca = h.server().tls.as_ref().expect("TLS on").trust_path.clone();
    let ca = ca.to_str().unwrap();
    let wallet_dir = dir.path().join("client");
    let conn = [
        "--server".to_string(),
        format!("https://{addr}"),
        "--cacert".into(),
        ca.to_string(),
        "--wallet-dir".into(),
        wallet_dir.display().to_string(),
        "--bitcoind-rpc".into(),
        format!("127.0.0.1:{}", h.bitcoind.rpc_port),
        "--listen".into(),
        format!("127.0.0.1:{}", satstream::harness::free_port()),
    ];
    let wallet = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_satstream"))
            .arg("wallet")
            .args(&conn)
            .args(args)
            .output()
            .expect("run satstream wallet");
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        assert!(out.status.success(), "wallet {args:?}:\n{stdout}\n{stderr}");
        stdout
    };

    let address = wallet(&["address"]);
    h.bitcoind.mine_to(101, address.trim()).unwrap();
    let opened = wallet(&["open-channel", "--sats", "200000"]);
    assert!(opened.contains(&h.server_node_id()), "{opened}");
    let height = h.bitcoind.mine_to(6, address.trim()).unwrap();
    h.wait_synced(height).await.unwrap();

    // satstream wallet pay --max-sats N -- grpcurl … Generate
    let paid_run = |max_sats: &str| {
        let request = r#"{"model": "tiny", "max_tokens": 10, "sampling": {"temperature": 0},
            "messages": [{"role": "user", "content": "hi"}]}"#;
        let pay = Command::new(env!("CARGO_BIN_EXE_satstream"))
            .arg("wallet")
            .args(&conn)
            .args(["pay", "--max-sats", max_sats, "--"])
            .arg(super::support::grpcurl())
            .args(["-cacert", ca, "-d", request, &addr])
            .arg("satstream.v1.Inference/Generate")
            .output()
            .expect("run satstream wallet pay");
        let (stdout, stderr) = (
            String::from_utf8_lossy(&pay.stdout).into_owned(),
            String::from_utf8_lossy(&pay.stderr).into_owned(),
        );
        assert!(pay.status.success(), "wallet pay:\n{stdout}\n{stderr}");
        // grpcurl's output passes through unchanged.
        let events: Vec<serde_json::Value> = serde_json::Deserializer::from_str(&stdout)
            .into_iter()
            .map(|e| e.expect("grpcurl's JSON passes through"))
            .collect();
        let summary = stderr
            .lines()
            .find(|l| l.starts_with("[wallet] summary:"))
            .unwrap_or_else(|| panic!("no summary in:\n{stderr}"))
            .to_string();
        (events, summary)
    };
    let text = |events: &[serde_json::Value]| -> String {
        events
            .iter()
            .filter_map(|e| e["tokens"]["text"].as_str())
            .collect()
    };

    let (events, summary) = paid_run("100");
    assert_eq!(text(&events), "abcdefghij");
    assert_eq!(events.last().unwrap()["done"]["paidMsat"], "10000");
    assert_eq!(
        summary,
        "[wallet] summary: paid=4 paid_msat=10000 fees_msat=0 failed=0 refused=0 unresolved=0"
    );

    // 5 sat buys the first two chunks (1 000 + 4 000 msat); the third (4 000) and, once the
    // window moves, the fourth (1 000) are refused.
    let (events, summary) = paid_run("5");
    assert_eq!(text(&events), "abcde");
    let halted = &events.last().unwrap()["halted"];
    assert_eq!(
        halted["reason"], "HALT_REASON_PAYMENT_TIMEOUT",
        "{events:?}"
    );
    assert_eq!(halted["paidMsat"], "5000");
    assert_eq!(
        summary,
        "[wallet] summary: paid=2 paid_msat=5000 fees_msat=0 failed=0 refused=2 unresolved=0"
    );
    h.stop().await;
}
