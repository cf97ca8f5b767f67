//! Engine benchmark on SmolLM2-135M-Instruct (install with scripts/setup-model.sh).
//! Run: `cargo bench --bench engine`. Not a test: it prints numbers, it asserts nothing beyond
//! the outputs being well-formed.
//!
//! Measures: load time; time to first token (~30 and ~300 prompt tokens); decode tok/s over 256
//! tokens; peak RSS; aggregate tok/s with 1/2/4 concurrent streams; the engine's overhead
//! (driver + per-token accounting + forced-EOS step) against a bare mistral.rs stream of the
//! same prompt; and the cost of a pause/resume (first token after raising the allowance).
//!
//! Every measured prompt starts with a unique tag so mistral.rs's prefix cache never turns a
//! measurement into a cache hit, except where the cache is the point (resume).

use std::path::Path;
use std::time::{Duration, Instant};

use mistralrs::{
    Constraint, GgufModelBuilder, NormalRequest, Request, RequestMessage, Response, SamplingParams,
    TokenSource,
};
use satstream::config::ModelConfig;
use satstream::engine::{Engine, EventStream, GenerateParams, Prompt, TokenEvent};

const STORY: &str = "The old lighthouse keeper climbed the spiral stairs every evening, counting \
the steps as his father had taught him, and each night he wrote in a leather notebook what the \
sea had brought to the rocks below: driftwood, glass floats, a child's shoe, once a letter \
sealed in wax that he never dared to open. ";

fn vm_hwm_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// A prompt of roughly `words` words, unique per `tag`.
fn prompt_text(tag: &str, words: usize) -> String {
    let mut s = format!("[{tag}] ");
    let story: Vec<&str> = STORY.split_whitespace().collect();
    for i in 0..words {
        s.push_str(story[i % story.len()]);
        s.push(' ');
    }
    s.push_str("Continue the story:");
    s
}

struct Run {
    ttft: Duration,
    /// Time between the first and the last token.
    decode: Duration,
    tokens: u32,
    total: Duration,
}

impl Run {
    /// From the request's start, the first and last token's times (no token: all at `last`).
    fn timed(start: Instant, first: Option<Instant>, last: Instant, tokens: u32) -> Run {
        let first = first.unwrap_or(last);
        Run {
            ttft: first - start,
            decode: last - first,
            tokens,
            total: start.elapsed(),
        }
    }

    fn decode_tps(&self) -> f64 {
        if self.tokens < 2 {
            return f64::NAN;
        }
        (self.tokens - 1) as f64 / self.decode.as_secs_f64()
    }
}

async fn drain(start: Instant, ev: &mut EventStream) -> Run {
    let mut first = None;
    let mut last = start;
    let mut tokens = 0;
    while let Some(e) = ev.recv().await {
        match e {
            TokenEvent::Token { .. } => {
                let now = Instant::now();
                first.get_or_insert(now);
                last = now;
                tokens += 1;
            }
            TokenEvent::Paused { .. } => panic!("unexpected pause"),
            TokenEvent::Finished { .. } => break,
        }
    }
    Run::timed(start, first, last, tokens)
}

async fn engine_run(engine: &Engine, prompt: &str, max_tokens: u32) -> Run {
    let start = Instant::now();
    let mut g = engine
        .generate(
            "smollm2",
            GenerateParams::new(Prompt::Text(prompt.into()), max_tokens),
        )
        .await
        .expect("generate");
    drain(start, &mut g.events).await
}

