//! The client's commands, one module each; the `satstream` binary only parses arguments and
//! calls them.
//!
//! - [`generate`]: `generate` and `chat`, paid from the client's wallet (and, in KEYSEND, the
//!   leftover asked back at the end).
//! - [`wallet`]: `wallet address | balance | open-channel | pay`.
//! - [`account`]: PREPAID accounts, `account topup | balance | refund`.
//! - [`receipt`]: `receipt verify FILE`, offline.
//!
//! `satstream demo` and `satstream regtest` run a whole regtest world and live with the other
//! tooling in `crate::devtools`: the client does not depend on the harness.

pub mod account;
pub mod generate;
pub mod receipt;
pub mod wallet;

use clap::{Args, ValueEnum};
use std::path::PathBuf;
use std::time::Duration;
use tonic::transport::Channel;

use super::{ClientError, Wallet};
use crate::config::{ChainConfig, ChainSource, Network};
use crate::wire::proto::{
    inference_client::InferenceClient, ChatMessage, GenerateRequest, ListModelsRequest,
    PaymentMode, SamplingParams,
};

pub(crate) const NO_CHANNEL: &str =
    "the wallet has no channel: `satstream wallet open-channel --sats N` first";

/// How long a client waits for its channel to be re-established after the wallet starts.
pub(crate) const CHANNEL_WAIT: Duration = Duration::from_secs(60);

/// Where the client finds the server and keeps its wallet.
#[derive(Args, Clone, Debug)]
pub struct Conn {
    /// The satstream server's gRPC endpoint (https:// for TLS).
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub server: String,
    /// TLS: trust this certificate (PEM) for the server, e.g. the `tls/ca.pem` a server
    /// generated for itself. Without it, https:// endpoints are checked against the public
    /// web PKI roots.
    #[arg(long)]
    pub cacert: Option<PathBuf>,
    /// The client wallet's data directory (its seed and the account token live here).
    #[arg(long, default_value = "satstream-client")]
    pub wallet_dir: PathBuf,
    #[arg(long, default_value = "regtest")]
    pub network: String,
    /// The wallet node's Lightning listen address.
    #[arg(long, default_value = "127.0.0.1:9737")]
    pub listen: String,
    /// Chain source: an Esplora URL (otherwise bitcoind RPC below).
    #[arg(long)]
    pub esplora: Option<String>,
    #[arg(long, default_value = "127.0.0.1:18443")]
    pub bitcoind_rpc: String,
    #[arg(long, default_value = "satstream")]
    pub rpc_user: String,
    #[arg(long, default_value = "satstream")]
    pub rpc_password: String,
}

impl Conn {
    fn chain(&self) -> Result<ChainConfig, ClientError> {
        let mut c = ChainConfig::default();
        if let Some(url) = &self.esplora {
            c.source = ChainSource::Esplora;
            c.esplora_url = url.clone();
        } else {
            let (host, port) = self
                .bitcoind_rpc
                .rsplit_once(':')
                .ok_or_else(|| ClientError::Usage("--bitcoind-rpc must be HOST:PORT".into()))?;
            c.source = ChainSource::BitcoindRpc;
            c.bitcoind_rpc_host = host.into();
            c.bitcoind_rpc_port = port
                .parse()
                .map_err(|_| ClientError::Usage(format!("--bitcoind-rpc: bad port {port:?}")))?;
            c.bitcoind_rpc_user = self.rpc_user.clone();
            c.bitcoind_rpc_password = self.rpc_password.clone();
        }
        Ok(c)
    }

    pub fn network(&self) -> Result<Network, ClientError> {
        Ok(match self.network.as_str() {
            "regtest" => Network::Regtest,
            "signet" => Network::Signet,
            "testnet" => Network::Testnet,
            "bitcoin" | "mainnet" => Network::Bitcoin,
            other => {
                return Err(ClientError::Usage(format!(
                    "--network {other:?}: use regtest, signet, testnet or bitcoin"
                )))
            }
        })
    }

    pub async fn open_wallet(&self) -> Result<Wallet, ClientError> {
        let (dir, network, listen, chain) = (
            self.wallet_dir.clone(),
            self.network()?,
            self.listen.clone(),
            self.chain()?,
        );
        tokio::task::spawn_blocking(move || Wallet::start(&dir, network, &listen, &chain, true))
            .await
            .map_err(|e| ClientError::Wallet(e.to_string()))?
    }

