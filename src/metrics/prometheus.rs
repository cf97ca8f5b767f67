//! Prometheus export (`metrics` with `metrics-exporter-prometheus`, the pair mistral.rs uses):
//! `/metrics` on its own listener. Names follow Prometheus conventions (`satstream_` prefix,
//! `_total` counters, `_seconds` and `_msat` units); labels are small fixed sets (mode, end
//! reason, state), never payment hashes or session ids.

use metrics_exporter_prometheus::PrometheusBuilder;
use std::net::SocketAddr;
use std::sync::OnceLock;

/// Histogram buckets for latencies, seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Payment → tokens, finer where a loaded server's tail lies (10-500 ms): a p99 read from
/// these buckets (e.g. by `bench --model longrun`) is good to a few percent.
const PAYMENT_TO_TOKENS_BUCKETS: &[f64] = &[
    0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.12, 0.15, 0.2,
    0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
];

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("{0:?} is not host:port")]
    Address(String),
    #[error("{0}")]
    Install(String),
    #[error("this process already exports metrics on {0}")]
    AlreadyOn(SocketAddr),
}

static INSTALLED: OnceLock<SocketAddr> = OnceLock::new();

/// Installs the process-wide recorder and serves `/metrics` on `listen`. Once per process
/// (the recorder is global).
pub fn install(listen: &str) -> Result<SocketAddr, MetricsError> {
    let addr: SocketAddr = listen
        .parse()
        .map_err(|_| MetricsError::Address(listen.to_string()))?;
    if let Some(a) = INSTALLED.get() {
        return Err(MetricsError::AlreadyOn(*a));
    }
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
            LATENCY_BUCKETS,
        )
        .map_err(|e| MetricsError::Install(e.to_string()))?
        // A full name is matched before any suffix.
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(
                "satstream_payment_to_tokens_seconds".into(),
            ),
            PAYMENT_TO_TOKENS_BUCKETS,
        )
        .map_err(|e| MetricsError::Install(e.to_string()))?
        .install()
        .map_err(|e| MetricsError::Install(e.to_string()))?;
    let _ = INSTALLED.set(addr);
    super::describe();
    tracing::info!(%addr, "Prometheus metrics on /metrics");
    Ok(addr)
}
