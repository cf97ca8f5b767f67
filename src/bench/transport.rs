//! What TLS costs on the gRPC listener: the same server (tiny model, in process) with
//! `server.tls` off and on, measured by a client on loopback: a unary RPC's round trip
//! (ListModels) and, on paid BOLT11 streams, the client-side time from sending a chunk's
//! payment to receiving its text (what a user waits for, Lightning included).

use std::collections::HashMap;
use std::time::Instant;

use super::{pct, request, BenchError};
use crate::client::{self, ClientEvent};
use crate::config::ModelConfig;
use crate::harness::{Harness, HarnessOptions};
use crate::wire::proto::{inference_client::InferenceClient, ListModelsRequest};

/// One side of the comparison.
#[derive(Debug, Clone)]
pub struct TransportRun {
    pub tls: bool,
    pub rpc_ms: Vec<f64>,
    pub pay_to_text_ms: Vec<f64>,
}

async fn side(
    model: &ModelConfig,
    tls: bool,
    rpcs: usize,
    streams: usize,
) -> Result<TransportRun, BenchError> {
    let fail = |e: &dyn std::fmt::Display| BenchError::Failed(e.to_string());
    let h = Harness::start(HarnessOptions {
        models: vec![model.clone()],
        sets: vec![format!("server.tls={}", if tls { "on" } else { "off" })],
        ..HarnessOptions::default()
    })
    .await?;
    let port = h.server().grpc_addr.port();
    let channel = match &h.server().tls {
        Some(t) if tls => {
            client::connect(&format!("https://127.0.0.1:{port}"), Some(&t.trust_path)).await?
        }
        _ => client::connect(&format!("http://127.0.0.1:{port}"), None).await?,
    };
    let mut c = InferenceClient::new(channel);
    let mut rpc_ms = Vec::with_capacity(rpcs);
    for i in 0..rpcs + rpcs / 10 {
        let t = Instant::now();
        c.list_models(ListModelsRequest {})
            .await
            .map_err(|e| fail(&e))?;
        // The first tenth warms the connection up.
        if i >= rpcs / 10 {
            rpc_ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    let mut pay_to_text_ms = Vec::new();
    for _ in 0..streams {
        let mut paying: HashMap<u32, Instant> = HashMap::new();
        let mut req = request(&model.id, 256, 2);
        req.window_chunks = None;
        client::generate(&mut c, &h.payer, req, None, |ev| match ev {
            ClientEvent::Paying { chunk: Some(k), .. } => {
                paying.insert(*k, Instant::now());
            }
            ClientEvent::Text { chunk, .. } => {
                if let Some(t) = paying.remove(chunk) {
                    pay_to_text_ms.push(t.elapsed().as_secs_f64() * 1e3);
                }
            }
            _ => {}
        })
        .await?;
    }
    h.stop().await;
    Ok(TransportRun {
        tls,
        rpc_ms,
        pay_to_text_ms,
    })
}

/// Plaintext and TLS side by side: the Markdown table.
pub async fn compare(model: &ModelConfig) -> Result<String, BenchError> {
    // Alternating sides, pooled: each fresh regtest world's Lightning latency differs more
    // than TLS could.
    let mut runs = [
        TransportRun {
            tls: false,
            rpc_ms: Vec::new(),
            pay_to_text_ms: Vec::new(),
        },
        TransportRun {
            tls: true,
            rpc_ms: Vec::new(),
            pay_to_text_ms: Vec::new(),
        },
    ];
    for _ in 0..3 {
        for r in runs.iter_mut() {
            let s = side(model, r.tls, 1000, 4).await?;
            r.rpc_ms.extend(s.rpc_ms);
            r.pay_to_text_ms.extend(s.pay_to_text_ms);
        }
    }
    let mut md = String::from(
        "| loopback, tiny model | plaintext | TLS (generated certificate) | TLS − plaintext |\n|---|---|---|---|\n",
    );
    let mut row = |what: &str, f: &dyn Fn(&TransportRun) -> f64| {
        let (a, b) = (f(&runs[0]), f(&runs[1]));
        md.push_str(&format!(
            "| {what} | {a:.3} ms | {b:.3} ms | {:+.3} ms |\n",
            b - a
        ));
    };
    row("ListModels round trip, p50", &|r| pct(&r.rpc_ms, 0.5));
    row("ListModels round trip, p99", &|r| pct(&r.rpc_ms, 0.99));
    row("Chunk payment sent → its text received, p50", &|r| {
        pct(&r.pay_to_text_ms, 0.5)
    });
    row("Chunk payment sent → its text received, p99", &|r| {
        pct(&r.pay_to_text_ms, 0.99)
    });
    md.push_str(&format!(
        "\n{} round trips and {} / {} paid chunks (256-token BOLT11 streams, chunk 4) per side, \
         pooled over three alternations of plaintext and TLS worlds.\n",
        runs[0].rpc_ms.len(),
        runs[0].pay_to_text_ms.len(),
        runs[1].pay_to_text_ms.len()
    ));
    Ok(md)
}
