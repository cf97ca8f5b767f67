//! The satstream command line: argument parsing over the library. The server is
//! `satstream::server`; each client command is a module of `satstream::client::cmd`; the
//! benchmark is `satstream::bench`.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[cfg(feature = "devtools")]
use satstream::bench::cli::BenchArgs;
use satstream::client::cmd::{account, generate, receipt, wallet};
use satstream::config::Config;
#[cfg(feature = "devtools")]
use satstream::devtools::{demo, regtest};

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
    #[cfg(feature = "devtools")]
    Regtest(regtest::RegtestArgs),
    /// The whole product on one machine: bitcoind -regtest, the server (default model), a
    /// client wallet with a channel to it, and one paid chat generation shown live.
    #[cfg(feature = "devtools")]
    Demo(demo::DemoArgs),
    /// One paid generation against any satstream server, paid from the client's own wallet.
    Generate(generate::GenerateArgs),
    /// An interactive paid chat (one line per turn; the conversation is kept).
    Chat(generate::GenerateArgs),
    /// The client's wallet: address, balance, open a channel to a server, pay invoices.
    Wallet(wallet::WalletArgs),
    /// A prepaid account on a server: top up, balance, refund.
    Account(account::AccountArgs),
    /// Signed receipts: verify one offline.
    Receipt(receipt::ReceiptArgs),
    /// Measure the performance goals on the regtest harness; print the table and write it to
    /// docs/benchmarks.md.
    #[cfg(feature = "devtools")]
    Bench(BenchArgs),
    /// Write a GGUF model with its quantized weights converted (e.g. Q4_1 → Q8_0, which
    /// mistral.rs decodes faster on a CPU).
    Requantize {
        /// q8_0, q4_0 or f16.
        #[arg(long, default_value = "q8_0")]
        to: String,
        src: PathBuf,
        dst: PathBuf,
    },
}

/// glibc gives a thread that finds the allocator's arenas busy a new arena, up to 8 per core.
/// Across tokio's workers, the blocking threads and the engines' threads, freed memory then
/// sits in many arenas that rarely hand it back, and the server's RSS creeps up with its
/// history (the long-run bench: 184 → 198 MB over 10 000 → 30 000 invoices with the default,
/// 151 → 156 MB with 2 arenas on 2 cores). One arena per core, unless the operator set
/// `MALLOC_ARENA_MAX`.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn limit_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let arenas = i32::try_from(cores.max(2)).unwrap_or(i32::MAX);
    // SAFETY: mallopt only sets a parameter of glibc's allocator; it is called first thing in
    // main, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, arenas);
    }
}

fn main() -> Result<()> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    limit_malloc_arenas();
    let cli = Cli::parse();
    let default_log = match cli.cmd {
        Cmd::Serve | Cmd::Config => "info,ldk_node=warn,lightning=warn,llama_cpp_2=warn",
        #[cfg(feature = "devtools")]
        Cmd::Regtest(_) => "info,ldk_node=warn,lightning=warn,llama_cpp_2=warn",
        _ => "warn",
    };
    let log = cli.log.clone().unwrap_or_else(|| default_log.to_string());
    // Regtest's known noise (no fee estimates) is not an error there; elsewhere it is.
    let regtest = load_config(&cli)
        .map(|c| c.lightning.network == satstream::config::Network::Regtest)
        .unwrap_or(true);
    satstream::logging::init(&log, regtest).context("--log")?;
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
    match &cli.cmd {
        Cmd::Config => {
            let c = load_config(&cli)?;
            print!("{}", c.to_toml());
            if c.plaintext() {
                println!("\n# gRPC is plaintext ({}: loopback)", c.server.grpc_listen);
            } else {
                // The certificate clients trust (generated now if it does not exist yet).
                let t = satstream::tls::load_or_create(&c)?;
                println!(
                    "\n# TLS: clients trust {} (--cacert); SHA-256 fingerprint {}",
                    t.trust_path.display(),
                    t.fingerprint
                );
            }
        }
        Cmd::Serve => serve(load_config(&cli)?).await?,
        #[cfg(feature = "devtools")]
        Cmd::Regtest(a) => regtest::run(&load_config(&cli)?, &cli.sets, a).await?,
        #[cfg(feature = "devtools")]
        Cmd::Demo(a) => demo::run(&load_config(&cli)?, &cli.sets, a).await?,
        Cmd::Generate(a) => generate::run(a, false).await?,
        Cmd::Chat(a) => generate::run(a, true).await?,
        Cmd::Wallet(a) => wallet::run(a).await?,
        Cmd::Account(a) => account::run(a).await?,
        Cmd::Receipt(a) => receipt::run(a)?,
        #[cfg(feature = "devtools")]
        Cmd::Bench(a) => satstream::bench::cli::command(&load_config(&cli)?, a).await?,
        Cmd::Requantize { to, src, dst } => {
            use satstream::engine::requantize::{parse_type, requantize};
            let to = parse_type(to).map_err(anyhow::Error::msg)?;
            let r = requantize(src, dst, to).map_err(anyhow::Error::msg)?;
            eprintln!(
                "{}: {} tensors converted, {} copied",
                dst.display(),
                r.converted,
                r.copied
            );
        }
    }
    Ok(())
}

async fn serve(config: Config) -> Result<()> {
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
