//! Configuration: one TOML file, every key overridable by environment (`SATSTREAM_<KEY>`) and
//! by `--set key=value` on the command line. Validated once at start: a bad value fails with the
//! key and the reason.
//!
//! Precedence, lowest first: built-in defaults, the file, environment, `--set`. Environment
//! names are the dotted key in upper case with `.` → `_`, prefixed by `SATSTREAM_`:
//! `payments.window_chunks` ↔ `SATSTREAM_PAYMENTS_WINDOW_CHUNKS`, `models.0.path` ↔
//! `SATSTREAM_MODELS_0_PATH`. Values are parsed as TOML (`30`, `true`, `"x"`), falling back to a
//! plain string.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// One model the server sells. Prices are in millisatoshis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Public id clients ask for (e.g. "smollm2-135m").
    pub id: String,
    /// Local GGUF file. Relative paths are resolved against the current directory.
    pub path: PathBuf,
    /// Upper bound on prompt + output tokens; 0 = the model's own context length.
    #[serde(default)]
    pub context_length: u32,
    /// Price of one output token, msat.
    pub msat_per_token: u64,
    /// Price of one prompt token, msat (0 = prompts are free).
    #[serde(default)]
    pub msat_per_prompt_token: u64,
    /// Tokens per paid chunk.
    #[serde(default = "default_chunk_tokens")]
    pub chunk_tokens: u32,
    /// Generations running at once on this model.
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent: u32,
    /// Generations waiting for a slot before new ones get ResourceExhausted.
    #[serde(default = "default_max_queue")]
    pub max_queue: u32,
    /// The inference engine: `mistralrs` (the default), `llamacpp` (batched decode, a true
    /// pause: a paused generation keeps its KV cache) or `openai` (remote OpenAI-compatible
    /// servers, set in `upstream`; `path` is then only read for its tokenizer).
    #[serde(default)]
    pub backend: BackendKind,
    /// The remote engines of an `openai` model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<UpstreamConfig>,
}

/// Remote OpenAI-compatible engines serving one model (`backend = "openai"`): replicas behind
/// one name, routed least-loaded among the healthy ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// The protocol the replicas speak (`api = "openai"` or `"llama.cpp"`).
    pub api: UpstreamApi,
    /// Base URLs of the replicas; `/completions` and `/models` are appended. For `openai`, up
    /// to and including the API version (`http://10.0.0.5:8000/v1`); for `llama.cpp`, the
    /// server's root (`http://10.0.0.5:8080`), where its native endpoints live.
    pub urls: Vec<String>,
    /// The model name the upstream serves (its `/models` id). Empty: the model's `id`.
    pub model: String,
    /// File holding the API key sent as `Authorization: Bearer` (must be 0600).
    pub api_key_file: PathBuf,
    /// Or: the environment variable holding it.
    pub api_key_env: String,
    /// Seconds between health checks (`GET /models`) of each replica.
    pub health_interval_secs: u64,
    /// Deadline to connect, and to get the response headers of a request.
    pub connect_timeout_secs: u64,
    /// Longest the upstream may go silent in a running stream before the replica is declared
    /// failed (a prefill counts: keep it above the longest prompt's prefill).
    pub idle_timeout_secs: u64,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            api: UpstreamApi::default(),
            urls: Vec::new(),
            model: String::new(),
            api_key_file: PathBuf::new(),
            api_key_env: String::new(),
            health_interval_secs: 5,
            connect_timeout_secs: 5,
            idle_timeout_secs: 60,
        }
    }
}

/// How the gateway talks to its upstream, and so how exactly it can count what it sells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum UpstreamApi {
    /// OpenAI's `POST /completions`: the prompt goes as text and tokens come back as text,
    /// mapped back to ids by the gateway's tokenizer (exact when the upstream streams one
    /// token per event; docs/scale-out.md).
    #[default]
    #[serde(rename = "openai")]
    Openai,
    /// llama.cpp's `llama-server`, its native `POST /completions`: the prompt goes as token
    /// ids and every streamed event carries the id of the token it was sampled for and the
    /// server's own count of generated tokens, so what is charged is what was generated.
    #[serde(rename = "llama.cpp")]
    Llamacpp,
}

