//! The satstream command line: a thin layer over the library.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

use satstream::config::Config;
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
    /// Log filter (tracing EnvFilter syntax), e.g. "info" or "satstream=debug".
    #[arg(
        long,
        global = true,
        env = "SATSTREAM_LOG",
        default_value = "info,ldk_node=warn,lightning=warn"
    )]
    log: String,
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
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&cli.log).context("--log")?)
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
    }
}

async fn regtest(cli: &Cli) -> Result<()> {
    let base = load_config(cli)?;
    let mut sets = cli.sets.clone();
    sets.push(format!("server.grpc_listen={}", base.server.grpc_listen));
    eprintln!("Starting bitcoind -regtest, the server and a payer node; opening a channel...");
    let h = Harness::start(HarnessOptions {
        models: base.models.clone(),
        sets,
        ..HarnessOptions::default()
    })
    .await?;
    let addr = h.server().grpc_addr;
    let token = &h.server().admin_token;
    println!(
        "\nsatstream is running on regtest.\n\
         gRPC:          {addr}\n\
         server node:   {}@{}\n\
         payer node:    {}\n\
         bitcoind RPC:  127.0.0.1:{} (user/password satstream)\n\n\
         Try (grpcurl needs no .proto files, reflection is on):\n\
         \x20 grpcurl -plaintext {addr} list\n\
         \x20 grpcurl -plaintext {addr} describe satstream.v1.Inference\n\
         \x20 grpcurl -plaintext -H 'authorization: Bearer {token}' {addr} satstream.v1.Admin/GetInfo\n\
         \x20 grpcurl -plaintext -H 'authorization: Bearer {token}' {addr} satstream.v1.Admin/ListChannels\n\
         \x20 grpcurl -plaintext -H 'authorization: Bearer {token}' -d '{{\"page_size\": 10}}' {addr} satstream.v1.Admin/ListInvoices\n\n\
         Ctrl-C stops everything.",
        h.server_node_id(),
        h.server_ln_address(),
        h.payer.node_id(),
        h.bitcoind.rpc_port,
    );
    let stop = CancellationToken::new();
    satstream::shutdown::cancel_on_signal(stop.clone()).await;
    h.stop().await;
    eprintln!("stopped; no processes left behind");
    Ok(())
}
