//! `satstream bench`: which measurements to run, and the report they write.

use clap::Args;
use std::path::PathBuf;

use super::{run, BenchError, BenchOptions};
use crate::config::Config;

#[derive(Args, Clone, Debug)]
pub struct BenchArgs {
    /// smollm2 (the configured default model), tiny (generated), all, or store (only the
    /// ldk-node store comparison, on tiny; all includes it), written to docs/benchmarks.md;
    /// backends (mistral.rs and llama.cpp side by side on the configured model, written to
    /// docs/backends.md); engines (raw decode of both backends on the Q4_1, Q8_0 and Q4_0 files,
    /// each file's perplexity, and llama.cpp beside a second loaded model).
    /// stall (the configured model and backend: the stall share of paid BOLT11 streams with
    /// adaptive lookahead, and how much of it comes before a session's first payment).
    /// Printed only: short (issue 26: answers of 32/64/128/512 tokens on both backends, raw
    /// against every paid mode, time to first token and to Done, with the run's p50 payment
    /// round trip; --sessions sets the alternated rounds, default 3), http (the HTTP face's paid tok/s and time to first token against gRPC's,
    /// PREPAID, the configured model), chaos (random SIGKILLs of a server process, tiny model), rpc (ListModels
    /// latency, completions and the server's peak RSS under 32 paid sessions, tiny model),
    /// soak (a server process's RSS over 1 000 distinct generations of the configured model),
    /// tls (plaintext against TLS: RPC round trip and payment → text, tiny model), gateway
    /// (the configured model on a real llama-cpp-python upstream, on its own and through the
    /// `openai` backend: the gateway's overhead; needs scripts/setup-upstream.sh), longrun
    /// (issue 23.7: 100 000 paid invoices through a server process, tiny model: RSS and
    /// ldk-node records every 10 000, restart times, p99 payment → tokens first and last,
    /// the paying client under abuse; ~30 min).
    #[arg(long, default_value = "smollm2")]
    pub model: String,
    /// Where to write the report.
    #[arg(long, default_value = "docs/benchmarks.md")]
    pub out: PathBuf,
    /// chaos, rpc: the server binary to run (default: this one). Point it at an older build
    /// to compare.
    #[arg(long)]
    pub server_exe: Option<PathBuf>,
    /// chaos: sessions (each cut by a SIGKILL); rpc: concurrent paid sessions; soak:
    /// generations; stall: paid streams (default 10); longrun: invoices (default 100 000).
    #[arg(long)]
    pub sessions: Option<usize>,
}

