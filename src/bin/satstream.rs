//! The satstream command line: a thin layer over the library.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use satstream::client::{console::Console, Summary, Wallet};
use satstream::config::{ChainConfig, ChainSource, Config, Network};
use satstream::grpc::proto::{
    inference_client::InferenceClient, ChatMessage, GenerateRequest, ListModelsRequest,
    PaymentMode, QuoteRequest, SamplingParams,
};
use satstream::harness::{Harness, HarnessOptions};

#[derive(Parser)]
#[command(
    name = "satstream",
    version,
    about = "Sell LLM tokens per chunk over Lightning"
)]
struct Cli {
    /// TOML config file (default: built-in defaults, the same as config/satstream.toml).
    #[arg(long, short, global = true, env = "SATSTREAM_CONFIG")]
    config: Option<PathBuf>,
    /// Override any config key, e.g. --set payments.window_chunks=3 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE", global = true)]
    sets: Vec<String>,
    /// Log filter (tracing EnvFilter syntax), e.g. "info" or "satstream=debug". Default:
    /// "info,ldk_node=warn,lightning=warn" for the server, "warn" for client commands.
    #[arg(long, global = true, env = "SATSTREAM_LOG")]
    log: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the server.
    Serve,
    /// Print the effective configuration (file + environment + --set) and exit.
    Config,
    /// Start a local regtest world (bitcoind, this server, a funded payer node with a channel
    /// to it) and print grpcurl commands to try. Ctrl-C stops everything.
    Regtest,
    /// The whole product on one machine: bitcoind -regtest, the server (default model), a
    /// client wallet with a channel to it, and one paid chat generation shown live.
    Demo(DemoArgs),
    /// One paid generation against any satstream server, paid from the client's own wallet.
    Generate(GenerateArgs),
    /// An interactive paid chat (one line per turn; the conversation is kept).
    Chat(GenerateArgs),
    /// The client's wallet: address, balance, open a channel to a server.
    Wallet(WalletArgs),
    /// Measure the performance goals on the regtest harness; print the table and write it to
    /// docs/benchmarks.md.
    Bench(BenchArgs),
}

#[derive(Args)]
struct BenchArgs {
    /// smollm2 (the configured default model), tiny (generated), all, or store (only the
    /// ldk-node store comparison, on tiny; all includes it).
    #[arg(long, default_value = "smollm2")]
    model: String,
    /// Where to write the report.
    #[arg(long, default_value = "docs/benchmarks.md")]
    out: PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    Bolt11,
    Atomic,
    Keysend,
}

impl Mode {
    fn proto(self) -> PaymentMode {
        match self {
            Mode::Bolt11 => PaymentMode::Bolt11,
            Mode::Atomic => PaymentMode::Atomic,
            Mode::Keysend => PaymentMode::Keysend,
        }
    }
}

