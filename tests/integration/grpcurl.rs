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