/// The same request straight to mistral.rs: streaming, greedy, its own max_len, chunks read
/// in place. The reference for the engine's overhead.
async fn raw_run(model: &mistralrs::Model, prompt: &str, max_tokens: u32) -> Run {
    let runner = model.inner();
    let (tx, mut rx) = tokio::sync::mpsc::channel(max_tokens as usize + 4);
    let req = NormalRequest {
        messages: RequestMessage::Completion {
            text: prompt.into(),
            echo_prompt: false,
            best_of: None,
        },
        sampling_params: SamplingParams {
            max_len: Some(max_tokens as usize),
            // None would mean 1.0 in mistral.rs; 0 selects greedy like the engine runs.
            temperature: Some(0.0),
            ..SamplingParams::neutral()
        },
        response: tx,
        return_logprobs: false,
        is_streaming: true,
        id: runner.next_request_id(),
        constraint: Constraint::None,
        suffix: None,
        tools: None,
        tool_choice: None,
        logits_processors: None,
        return_raw_logits: false,
        web_search_options: None,
        model_id: None,
        truncate_sequence: false,
    };
    let start = Instant::now();
    runner
        .get_sender(None)
        .unwrap()
        .send(Request::Normal(Box::new(req)))
        .await
        .unwrap();
    let mut first = None;
    let mut last = start;
    let mut tokens = 0u32;
    while let Some(r) = rx.recv().await {
        let done = match r {
            Response::CompletionChunk(c) => {
                let now = Instant::now();
                first.get_or_insert(now);
                last = now;
                tokens += 1;
                c.choices.iter().any(|c| c.finish_reason.is_some())
            }
            Response::InternalError(e) | Response::ValidationError(e) => panic!("{e}"),
            Response::CompletionModelError(e, _) => panic!("{e}"),
            _ => false,
        };
        if done {
            break;
        }
    }
    Run::timed(start, first, last, tokens)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.exists() {
        println!(
            "SKIPPED: {} not found; run scripts/setup-model.sh first",
            path.display()
        );
        return;
    }
    println!("satstream engine benchmark — SmolLM2-135M-Instruct Q4_1, CPU");
    println!(
        "RAYON_NUM_THREADS={}",
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "unset".into())
    );

    let cfg = ModelConfig::new("smollm2", path.clone(), 1000);
    let t = Instant::now();
    let engine = Engine::load(&[cfg]).await.expect("load");
    println!(
        "load: {:.2} s (context {} tokens)",
        t.elapsed().as_secs_f64(),
        engine.models()[0].context_length
    );

    // Warm-up (first request pays one-time allocations).
    engine_run(&engine, &prompt_text("warm", 10), 8).await;

    // Time to first token. The engine reports a token when the next step observes it, so this
    // includes prefill plus one decode step.
    for (words, label) in [(20, "~30"), (230, "~300")] {
        let mut ttfts = Vec::new();
        let mut ntoks = 0;
        for i in 0..3 {
            let p = prompt_text(&format!("ttft{words}-{i}"), words);
            ntoks = engine
                .count_prompt_tokens("smollm2", &Prompt::Text(p.clone()))
                .await
                .unwrap();
            ttfts.push(engine_run(&engine, &p, 1).await.ttft.as_secs_f64());
        }
        println!(
            "time to first token, {label} prompt ({ntoks} tokens): median {:.3} s of {:?}",
            median(ttfts.clone()),
            ttfts
                .iter()
                .map(|x| (x * 1000.0).round() / 1000.0)
                .collect::<Vec<_>>()
        );
    }

    // Decode rate over 256 tokens.
    let r = engine_run(&engine, &prompt_text("decode", 20), 256).await;
    println!(
        "decode: {} tokens, {:.1} tok/s (ttft {:.3} s, total {:.2} s)",
        r.tokens,
        r.decode_tps(),
        r.ttft.as_secs_f64(),
        r.total.as_secs_f64()
    );
    println!("peak RSS (VmHWM) after one model: {:.0} MB", vm_hwm_mb());

    // Aggregate throughput with concurrent streams.
    for n in [1usize, 2, 4] {
        let start = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..n {
            let e = engine.clone();
            tasks.push(tokio::spawn(async move {
                engine_run(&e, &prompt_text(&format!("conc{n}-{i}"), 20), 128).await
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.unwrap().tokens;
        }
        let wall = start.elapsed().as_secs_f64();
        println!(
            "{n} concurrent stream(s): {total} tokens in {wall:.2} s = {:.1} tok/s aggregate (prefill included)",
            total as f64 / wall
        );
    }

    // Engine vs bare mistral.rs, same prompt length, greedy, 256 tokens, alternating.
    let t = Instant::now();
    let raw = GgufModelBuilder::new(
        path.parent().unwrap().to_str().unwrap(),
        vec![path.file_name().unwrap().to_str().unwrap()],
    )
    .with_token_source(TokenSource::None)
    .with_force_cpu()
    .with_max_num_seqs(4)
    .build()
    .await
    .expect("raw load");
    println!(
        "(second, bare mistral.rs instance loaded in {:.2} s)",
        t.elapsed().as_secs_f64()
    );
    raw_run(&raw, &prompt_text("rawwarm", 10), 8).await;
    let (mut e_tps, mut r_tps, mut e_tot, mut r_tot, mut e_ttft, mut r_ttft) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for i in 0..3 {
        let r = raw_run(&raw, &prompt_text(&format!("cmp-raw-{i}"), 20), 256).await;
        let e = engine_run(&engine, &prompt_text(&format!("cmp-eng-{i}"), 20), 256).await;
        // Greedy output may end early (EOS); rates are per token, so runs stay comparable.
        println!(
            "  trial {i}: bare {} tokens, engine {} tokens",
            r.tokens, e.tokens
        );
        r_tps.push(r.decode_tps());
        e_tps.push(e.decode_tps());
        r_tot.push(r.total.as_secs_f64());
        e_tot.push(e.total.as_secs_f64());
        r_ttft.push(r.ttft.as_secs_f64());
        e_ttft.push(e.ttft.as_secs_f64());
    }
    let (et, rt) = (median(e_tot), median(r_tot));
    println!(
        "overhead, up to 256 tokens x3 (median): bare mistral.rs {:.1} tok/s, total {:.2} s, ttft {:.3} s | \
         engine {:.1} tok/s, total {:.2} s, ttft {:.3} s | engine/bare total time {:+.1}%",
        median(r_tps),
        rt,
        median(r_ttft),
        median(e_tps),
        et,
        median(e_ttft),
        (et / rt - 1.0) * 100.0
    );
    drop(raw);

    // Pause/resume: pause after 64 tokens, raise the allowance, time the first resumed token.
    let mut resume = Vec::new();
    let mut fresh = Vec::new();
    for i in 0..3 {
        let p = prompt_text(&format!("pause-{i}"), 230);
        let mut params = GenerateParams::new(Prompt::Text(p.clone()), 96);
        params.allowance = 64;
        let mut g = engine.generate("smollm2", params).await.unwrap();
        loop {
            match g.events.recv().await.unwrap() {
                TokenEvent::Paused { generated } => {
                    assert_eq!(generated, 64);
                    break;
                }
                TokenEvent::Finished { .. } => panic!("finished before the pause"),
                TokenEvent::Token { .. } => {}
            }
        }
        let t = Instant::now();
        g.handle.set_allowance(u32::MAX);
        match g.events.recv().await.unwrap() {
            TokenEvent::Token { index, .. } => assert_eq!(index, 64),
            other => panic!("{other:?}"),
        }
        resume.push(t.elapsed().as_secs_f64());
        while g.events.recv().await.is_some() {}
        // Reference: a cold request of the same total length (prompt + 64 tokens) — what a
        // resume would cost without the prefix cache.
        let cold = format!(
            "{} {}",
            prompt_text(&format!("cold-{i}"), 230),
            "and ".repeat(64)
        );
        fresh.push(engine_run(&engine, &cold, 1).await.ttft.as_secs_f64());
    }
    println!(
        "pause/resume (~300-token prompt, paused at 64): first token after resume median {:.3} s \
         (cold request of the same length: {:.3} s)",
        median(resume),
        median(fresh)
    );
    println!(
        "peak RSS (VmHWM) at the end (two model instances were loaded): {:.0} MB",
        vm_hwm_mb()
    );
}