#[derive(Args)]
struct Request {
    /// The user message (generate/demo) or the system prompt (chat).
    #[arg(long, short)]
    prompt: Option<String>,
    /// Model id (default: the server's first model).
    #[arg(long)]
    model: Option<String>,
    #[arg(long, default_value_t = 128)]
    max_tokens: u32,
    /// How to pay: a hold invoice per chunk, pay-to-decrypt, or keysend balance.
    #[arg(long, value_enum, default_value = "bolt11")]
    mode: Mode,
    /// Stop paying (which halts the generation) before spending more than this.
    #[arg(long)]
    max_sats: Option<u64>,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Chunks the server may generate ahead of payment (default: the server's).
    #[arg(long)]
    window: Option<u32>,
    /// One JSON object per event on stdout, then a summary object.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct DemoArgs {
    #[command(flatten)]
    req: Request,
}

#[derive(Args)]
struct WalletConn {
    /// The satstream server's gRPC endpoint.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    server: String,
    /// The client wallet's data directory (its seed lives here).
    #[arg(long, default_value = "satstream-client")]
    wallet_dir: PathBuf,
    #[arg(long, default_value = "regtest")]
    network: String,
    /// The wallet node's Lightning listen address.
    #[arg(long, default_value = "127.0.0.1:9737")]
    listen: String,
    /// Chain source: an Esplora URL (otherwise bitcoind RPC below).
    #[arg(long)]
    esplora: Option<String>,
    #[arg(long, default_value = "127.0.0.1:18443")]
    bitcoind_rpc: String,
    #[arg(long, default_value = "satstream")]
    rpc_user: String,
    #[arg(long, default_value = "satstream")]
    rpc_password: String,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    conn: WalletConn,
    #[command(flatten)]
    req: Request,
}

#[derive(Args)]
struct WalletArgs {
    #[command(flatten)]
    conn: WalletConn,
    #[command(subcommand)]
    cmd: WalletCmd,
}

#[derive(Subcommand)]
enum WalletCmd {
    /// A fresh on-chain address to fund the wallet.
    Address,
    /// On-chain and Lightning balances.
    Balance,
    /// Open a channel to the server (its node id and address come from Quote).
    OpenChannel {
        #[arg(long, default_value_t = 100_000)]
        sats: u64,
    },
    /// Pay BOLT11 invoices as they appear in the output of a command, which is copied to
    /// stdout: `satstream wallet pay --max-sats 50 -- grpcurl … Generate`. The command starts
    /// once the wallet's channel is usable. Without a command: `--invoice`s, else stdin.
    Pay {
        /// Spend at most this much (invoice amounts); invoices beyond it are refused.
        #[arg(long)]
        max_sats: u64,
        /// An invoice to pay (repeatable).
        #[arg(long = "invoice")]
        invoices: Vec<String>,
        /// The command whose output carries the invoices (after `--`).
        #[arg(last = true)]
        command: Vec<String>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let default_log = match cli.cmd {
        Cmd::Serve | Cmd::Regtest | Cmd::Config => "info,ldk_node=warn,lightning=warn",
        // Regtest has no fee estimates; ldk-node logs that as an error on every sync.
        _ => "warn,ldk_node::chain=off",
    };
    let log = cli.log.clone().unwrap_or_else(|| default_log.to_string());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&log).context("--log")?)
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(cli))
}

fn load_config(cli: &Cli) -> Result<Config> {
    Ok(Config::load(
        cli.config.as_deref(),
        std::env::vars(),
        &cli.sets,
    )?)
}

async fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Config => {
            print!("{}", load_config(&cli)?.to_toml());
            Ok(())
        }
        Cmd::Serve => {
            let config = load_config(&cli)?;
            let server = satstream::server::start(config).await?;
            tokio::spawn(satstream::shutdown::cancel_on_signal(
                server.shutdown_token(),
            ));
            eprintln!(
                "satstream serving gRPC on {} (node {}); admin token in {}",
                server.grpc_addr,
                server.app.lightning.node_id(),
                server.app.config.admin_token_path().display()
            );
            server.cancelled().await;
            server.stop().await;
            Ok(())
        }
        Cmd::Regtest => regtest(&cli).await,
        Cmd::Demo(ref a) => demo(&cli, &a.req).await,
        Cmd::Generate(ref a) => client_generate(a, false).await,
        Cmd::Chat(ref a) => client_generate(a, true).await,
        Cmd::Wallet(ref a) => wallet(a).await,
        Cmd::Bench(ref a) => bench(&cli, a).await,
    }
}

async fn bench(cli: &Cli, a: &BenchArgs) -> Result<()> {
    use satstream::bench::{run, BenchOptions};
    let base = load_config(cli)?;
    let tmp = tempfile::tempdir()?;
    let mut runs = Vec::new();
    if a.model == "smollm2" || a.model == "all" {
        let m = base
            .models
            .first()
            .context("the configuration has no model")?
            .clone();
        runs.push(BenchOptions {
            model: m,
            tokens: 128,
            concurrent_tokens: 32,
        });
    }
    let tiny_model = || -> Result<satstream::config::ModelConfig> {
        let path = satstream::engine::tiny_model::write_tiny_model(tmp.path())?;
        let msat = base.models.first().map_or(1000, |m| m.msat_per_token);
        Ok(satstream::config::ModelConfig::new("tiny", path, msat))
    };
    let mut tiny = (a.model == "store").then(tiny_model).transpose()?;
    if a.model == "tiny" || a.model == "all" {
        let m = tiny_model()?;
        runs.push(BenchOptions {
            model: m,
            tokens: 1024,
            concurrent_tokens: 128,
        });
    }
    if runs.is_empty() && tiny.is_none() {
        bail!("--model {:?}: use smollm2, tiny, all or store", a.model);
    }
    let mut report = String::from(BENCH_HEADER);
    for r in runs {
        let id = r.model.id.clone();
        if id == "tiny" {
            tiny = Some(r.model.clone());
        }
        let table = run(r).await?;
        println!("{table}");
        report.push_str(&format!("\n## {id}\n\n{table}"));
    }
    // LDK's persistence is model-independent; the tiny model makes the stream payment-bound.
    if let Some(tiny) = tiny {
        let table = satstream::bench::store_comparison(&tiny).await?;
        println!("{table}");
        report.push_str(&format!(
            "\n## LDK persistence stalls\n\n{STORE_NOTE}\n\n{table}"
        ));
    }
    if let Some(dir) = a.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&a.out, report)?;
    eprintln!("written to {}", a.out.display());
    Ok(())
}

