//! `satstream demo` end to end, as a user runs it (the real binary), on the tiny model: the
//! summary must show the exact token count and msat, in every payment mode.

use std::process::Command;

fn demo(model_path: &std::path::Path, extra: &[&str]) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_satstream"))
        .args([
            "--set",
            "models.0.id=tiny",
            "--set",
            &format!("models.0.path={}", model_path.display()),
            "--set",
            "models.0.chunk_tokens=4",
            "--set",
            "models.0.msat_per_token=1000",
            "demo",
            "--max-tokens",
            "10",
            // Greedy, to compare texts (the demo's own default samples like a chat).
            "--temperature",
            "0",
            "--repetition-penalty",
            "1",
        ])
        .args(extra)
        .output()
        .expect("run satstream demo");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    (stdout, stderr)
}

#[test]
fn demo_runs_a_paid_generation_and_summarises_it_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let path = satstream::engine::tiny_model::write_tiny_model(dir.path()).unwrap();

    // BOLT11, as a person sees it: the text, then the summary line.
    let (out, err) = demo(&path, &[]);
    assert!(out.contains("abcdefghij"), "{out}");
    let summary = out
        .lines()
        .find(|l| l.starts_with("summary:"))
        .unwrap_or_else(|| panic!("no summary in:\n{out}\n{err}"));
    for field in [
        "outcome=length",
        "tokens=10",
        // The first word alone, then chunks of 4: 1 + 4 + 4 + 1.
        "chunks=4",
        "paid_msat=10000",
        "payments=4",
    ] {
        assert!(
            summary.split_whitespace().any(|w| w == field),
            "{field} missing from {summary}"
        );
    }
    assert!(err.contains("no processes left behind"), "{err}");

    // ATOMIC, KEYSEND (its 2 000 msat prepaid ahead come back at the end) and PREPAID (drawn
    // from an account topped up with 110 000 msat: no payment in the stream), machine-readable.
    for (mode, paid, server_paid, refunded, balance) in [
        ("atomic", 10_000, 10_000, 0, 0),
        ("keysend", 12_000, 12_000, 2_000, 0),
        ("prepaid", 0, 10_000, 0, 100_000),
    ] {
        let (out, _) = demo(&path, &["--mode", mode, "--json"]);
        let events: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
            .collect();
        let text: String = events
            .iter()
            .filter(|e| e["event"] == "text")
            .map(|e| e["text"].as_str().unwrap())
            .collect();
        assert_eq!(text, "abcdefghij", "{mode}");
        let s = events.last().unwrap();
        assert_eq!(s["event"], "summary", "{mode}");
        assert_eq!(s["tokens"], 10, "{mode}");
        assert_eq!(s["spent_msat"], paid, "{mode}");
        assert_eq!(s["server_paid_msat"], server_paid, "{mode}");
        assert_eq!(
            s["refunded_msat"], refunded,
            "{mode}: what the server recorded"
        );
        assert_eq!(
            s["refundable_msat"], 0,
            "{mode}: nothing left on the server"
        );
        assert_eq!(s["balance_msat"], balance, "{mode}");
    }
}