pub async fn command(base: &Config, a: &BenchArgs) -> Result<(), BenchError> {
    if matches!(
        a.model.as_str(),
        "chaos" | "rpc" | "soak" | "tls" | "longrun"
    ) {
        return faults_command(base, a).await;
    }
    if a.model == "gateway" {
        let m = first_model(base)?;
        println!("{}", super::gateway::overhead(&m, 128).await?);
        eprintln!("machine: {}", super::machine());
        return Ok(());
    }
    if a.model == "http" {
        let m = first_model(base)?;
        println!("{}", super::http::report(&m, 256).await?);
        eprintln!("machine: {}", super::machine());
        return Ok(());
    }
    if a.model == "short" {
        let m = first_model(base)?;
        println!(
            "{}",
            super::short::report(&m, a.sessions.unwrap_or(3)).await?
        );
        eprintln!("machine: {}", super::machine());
        return Ok(());
    }
    if a.model == "stall" {
        let m = first_model(base)?;
        println!(
            "{}",
            super::backends::stall_report(&m, a.sessions.unwrap_or(10), 128).await?
        );
        eprintln!("machine: {}", super::machine());
        return Ok(());
    }
    if a.model == "engines" {
        println!("{}", super::backends::engines(&first_model(base)?).await?);
        return Ok(());
    }
    if a.model == "backends" {
        let tmp = tempfile::tempdir().map_err(|e| BenchError::Failed(e.to_string()))?;
        let m = first_model(base)?;
        let path = crate::engine::tiny_model::write_tiny_model(tmp.path())
            .map_err(|e| BenchError::Failed(e.to_string()))?;
        let tiny = crate::config::ModelConfig::new("tiny", path, m.msat_per_token);
        let engines = super::backends::engines(&m).await?;
        println!("{engines}");
        let table = super::backends::compare(&m, &tiny, 128).await?;
        println!("{table}");
        let out = a.out.with_file_name("backends.md");
        let report = format!(
            "# Engines side by side\n\nWritten by `satstream bench --model backends` (one run, \
             both backends on the same model file; medians where stated). Machine: {}.\n\n\
             Raw decode by weight format (no server):\n\n{engines}\n\
             Served by satstream, `{}`:\n\n{table}",
            super::machine(),
            m.path.display()
        );
        std::fs::write(&out, report).map_err(|e| BenchError::Failed(e.to_string()))?;
        eprintln!("written to {}", out.display());
        return Ok(());
    }
    let tmp = tempfile::tempdir().map_err(|e| BenchError::Failed(e.to_string()))?;
    let mut runs = Vec::new();
    if a.model == "smollm2" || a.model == "all" {
        let m = first_model(base)?;
        runs.push(BenchOptions {
            model: m,
            tokens: 128,
            concurrent_tokens: 32,
        });
    }
    let tiny_model = || -> Result<crate::config::ModelConfig, BenchError> {
        let path = crate::engine::tiny_model::write_tiny_model(tmp.path())
            .map_err(|e| BenchError::Failed(e.to_string()))?;
        let msat = base.models.first().map_or(1000, |m| m.msat_per_token);
        Ok(crate::config::ModelConfig::new("tiny", path, msat))
    };
    let mut tiny = (a.model == "store").then(tiny_model).transpose()?;
    if a.model == "tiny" || a.model == "all" {
        let m = tiny_model()?;
        runs.push(BenchOptions {
            model: m,
            tokens: 1024,
            concurrent_tokens: 128,
        });
    }
    if runs.is_empty() && tiny.is_none() {
        return Err(BenchError::Failed(format!(
            "--model {:?}: use smollm2, tiny, all or store",
            a.model
        )));
    }
    let mut report = String::from(BENCH_HEADER);
    for r in runs {
        let id = r.model.id.clone();
        if id == "tiny" {
            tiny = Some(r.model.clone());
        }
        let table = run(r).await?;
        println!("{table}");
        report.push_str(&format!("\n## {id}\n\n{table}"));
    }
    // LDK's persistence is model-independent; the tiny model makes the stream payment-bound.
    if let Some(tiny) = tiny {
        let table = super::store_comparison(&tiny).await?;
        println!("{table}");
        report.push_str(&format!(
            "\n## LDK persistence stalls\n\n{STORE_NOTE}\n\n{table}"
        ));
    }
    if let Some(dir) = a.out.parent() {
        std::fs::create_dir_all(dir).map_err(|e| BenchError::Failed(e.to_string()))?;
    }
    std::fs::write(&a.out, report).map_err(|e| BenchError::Failed(e.to_string()))?;
    eprintln!("written to {}", a.out.display());
    Ok(())
}

const STORE_NOTE: &str = "Every ~100 channel-monitor updates (~20 payments) ldk-node \
rewrites a channel's full monitor and removes the stale updates, one store write each, and \
payments wait meanwhile. Each run below is a fresh regtest world whose server and payer \
stores use the journal mode named; everything else is equal.";

const BENCH_HEADER: &str = "# Benchmarks\n\n\
Written by `satstream bench --model all` (rerun: `scripts/bench.sh`, ~10 min). Every number comes from \
one run on the regtest harness: a real bitcoind, the server in process with its ldk-node, a \
client wallet node paying over a real channel, and the real engine. The analysis (where the \
time goes, which goals this hardware cannot meet and why) is in docs/performance.md. \
Definitions:\n\n\
- *Paid ÷ raw*: a paid BOLT11 stream (request to Done, client side) against the same engine \
generating the same prompt greedily without payment, in the same run (medians of 5 alternated runs each, after one warm-up stream).\n\
- *Stall share*: time the engine sat paused at its allowance waiting for payment (pause to \
the next token, so a resume's prefill counts), over the sessions' total time.\n\
- *Payment event → first token*: the server's event loop handling PaymentClaimable to the \
chunk's Tokens being written to the stream (LDK's claim and the ledger commit included), \
and its parts.\n\
- *Tokens after the payer stops*: generated beyond what was paid when the payment timeout \
halts the session.\n\
- *Pay → settled*: client side, from sending a payment to PaymentSuccessful.\n";