const STORE_NOTE: &str = "Every ~100 channel-monitor updates (~20 payments) ldk-node \
rewrites a channel's full monitor and removes the stale updates, one store write each, and \
payments wait meanwhile. Each run below is a fresh regtest world whose server and payer \
stores use the journal mode named; everything else is equal.";

const BENCH_HEADER: &str = "# Benchmarks\n\n\
Written by `satstream bench --model all` (rerun: `scripts/bench.sh`, ~10 min). Every number comes from \
one run on the regtest harness: a real bitcoind, the server in process with its ldk-node, a \
client wallet node paying over a real channel, and the real engine. The analysis (where the \
time goes, which goals this hardware cannot meet and why) is in docs/performance.md. \
Definitions:\n\n\
- *Paid ÷ raw*: a paid BOLT11 stream (request to Done, client side) against the same engine \
generating the same prompt greedily without payment, in the same run (medians of 5 alternated runs each, after one warm-up stream).\n\
- *Stall share*: time the engine sat paused at its allowance waiting for payment (pause to \
the next token, so a resume's prefill counts), over the sessions' total time.\n\
- *Payment event → first token*: the server's event loop handling PaymentClaimable to the \
chunk's Tokens being written to the stream (LDK's claim and the ledger commit included), \
and its parts.\n\
- *Tokens after the payer stops*: generated beyond what was paid when the payment timeout \
halts the session.\n\
- *Pay → settled*: client side, from sending a payment to PaymentSuccessful.\n";

fn generate_request(model: String, messages: Vec<ChatMessage>, r: &Request) -> GenerateRequest {
    GenerateRequest {
        model,
        messages,
        max_tokens: r.max_tokens,
        mode: r.mode.proto() as i32,
        sampling: Some(SamplingParams {
            temperature: Some(r.temperature),
            ..Default::default()
        }),
        window_chunks: r.window,
        ..Default::default()
    }
}

fn user(content: &str) -> ChatMessage {
    ChatMessage {
        role: "user".into(),
        content: content.into(),
    }
}

/// Runs one paid generation, printing it live; Ctrl-C hangs up (which halts it server-side).
async fn paid_generation(
    client: &mut InferenceClient<Channel>,
    wallet: &Wallet,
    req: GenerateRequest,
    r: &Request,
    stop: &CancellationToken,
) -> Result<Option<Summary>> {
    let mut console = Console::new(r.json);
    let budget = r.max_sats.map(|s| s * 1000);
    let run = satstream::client::generate(client, wallet, req, budget, |e| console.on_event(e));
    let summary = tokio::select! {
        s = run => s?,
        _ = stop.cancelled() => {
            eprintln!("\ninterrupted: hung up, the server halts the generation");
            return Ok(None);
        }
    };
    console.finish(&summary);
    Ok(Some(summary))
}

