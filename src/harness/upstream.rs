//! Real upstreams for the `openai` backend's tests and benchmarks:
//! - llama-cpp-python's OpenAI-compatible server (installed by `scripts/setup-upstream.sh`),
//!   run through `scripts/upstream.py`, which adds `GET /satstream/stats`: the tokens the
//!   upstream's engine sampled, counted on its own side;
//! - llama.cpp's own `llama-server` (built by `scripts/setup-llama-server.sh`), spoken to by
//!   its native API (`upstream.api = "llama.cpp"`).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde::Deserialize;

use super::bitcoind::{free_port, spawn_kept};
use super::HarnessError;
use crate::config::UpstreamApi;

/// The launcher, built into the binary so that no checkout path is needed at run time.
const LAUNCHER: &str = include_str!("../../scripts/upstream.py");

/// The upstream's own counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct UpstreamStats {
    /// Tokens its engine sampled since start (a sampled end-of-sequence token included).
    pub sampled: u64,
    /// Requests that got the model.
    pub requests: u64,
    /// Requests generating now.
    pub active: u64,
}

pub struct Upstream {
    child: Child,
    _keeper: std::sync::mpsc::Sender<()>,
    _dir: tempfile::TempDir,
    /// The base URL the backend is configured with (`http://127.0.0.1:P/v1` for OpenAI's API,
    /// `http://127.0.0.1:P` for llama.cpp's).
    pub url: String,
    /// The model name it serves.
    pub model: String,
    /// The API the backend speaks to it.
    pub api: UpstreamApi,
    http: reqwest::Client,
}

/// `llama-server`: `SATSTREAM_LLAMA_SERVER`, else the binary `scripts/setup-llama-server.sh`
/// builds.
pub fn llama_server() -> Result<PathBuf, HarnessError> {
    if let Some(p) = std::env::var_os("SATSTREAM_LLAMA_SERVER") {
        return Ok(PathBuf::from(p));
    }
    let bin = cache_dir()?.join("llama-server-0.3.36/llama-server");
    if bin.exists() {
        Ok(bin)
    } else {
        Err(HarnessError::Setup(format!(
            "{} is missing: run scripts/setup-llama-server.sh (or set SATSTREAM_LLAMA_SERVER)",
            bin.display()
        )))
    }
}

fn cache_dir() -> Result<PathBuf, HarnessError> {
    std::env::var_os("SATSTREAM_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/satstream")))
        .ok_or_else(|| HarnessError::Setup("HOME is not set".into()))
}

/// The last lines of a child's log, for a start-up failure's message.
fn log_tail(path: &Path) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().rev().take(15).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// The Python interpreter that has llama-cpp-python: `SATSTREAM_UPSTREAM_PYTHON`, else the
/// venv `scripts/setup-upstream.sh` makes.
pub fn python() -> Result<PathBuf, HarnessError> {
    if let Some(p) = std::env::var_os("SATSTREAM_UPSTREAM_PYTHON") {
        return Ok(PathBuf::from(p));
    }
    let py = cache_dir()?.join("upstream-venv/bin/python");
    if py.exists() {
        Ok(py)
    } else {
        Err(HarnessError::Setup(format!(
            "{} is missing: run scripts/setup-upstream.sh (or set SATSTREAM_UPSTREAM_PYTHON)",
            py.display()
        )))
    }
}

impl Upstream {
    /// Starts a server for `model` (served under the name `name`) on a free port, with
    /// `threads` threads, and returns once it answers.
    pub async fn start(
        model: &Path,
        name: &str,
        n_ctx: u32,
        threads: u32,
    ) -> Result<Upstream, HarnessError> {
        Self::start_with(model, name, n_ctx, threads, &[]).await
    }

    /// [`Upstream::start`] with more llama_cpp.server settings (`["--api_key", "k"]`).
    pub async fn start_with(
        model: &Path,
        name: &str,
        n_ctx: u32,
        threads: u32,
        extra: &[&str],
    ) -> Result<Upstream, HarnessError> {
        let setup = |e: String| HarnessError::Setup(format!("upstream: {e}"));
        let py = python()?;
        let dir = tempfile::tempdir().map_err(|e| setup(e.to_string()))?;
        let script = dir.path().join("upstream.py");
        std::fs::write(&script, LAUNCHER).map_err(|e| setup(e.to_string()))?;
        let log = std::fs::File::create(dir.path().join("upstream.log"))
            .map_err(|e| setup(e.to_string()))?;
        let mut cmd = Command::new(&py);
        cmd.arg(&script)
            .arg("--model")
            .arg(model)
            .args(["--model_alias", name, "--port", "0"])
            .args(["--n_ctx", &n_ctx.to_string()])
            .args(["--n_threads", &threads.to_string()])
            .args(["--n_threads_batch", &threads.to_string()])
            // Per-token logits for every position (logprobs) are not needed, and cost
            // n_ctx × vocabulary floats.
            .args(["--logits_all", "false"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        let (mut child, keeper) =
            spawn_kept(cmd, "upstream").map_err(|e| setup(format!("{}: {e}", py.display())))?;
        let stdout = child.stdout.take().expect("piped");
        // The ready line carries the port; read it off the async workers, with a deadline.
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let port = lines.find_map(|l| {
                l.ok()?
                    .strip_prefix("upstream ready on 127.0.0.1:")?
                    .trim()
                    .parse::<u16>()
                    .ok()
            });
            let _ = tx.send(port);
            // Keep draining so the child never blocks on a full pipe.
            lines.for_each(drop);
        });
        let port = match tokio::time::timeout(Duration::from_secs(60), rx).await {
            Ok(Ok(Some(p))) => p,
            _ => {
                let _ = child.kill();
                return Err(setup(format!(
                    "did not start within 60 s; its log ends:\n{}",
                    log_tail(&dir.path().join("upstream.log"))
                )));
            }
        };
        Ok(Upstream {
            child,
            _keeper: keeper,
            _dir: dir,
            url: format!("http://127.0.0.1:{port}/v1"),
            model: name.to_string(),
            api: UpstreamApi::Openai,
            http: reqwest::Client::new(),
        })
    }

