//! `satstream wallet address | balance | open-channel | pay`: the client's own Lightning wallet.

use clap::{Args, Subcommand};
use std::time::Duration;

use super::{first_model, Conn, CHANNEL_WAIT, NO_CHANNEL};
use crate::client::pipe::{pay_lines, PipeEvent};
use crate::client::{ClientError, Wallet};
use crate::config::Network;
use crate::wire::proto::QuoteRequest;

#[derive(Args, Clone, Debug)]
pub struct WalletArgs {
    #[command(flatten)]
    pub conn: Conn,
    #[command(subcommand)]
    pub cmd: WalletCmd,
}

#[derive(Subcommand, Clone, Debug)]
pub enum WalletCmd {
    /// A fresh on-chain address to fund the wallet.
    Address,
    /// On-chain and Lightning balances.
    Balance,
    /// Open a channel to the server (its node id and address come from Quote).
    OpenChannel {
        #[arg(long, default_value_t = 100_000)]
        sats: u64,
    },
    /// Pay the invoices Generate events carry in the output of a command, which is copied
    /// to stdout: `satstream wallet pay --max-sats 50 -- grpcurl … Generate`. An invoice
    /// inside generated text is never paid. The command starts once the wallet's channel is
    /// usable. Without a command: `--invoice`s, else invoices on stdin (one per line).
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

pub async fn run(a: &WalletArgs) -> Result<(), ClientError> {
    let wallet = a.conn.open_wallet().await?;
    let result = async {
        match &a.cmd {
            WalletCmd::Address => println!("{}", wallet.new_address()?),
            WalletCmd::Balance => {
                let node = wallet.node.clone();
                tokio::task::spawn_blocking(move || node.sync_wallets())
                    .await
                    .map_err(|e| ClientError::Wallet(e.to_string()))?
                    .map_err(|e| ClientError::Wallet(format!("sync: {e}")))?;
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
            } => pay(&wallet, a.conn.network()?, *max_sats, invoices, command).await?,
        }
        Ok::<(), ClientError>(())
    }
    .await;
    wallet.stop();
    result
}

/// `satstream wallet pay`: every invoice a Generate event carries in a command's output, the
/// invoices given, or those piped through stdin.
async fn pay(
    wallet: &Wallet,
    network: Network,
    max_sats: u64,
    invoices: &[String],
    command: &[String],
) -> Result<(), ClientError> {
    use tokio::io::BufReader;
    // The server refuses a generation it could not be paid for, so a command that starts
    // one must wait until this wallet's channel is back up.
    if !wallet.wait_usable(CHANNEL_WAIT).await? {
        return Err(ClientError::Usage(NO_CHANNEL.into()));
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
    let settle = Duration::from_secs(60);
    let out = tokio::io::stdout();
    let (s, status) = if let Some((program, args)) = command.split_first() {
        let mut child = tokio::process::Command::new(program)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| ClientError::Usage(format!("cannot run {program:?}: {e}")))?;
        let output = BufReader::new(
            child
                .stdout
                .take()
                .ok_or_else(|| ClientError::Usage("the command has no stdout".into()))?,
        );
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
        return Err(ClientError::Usage(format!("the command failed ({status})")));
    }
    if s.failed + s.unresolved > 0 {
        return Err(ClientError::Payment("not every payment succeeded".into()));
    }
    Ok(())
}