async fn demo(cli: &Cli, r: &Request) -> Result<()> {
    let base = load_config(cli)?;
    let Some(model) = base.models.first() else {
        bail!("the configuration has no model: add a [[models]] entry or --set models.0.path=...");
    };
    let model_id = r.model.clone().unwrap_or_else(|| model.id.clone());
    let stop = CancellationToken::new();
    tokio::spawn(satstream::shutdown::cancel_on_signal(stop.clone()));
    eprintln!("satstream demo: starting bitcoind -regtest, the server ({model_id}) and a client wallet; opening a channel...");
    let started = std::time::Instant::now();
    let mut sets = cli.sets.clone();
    sets.push(format!(
        "server.grpc_listen=127.0.0.1:{}",
        satstream::harness::free_port()
    ));
    let h = tokio::select! {
        h = Harness::start(HarnessOptions { models: base.models.clone(), sets, ..HarnessOptions::default() }) => h?,
        _ = stop.cancelled() => bail!("interrupted during setup"),
    };
    eprintln!(
        "ready in {:.1} s: server node {}, client node {}, channel {} sat. Paying per chunk ({}):\n",
        started.elapsed().as_secs_f64(),
        h.server_node_id(),
        h.payer.node_id(),
        1_000_000,
        r.mode.proto().as_str_name().trim_start_matches("PAYMENT_MODE_"),
    );
    let prompt = r
        .prompt
        .clone()
        .unwrap_or_else(|| "Write a short poem about the Lightning Network.".into());
    let mut client = InferenceClient::connect(format!("http://{}", h.server().grpc_addr)).await?;
    let req = generate_request(model_id, vec![user(&prompt)], r);
    let result = paid_generation(&mut client, &h.payer, req, r, &stop).await;
    h.stop().await;
    eprintln!("stopped bitcoind, the server and the wallet; no processes left behind");
    result.map(|_| ())
}

const NO_CHANNEL: &str =
    "the wallet has no channel: `satstream wallet open-channel --sats N` first";

/// How long a client waits for its channel to be re-established after the wallet starts.
const CHANNEL_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

impl WalletConn {
    fn chain(&self) -> Result<ChainConfig> {
        let mut c = ChainConfig::default();
        if let Some(url) = &self.esplora {
            c.source = ChainSource::Esplora;
            c.esplora_url = url.clone();
        } else {
            let (host, port) = self
                .bitcoind_rpc
                .rsplit_once(':')
                .context("--bitcoind-rpc must be HOST:PORT")?;
            c.source = ChainSource::BitcoindRpc;
            c.bitcoind_rpc_host = host.into();
            c.bitcoind_rpc_port = port.parse().context("--bitcoind-rpc port")?;
            c.bitcoind_rpc_user = self.rpc_user.clone();
            c.bitcoind_rpc_password = self.rpc_password.clone();
        }
        Ok(c)
    }

    fn network(&self) -> Result<Network> {
        Ok(match self.network.as_str() {
            "regtest" => Network::Regtest,
            "signet" => Network::Signet,
            "testnet" => Network::Testnet,
            "bitcoin" | "mainnet" => Network::Bitcoin,
            other => bail!("--network {other:?}: use regtest, signet, testnet or bitcoin"),
        })
    }

    async fn open_wallet(&self) -> Result<Wallet> {
        let (dir, network, listen, chain) = (
            self.wallet_dir.clone(),
            self.network()?,
            self.listen.clone(),
            self.chain()?,
        );
        Ok(
            tokio::task::spawn_blocking(move || {
                Wallet::start(&dir, network, &listen, &chain, true)
            })
            .await??,
        )
    }

    async fn connect(&self) -> Result<InferenceClient<Channel>> {
        InferenceClient::connect(self.server.clone())
            .await
            .with_context(|| format!("cannot reach the server at {}", self.server))
    }

    /// The wallet, ready to pay (a usable channel), and the server.
    async fn open(&self) -> Result<(Wallet, InferenceClient<Channel>)> {
        let wallet = self.open_wallet().await?;
        let client = match self.connect().await {
            Ok(c) => c,
            Err(e) => {
                wallet.stop();
                return Err(e);
            }
        };
        match wallet.wait_usable(CHANNEL_WAIT).await {
            Ok(true) => Ok((wallet, client)),
            Ok(false) => {
                wallet.stop();
                bail!(NO_CHANNEL)
            }
            Err(e) => {
                wallet.stop();
                Err(e.into())
            }
        }
    }
}

async fn first_model(client: &mut InferenceClient<Channel>) -> Result<String> {
    let models = client
        .list_models(ListModelsRequest {})
        .await?
        .into_inner()
        .models;
    models
        .first()
        .map(|m| m.id.clone())
        .context("the server lists no models")
}

