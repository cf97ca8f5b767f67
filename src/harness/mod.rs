//! A real regtest world for tests, benchmarks and the demo: Bitcoin Core, the satstream
//! server (in process), a payer node, both funded by mining, and a channel payer → server.
//!
//! Waiting is always for an event or a condition with a deadline, never a fixed sleep.

pub mod audit;
mod bitcoind;
pub mod process;
pub mod upstream;

pub use crate::client::{PayOutcome, Wallet};
pub use bitcoind::{cached_bitcoind, find_bitcoind, free_port, Bitcoind};
pub use process::ServerProcess;

use std::future::Future;
use std::time::{Duration, Instant};

use crate::config::{ChainConfig, ChainSource, Config, ModelConfig};
use crate::lightning::{LightningError, NodeNotice};
use crate::server::{self, RunningServer, ServerError};

#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("harness setup: {0}")]
    Setup(String),
    #[error("bitcoind: {0}")]
    Bitcoind(String),
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("payment: {0}")]
    Payment(String),
    #[error(transparent)]
    Lightning(#[from] LightningError),
    #[error(transparent)]
    Node(#[from] crate::node::NodeError),
    #[error(transparent)]
    Client(#[from] crate::client::ClientError),
    #[error(transparent)]
    Server(#[from] ServerError),
}

#[derive(Debug, Clone)]
pub struct HarnessOptions {
    pub models: Vec<ModelConfig>,
    /// Channel payer → server, in sat (0: no channel).
    pub channel_sat: u64,
    /// Channel server → payer, in sat (0: none): gives the server outbound liquidity (to pay
    /// refunds) and the payer inbound (to receive them).
    pub server_channel_sat: u64,
    /// Extra `--set key=value` overrides for the server's config.
    pub sets: Vec<String>,
    /// A config file under the overrides (None: built-in defaults).
    pub config_file: Option<std::path::PathBuf>,
    /// Where the server and payer keep their data (None: a temp dir removed on drop).
    pub data_dir: Option<std::path::PathBuf>,
    /// bitcoind's RPC port (None: any free port). `satstream regtest` uses the standard
    /// 18443 so that copy-pasted commands (bitcoin-cli, the client's default) find it.
    pub bitcoind_rpc_port: Option<u16>,
}

impl Default for HarnessOptions {
    fn default() -> Self {
        HarnessOptions {
            models: Vec::new(),
            channel_sat: 1_000_000,
            server_channel_sat: 0,
            config_file: None,
            sets: Vec::new(),
            data_dir: None,
            bitcoind_rpc_port: None,
        }
    }
}

pub struct Harness {
    /// How long the last server start took (store, node, model load, gRPC serving).
    pub server_start: Duration,
    pub config: Config,
    server: Option<RunningServer>,
    /// The paying client wallet, with a funded channel to the server.
    pub payer: Wallet,
    /// How the payer reaches the chain (a second payer uses it too).
    payer_chain: ChainConfig,
    pub bitcoind: Bitcoind,
    _tmp: Option<tempfile::TempDir>,
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes.
/// Waits (up to a minute, syncing) until `node`'s wallet has spendable on-chain coins.
pub(crate) async fn wait_onchain_funds(
    node: std::sync::Arc<ldk_node::Node>,
) -> Result<(), HarnessError> {
    wait_until("on-chain funds", Duration::from_secs(60), || {
        let node = node.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let _ = node.sync_wallets();
                node.list_balances().spendable_onchain_balance_sats > 0
            })
            .await
            .unwrap_or(false)
        }
    })
    .await
}

/// A gRPC client of `server` whose connection comes from `ip` (another loopback address,
/// 127.0.0.x): another client on this machine, as the server tells clients apart.
pub async fn client_from(
    server: std::net::SocketAddr,
    ip: std::net::IpAddr,
) -> Result<
    crate::wire::proto::inference_client::InferenceClient<tonic::transport::Channel>,
    HarnessError,
> {
    let connector = tower::service_fn(move |_: tonic::transport::Uri| async move {
        let sock = tokio::net::TcpSocket::new_v4()?;
        sock.bind(std::net::SocketAddr::new(ip, 0))?;
        let stream = sock.connect(server).await?;
        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
    });
    let ch = tonic::transport::Endpoint::from_static("http://127.0.0.1")
        .connect_with_connector(connector)
        .await
        .map_err(|e| HarnessError::Setup(format!("connecting from {ip}: {e}")))?;
    Ok(crate::wire::proto::inference_client::InferenceClient::new(
        ch,
    ))
}

pub async fn wait_until<F, Fut>(
    what: &'static str,
    timeout: Duration,
    mut cond: F,
) -> Result<(), HarnessError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(HarnessError::Timeout(what));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Harness {
    /// Starts bitcoind, the server and the payer; funds both nodes; opens the channel and
    /// waits until it is usable. Call on a multi-thread tokio runtime.
    pub async fn start(opts: HarnessOptions) -> Result<Harness, HarnessError> {
        let bitcoind = Bitcoind::start(opts.bitcoind_rpc_port)?;
        let (tmp, root) = match &opts.data_dir {
            Some(d) => (None, d.clone()),
            None => {
                let t = tempfile::Builder::new()
                    .prefix("satstream-harness-")
                    .tempdir()
                    .map_err(|e| HarnessError::Setup(e.to_string()))?;
                let p = t.path().to_path_buf();
                (Some(t), p)
            }
        };
        let chain = ChainConfig {
            source: ChainSource::BitcoindRpc,
            bitcoind_rpc_host: "127.0.0.1".into(),
            bitcoind_rpc_port: bitcoind.rpc_port,
            bitcoind_rpc_user: bitcoind.rpc_user.clone(),
            bitcoind_rpc_password: bitcoind.rpc_password.clone(),
            esplora_url: String::new(),
            electrum_url: String::new(),
        };
        let mut sets = vec![
            format!("server.data_dir={}", root.join("server").display()),
            "server.grpc_listen=127.0.0.1:0".to_string(),
            "server.http_listen=127.0.0.1:0".to_string(),
            format!("lightning.listen=127.0.0.1:{}", free_port()),
            "lightning.network=regtest".to_string(),
            // Tests and benches open many streams from one address at once.
            "limits.max_unpaid_sessions_per_client=64".to_string(),
            "chain.source=bitcoind_rpc".to_string(),
            "chain.bitcoind_rpc_host=127.0.0.1".to_string(),
            format!("chain.bitcoind_rpc_port={}", bitcoind.rpc_port),
            format!("chain.bitcoind_rpc_user={}", bitcoind.rpc_user),
            format!("chain.bitcoind_rpc_password={}", bitcoind.rpc_password),
        ];
        sets.extend(opts.sets.iter().cloned());
        let mut config = Config::load(opts.config_file.as_deref(), Vec::new(), &sets)
            .map_err(|e| HarnessError::Setup(e.to_string()))?;
        if !opts.models.is_empty() {
            config.models = opts.models.clone();
        }

        let t = Instant::now();
        let server = server::start(config.clone()).await?;
        let server_start = t.elapsed();
        let payer_listen = format!("127.0.0.1:{}", free_port());
        let payer_dir = root.join("payer");
        let payer = {
            let chain = chain.clone();
            // The payer's store is set up like the server's, so a benchmark of either
            // setting measures both ends of the channel.
            let wal = config.lightning.store_wal;
            tokio::task::spawn_blocking(move || {
                Wallet::start(
                    &payer_dir,
                    crate::config::Network::Regtest,
                    &payer_listen,
                    &chain,
                    wal,
                )
            })
            .await
            .map_err(|e| HarnessError::Setup(e.to_string()))??
        };
        let mut h = Harness {
            config,
            server: Some(server),
            server_start,
            payer,
            payer_chain: chain,
            bitcoind,
            _tmp: tmp,
        };
        h.fund().await?;
        if opts.channel_sat > 0 {
            h.open_channel(opts.channel_sat).await?;
        }
        if opts.server_channel_sat > 0 {
            h.open_server_channel(opts.server_channel_sat).await?;
        }
        Ok(h)
    }

    pub fn server(&self) -> &RunningServer {
        self.server.as_ref().expect("server is running")
    }

    pub fn server_node_id(&self) -> String {
        self.server().app.lightning.node_id()
    }

    pub fn server_ln_address(&self) -> String {
        self.config.lightning.listen.clone()
    }

    /// Mines 101 blocks so both nodes own a mature coinbase (the server needs on-chain funds
    /// to accept anchor channels), then waits until both wallets see them.
    async fn fund(&mut self) -> Result<(), HarnessError> {
        let server_addr = self
            .server()
            .app
            .lightning
            .node()
            .onchain_payment()
            .new_address()
            .map_err(LightningError::from)?
            .to_string();
        let payer_addr = self.payer.new_address()?;
        self.bitcoind.mine_to(1, &payer_addr)?;
        self.bitcoind.mine_to(1, &server_addr)?;
        let tip = self.bitcoind.mine_to(100, &payer_addr)?;
        self.wait_synced(tip).await?;
        for node in [
            self.server().app.lightning.node().clone(),
            self.payer.node.clone(),
        ] {
            wait_onchain_funds(node).await?;
        }
        Ok(())
    }

    /// Waits until `cond` holds on both the server's and the payer's node.
    async fn wait_both<F>(
        &self,
        what: &'static str,
        timeout: Duration,
        cond: F,
    ) -> Result<(), HarnessError>
    where
        F: Fn(&ldk_node::Node) -> bool + Clone,
    {
        let nodes = [
            self.server().app.lightning.node().clone(),
            self.payer.node.clone(),
        ];
        wait_until(what, timeout, || {
            let (nodes, cond) = (nodes.clone(), cond.clone());
            async move { nodes.iter().all(|n| cond(n)) }
        })
        .await
    }

    /// Waits until both nodes have seen block `height`.
    pub async fn wait_synced(&self, height: u32) -> Result<(), HarnessError> {
        self.wait_both(
            "nodes to sync the chain",
            Duration::from_secs(60),
            move |n| n.status().current_best_block.height >= height,
        )
        .await
    }

    /// Mines `n` blocks and waits for both nodes to see them.
    pub async fn mine(&self, n: u32) -> Result<u32, HarnessError> {
        let addr = self.payer.new_address()?;
        let tip = self.bitcoind.mine_to(n, &addr)?;
        self.wait_synced(tip).await?;
        Ok(tip)
    }

    /// Opens a channel payer → server and waits until both sides report it ready and the
    /// payer can send over it.
    pub async fn open_channel(&self, sat: u64) -> Result<(), HarnessError> {
        let server_id = crate::lightning::parse_node_id(&self.server_node_id())?;
        let addr = crate::lightning::parse_address(&self.server_ln_address())?;
        self.open_between(self.payer.node.clone(), server_id, addr, sat, &self.payer)
            .await
    }

    /// Opens a channel server → payer (the server's outbound liquidity, for refunds).
    pub async fn open_server_channel(&self, sat: u64) -> Result<(), HarnessError> {
        let payer_id = crate::lightning::parse_node_id(&self.payer.node_id())?;
        let addr = crate::lightning::parse_address(&self.payer.listen)?;
        let node = self.server().app.lightning.node().clone();
        self.open_between(node, payer_id, addr, sat, &self.payer)
            .await
    }

    /// A second payer: its own wallet node, funded, with a `sat` channel to the server (a
    /// second, independent source of HTLCs, e.g. paying an invoice the first one paid).
    /// Stop it with [`Wallet::stop`].
    pub async fn add_payer(&self, name: &str, sat: u64) -> Result<Wallet, HarnessError> {
        let dir = self
            .config
            .server
            .data_dir
            .parent()
            .unwrap_or(std::path::Path::new("."))
            .join(name);
        let listen = format!("127.0.0.1:{}", free_port());
        let chain = self.payer_chain.clone();
        let wallet = tokio::task::spawn_blocking(move || {
            Wallet::start(
                &dir,
                crate::config::Network::Regtest,
                &listen,
                &chain,
                false,
            )
        })
        .await
        .map_err(|e| HarnessError::Setup(e.to_string()))??;
        let addr = wallet.new_address()?;
        self.bitcoind.mine_to(1, &addr)?;
        self.mine(100).await?;
        wait_onchain_funds(wallet.node.clone()).await?;
        let server_id = crate::lightning::parse_node_id(&self.server_node_id())?;
        let server_addr = crate::lightning::parse_address(&self.server_ln_address())?;
        self.open_between(wallet.node.clone(), server_id, server_addr, sat, &wallet)
            .await?;
        let node = wallet.node.clone();
        wait_until(
            "the second payer's channel",
            Duration::from_secs(90),
            || {
                let node = node.clone();
                async move { node.list_channels().iter().any(|c| c.is_usable) }
            },
        )
        .await?;
        Ok(wallet)
    }

    /// Opens a channel from `opener` to `peer` and waits until the server and `wallet` (the
    /// payer-side node of the channel) report it ready.
    async fn open_between(
        &self,
        opener: std::sync::Arc<ldk_node::Node>,
        peer: ldk_node::bitcoin::secp256k1::PublicKey,
        addr: ldk_node::lightning::ln::msgs::SocketAddress,
        sat: u64,
        wallet: &Wallet,
    ) -> Result<(), HarnessError> {
        let mut server_notices = self.server().app.lightning.subscribe();
        let mut payer_events = wallet.subscribe();
        let mempool_before = self.bitcoind.mempool_len()?;
        tokio::task::spawn_blocking(move || opener.open_channel(peer, addr, sat, None, None))
            .await
            .map_err(|e| HarnessError::Setup(e.to_string()))?
            .map_err(LightningError::from)?;
        // The funding transaction is broadcast asynchronously.
        wait_until(
            "funding tx in the mempool",
            Duration::from_secs(60),
            || async { self.bitcoind.mempool_len().unwrap_or(0) > mempool_before },
        )
        .await?;
        self.mine(6).await?;
        let server_ready = async {
            loop {
                match server_notices.recv().await {
                    Ok(NodeNotice::ChannelReady { .. }) => return Ok(()),
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => return Err(HarnessError::Setup("server notices closed".into())),
                }
            }
        };
        let payer_ready = async {
            loop {
                match payer_events.recv().await {
                    Ok(ldk_node::Event::ChannelReady { .. }) => return Ok(()),
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => return Err(HarnessError::Setup("payer events closed".into())),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(60), async {
            tokio::try_join!(server_ready, payer_ready)
        })
        .await
        .map_err(|_| HarnessError::Timeout("ChannelReady on both nodes"))??;
        self.wait_channel_usable().await
    }

    /// Waits until both ends see a usable channel (after a restart, the new server node
    /// only does once the payer has reconnected and the channel is re-established).
    pub async fn wait_channel_usable(&self) -> Result<(), HarnessError> {
        self.wait_both("usable channels", Duration::from_secs(90), |n| {
            let chans = n.list_channels();
            !chans.is_empty() && chans.iter().all(|c| c.is_usable)
        })
        .await
    }

    /// Stops the server (as a process exit would) and starts it again on the same data, then
    /// has the payer reconnect (the server does not dial out) and waits for the channel.
    pub async fn restart_server(&mut self) -> Result<(), HarnessError> {
        if let Some(s) = self.server.take() {
            s.stop().await;
        }
        let t = Instant::now();
        self.server = Some(server::start(self.config.clone()).await?);
        self.server_start = t.elapsed();
        let id = crate::lightning::parse_node_id(&self.server_node_id())?;
        let addr = crate::lightning::parse_address(&self.server_ln_address())?;
        let node = self.payer.node.clone();
        tokio::task::spawn_blocking(move || node.connect(id, addr, true))
            .await
            .map_err(|e| HarnessError::Setup(e.to_string()))?
            .map_err(LightningError::from)?;
        self.wait_channel_usable().await
    }

    /// Stops the server and the payer (bitcoind goes with the harness).
    pub async fn stop(mut self) {
        if let Some(s) = self.server.take() {
            s.stop().await;
        }
        let payer = self.payer.node.clone();
        self.payer.stop();
        drop(payer);
    }
}
