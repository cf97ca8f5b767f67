//! `satstream regtest`: a local regtest world (bitcoind, the server, a funded payer node with
//! a channel) that keeps running, with grpcurl commands to try.

use tokio_util::sync::CancellationToken;

use crate::client::ClientError;
use crate::config::Config;
use crate::harness::{Harness, HarnessOptions};

/// `satstream regtest` options.
#[derive(clap::Args, Clone, Debug)]
pub struct RegtestArgs {
    /// The inference engine for every model (default: each model's `backend`).
    #[arg(long, value_enum)]
    pub backend: Option<crate::config::BackendKind>,
}

pub async fn run(base: &Config, sets: &[String], a: &RegtestArgs) -> Result<(), ClientError> {
    let mut base = base.clone();
    if let Some(b) = a.backend {
        for m in &mut base.models {
            m.backend = b;
        }
    }
    let base = &base;
    let mut sets = sets.to_vec();
    sets.push(format!("server.grpc_listen={}", base.server.grpc_listen));
    sets.push(format!("server.http_listen={}", base.server.http_listen));
    eprintln!("Starting bitcoind -regtest, the server and a payer node; opening a channel...");
    let h = Harness::start(HarnessOptions {
        models: base.models.clone(),
        sets,
        bitcoind_rpc_port: Some(base.chain.bitcoind_rpc_port),
        ..HarnessOptions::default()
    })
    .await
    .map_err(|e| ClientError::Harness(e.to_string()))?;
    let addr = h.server().grpc_addr;
    let http = h
        .server()
        .http_addr
        .map_or_else(|| "off".to_string(), |a| a.to_string());
    let token = &h.server().admin_token;
    // grpcurl's TLS flag: plaintext on loopback by default, or trust the server's own CA.
    let (tls, server_url, cacert) = match &h.server().tls {
        Some(t) => (
            format!("-cacert {}", t.trust_path.display()),
            format!("https://{addr}"),
            format!(" --cacert {}", t.trust_path.display()),
        ),
        None => (
            "-plaintext".to_string(),
            format!("http://{addr}"),
            String::new(),
        ),
    };
    let model = base.models.first().map_or("MODEL", |m| m.id.as_str());
    let rpc = h.bitcoind.rpc_port;
    println!(
        "\nsatstream is running on regtest.\n\
         gRPC:          {addr}\n\
         HTTP:          {http} (OpenAI-compatible, L402)\n\
         server node:   {}@{}\n\
         bitcoind RPC:  127.0.0.1:{rpc} (user/password satstream)\n\n\
         In another terminal (`source scripts/env.sh` puts satstream, bitcoin-cli and grpcurl on PATH):\n\
         \x20 grpcurl {tls} {addr} list\n\
         \x20 grpcurl {tls} {addr} describe satstream.v1.Inference\n\
         \x20 grpcurl {tls} {addr} satstream.v1.Inference/ListModels\n\
         \x20 grpcurl {tls} -H 'authorization: Bearer {token}' {addr} satstream.v1.Admin/GetInfo\n\n\
         Pay from a wallet of your own (its data goes to ./satstream-client):\n\
         \x20 mine() {{ bitcoin-cli -regtest -rpcport={rpc} -rpcuser=satstream -rpcpassword=satstream generatetoaddress \"$1\" \"$(satstream wallet address)\" >/dev/null; }}\n\
         \x20 mine 101 && satstream wallet --server {server_url}{cacert} open-channel --sats 200000 && mine 6\n\
         \x20 satstream wallet pay --max-sats 100 -- grpcurl {tls} -d '{{\"model\":\"{model}\",\"max_tokens\":48,\"messages\":[{{\"role\":\"user\",\"content\":\"Tell me about Lightning\"}}]}}' {addr} satstream.v1.Inference/Generate\n\n\
         Ctrl-C stops everything.",
        h.server_node_id(),
        h.server_ln_address(),
    );
    let stop = CancellationToken::new();
    crate::shutdown::cancel_on_signal(stop.clone()).await;
    h.stop().await;
    eprintln!("stopped; no processes left behind");
    Ok(())
}
