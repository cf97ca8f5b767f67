//! Logging (tracing) with known noise classified for what it is, so that an ERROR always means
//! something is wrong:
//! - on regtest, bitcoind has no fee estimates on a young chain and ldk-node logs "Failed to
//!   retrieve fee rate estimates" as an ERROR on every sync while falling back to its default
//!   rate: that is how regtest is, not an error. It is dropped on regtest (and said once, at
//!   INFO); on every other network it stays an ERROR.
//! - mistral.rs warns about "a mix of GPU and CPU" device mapping on a CPU-only machine, where
//!   there is no such mix: dropped.

use std::sync::atomic::{AtomicBool, Ordering};
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// Drops the known-noise events described above.
pub struct KnownNoise {
    pub regtest: bool,
    told: AtomicBool,
}

impl KnownNoise {
    pub fn new(regtest: bool) -> Self {
        KnownNoise {
            regtest,
            told: AtomicBool::new(false),
        }
    }
}

struct Message(String);

impl Visit for Message {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

impl<S: tracing::Subscriber> Layer<S> for KnownNoise {
    fn event_enabled(&self, event: &tracing::Event<'_>, _: Context<'_, S>) -> bool {
        let target = event.metadata().target();
        let fees = self.regtest && target.starts_with("ldk_node::chain");
        let device = target.starts_with("mistralrs");
        if !fees && !device {
            return true;
        }
        let mut m = Message(String::new());
        event.record(&mut m);
        if fees && m.0.contains("fee rate estimates") {
            if !self.told.swap(true, Ordering::Relaxed) {
                tracing::info!(
                    "regtest: bitcoind has no fee estimates yet; LDK uses its fallback fee rate"
                );
            }
            return false;
        }
        !(device && m.0.contains("mix of GPU and CPU"))
    }
}

/// Initialises logging to stderr with `filter` (EnvFilter syntax).
pub fn init(filter: &str, regtest: bool) -> Result<(), tracing_subscriber::filter::ParseError> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)?;
    tracing_subscriber::registry()
        .with(KnownNoise::new(regtest))
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .init();
    Ok(())
}