    /// Starts llama.cpp's `llama-server` for `model` (served as `name`) with `parallel` slots
    /// of `n_ctx` tokens each and `threads` threads, and returns once its `/health` answers.
    pub async fn start_llama_server(
        model: &Path,
        name: &str,
        n_ctx: u32,
        threads: u32,
        parallel: u32,
    ) -> Result<Upstream, HarnessError> {
        let setup = |e: String| HarnessError::Setup(format!("llama-server: {e}"));
        let bin = llama_server()?;
        let dir = tempfile::tempdir().map_err(|e| setup(e.to_string()))?;
        let log_path = dir.path().join("llama-server.log");
        let http = reqwest::Client::new();
        // A port picked free can be taken before the server binds it: then another one.
        for _ in 0..3 {
            let port = free_port();
            let log = std::fs::File::create(&log_path).map_err(|e| setup(e.to_string()))?;
            let mut cmd = Command::new(&bin);
            cmd.arg("--model")
                .arg(model)
                .args(["--alias", name, "--host", "127.0.0.1"])
                .args(["--port", &port.to_string()])
                .args(["--ctx-size", &(n_ctx * parallel).to_string()])
                .args(["--parallel", &parallel.to_string()])
                .args(["--threads", &threads.to_string()])
                .args(["--threads-batch", &threads.to_string()])
                // Its AMX weight repacking crashes on the tiny model's tensors on CPUs that
                // have AMX (this CI's Xeon), seen as a SIGSEGV in ggml_backend_amx_mul_mat.
                .arg("--no-repack")
                .arg("--no-warmup")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log);
            let (mut child, keeper) = spawn_kept(cmd, "llama-server")
                .map_err(|e| setup(format!("{}: {e}", bin.display())))?;
            let health = format!("http://127.0.0.1:{port}/health");
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            let up = loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break false; // exited: the port was taken, or a real failure (logged)
                }
                let ok = http
                    .get(&health)
                    .timeout(Duration::from_secs(2))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                if ok {
                    break true;
                }
                if tokio::time::Instant::now() > deadline {
                    let _ = child.kill();
                    return Err(setup(format!(
                        "did not answer /health within 60 s; its log ends:\n{}",
                        log_tail(&log_path)
                    )));
                }
                // Loading takes a few hundred ms; /health is the only sign of it being done.
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            if up {
                return Ok(Upstream {
                    child,
                    _keeper: keeper,
                    _dir: dir,
                    url: format!("http://127.0.0.1:{port}"),
                    model: name.to_string(),
                    api: UpstreamApi::Llamacpp,
                    http,
                });
            }
            if !log_tail(&log_path).contains("bind") {
                break;
            }
        }
        Err(setup(format!(
            "exited at start; its log ends:\n{}",
            log_tail(&log_path)
        )))
    }

    fn base(&self) -> &str {
        self.url.trim_end_matches("/v1")
    }

    pub async fn stats(&self) -> Result<UpstreamStats, HarnessError> {
        let err = |e: reqwest::Error| HarnessError::Setup(format!("upstream stats: {e}"));
        self.http
            .get(format!("{}/satstream/stats", self.base()))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map_err(err)?
            .json()
            .await
            .map_err(err)
    }

    /// Stats once no request is generating (then `sampled` is final for every ended request).
    pub async fn idle_stats(&self, within: Duration) -> Result<UpstreamStats, HarnessError> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let s = self.stats().await?;
            if s.active == 0 {
                return Ok(s);
            }
            if tokio::time::Instant::now() > deadline {
                return Err(HarnessError::Timeout("the upstream to go idle"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A streamed completion straight from the upstream (no gateway): the texts of its events
    /// and how long the stream took from the request to its end.
    pub async fn complete(
        &self,
        prompt: &str,
        max_tokens: u32,
    ) -> Result<(Vec<String>, Duration), HarnessError> {
        use eventsource_stream::Eventsource;
        use futures_util::StreamExt;
        let err = |e: String| HarnessError::Setup(format!("upstream completion: {e}"));
        let started = std::time::Instant::now();
        let resp = self
            .http
            .post(format!("{}/v1/completions", self.base()))
            .json(&serde_json::json!({
                "model": self.model, "prompt": prompt, "max_tokens": max_tokens,
                "temperature": 0.0, "stream": true,
            }))
            .send()
            .await
            .map_err(|e| err(e.to_string()))?;
        let mut events = resp.bytes_stream().eventsource();
        let mut texts = Vec::new();
        while let Some(ev) = events.next().await {
            let ev = ev.map_err(|e| err(e.to_string()))?;
            if ev.data.trim() == "[DONE]" {
                break;
            }
            let v: serde_json::Value =
                serde_json::from_str(&ev.data).map_err(|e| err(e.to_string()))?;
            if let Some(t) = v["choices"][0]["text"].as_str().filter(|t| !t.is_empty()) {
                texts.push(t.to_string());
            }
        }
        Ok((texts, started.elapsed()))
    }

    /// SIGSTOP (`true`) or SIGCONT (`false`): a hung engine host, whose connections stay open
    /// but say nothing.
    pub fn freeze(&self, frozen: bool) {
        let sig = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
        // SAFETY: a plain signal to our own child's pid.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, sig);
        }
    }

    /// SIGKILL, as a crashed engine host.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.kill();
    }
}