async fn client_generate(a: &GenerateArgs, chat: bool) -> Result<()> {
    let (wallet, mut client) = a.conn.open().await?;
    let model = match &a.req.model {
        Some(m) => m.clone(),
        None => first_model(&mut client).await?,
    };
    let stop = CancellationToken::new();
    tokio::spawn(satstream::shutdown::cancel_on_signal(stop.clone()));
    let result = if !chat {
        let prompt = a.req.prompt.clone().context("--prompt is required")?;
        let req = generate_request(model, vec![user(&prompt)], &a.req);
        paid_generation(&mut client, &wallet, req, &a.req, &stop)
            .await
            .map(|_| ())
    } else {
        chat_loop(&mut client, &wallet, model, &a.req, &stop).await
    };
    wallet.stop();
    result
}

async fn chat_loop(
    client: &mut InferenceClient<Channel>,
    wallet: &Wallet,
    model: String,
    r: &Request,
    stop: &CancellationToken,
) -> Result<()> {
    use tokio::io::AsyncBufReadExt;
    let mut history = Vec::new();
    if let Some(system) = &r.prompt {
        history.push(ChatMessage {
            role: "system".into(),
            content: system.clone(),
        });
    }
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    loop {
        eprint!("> ");
        let line = tokio::select! {
            l = lines.next_line() => l?,
            _ = stop.cancelled() => None,
        };
        let Some(line) = line else { return Ok(()) };
        if line.trim().is_empty() {
            continue;
        }
        history.push(user(&line));
        let req = generate_request(model.clone(), history.clone(), r);
        let mut text = String::new();
        let mut console = Console::new(r.json);
        let budget = r.max_sats.map(|s| s * 1000);
        let run = satstream::client::generate(client, wallet, req, budget, |e| {
            if let satstream::client::ClientEvent::Text { text: t, .. } = e {
                text.push_str(t);
            }
            console.on_event(e)
        });
        let summary = tokio::select! {
            s = run => s?,
            _ = stop.cancelled() => return Ok(()),
        };
        console.finish(&summary);
        history.push(ChatMessage {
            role: "assistant".into(),
            content: text,
        });
    }
}