impl UpstreamConfig {
    fn validate(&self, key: &dyn Fn(&str) -> String) -> Result<(), ConfigError> {
        if self.urls.is_empty() {
            return Err(err(key("upstream.urls"), "list at least one upstream URL"));
        }
        for (i, u) in self.urls.iter().enumerate() {
            let ok = (u.starts_with("http://") || u.starts_with("https://"))
                && u.len() > "https://".len();
            if !ok || u.chars().any(char::is_whitespace) {
                return Err(err(
                    key(&format!("upstream.urls.{i}")),
                    format!("{u:?} is not an http(s) URL (e.g. \"http://10.0.0.5:8000/v1\")"),
                ));
            }
        }
        if !self.api_key_file.as_os_str().is_empty() && !self.api_key_env.is_empty() {
            return Err(err(
                key("upstream.api_key_env"),
                "set api_key_file or api_key_env, not both",
            ));
        }
        for (k, v) in [
            ("health_interval_secs", self.health_interval_secs),
            ("connect_timeout_secs", self.connect_timeout_secs),
            ("idle_timeout_secs", self.idle_timeout_secs),
        ] {
            if v == 0 || v > 3600 {
                return Err(err(
                    key(&format!("upstream.{k}")),
                    "must be between 1 and 3600 seconds",
                ));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    #[default]
    Mistralrs,
    Llamacpp,
    /// Needs `upstream` settings, so the demo and the client's `--backend` leave it out.
    #[value(skip)]
    Openai,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Mistralrs => "mistralrs",
            BackendKind::Llamacpp => "llamacpp",
            BackendKind::Openai => "openai",
        }
    }
}

impl ModelConfig {
    /// A model with the file's own context length, the config file's defaults for chunking
    /// and admission, and `msat_per_token` per output token (prompts free).
    pub fn new(id: impl Into<String>, path: impl Into<PathBuf>, msat_per_token: u64) -> Self {
        ModelConfig {
            id: id.into(),
            path: path.into(),
            context_length: 0,
            msat_per_token,
            msat_per_prompt_token: 0,
            chunk_tokens: default_chunk_tokens(),
            max_concurrent: default_max_concurrent(),
            max_queue: default_max_queue(),
            backend: BackendKind::default(),
            upstream: None,
        }
    }
}

fn default_chunk_tokens() -> u32 {
    16
}
fn default_max_concurrent() -> u32 {
    4
}
fn default_max_queue() -> u32 {
    16
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub store: StoreConfig,
    pub lightning: LightningConfig,
    pub chain: ChainConfig,
    pub payments: PaymentsConfig,
    pub limits: LimitsConfig,
    pub models: Vec<ModelConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// gRPC listen address (host:port).
    pub grpc_listen: String,
    /// The HTTP face (OpenAI-compatible endpoints, L402), host:port. Empty: off. Same TLS
    /// policy and certificate as gRPC (`tls = "auto"`: TLS unless this address is loopback).
    pub http_listen: String,
    /// Everything the server writes lives here unless a path below says otherwise.
    pub data_dir: PathBuf,
    /// Bearer token for the Admin service; created (0600) on first start. Empty: `<data_dir>/admin.token`.
    pub admin_token_file: PathBuf,
    /// Longest a shutdown waits for streams and sessions to end before it stops the node
    /// anyway (held HTLCs are failed back before that).
    pub shutdown_timeout_secs: u64,
    /// TLS on the gRPC listener: `auto` (on, unless the listen address is loopback), `on`,
    /// or `off`.
    pub tls: TlsMode,
    /// PEM certificate (chain) and key. Empty: a certificate is generated in
    /// `<data_dir>/tls/` on first start, for `tls_hosts`.
    pub tls_cert_file: PathBuf,
    pub tls_key_file: PathBuf,
    /// Host names and IP addresses the generated certificate is valid for.
    pub tls_hosts: Vec<String>,
    /// Serve plaintext on a non-loopback address (never Admin). Off: the server refuses to.
    pub allow_plaintext: bool,
    /// Prometheus metrics (`/metrics`) on their own listener, host:port. Empty: off.
    pub metrics_listen: String,
    /// HTTP/2 keepalive pings to idle clients (dead connections are dropped).
    pub http2_keepalive_secs: u64,
    /// Concurrent streams one connection may open.
    pub max_streams_per_connection: u32,
    /// Deadline of unary requests (Quote, TopUp, Refund, Admin...).
    pub request_timeout_secs: u64,
    /// Open connections in all, and per client (address prefix, `limits.client_prefix_*`);
    /// beyond, a new connection is closed at once.
    pub max_connections: usize,
    pub max_connections_per_client: usize,
    /// A new connection must finish its TLS handshake (in plaintext: send its first bytes)
    /// within this, or it is closed.
    pub handshake_timeout_secs: u64,
    /// Reverse proxies (addresses or CIDRs) whose `x-forwarded-for` names the client. Empty:
    /// the connection's own address is the client.
    pub trusted_proxies: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    Auto,
    On,
    Off,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// SQLite file. Empty: `<data_dir>/satstream.sqlite`.
    pub path: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    Regtest,
    Signet,
    Testnet,
    Bitcoin,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LightningConfig {
    pub network: Network,
    /// LDK node storage. Empty: `<data_dir>/ldk`.
    pub data_dir: PathBuf,
    /// Lightning P2P listen address (host:port).
    pub listen: String,
    /// Address advertised to clients (Quote, SessionOpened). Empty: same as `listen`.
    pub public_address: String,
    pub alias: String,
    /// 64-byte seed file. Empty: `<lightning.data_dir>/keys_seed` (created on first start).
    pub seed_file: PathBuf,
    /// ldk-node keeps every payment record in memory: records of payments final in the ledger
    /// (and in LDK) for this long are removed from the node (the ledger keeps them).
    pub payment_retention_secs: u64,
    /// A channel's monitor keeps every past commitment until its funding output is spent:
    /// when the stored monitor passes this many bytes, the channel is spliced (0: never).
    pub compact_monitor_bytes: u64,
    /// What each such splice moves from the operator's channel balance to the node's wallet.
    pub compact_splice_sat: u64,
    /// Put ldk-node's SQLite store in WAL mode (one fsync per write instead of the rollback
    /// journal's several; still durable). Off: ldk-node's own default. See docs/benchmarks.md.
    pub store_wal: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChainSource {
    BitcoindRpc,
    Esplora,
    Electrum,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChainConfig {
    pub source: ChainSource,
    pub bitcoind_rpc_host: String,
    pub bitcoind_rpc_port: u16,
    pub bitcoind_rpc_user: String,
    pub bitcoind_rpc_password: String,
    pub esplora_url: String,
    pub electrum_url: String,
}

/// Longest a dropped session waits for `Resume`.
pub const MAX_RESUME_GRACE_SECS: u64 = 600;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PaymentsConfig {
    /// Halt a generation when the next chunk's payment is this late.
    pub payment_timeout_secs: u64,
    /// Chunks the engine may run ahead of payment (clients may ask for fewer).
    pub window_chunks: u32,
    /// Tokens in a session's first chunk (0: a full chunk). A short first chunk shows the
    /// answer's first words at the engine's own time to first token (its invoice, sent as the
    /// session opens, is paid during the prefill); the rest come in full chunks.
    pub first_chunk_tokens: u32,
    /// Lifetime of chunk invoices.
    pub invoice_expiry_secs: u32,
    /// Custom TLV record carrying the session id in KEYSEND mode (odd, ≥ 65536).
    pub keysend_tlv_type: u64,
    /// Deadline of a session's first payment (its prompt's, or its first chunk's): an unpaid
    /// client's slot is freed sooner than a paying client's would be.
    pub first_payment_timeout_secs: u64,
    /// Longest a write to a client may wait for it to read; a client that stops reading is
    /// halted (anything held is failed back).
    pub client_send_timeout_secs: u64,
    /// A claim LDK has not reported completed after this long is checked against LDK's
    /// records (and, if LDK never made it, written off).
    pub claim_confirm_timeout_secs: u64,
    /// Refunds: the operator pays routing fees up to max(this, amount × refund_fee_ppm).
    pub refund_max_fee_msat: u64,
    pub refund_fee_ppm: u64,
    /// TopUp amounts accepted.
    pub topup_min_msat: u64,
    pub topup_max_msat: u64,
    /// The HTTP face's L402 challenge: its invoice tops up an account by this much (at least
    /// the request's first payment), within topup_min_msat..=topup_max_msat.
    pub l402_topup_msat: u64,
    /// How long an L402 credential (macaroon + preimage) stays valid.
    pub l402_valid_secs: u64,
    /// Attempts at handling an LDK event before it is parked (Admin ListParkedEvents).
    pub event_max_attempts: u32,
    /// Lookahead follows each session's measured payment latency and engine rate (and an
    /// invoice covers more tokens when payments cannot keep up); off: a fixed
    /// `window_chunks × chunk_tokens`.
    pub adaptive_lookahead: bool,
    /// Most msat of tokens generated beyond what is paid, per session (0: 256 tokens' worth).
    pub max_unpaid_msat: u64,
    /// A session whose client disconnects is kept this long for `Resume` (the engine pauses
    /// at what is paid; payment deadlines wait); 0 ends it at once.
    pub resume_grace_secs: u64,
    /// Resumes a session may take (a client that drops and resumes forever would hold its
    /// engine slot forever); 0: none.
    pub max_resumes: u32,
    /// A session's whole life, resumes and pauses included: then it halts
    /// (`SESSION_LIFETIME`).
    pub max_session_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Live sessions across all models; beyond, Generate answers ResourceExhausted.
    pub max_sessions: u32,
    /// Prompt tokens accepted (0: only the model's context bounds it).
    pub max_prompt_tokens: u32,
    /// Prompt bytes accepted, checked before tokenizing (a prompt this long cannot be cheap).
    pub max_prompt_bytes: u32,
    /// Live sessions one client may hold before its first payment (an unpaid session holds
    /// an engine slot for up to `payments.first_payment_timeout_secs`).
    pub max_unpaid_sessions_per_client: u32,
    /// Of `max_sessions`, slots only sessions that have paid may hold: sessions waiting for
    /// their first payment (all new ones but PREPAID with a balance) share the rest.
    pub reserved_paid_sessions: u32,
    /// A client is its address's prefix of this many bits (one IPv6 /64 is one network).
    pub client_prefix_v4: u8,
    pub client_prefix_v6: u8,
    /// Chat messages per request (each is rendered through the template before the token
    /// cap can see it).
    pub max_messages: u32,
    /// TopUp invoices one client may have open (unpaid) at once.
    pub max_open_topups_per_client: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            grpc_listen: "127.0.0.1:50051".into(),
            http_listen: "127.0.0.1:8402".into(),
            data_dir: "satstream-data".into(),
            admin_token_file: PathBuf::new(),
            shutdown_timeout_secs: 15,
            tls: TlsMode::Auto,
            tls_cert_file: PathBuf::new(),
            tls_key_file: PathBuf::new(),
            tls_hosts: vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
            allow_plaintext: false,
            metrics_listen: String::new(),
            http2_keepalive_secs: 30,
            max_streams_per_connection: 32,
            request_timeout_secs: 150,
            max_connections: 1024,
            max_connections_per_client: 64,
            handshake_timeout_secs: 10,
            trusted_proxies: Vec::new(),
        }
    }
}

impl Default for LightningConfig {
    fn default() -> Self {
        LightningConfig {
            network: Network::Regtest,
            data_dir: PathBuf::new(),
            listen: "127.0.0.1:9735".into(),
            public_address: String::new(),
            alias: "satstream".into(),
            seed_file: PathBuf::new(),
            payment_retention_secs: 86_400,
            compact_monitor_bytes: 16 << 20,
            compact_splice_sat: 10_000,
            store_wal: true,
        }
    }
}

impl Default for ChainConfig {
    fn default() -> Self {
        ChainConfig {
            source: ChainSource::BitcoindRpc,
            bitcoind_rpc_host: "127.0.0.1".into(),
            bitcoind_rpc_port: 18443,
            bitcoind_rpc_user: "satstream".into(),
            bitcoind_rpc_password: "satstream".into(),
            esplora_url: String::new(),
            electrum_url: String::new(),
        }
    }
}

impl Default for PaymentsConfig {
    fn default() -> Self {
        PaymentsConfig {
            payment_timeout_secs: 30,
            window_chunks: 2,
            first_chunk_tokens: 1,
            invoice_expiry_secs: 600,
            keysend_tlv_type: 5_482_373_485,
            first_payment_timeout_secs: 15,
            client_send_timeout_secs: 10,
            claim_confirm_timeout_secs: 60,
            refund_max_fee_msat: 10_000,
            refund_fee_ppm: 10_000,
            topup_min_msat: 1_000,
            topup_max_msat: 100_000_000,
            l402_topup_msat: 100_000,
            l402_valid_secs: 30 * 24 * 3600,
            event_max_attempts: 5,
            adaptive_lookahead: true,
            max_unpaid_msat: 0,
            resume_grace_secs: 60,
            max_resumes: 16,
            max_session_secs: 3_600,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_sessions: 64,
            max_prompt_tokens: 4096,
            max_prompt_bytes: 262_144,
            max_unpaid_sessions_per_client: 8,
            reserved_paid_sessions: 16,
            client_prefix_v4: 32,
            client_prefix_v6: 64,
            max_messages: 256,
            max_open_topups_per_client: 8,
        }
    }
}

/// A configuration problem, always naming the key (or file) and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("config {key}: {reason}")]
pub struct ConfigError {
    pub key: String,
    pub reason: String,
}

fn err(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.into(),
        reason: reason.into(),
    }
}

/// Window sizes above this buy nothing (the engine is far ahead of any payer) and let one
/// session hold many unpaid tokens.
pub const MAX_WINDOW_CHUNKS: u32 = 16;

impl Config {
    /// Loads defaults ← `file` ← `SATSTREAM_*` variables of `env` ← `sets` (`key=value`).
    pub fn load<I>(file: Option<&Path>, env: I, sets: &[String]) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let mut doc = toml::Value::try_from(Config::default())
            .map_err(|e| err("(defaults)", e.to_string()))?;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| err(format!("file {}", path.display()), e.to_string()))?;
            let file_doc: toml::Value = toml::from_str(&text)
                .map_err(|e| err(format!("file {}", path.display()), e.to_string()))?;
            merge(&mut doc, file_doc);
        }
        // Environment keys are matched against the keys the document has (defaults ∪ file),
        // since `_` inside key names makes the variable name ambiguous otherwise.
        let env: std::collections::HashMap<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("SATSTREAM_"))
            .collect();
        if !env.is_empty() {
            let mut keys = Vec::new();
            leaf_keys(&doc, "", &mut keys);
            for key in keys {
                let var = format!("SATSTREAM_{}", key.replace('.', "_").to_uppercase());
                if let Some(v) = env.get(&var) {
                    set_key(&mut doc, &key, v)
                        .map_err(|r| err(format!("{key} (from {var})"), r))?;
                }
            }
        }
        for s in sets {
            let (key, value) = s
                .split_once('=')
                .ok_or_else(|| err(s.clone(), "expected --set key=value"))?;
            set_key(&mut doc, key.trim(), value).map_err(|r| err(key.trim(), r))?;
        }
        let cfg: Config = serde_path_to_error::deserialize(doc).map_err(|e| {
            let path = e.path().to_string();
            err(path, e.into_inner().to_string())
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        addr("server.grpc_listen", &self.server.grpc_listen)?;
        addr("lightning.listen", &self.lightning.listen)?;
        if self.server.data_dir.as_os_str().is_empty() {
            return Err(err("server.data_dir", "must not be empty"));
        }
        if self.lightning.alias.len() > 32 {
            return Err(err("lightning.alias", "at most 32 bytes"));
        }
        // An output below the dust limit (546 sat for any script) would be refused on chain.
        if self.lightning.compact_monitor_bytes > 0 && self.lightning.compact_splice_sat < 1_000 {
            return Err(err(
                "lightning.compact_splice_sat",
                format!(
                    "must be at least 1000 (an on-chain output), got {}; or set \
                     lightning.compact_monitor_bytes = 0 to never splice",
                    self.lightning.compact_splice_sat
                ),
            ));
        }
        let c = &self.chain;
        match c.source {
            ChainSource::BitcoindRpc
                if c.bitcoind_rpc_host.is_empty() || c.bitcoind_rpc_port == 0 =>
            {
                return Err(err(
                    "chain.bitcoind_rpc_host",
                    "source bitcoind_rpc needs bitcoind_rpc_host and bitcoind_rpc_port",
                ));
            }
            ChainSource::Esplora if !c.esplora_url.starts_with("http") => {
                return Err(err(
                    "chain.esplora_url",
                    "source esplora needs an http(s) URL, e.g. https://mempool.space/signet/api",
                ));
            }
            ChainSource::Electrum if !c.electrum_url.contains("://") => {
                return Err(err(
                    "chain.electrum_url",
                    "source electrum needs a URL such as ssl://electrum.blockstream.info:60002",
                ));
            }
            _ => {}
        }
        let p = &self.payments;
        if p.payment_timeout_secs == 0 {
            return Err(err("payments.payment_timeout_secs", "must be at least 1"));
        }
        if p.window_chunks > MAX_WINDOW_CHUNKS {
            return Err(err(
                "payments.window_chunks",
                format!(
                    "must be at most {MAX_WINDOW_CHUNKS} (got {})",
                    p.window_chunks
                ),
            ));
        }
        for (key, v) in [
            (
                "payments.first_payment_timeout_secs",
                p.first_payment_timeout_secs,
            ),
            (
                "payments.client_send_timeout_secs",
                p.client_send_timeout_secs,
            ),
            (
                "payments.claim_confirm_timeout_secs",
                p.claim_confirm_timeout_secs,
            ),
            (
                "server.shutdown_timeout_secs",
                self.server.shutdown_timeout_secs,
            ),
            ("payments.max_session_secs", p.max_session_secs),
        ] {
            if v == 0 {
                return Err(err(key, "must be at least 1"));
            }
        }
        // A detached session may hold a paid prompt's HTLC; keep that far inside any HTLC's
        // on-chain deadline (hours).
        if p.resume_grace_secs > MAX_RESUME_GRACE_SECS {
            return Err(err(
                "payments.resume_grace_secs",
                format!(
                    "must be at most {MAX_RESUME_GRACE_SECS} (got {}); 0 turns Resume off",
                    p.resume_grace_secs
                ),
            ));
        }
        let sv = &self.server;
        if sv.tls_cert_file.as_os_str().is_empty() != sv.tls_key_file.as_os_str().is_empty() {
            return Err(err(
                "server.tls_cert_file",
                "set both tls_cert_file and tls_key_file, or neither (a certificate is then generated)",
            ));
        }
        if sv.tls_hosts.is_empty() && sv.tls_cert_file.as_os_str().is_empty() {
            return Err(err(
                "server.tls_hosts",
                "the generated certificate needs at least one host name",
            ));
        }
        if !sv.metrics_listen.is_empty() {
            addr("server.metrics_listen", &sv.metrics_listen)?;
        }
        if !sv.http_listen.is_empty() {
            addr("server.http_listen", &sv.http_listen)?;
        }
        if let Some(a) = self.http_addr() {
            if !self.tls_on(a) && !a.ip().is_loopback() && !sv.allow_plaintext {
                return Err(err(
                    "server.tls",
                    format!(
                        "plaintext HTTP on the non-loopback address {} would send API keys and \
                         L402 preimages in the clear: use tls = \"auto\" or \"on\", or set \
                         server.allow_plaintext = true",
                        sv.http_listen
                    ),
                ));
            }
        }
        if self.payments.l402_valid_secs == 0 {
            return Err(err("payments.l402_valid_secs", "must be at least 1"));
        }
        if self.plaintext() && !self.grpc_addr().ip().is_loopback() && !sv.allow_plaintext {
            return Err(err(
                "server.tls",
                format!(
                    "plaintext gRPC on the non-loopback address {} would send tokens, invoices and \
                     chunk keys in the clear: use tls = \"auto\" or \"on\" (a certificate is \
                     generated when none is configured), or set server.allow_plaintext = true",
                    sv.grpc_listen
                ),
            ));
        }
        if self.limits.max_unpaid_sessions_per_client == 0 {
            return Err(err(
                "limits.max_unpaid_sessions_per_client",
                "must be at least 1",
            ));
        }
        if p.topup_min_msat == 0 || p.topup_min_msat > p.topup_max_msat {
            return Err(err(
                "payments.topup_min_msat",
                "must be at least 1 and at most payments.topup_max_msat",
            ));
        }
        if p.event_max_attempts == 0 {
            return Err(err("payments.event_max_attempts", "must be at least 1"));
        }
        if p.invoice_expiry_secs < 60 {
            return Err(err("payments.invoice_expiry_secs", "must be at least 60"));
        }
        if p.keysend_tlv_type < 65_536 || p.keysend_tlv_type % 2 == 0 {
            return Err(err(
                "payments.keysend_tlv_type",
                format!(
                    "must be odd and at least 65536 (got {}): even types are rejected by receivers",
                    p.keysend_tlv_type
                ),
            ));
        }
        let l = &self.limits;
        if l.max_sessions == 0 {
            return Err(err("limits.max_sessions", "must be at least 1"));
        }
        if l.reserved_paid_sessions >= l.max_sessions {
            return Err(err(
                "limits.reserved_paid_sessions",
                format!(
                    "must be below limits.max_sessions ({}): new sessions need a slot to pay in",
                    l.max_sessions
                ),
            ));
        }
        if l.client_prefix_v4 == 0 || l.client_prefix_v4 > 32 {
            return Err(err("limits.client_prefix_v4", "must be 1 to 32"));
        }
        if l.client_prefix_v6 == 0 || l.client_prefix_v6 > 128 {
            return Err(err("limits.client_prefix_v6", "must be 1 to 128"));
        }
        for (key, v) in [
            ("limits.max_messages", l.max_messages as u64),
            (
                "limits.max_open_topups_per_client",
                l.max_open_topups_per_client as u64,
            ),
            ("server.max_connections", self.server.max_connections as u64),
            (
                "server.max_connections_per_client",
                self.server.max_connections_per_client as u64,
            ),
            (
                "server.handshake_timeout_secs",
                self.server.handshake_timeout_secs,
            ),
        ] {
            if v == 0 {
                return Err(err(key, "must be at least 1"));
            }
        }
        if let Err(e) = crate::net::ClientKeys::from_config(self) {
            return Err(err(
                format!("server.trusted_proxies.{}", e.index),
                e.to_string(),
            ));
        }
        let mut ids = std::collections::HashSet::new();
        for (i, m) in self.models.iter().enumerate() {
            let key = |k: &str| format!("models.{i}.{k}");
            if m.id.is_empty() || m.id.chars().any(|c| c.is_whitespace()) {
                return Err(err(key("id"), "must be non-empty, without spaces"));
            }
            if !ids.insert(m.id.as_str()) {
                return Err(err(key("id"), format!("duplicate model id {:?}", m.id)));
            }
            if m.path.as_os_str().is_empty() {
                return Err(err(key("path"), "must name a GGUF file"));
            }
            if m.msat_per_token == 0 {
                return Err(err(key("msat_per_token"), "must be at least 1 msat"));
            }
            if m.chunk_tokens == 0 || m.chunk_tokens > 4096 {
                return Err(err(key("chunk_tokens"), "must be between 1 and 4096"));
            }
            if m.max_concurrent == 0 {
                return Err(err(key("max_concurrent"), "must be at least 1"));
            }
            match (m.backend, &m.upstream) {
                (BackendKind::Openai, None) => {
                    return Err(err(
                        key("upstream.urls"),
                        "backend \"openai\" needs the upstream's URLs ([models.upstream] urls = [\"http://host:port/v1\"])",
                    ))
                }
                (BackendKind::Openai, Some(u)) => u.validate(&key)?,
                (_, Some(_)) => {
                    return Err(err(
                        key("upstream"),
                        format!(
                            "only used with backend = \"openai\" (this model's backend is {:?})",
                            m.backend.as_str()
                        ),
                    ))
                }
                (_, None) => {}
            }
        }
        Ok(())
    }

    pub fn store_path(&self) -> PathBuf {
        or_under(&self.store.path, &self.server.data_dir, "satstream.sqlite")
    }

    pub fn ldk_dir(&self) -> PathBuf {
        or_under(&self.lightning.data_dir, &self.server.data_dir, "ldk")
    }

    pub fn admin_token_path(&self) -> PathBuf {
        or_under(
            &self.server.admin_token_file,
            &self.server.data_dir,
            "admin.token",
        )
    }

    /// Whether the gRPC listener serves plaintext (TLS `off`, or `auto` on loopback).
    pub fn plaintext(&self) -> bool {
        match self.server.grpc_listen.parse::<SocketAddr>() {
            Ok(a) => !self.tls_on(a),
            Err(_) => self.server.tls == TlsMode::Off,
        }
    }

    /// The TLS policy for a listener on `a`: `auto` is on unless `a` is loopback.
    pub fn tls_on(&self, a: SocketAddr) -> bool {
        match self.server.tls {
            TlsMode::On => true,
            TlsMode::Off => false,
            TlsMode::Auto => !a.ip().is_loopback(),
        }
    }

    /// Where the HTTP face listens; None when it is off (or the address is invalid).
    pub fn http_addr(&self) -> Option<SocketAddr> {
        match self.server.http_listen.as_str() {
            "" => None,
            a => a.parse().ok(),
        }
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.server.grpc_listen.parse().expect("validated")
    }

    /// Address clients should open channels / connect to.
    pub fn public_ln_address(&self) -> &str {
        if self.lightning.public_address.is_empty() {
            &self.lightning.listen
        } else {
            &self.lightning.public_address
        }
    }

    /// The configuration as TOML (what `satstream config` prints).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }
}