async fn faults_command(base: &Config, a: &BenchArgs) -> Result<(), BenchError> {
    let fail = |e: &dyn std::fmt::Display| BenchError::Failed(e.to_string());
    let tmp = tempfile::tempdir().map_err(|e| fail(&e))?;
    let exe = match &a.server_exe {
        Some(p) => p.clone(),
        None => std::env::current_exe().map_err(|e| fail(&e))?,
    };
    let tiny = || -> Result<crate::config::ModelConfig, BenchError> {
        let path = crate::engine::tiny_model::write_tiny_model(tmp.path()).map_err(|e| fail(&e))?;
        let mut m = crate::config::ModelConfig::new("tiny", path, 1_000);
        m.chunk_tokens = 4;
        m.max_concurrent = 32;
        m.max_queue = 64;
        Ok(m)
    };
    match a.model.as_str() {
        "longrun" => {
            let m = tiny()?;
            let report = super::longrun::long_run(
                &exe,
                &m.path,
                super::longrun::Options {
                    invoices: a.sessions.map_or(100_000, |n| n as u64),
                    // 12 streams of at most 4 unpaid invoices (the bench caps a session's
                    // unpaid tokens at 8): under the 50 HTLCs LDK lets one channel carry.
                    streams: 12,
                    chunk_tokens: 2,
                    tokens: 64,
                },
            )
            .await?;
            println!("{report}");
        }
        "chaos" => {
            let n = a.sessions.unwrap_or(24);
            let r = super::faults::chaos(&exe, &tiny()?, n, std::time::Duration::from_millis(1500))
                .await?;
            println!(
                "| chaos | value |\n|---|---|\n| sessions | {} |\n| kills (SIGKILL) | {} |\n\
                 | payments succeeded / failed (payer) | {} / {} |\n| force-closes | {} |\n\
                 | msat unaccounted (goal 0) | {} |\n| HTLCs unresolved 60 s after restart (goal 0) | {} |\n\
                 | msat written off as lost | {} |",
                r.sessions,
                r.kills,
                r.payments_succeeded,
                r.payments_failed,
                r.force_closes,
                r.unaccounted_msat,
                r.unresolved_after_60s,
                r.lost_msat
            );
            if !r.problems.is_empty() {
                return Err(BenchError::Failed(format!(
                    "broken promises: {:#?}",
                    r.problems
                )));
            }
        }
        "tls" => println!("{}", super::transport::compare(&tiny()?).await?),
        "rpc" => {
            let n = a.sessions.unwrap_or(32);
            let r = super::faults::load(&exe, &tiny()?, n, 256).await?;
            println!(
                "ListModels while {n} paid sessions stream ({}): p50 {:.2} ms, p99 {:.2} ms, \
                 max {:.2} ms ({} probes); {}/{n} streams done, server peak RSS {:.0} MB",
                exe.display(),
                super::pct(&r.probe_ms, 0.5),
                super::pct(&r.probe_ms, 0.99),
                super::pct(&r.probe_ms, 1.0),
                r.probe_ms.len(),
                r.completed,
                r.peak_rss_mb
            );
        }
        _ => {
            let n = a.sessions.unwrap_or(1000);
            let m = first_model(base)?;
            let curve = super::faults::soak(&exe, &m, n, (n / 10).max(1), 8).await?;
            println!(
                "| generations | server RSS MB ({}, {}) |\n|---|---|",
                m.path.display(),
                m.backend.as_str()
            );
            for (i, mb) in &curve {
                println!("| {i} | {mb:.0} |");
            }
        }
    }
    Ok(())
}

fn first_model(base: &Config) -> Result<crate::config::ModelConfig, BenchError> {
    base.models
        .first()
        .cloned()
        .ok_or_else(|| BenchError::Failed("the configuration has no model".into()))
}
