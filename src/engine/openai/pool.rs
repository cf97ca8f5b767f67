//! The replicas of one remote model: health checks, and least-loaded routing among the healthy.
//!
//! A replica is healthy when its last `GET /models` answered and listed the model. A request
//! that cannot reach a replica, or a stream that breaks, marks it unhealthy at once (the next
//! check may restore it), so that no new work goes to an engine that just failed.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use serde::Deserialize;
use tracing::{info, warn};

pub(super) struct Replica {
    pub url: String,
    in_flight: AtomicU32,
    healthy: AtomicBool,
    /// Why the last check failed (for the error a client sees when nothing is healthy).
    last_error: Mutex<String>,
}

pub(super) struct Pool {
    /// The satstream model id (logs, metrics).
    pub model: String,
    /// The upstream's name for it.
    pub upstream_model: String,
    pub client: reqwest::Client,
    pub api_key: Option<String>,
    replicas: Vec<Replica>,
    /// Where ties between equally loaded replicas start, rotated per pick.
    rotate: AtomicUsize,
    timeout: Duration,
}

/// One request's claim on a replica; counted in its load until dropped.
pub(super) struct Lease {
    pool: Arc<Pool>,
    pub idx: usize,
    /// Reported to metrics when the lease ends (a segment aborted mid-stream was cancelled).
    pub outcome: &'static str,
}

impl Lease {
    pub fn url(&self) -> &str {
        &self.pool.replicas[self.idx].url
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let r = &self.pool.replicas[self.idx];
        r.in_flight.fetch_sub(1, Ordering::SeqCst);
        crate::metrics::upstream_request(&self.pool.model, &r.url, self.outcome);
    }
}

#[derive(Deserialize)]
struct Models {
    data: Vec<ModelEntry>,
}

#[derive(Deserialize)]
struct ModelEntry {
    id: String,
}

/// How a health check went.
pub(super) enum Check {
    Healthy,
    /// Reachable, but it refuses the key or does not serve the model: a configuration error,
    /// not an outage.
    Misconfigured(String),
    Unreachable(String),
}

impl Pool {
    pub fn new(
        model: String,
        upstream_model: String,
        urls: &[String],
        api_key: Option<String>,
        timeout: Duration,
    ) -> Result<Arc<Pool>, String> {
        let client = reqwest::Client::builder()
            .connect_timeout(timeout)
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        let replicas = urls
            .iter()
            .map(|u| Replica {
                url: u.trim_end_matches('/').to_string(),
                in_flight: AtomicU32::new(0),
                healthy: AtomicBool::new(false),
                last_error: Mutex::new("not checked yet".into()),
            })
            .collect();
        Ok(Arc::new(Pool {
            model,
            upstream_model,
            client,
            api_key,
            replicas,
            rotate: AtomicUsize::new(0),
            timeout,
        }))
    }

    pub fn url(&self, idx: usize) -> &str {
        &self.replicas[idx].url
    }

    pub fn request(&self, method: reqwest::Method, url: String) -> reqwest::RequestBuilder {
        let b = self.client.request(method, url);
        match &self.api_key {
            Some(k) => b.bearer_auth(k),
            None => b,
        }
    }

    /// The least-loaded healthy replica not in `exclude` (ties rotate).
    pub fn pick(self: &Arc<Self>, exclude: &[usize]) -> Option<Lease> {
        let n = self.replicas.len();
        let start = self.rotate.fetch_add(1, Ordering::Relaxed);
        let idx = (0..n)
            .map(|k| (start + k) % n)
            .filter(|i| !exclude.contains(i) && self.replicas[*i].healthy.load(Ordering::SeqCst))
            .min_by_key(|i| self.replicas[*i].in_flight.load(Ordering::SeqCst))?;
        self.replicas[idx].in_flight.fetch_add(1, Ordering::SeqCst);
        Some(Lease {
            pool: self.clone(),
            idx,
            outcome: "cancelled",
        })
    }

    pub fn any_healthy(&self) -> bool {
        self.replicas
            .iter()
            .any(|r| r.healthy.load(Ordering::SeqCst))
    }

    /// Why no replica can take work: each one's last error.
    pub fn why_unavailable(&self) -> String {
        let each: Vec<String> = self
            .replicas
            .iter()
            .map(|r| {
                let e = r.last_error.lock().unwrap_or_else(|p| p.into_inner());
                format!("{}: {}", r.url, e)
            })
            .collect();
        format!("no upstream replica is healthy ({})", each.join("; "))
    }

    /// Records a replica's state; logs transitions only.
    pub fn mark(&self, idx: usize, healthy: bool, why: &str) {
        let r = &self.replicas[idx];
        let was = r.healthy.swap(healthy, Ordering::SeqCst);
        if !healthy {
            *r.last_error.lock().unwrap_or_else(|p| p.into_inner()) = why.to_string();
        }
        if was != healthy {
            if healthy {
                info!(model = %self.model, url = %r.url, "upstream replica healthy");
            } else {
                warn!(model = %self.model, url = %r.url, reason = why, "upstream replica unhealthy");
            }
        }
        crate::metrics::upstream_health(&self.model, &r.url, healthy);
    }

    /// `GET /models` on one replica, within the connect timeout.
    pub async fn check(&self, idx: usize) -> Check {
        let url = format!("{}/models", self.replicas[idx].url);
        let resp = self
            .request(reqwest::Method::GET, url)
            .timeout(self.timeout)
            .send()
            .await;
        let resp = match resp {
            Ok(r) if r.status().is_success() => r,
            Ok(r) if matches!(r.status().as_u16(), 401 | 403) => {
                return Check::Misconfigured(format!(
                    "GET /models answered {}: set the upstream's API key in \
                     upstream.api_key_file or upstream.api_key_env",
                    r.status()
                ))
            }
            Ok(r) => return Check::Unreachable(format!("GET /models answered {}", r.status())),
            Err(e) => return Check::Unreachable(error_chain(&e)),
        };
        let models: Models = match resp.json().await {
            Ok(m) => m,
            Err(e) => return Check::Unreachable(format!("GET /models: {}", error_chain(&e))),
        };
        if models.data.iter().any(|m| m.id == self.upstream_model) {
            Check::Healthy
        } else {
            let ids: Vec<&str> = models.data.iter().map(|m| m.id.as_str()).collect();
            Check::Misconfigured(format!(
                "it serves {ids:?}, not {:?} (set upstream.model)",
                self.upstream_model
            ))
        }
    }

    /// Checks every replica now and records the results.
    pub async fn check_all(&self) -> Vec<Check> {
        let checks =
            futures_util::future::join_all((0..self.replicas.len()).map(|i| self.check(i))).await;
        for (i, c) in checks.iter().enumerate() {
            match c {
                Check::Healthy => self.mark(i, true, ""),
                Check::Misconfigured(e) | Check::Unreachable(e) => self.mark(i, false, e),
            }
        }
        checks
    }

    /// Re-checks every replica every `every` for as long as the pool is in use.
    pub fn spawn_health_checks(self: &Arc<Self>, every: Duration) {
        let weak: Weak<Pool> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(pool) = weak.upgrade() else { return };
                pool.check_all().await;
            }
        });
    }
}

/// An error with its causes ("error sending request: connection refused").
pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        let text = cause.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        src = cause.source();
    }
    s
}