    pub async fn connect(&self) -> Result<InferenceClient<Channel>, ClientError> {
        Ok(InferenceClient::new(
            crate::client::connect(&self.server, self.cacert.as_deref()).await?,
        ))
    }

    /// The wallet, ready to pay (a usable channel), and the server.
    pub async fn open(&self) -> Result<(Wallet, InferenceClient<Channel>), ClientError> {
        let wallet = self.open_wallet().await?;
        let ready = async {
            let client = self.connect().await?;
            if wallet.wait_usable(CHANNEL_WAIT).await? {
                Ok(client)
            } else {
                Err(ClientError::Usage(NO_CHANNEL.into()))
            }
        }
        .await;
        match ready {
            Ok(c) => Ok((wallet, c)),
            Err(e) => {
                wallet.stop();
                Err(e)
            }
        }
    }

    /// Where `account topup` keeps the account token (mode 0600).
    pub fn account_token_file(&self) -> PathBuf {
        self.wallet_dir.join("account.token")
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Mode {
    Bolt11,
    Atomic,
    Keysend,
    Prepaid,
}

impl Mode {
    pub fn proto(self) -> PaymentMode {
        match self {
            Mode::Bolt11 => PaymentMode::Bolt11,
            Mode::Atomic => PaymentMode::Atomic,
            Mode::Keysend => PaymentMode::Keysend,
            Mode::Prepaid => PaymentMode::Prepaid,
        }
    }
}

/// What to generate and how to pay for it.
#[derive(Args, Clone, Debug)]
pub struct Request {
    /// The user message (generate/demo) or the system prompt (chat).
    #[arg(long, short)]
    pub prompt: Option<String>,
    /// Model id (default: the server's first model).
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long, default_value_t = 128)]
    pub max_tokens: u32,
    /// How to pay: a hold invoice per chunk, pay-to-decrypt, keysend balance, or a prepaid
    /// account (`satstream account topup` first).
    #[arg(long, value_enum, default_value = "bolt11")]
    pub mode: Mode,
    /// Stop paying (which halts the generation) before spending more than this.
    #[arg(long)]
    pub max_sats: Option<u64>,
    /// Sampling temperature (0 = greedy). The defaults read like a chat answer rather than
    /// greedy decoding's loops ("A lightning, a lightning, …" on a small model).
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f64,
    /// Nucleus sampling: draw from the most likely tokens that make up this much probability.
    #[arg(long, default_value_t = 0.9)]
    pub top_p: f64,
    /// Penalize tokens among the last 64 (1 = off).
    #[arg(long, default_value_t = 1.1)]
    pub repetition_penalty: f64,
    /// The sampler's seed, for the same answer to the same request (models on llama.cpp; on
    /// mistral.rs use --temperature 0).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Chunks the server may generate ahead of payment (default: the server's).
    #[arg(long)]
    pub window: Option<u32>,
    /// One JSON object per event on stdout, then a summary object.
    #[arg(long)]
    pub json: bool,
    /// KEYSEND: leave what was paid and not spent on the server instead of asking for it back.
    #[arg(long)]
    pub no_refund: bool,
    /// Write the session's signed receipt to this file (check it later with
    /// `satstream receipt verify FILE`).
    #[arg(long)]
    pub receipt: Option<PathBuf>,
}

pub fn generate_request(model: String, messages: Vec<ChatMessage>, r: &Request) -> GenerateRequest {
    GenerateRequest {
        model,
        messages,
        max_tokens: r.max_tokens,
        mode: r.mode.proto() as i32,
        sampling: Some(SamplingParams {
            temperature: Some(r.temperature),
            top_p: Some(r.top_p),
            repetition_penalty: Some(r.repetition_penalty),
            seed: r.seed,
            ..Default::default()
        }),
        window_chunks: r.window,
        ..Default::default()
    }
}

pub fn user(content: &str) -> ChatMessage {
    ChatMessage {
        role: "user".into(),
        content: content.into(),
    }
}

pub async fn first_model(client: &mut InferenceClient<Channel>) -> Result<String, ClientError> {
    let models = client
        .list_models(ListModelsRequest {})
        .await?
        .into_inner()
        .models;
    models
        .first()
        .map(|m| m.id.clone())
        .ok_or_else(|| ClientError::Protocol("the server lists no models".into()))
}
