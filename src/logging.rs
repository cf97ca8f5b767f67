//! Logging (tracing) with known noise classified for what it is, so that an ERROR always means
//! something is wrong:
//! - on regtest, bitcoind has no fee estimates on a young chain and ldk-node logs "Failed to
//!   retrieve fee rate estimates" as an ERROR on every sync while falling back to its default
//!   rate: that is how regtest is, not an error. It is dropped on regtest (and said once, at
//!   INFO); on every other network it stays an ERROR.
//! - mistral.rs warns about "a mix of GPU and CPU" device mapping on a CPU-only machine, where
//!   there is no such mix: dropped.
//!
//! And secrets never reach a log: LDK itself logs preimages at DEBUG ("Claiming inbound HTLC
//! … with preimage …"), and a preimage is an ATOMIC chunk's key. Every line written is
//! scrubbed ([`Redact`]): a long hex string near the word "preimage" becomes `<redacted>`.
//! satstream's own code never logs tokens, preimages, keys or seeds in the first place.

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
        use tracing_log::NormalizeEvent;
        // Records from the `log` crate (ldk-node's) carry their real target in fields.
        let normalized = event.normalized_metadata();
        let target = normalized
            .as_ref()
            .map(|m| m.target())
            .unwrap_or_else(|| event.metadata().target());
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
        .with(tracing_subscriber::fmt::layer().with_writer(|| Redact(std::io::stderr())))
        .init();
    Ok(())
}

/// A writer that scrubs preimages from what it writes (each log line is one write).
pub struct Redact<W>(pub W);

impl<W: std::io::Write> std::io::Write for Redact<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        self.0.write_all(scrub(&text).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Replaces every run of at least 64 hex digits that starts within 48 bytes after the word
/// "preimage" (any case) with `<redacted>`.
pub fn scrub(line: &str) -> String {
    let lower = line.to_ascii_lowercase();
    if !lower.contains("preimage") {
        return line.to_string();
    }
    let bytes = line.as_bytes();
    let mut out = String::with_capacity(line.len());
    let mut i = 0;
    let mut armed_until = 0usize;
    while i < bytes.len() {
        if lower[i..].starts_with("preimage") {
            armed_until = i + "preimage".len() + 48;
        }
        let run = bytes[i..]
            .iter()
            .take_while(|b| b.is_ascii_hexdigit())
            .count();
        if run >= 64 && i <= armed_until {
            out.push_str("<redacted>");
            i += run;
            continue;
        }
        let step = if run > 0 { run } else { 1 };
        let end = (i + step).min(bytes.len());
        // Copy whole UTF-8 characters.
        let mut e = end;
        while e < bytes.len() && !line.is_char_boundary(e) {
            e += 1;
        }
        out.push_str(&line[i..e]);
        i = e;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::scrub;

    #[test]
    fn preimages_are_scrubbed_and_nothing_else() {
        let p = "ab".repeat(32);
        let h = "cd".repeat(32);
        let line = format!("Claiming inbound HTLC id 2 with payment hash {h} with preimage {p}");
        let s = scrub(&line);
        assert!(!s.contains(&p), "{s}");
        assert!(s.contains(&h), "a payment hash is not a secret: {s}");
        assert!(s.ends_with("with preimage <redacted>"), "{s}");
        let debug = format!("payment_preimage: Some(PaymentPreimage({p})), fée");
        assert!(!scrub(&debug).contains(&p));
        assert!(scrub(&debug).ends_with("fée"));
        assert_eq!(scrub("no secrets é here"), "no secrets é here");
    }
}
