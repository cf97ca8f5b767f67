//! The server as its own OS process (`satstream serve`), for the crash tests and the chaos
//! bench: it can be killed with SIGKILL (or kill itself at a fault point, `SATSTREAM_FAULT`)
//! and restarted on the same data directories, exactly as an operator's process would be.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::bitcoind::spawn_kept;
use super::HarnessError;
use crate::config::Config;

pub struct ServerProcess {
    child: Child,
    _keeper: std::sync::mpsc::Sender<()>,
    /// gRPC endpoint (`http://host:port`).
    pub endpoint: String,
    pub log: PathBuf,
    exited: Option<ExitStatus>,
}

impl ServerProcess {
    /// Writes `config` to `<data_dir>/server.toml` and runs `exe serve` on it with `env`
    /// added, logging (debug for satstream) to `<data_dir>/server-<n>.log`. Returns once gRPC
    /// answers, or fails with the log's tail if the process exits first.
    pub async fn start(
        exe: &Path,
        config: &Config,
        log_filter: &str,
        env: &[(&str, &str)],
        timeout: Duration,
    ) -> Result<ServerProcess, HarnessError> {
        let dir = &config.server.data_dir;
        std::fs::create_dir_all(dir).map_err(|e| HarnessError::Setup(e.to_string()))?;
        let config_path = dir.join("server.toml");
        std::fs::write(&config_path, config.to_toml())
            .map_err(|e| HarnessError::Setup(format!("{}: {e}", config_path.display())))?;
        let n = (0..)
            .find(|i| !dir.join(format!("server-{i}.log")).exists())
            .unwrap_or(0);
        let log = dir.join(format!("server-{n}.log"));
        let out = std::fs::File::create(&log).map_err(|e| HarnessError::Setup(e.to_string()))?;
        let err = out
            .try_clone()
            .map_err(|e| HarnessError::Setup(e.to_string()))?;
        let mut cmd = Command::new(exe);
        cmd.arg("serve")
            .arg("--config")
            .arg(&config_path)
            .arg("--log")
            .arg(log_filter)
            .env_remove("SATSTREAM_FAULT")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        let (child, keeper) = spawn_kept(cmd, "server-keeper")
            .map_err(|e| HarnessError::Setup(format!("starting {}: {e}", exe.display())))?;
        let mut p = ServerProcess {
            child,
            _keeper: keeper,
            endpoint: format!("http://{}", config.server.grpc_listen),
            log,
            exited: None,
        };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = p.try_exit() {
                return Err(HarnessError::Setup(format!(
                    "the server exited at start ({status}):\n{}",
                    p.log_tail(40)
                )));
            }
            if crate::wire::proto::inference_client::InferenceClient::connect(p.endpoint.clone())
                .await
                .is_ok()
            {
                return Ok(p);
            }
            if Instant::now() > deadline {
                return Err(HarnessError::Timeout("the server process to serve gRPC"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status, if the process has ended.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// Waits for the process to end (e.g. killed at a fault point).
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_exit() {
                return Ok(s);
            }
            if Instant::now() > deadline {
                return Err(HarnessError::Timeout("the server process to exit"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL, as `kill -9` or the OOM killer would.
    pub async fn kill(&mut self) -> Result<ExitStatus, HarnessError> {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGKILL);
        }
        self.wait_exit(Duration::from_secs(30)).await
    }

    /// SIGTERM: the server's own orderly shutdown.
    pub async fn stop(&mut self, timeout: Duration) -> Result<ExitStatus, HarnessError> {
        if self.try_exit().is_none() {
            unsafe {
                libc::kill(self.child.id() as i32, libc::SIGTERM);
            }
        }
        self.wait_exit(timeout).await
    }

    /// Every log this server process (and the ones before it, on the same data dir) wrote.
    pub fn all_logs(&self) -> String {
        let dir = self.log.parent().map(Path::to_path_buf).unwrap_or_default();
        (0..)
            .map(|i| dir.join(format!("server-{i}.log")))
            .take_while(|p| p.exists())
            .map(|p| std::fs::read_to_string(p).unwrap_or_default())
            .collect()
    }

    /// The last `lines` lines of the process's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if self.try_exit().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Adds `authorization: Bearer <token>` to every Admin request.
#[derive(Clone)]
pub struct Bearer(pub String);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let v = format!("Bearer {}", self.0)
            .parse()
            .map_err(|_| tonic::Status::internal("bad token"))?;
        req.metadata_mut().insert("authorization", v);
        Ok(req)
    }
}

pub type AdminClient = crate::wire::proto::admin_client::AdminClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>,
>;

/// Options of a [`ProcessWorld`].
#[derive(Debug, Clone, Default)]
pub struct ProcessOptions {
    pub models: Vec<crate::config::ModelConfig>,
    /// `--set` overrides of the server's config.
    pub sets: Vec<String>,
    /// Channel payer → server, sat.
    pub channel_sat: u64,
    /// The server's log filter (default: satstream at debug, libraries at info).
    pub log: Option<String>,
}

/// A regtest world whose server is its own process: bitcoind, a payer wallet in this
/// process, and `satstream serve` on data directories that outlive its restarts.
pub struct ProcessWorld {
    pub bitcoind: super::Bitcoind,
    pub payer: super::Wallet,
    pub config: Config,
    pub server: Option<ServerProcess>,
    pub server_node_id: String,
    pub admin_token: String,
    exe: PathBuf,
    channel_sat: u64,
    log: String,
    _tmp: tempfile::TempDir,
}

impl ProcessWorld {
    /// The payer node's storage directory.
    pub fn payer_dir(&self) -> PathBuf {
        self._tmp.path().join("payer")
    }

    /// Starts bitcoind, the payer and the server (`exe`), funds both nodes and opens the
    /// channel.
    pub async fn start(exe: &Path, opts: ProcessOptions) -> Result<ProcessWorld, HarnessError> {
        let bitcoind = super::Bitcoind::start(None)?;
        let tmp = tempfile::Builder::new()
            .prefix("satstream-proc-")
            .tempdir()
            .map_err(|e| HarnessError::Setup(e.to_string()))?;
        let root = tmp.path().to_path_buf();
        let mut sets = vec![
            format!("server.data_dir={}", root.join("server").display()),
            format!("server.grpc_listen=127.0.0.1:{}", super::free_port()),
            format!("server.http_listen=127.0.0.1:{}", super::free_port()),
            format!("lightning.listen=127.0.0.1:{}", super::free_port()),
            format!("chain.bitcoind_rpc_port={}", bitcoind.rpc_port),
            format!("chain.bitcoind_rpc_user={}", bitcoind.rpc_user),
            format!("chain.bitcoind_rpc_password={}", bitcoind.rpc_password),
        ];
        sets.extend(opts.sets.iter().cloned());
        let mut config = Config::load(None, Vec::new(), &sets)
            .map_err(|e| HarnessError::Setup(e.to_string()))?;
        config.models = opts.models.clone();
        let payer = {
            let (dir, listen) = (
                root.join("payer"),
                format!("127.0.0.1:{}", super::free_port()),
            );
            let chain = config.chain.clone();
            tokio::task::spawn_blocking(move || {
                super::Wallet::start(&dir, crate::config::Network::Regtest, &listen, &chain, true)
            })
            .await
            .map_err(|e| HarnessError::Setup(e.to_string()))??
        };
        let mut w = ProcessWorld {
            bitcoind,
            payer,
            config,
            server: None,
            server_node_id: String::new(),
            admin_token: String::new(),
            exe: exe.to_path_buf(),
            channel_sat: opts.channel_sat,
            log: opts
                .log
                .clone()
                .unwrap_or_else(|| "info,satstream=debug,ldk_node=info,lightning=info".into()),
            _tmp: tmp,
        };
        w.start_server(&[]).await?;
        // Both nodes need mature coins: the server to accept anchor channels.
        let server_addr = w
            .admin()
            .await?
            .new_address(crate::wire::proto::NewAddressRequest {})
            .await
            .map_err(|e| HarnessError::Setup(e.to_string()))?
            .into_inner()
            .address;
        let payer_addr = w.payer.new_address()?;
        w.bitcoind.mine_to(1, &payer_addr)?;
        w.bitcoind.mine_to(1, &server_addr)?;
        w.mine(100).await?;
        w.ensure_channel().await?;
        Ok(w)
    }

    /// (Re)starts the server process with `env` (e.g. `SATSTREAM_FAULT`), then has the
    /// payer reconnect (the server does not dial out).
    pub async fn start_server(&mut self, env: &[(&str, &str)]) -> Result<(), HarnessError> {
        let p = ServerProcess::start(
            &self.exe,
            &self.config,
            &self.log,
            env,
            Duration::from_secs(120),
        )
        .await?;
        self.server = Some(p);
        self.admin_token = std::fs::read_to_string(self.config.admin_token_path())
            .map_err(|e| HarnessError::Setup(format!("admin token: {e}")))?
            .trim()
            .to_string();
        let info = self
            .admin()
            .await?
            .get_info(crate::wire::proto::GetInfoRequest {})
            .await
            .map_err(|e| HarnessError::Setup(e.to_string()))?
            .into_inner();
        self.server_node_id = info.node_id;
        self.reconnect().await
    }

    pub fn server(&mut self) -> &mut ServerProcess {
        self.server.as_mut().expect("server started")
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.config.server.grpc_listen)
    }

    /// The HTTP face's base URL (`http://host:port`).
    pub fn http_base(&self) -> String {
        format!("http://{}", self.config.server.http_listen)
    }

    pub async fn admin(&self) -> Result<AdminClient, HarnessError> {
        let ch = tonic::transport::Endpoint::from_shared(self.endpoint())
            .map_err(|e| HarnessError::Setup(e.to_string()))?
            .connect()
            .await
            .map_err(|e| HarnessError::Setup(format!("admin connect: {e}")))?;
        Ok(
            crate::wire::proto::admin_client::AdminClient::with_interceptor(
                ch,
                Bearer(self.admin_token.clone()),
            ),
        )
    }

    pub async fn inference(
        &self,
    ) -> Result<
        crate::wire::proto::inference_client::InferenceClient<tonic::transport::Channel>,
        HarnessError,
    > {
        crate::wire::proto::inference_client::InferenceClient::connect(self.endpoint())
            .await
            .map_err(|e| HarnessError::Setup(format!("connect: {e}")))
    }

    /// The payer dials the server.
    pub async fn reconnect(&self) -> Result<(), HarnessError> {
        let id = crate::node::parse_node_id(&self.server_node_id)?;
        let addr = crate::node::parse_address(&self.config.lightning.listen)?;
        let node = self.payer.node.clone();
        tokio::task::spawn_blocking(move || node.connect(id, addr, true))
            .await
            .map_err(|e| HarnessError::Setup(e.to_string()))?
            .map_err(|e| HarnessError::Setup(format!("connect to the server: {e}")))
    }

    /// Mines `n` blocks and waits for the payer and the server to see them.
    pub async fn mine(&self, n: u32) -> Result<u32, HarnessError> {
        let addr = self.payer.new_address()?;
        let tip = self.bitcoind.mine_to(n, &addr)?;
        let node = self.payer.node.clone();
        super::wait_until("the payer to sync", Duration::from_secs(60), || {
            let node = node.clone();
            async move { node.status().current_best_block.height >= tip }
        })
        .await?;
        if self.server.is_some() {
            super::wait_until("the server to sync", Duration::from_secs(60), || async {
                match self.admin().await {
                    Ok(mut a) => a
                        .get_info(crate::wire::proto::GetInfoRequest {})
                        .await
                        .map(|r| r.into_inner().best_block_height >= tip)
                        .unwrap_or(false),
                    Err(_) => false,
                }
            })
            .await?;
        }
        Ok(tip)
    }

    /// Makes sure the payer has a usable channel to the server, opening a new one when the
    /// last was closed (a force close after a crash).
    pub async fn ensure_channel(&self) -> Result<(), HarnessError> {
        let has = |n: &ldk_node::Node| !n.list_channels().is_empty();
        if !has(&self.payer.node) {
            super::wait_onchain_funds(self.payer.node.clone()).await?;
            let before = self.bitcoind.mempool_len()?;
            self.payer
                .open_channel(
                    &self.server_node_id,
                    &self.config.lightning.listen,
                    self.channel_sat,
                )
                .await?;
            // The funding transaction is broadcast asynchronously.
            super::wait_until(
                "funding tx in the mempool",
                Duration::from_secs(60),
                || async { self.bitcoind.mempool_len().unwrap_or(0) > before },
            )
            .await?;
            self.mine(6).await?;
        }
        if !self.payer.wait_usable(Duration::from_secs(90)).await? {
            return Err(HarnessError::Timeout("a usable channel to the server"));
        }
        Ok(())
    }

    /// After a crash: until every payment the payer made has an outcome (a force-closed
    /// channel's HTLCs resolve on chain, so blocks are mined meanwhile).
    pub async fn settle_payer(&self, timeout: Duration) -> Result<(), HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            let pending = self
                .payer
                .node
                .list_payments()
                .iter()
                .filter(|p| {
                    // Its own invoices (refunds it waits for) are not payments it made.
                    p.status == ldk_node::payment::PaymentStatus::Pending
                        && p.direction == ldk_node::payment::PaymentDirection::Outbound
                        && !matches!(p.kind, ldk_node::payment::PaymentKind::Onchain { .. })
                })
                .count();
            if pending == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(HarnessError::Timeout("the payer's payments to resolve"));
            }
            let _ = self.reconnect().await;
            if self.payer.node.list_channels().iter().any(|c| !c.is_usable)
                || self.payer.node.list_channels().is_empty()
            {
                // A closing channel: its HTLCs resolve as blocks confirm the close.
                self.mine(1).await?;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Waits until the server has resolved everything: no session live, no invoice open,
    /// held or claiming, every channel closure classified (mining while one waits for its
    /// closing transaction).
    pub async fn wait_settled(&self, timeout: Duration) -> Result<(), HarnessError> {
        use crate::wire::proto::{ListInvoicesRequest, ListLossesRequest, ListSessionsRequest};
        super::wait_until("the server to settle", timeout, || async {
            let Ok(mut a) = self.admin().await else {
                return false;
            };
            let open_sessions = a
                .list_sessions(ListSessionsRequest {
                    state: "open".into(),
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner().sessions.len())
                .unwrap_or(1);
            let mut unresolved = 0;
            for state in ["open", "held", "claiming"] {
                unresolved += a
                    .list_invoices(ListInvoicesRequest {
                        state: state.into(),
                        ..Default::default()
                    })
                    .await
                    .map(|r| r.into_inner().invoices.len())
                    .unwrap_or(1);
            }
            let closures = a
                .list_losses(ListLossesRequest::default())
                .await
                .map(|r| {
                    r.into_inner()
                        .closures
                        .iter()
                        .all(|c| c.resolved_at_unix > 0)
                })
                .unwrap_or(false);
            if !closures {
                let _ = self.mine(1).await;
            }
            open_sessions == 0 && unresolved == 0 && closures
        })
        .await
    }

    /// Stops the server and the payer.
    pub async fn stop(mut self) {
        if let Some(mut s) = self.server.take() {
            let _ = s.stop(Duration::from_secs(30)).await;
        }
        self.payer.stop();
    }
}
