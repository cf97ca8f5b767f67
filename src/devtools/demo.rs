//! `satstream demo`: the whole product on one machine: bitcoind -regtest, the server (the
//! configured model), a client wallet with a channel to it (and one from the server, so that
//! refunds can flow back), and one paid chat generation shown live.

use clap::Args;
use tokio_util::sync::CancellationToken;

use crate::client::cmd::generate::paid_generation;
use crate::client::cmd::{generate_request, user, Mode, Request};
use crate::client::ClientError;
use crate::config::Config;
use crate::harness::{Harness, HarnessOptions};
use crate::wire::proto::{inference_client::InferenceClient, TopUpRequest};

#[derive(Args, Clone, Debug)]
pub struct DemoArgs {
    #[command(flatten)]
    pub req: Request,
    /// The inference engine for every model (default: each model's `backend`).
    #[arg(long, value_enum)]
    pub backend: Option<crate::config::BackendKind>,
}

/// Channel server → client in the demo: the server's outbound liquidity, so a KEYSEND
/// leftover or a prepaid balance can be refunded.
const REFUND_CHANNEL_SAT: u64 = 200_000;
const CHANNEL_SAT: u64 = 1_000_000;

pub async fn run(base: &Config, sets: &[String], a: &DemoArgs) -> Result<(), ClientError> {
    let r = &a.req;
    let mut base = base.clone();
    if let Some(b) = a.backend {
        for m in &mut base.models {
            m.backend = b;
        }
    }
    let Some(model) = base.models.first() else {
        return Err(ClientError::Usage(
            "the configuration has no model: add a [[models]] entry or --set models.0.path=..."
                .into(),
        ));
    };
    let model_id = r.model.clone().unwrap_or_else(|| model.id.clone());
    let stop = CancellationToken::new();
    tokio::spawn(crate::shutdown::cancel_on_signal(stop.clone()));
    eprintln!(
        "satstream demo: starting bitcoind -regtest, the server ({model_id} on {}) and a client wallet; opening channels...",
        model.backend.as_str()
    );
    let started = std::time::Instant::now();
    let mut sets = sets.to_vec();
    sets.push(format!(
        "server.grpc_listen=127.0.0.1:{}",
        crate::harness::free_port()
    ));
    let opts = HarnessOptions {
        models: base.models.clone(),
        sets,
        channel_sat: CHANNEL_SAT,
        server_channel_sat: REFUND_CHANNEL_SAT,
        ..HarnessOptions::default()
    };
    let h = tokio::select! {
        h = Harness::start(opts) => h.map_err(|e| ClientError::Harness(e.to_string()))?,
        _ = stop.cancelled() => return Err(ClientError::Usage("interrupted during setup".into())),
    };
    eprintln!(
        "ready in {:.1} s: server node {}, client node {}, channel {CHANNEL_SAT} sat. Paying ({}):\n",
        started.elapsed().as_secs_f64(),
        h.server_node_id(),
        h.payer.node_id(),
        r.mode.proto().as_str_name().trim_start_matches("PAYMENT_MODE_"),
    );
    let result = async {
        let prompt = r
            .prompt
            .clone()
            .unwrap_or_else(|| "Write a short poem about the Lightning Network.".into());
        let mut client = InferenceClient::connect(format!("http://{}", h.server().grpc_addr))
            .await
            .map_err(|e| ClientError::Usage(e.to_string()))?;
        let mut req = generate_request(model_id, vec![user(&prompt)], r);
        if matches!(r.mode, Mode::Prepaid) {
            // Prepay what the whole answer could cost (or the budget), from the client wallet.
            let price = h.config.models.first().map_or(1000, |m| m.msat_per_token);
            let most = (r.max_tokens as u64 * price + 100_000)
                .min(r.max_sats.map_or(u64::MAX, |s| s * 1000));
            let t = client
                .top_up(TopUpRequest {
                    account_token: String::new(),
                    amount_msat: most,
                })
                .await?
                .into_inner();
            match h
                .payer
                .pay(&t.bolt11, std::time::Duration::from_secs(60))
                .await?
            {
                crate::client::PayOutcome::Succeeded { .. } => {
                    eprintln!("topped up a prepaid account with {most} msat\n")
                }
                crate::client::PayOutcome::Failed { reason } => {
                    return Err(ClientError::Payment(format!("top-up failed: {reason}")))
                }
            }
            req.account_token = t.account_token;
        }
        paid_generation(&mut client, &h.payer, req, r, &stop).await
    }
    .await;
    h.stop().await;
    eprintln!("stopped bitcoind, the server and the wallet; no processes left behind");
    result.map(|_| ())
}