fn or_under(p: &Path, dir: &Path, name: &str) -> PathBuf {
    if p.as_os_str().is_empty() {
        dir.join(name)
    } else {
        p.to_path_buf()
    }
}

fn addr(key: &str, v: &str) -> Result<(), ConfigError> {
    v.parse::<SocketAddr>()
        .map(|_| ())
        .map_err(|_| err(key, format!("{v:?} is not an ip:port address")))
}

/// Overlays `b` on `a`: tables merge key by key, anything else replaces.
fn merge(a: &mut toml::Value, b: toml::Value) {
    match (a, b) {
        (toml::Value::Table(at), toml::Value::Table(bt)) => {
            for (k, v) in bt {
                match at.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        at.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

fn leaf_keys(v: &toml::Value, prefix: &str, out: &mut Vec<String>) {
    let join = |k: &str| {
        if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        }
    };
    match v {
        toml::Value::Table(t) => t.iter().for_each(|(k, v)| leaf_keys(v, &join(k), out)),
        toml::Value::Array(a) if a.iter().all(|x| x.is_table()) && !a.is_empty() => a
            .iter()
            .enumerate()
            .for_each(|(i, v)| leaf_keys(v, &join(&i.to_string()), out)),
        _ => out.push(prefix.to_string()),
    }
}

fn parse_value(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

/// Sets a dotted key (`a.b`, `models.0.path`) in the document, creating tables on the way.
fn set_key(doc: &mut toml::Value, key: &str, raw: &str) -> Result<(), String> {
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err("malformed key".into());
    }
    let mut cur = doc;
    for (i, part) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        cur = match cur {
            toml::Value::Table(t) => {
                if last {
                    t.insert(part.to_string(), parse_value(raw));
                    return Ok(());
                }
                t.entry(part.to_string())
                    .or_insert_with(|| toml::Value::Table(Default::default()))
            }
            toml::Value::Array(a) => {
                let idx: usize = part
                    .parse()
                    .map_err(|_| format!("{part:?} is not an index into a list"))?;
                if idx > a.len() {
                    return Err(format!("index {idx} skips entries (list has {})", a.len()));
                }
                if idx == a.len() {
                    a.push(toml::Value::Table(Default::default()));
                }
                if last {
                    a[idx] = parse_value(raw);
                    return Ok(());
                }
                &mut a[idx]
            }
            _ => return Err(format!("{part:?} is inside a value that is not a table")),
        };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(file: &str, env: &[(&str, &str)], sets: &[&str]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, file).unwrap();
        Config::load(
            Some(&p),
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
            &sets.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        )
    }

    const MODEL: &str = r#"
[[models]]
id = "tiny"
path = "/m/tiny.gguf"
msat_per_token = 1000
"#;

    #[test]
    fn defaults_then_file_then_env_then_set() {
        let file = format!("[payments]\nwindow_chunks = 3\n{MODEL}");
        let c = load(&file, &[], &[]).unwrap();
        assert_eq!(c.payments.window_chunks, 3);
        assert_eq!(c.payments.payment_timeout_secs, 30, "default kept");
        assert_eq!(c.models[0].chunk_tokens, 16, "model default");
        let c = load(&file, &[("SATSTREAM_PAYMENTS_WINDOW_CHUNKS", "4")], &[]).unwrap();
        assert_eq!(c.payments.window_chunks, 4);
        let c = load(
            &file,
            &[("SATSTREAM_PAYMENTS_WINDOW_CHUNKS", "4")],
            &["payments.window_chunks=5"],
        )
        .unwrap();
        assert_eq!(c.payments.window_chunks, 5);
    }

    #[test]
    fn env_reaches_keys_with_underscores_and_model_entries() {
        let c = load(
            MODEL,
            &[
                ("SATSTREAM_SERVER_GRPC_LISTEN", "127.0.0.1:6000"),
                ("SATSTREAM_MODELS_0_MSAT_PER_TOKEN", "7"),
                ("SATSTREAM_CHAIN_BITCOIND_RPC_PORT", "1234"),
                ("SATSTREAM_UNRELATED", "x"),
            ],
            &[],
        )
        .unwrap();
        assert_eq!(c.server.grpc_listen, "127.0.0.1:6000");
        assert_eq!(c.models[0].msat_per_token, 7);
        assert_eq!(c.chain.bitcoind_rpc_port, 1234);
    }

    #[test]
    fn set_can_add_a_model() {
        let c = Config::load(
            None,
            Vec::new(),
            &[
                "models.0.id=m".into(),
                "models.0.path=/x.gguf".into(),
                "models.0.msat_per_token=2".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.models.len(), 1);
        assert_eq!(c.models[0].path, PathBuf::from("/x.gguf"));
    }

    #[test]
    fn errors_name_the_key_and_reason() {
        let e = load("[payments]\nwindow_chunks = \"many\"\n", &[], &[]).unwrap_err();
        assert_eq!(e.key, "payments.window_chunks");
        assert!(e.reason.contains("invalid type"), "{e}");

        let e = load("[payments]\nwindw_chunks = 2\n", &[], &[]).unwrap_err();
        assert!(e.reason.contains("unknown field `windw_chunks`"), "{e}");

        let e = load("", &[], &["payments.keysend_tlv_type=65538"]).unwrap_err();
        assert_eq!(e.key, "payments.keysend_tlv_type");
        assert!(e.reason.contains("odd"), "{e}");

        let e = load("", &[], &["payments.resume_grace_secs=3601"]).unwrap_err();
        assert_eq!(e.key, "payments.resume_grace_secs");
        assert!(e.reason.contains("at most 600"), "{e}");

        let e = load("", &[("SATSTREAM_SERVER_GRPC_LISTEN", "nowhere")], &[]).unwrap_err();
        assert_eq!(e.key, "server.grpc_listen");

        let e = load("[lightning]\nnetwork = \"mainnet\"\n", &[], &[]).unwrap_err();
        assert_eq!(e.key, "lightning.network");
        assert!(e.reason.contains("bitcoin"), "lists the valid values: {e}");

        let e = load(&format!("{MODEL}{MODEL}"), &[], &[]).unwrap_err();
        assert_eq!(e.key, "models.1.id");

        let e = load("[chain]\nsource = \"esplora\"\n", &[], &[]).unwrap_err();
        assert_eq!(e.key, "chain.esplora_url");

        let e = load("", &[], &["lightning.compact_splice_sat=500"]).unwrap_err();
        assert_eq!(e.key, "lightning.compact_splice_sat");
        assert!(e.reason.contains("compact_monitor_bytes = 0"), "{e}");
        let off = [
            "lightning.compact_splice_sat=0",
            "lightning.compact_monitor_bytes=0",
        ];
        assert!(
            load("", &[], &off).is_ok(),
            "compaction off needs no splice amount"
        );

        let e = load("not toml [", &[], &[]).unwrap_err();
        assert!(e.key.starts_with("file "), "{e}");
    }

    #[test]
    fn remote_models_need_urls_and_nothing_else_takes_them() {
        let remote = format!(
            "{MODEL}backend = \"openai\"\n[models.upstream]\nurls = [\"http://10.0.0.5:8000/v1\"]\n"
        );
        let c = load(&remote, &[], &[]).unwrap();
        let u = c.models[0].upstream.as_ref().unwrap();
        assert_eq!(c.models[0].backend, BackendKind::Openai);
        assert_eq!(u.urls, vec!["http://10.0.0.5:8000/v1".to_string()]);
        assert_eq!((u.health_interval_secs, u.idle_timeout_secs), (5, 60));
        assert_eq!(u.api, UpstreamApi::Openai);
        let c = load(&remote, &[], &["models.0.upstream.api=\"llama.cpp\""]).unwrap();
        assert_eq!(
            c.models[0].upstream.as_ref().unwrap().api,
            UpstreamApi::Llamacpp
        );
        let e = load(&remote, &[], &["models.0.upstream.api=\"vllm\""]).unwrap_err();
        assert!(e.to_string().contains("llama.cpp"), "{e}");
        // The replica list from the environment, as a TOML array.
        let c = load(
            &remote,
            &[(
                "SATSTREAM_MODELS_0_UPSTREAM_URLS",
                "[\"http://a:1/v1\", \"https://b/v1\"]",
            )],
            &[],
        )
        .unwrap();
        assert_eq!(c.models[0].upstream.as_ref().unwrap().urls.len(), 2);

        let e = load(&format!("{MODEL}backend = \"openai\"\n"), &[], &[]).unwrap_err();
        assert_eq!(e.key, "models.0.upstream.urls");
        let e = load(
            &remote,
            &[],
            &["models.0.upstream.urls=[\"10.0.0.5:8000\"]"],
        )
        .unwrap_err();
        assert_eq!(e.key, "models.0.upstream.urls.0");
        assert!(e.reason.contains("http"), "{e}");
        let e = load(&remote, &[], &["models.0.upstream.idle_timeout_secs=0"]).unwrap_err();
        assert_eq!(e.key, "models.0.upstream.idle_timeout_secs");
        let e = load(
            &remote,
            &[],
            &[
                "models.0.upstream.api_key_env=K",
                "models.0.upstream.api_key_file=/k",
            ],
        )
        .unwrap_err();
        assert_eq!(e.key, "models.0.upstream.api_key_env");
        let e = load(&remote, &[], &["models.0.backend=llamacpp"]).unwrap_err();
        assert_eq!(e.key, "models.0.upstream");
        assert!(e.reason.contains("openai"), "{e}");
    }

    #[test]
    fn derived_paths_follow_data_dir() {
        let c = load("[server]\ndata_dir = \"/d\"\n", &[], &[]).unwrap();
        assert_eq!(c.store_path(), PathBuf::from("/d/satstream.sqlite"));
        assert_eq!(c.ldk_dir(), PathBuf::from("/d/ldk"));
        assert_eq!(c.admin_token_path(), PathBuf::from("/d/admin.token"));
    }

    #[test]
    fn shipped_configs_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        for f in ["satstream.toml", "mainnet.example.toml"] {
            Config::load(Some(&dir.join(f)), Vec::new(), &[])
                .unwrap_or_else(|e| panic!("{f}: {e}"));
        }
    }
}
