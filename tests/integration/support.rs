//! Shared helpers for the integration tests.

use std::path::PathBuf;
use std::sync::Once;

/// Logs to the test output when RUST_LOG is set (e.g. RUST_LOG=satstream=debug).
pub fn init_tracing() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("RUST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_test_writer()
                .try_init();
        }
    });
}

/// The grpcurl binary scripts/setup-grpcurl.sh installed (or $GRPCURL).
pub fn grpcurl() -> PathBuf {
    let p = std::env::var_os("GRPCURL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/satstream/grpcurl/grpcurl")
        });
    assert!(
        p.is_file(),
        "grpcurl not found at {}: run scripts/setup-grpcurl.sh",
        p.display()
    );
    p
}