async fn wallet(a: &WalletArgs) -> Result<()> {
    let wallet = a.conn.open_wallet().await?;
    let result = async {
        match &a.cmd {
            WalletCmd::Address => println!("{}", wallet.new_address()?),
            WalletCmd::Balance => {
                let node = wallet.node.clone();
                tokio::task::spawn_blocking(move || node.sync_wallets()).await??;
                let (spendable, total, outbound) = wallet.balances();
                println!(
                    "on-chain: {spendable} sat spendable ({total} sat total)\nlightning: {} sat can be spent",
                    outbound / 1000
                );
            }
            WalletCmd::OpenChannel { sats } => {
                let mut client = a.conn.connect().await?;
                let model = first_model(&mut client).await?;
                // Quote is where a server names its node; any small request will do.
                let q = client
                    .quote(QuoteRequest {
                        model,
                        prompt: "hi".into(),
                        max_tokens: 1,
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                let txid = wallet
                    .open_channel(&q.node_id, &q.node_address, *sats)
                    .await?;
                println!(
                    "opened a {sats} sat channel to {}@{} (funding tx {txid}); it is usable after 6 confirmations",
                    q.node_id, q.node_address
                );
            }
            WalletCmd::Pay {
                max_sats,
                invoices,
                command,
            } => {
                pay(&wallet, a.conn.network()?, *max_sats, invoices, command).await?;
            }
        }
        anyhow::Ok(())
    }
    .await;
    wallet.stop();
    result
}

/// `satstream wallet pay`: every invoice in a command's output, the invoices given, or those
/// piped through stdin.
async fn pay(
    wallet: &Wallet,
    network: Network,
    max_sats: u64,
    invoices: &[String],
    command: &[String],
) -> Result<()> {
    use satstream::client::pipe::{pay_lines, PipeEvent};
    use tokio::io::BufReader;
    // The server refuses a generation it could not be paid for, so a command that starts
    // one must wait until this wallet's channel is back up.
    if !wallet.wait_usable(CHANNEL_WAIT).await? {
        bail!(NO_CHANNEL);
    }
    let report = |e: &PipeEvent| match e {
        PipeEvent::Sent { amount_msat } => eprintln!("[wallet] paying {amount_msat} msat"),
        PipeEvent::Paid {
            amount_msat,
            fee_msat,
        } => eprintln!("[wallet] paid {amount_msat} msat (fee {fee_msat} msat)"),
        PipeEvent::Failed {
            amount_msat,
            reason,
        } => eprintln!("[wallet] payment of {amount_msat} msat failed: {reason}"),
        PipeEvent::Refused { reason, .. } => eprintln!("[wallet] not paying an invoice: {reason}"),
    };
    let budget = max_sats * 1000;
    let settle = std::time::Duration::from_secs(60);
    let out = tokio::io::stdout();
    let (s, status) = if let Some((program, args)) = command.split_first() {
        let mut child = tokio::process::Command::new(program)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot run {program:?}"))?;
        let output = BufReader::new(child.stdout.take().context("the command's stdout")?);
        let s = pay_lines(wallet, network, output, out, budget, settle, report).await?;
        (s, Some(child.wait().await?))
    } else if !invoices.is_empty() {
        let text = invoices.join("\n");
        let input = BufReader::new(text.as_bytes());
        let s = pay_lines(
            wallet,
            network,
            input,
            tokio::io::sink(),
            budget,
            settle,
            report,
        );
        (s.await?, None)
    } else {
        let input = BufReader::new(tokio::io::stdin());
        (
            pay_lines(wallet, network, input, out, budget, settle, report).await?,
            None,
        )
    };
    eprintln!(
        "[wallet] summary: paid={} paid_msat={} fees_msat={} failed={} refused={} unresolved={}",
        s.paid, s.paid_msat, s.fees_msat, s.failed, s.refused, s.unresolved
    );
    if let Some(status) = status.filter(|s| !s.success()) {
        bail!("the command failed ({status})");
    }
    if s.failed + s.unresolved > 0 {
        bail!("not every payment succeeded");
    }
    Ok(())
}

async fn regtest(cli: &Cli) -> Result<()> {
    let base = load_config(cli)?;
    let mut sets = cli.sets.clone();
    sets.push(format!("server.grpc_listen={}", base.server.grpc_listen));
    eprintln!("Starting bitcoind -regtest, the server and a payer node; opening a channel...");
    let h = Harness::start(HarnessOptions {
        models: base.models.clone(),
        sets,
        bitcoind_rpc_port: Some(base.chain.bitcoind_rpc_port),
        ..HarnessOptions::default()
    })
    .await?;
    let addr = h.server().grpc_addr;
    let token = &h.server().admin_token;
    let model = base.models.first().map_or("MODEL", |m| m.id.as_str());
    let rpc = h.bitcoind.rpc_port;
    println!(
        "\nsatstream is running on regtest.\n\
         gRPC:          {addr}\n\
         server node:   {}@{}\n\
         bitcoind RPC:  127.0.0.1:{rpc} (user/password satstream)\n\n\
         In another terminal (`source scripts/env.sh` puts satstream, bitcoin-cli and grpcurl on PATH):\n\
         \x20 grpcurl -plaintext {addr} list\n\
         \x20 grpcurl -plaintext {addr} describe satstream.v1.Inference\n\
         \x20 grpcurl -plaintext {addr} satstream.v1.Inference/ListModels\n\
         \x20 grpcurl -plaintext -H 'authorization: Bearer {token}' {addr} satstream.v1.Admin/GetInfo\n\n\
         Pay from a wallet of your own (its data goes to ./satstream-client):\n\
         \x20 mine() {{ bitcoin-cli -regtest -rpcport={rpc} -rpcuser=satstream -rpcpassword=satstream generatetoaddress \"$1\" \"$(satstream wallet address)\" >/dev/null; }}\n\
         \x20 mine 101 && satstream wallet --server http://{addr} open-channel --sats 200000 && mine 6\n\
         \x20 satstream wallet pay --max-sats 100 -- grpcurl -plaintext -d '{{\"model\":\"{model}\",\"max_tokens\":48,\"messages\":[{{\"role\":\"user\",\"content\":\"Tell me about Lightning\"}}]}}' {addr} satstream.v1.Inference/Generate\n\n\
         Ctrl-C stops everything.",
        h.server_node_id(),
        h.server_ln_address(),
    );
    let stop = CancellationToken::new();
    satstream::shutdown::cancel_on_signal(stop.clone()).await;
    h.stop().await;
    eprintln!("stopped; no processes left behind");
    Ok(())
}
