//! `satstream account topup | balance | refund`: a PREPAID account on a server. The account
//! token (its bearer secret) is kept in the wallet directory, mode 0600, so that
//! `generate --mode prepaid` finds it; `--account-token` (or `SATSTREAM_ACCOUNT_TOKEN`) uses
//! another.

use clap::{Args, Subcommand};
use std::io::Write;
use std::time::Duration;

use super::Conn;
use crate::client::{ClientError, PayOutcome};
use crate::wire::proto::{GetAccountRequest, RefundRequest, TopUpRequest};

#[derive(Args, Clone, Debug)]
pub struct AccountArgs {
    #[command(flatten)]
    pub conn: Conn,
    /// The account's token (default: the one saved in the wallet directory).
    #[arg(
        long,
        env = "SATSTREAM_ACCOUNT_TOKEN",
        hide_env_values = true,
        global = true
    )]
    pub account_token: Option<String>,
    #[command(subcommand)]
    pub cmd: AccountCmd,
}

#[derive(Subcommand, Clone, Debug)]
pub enum AccountCmd {
    /// Credit the account (a new one when there is none yet) by paying a TopUp invoice from
    /// the wallet.
    Topup {
        #[arg(long)]
        sats: u64,
    },
    /// The account's balance.
    Balance,
    /// Pay the account's balance (or `--sats` of it) back to the wallet.
    Refund {
        #[arg(long)]
        sats: Option<u64>,
    },
}

/// The account token: given, else saved by `topup`.
pub fn token(conn: &Conn, given: Option<&str>) -> Result<String, ClientError> {
    if let Some(t) = given.filter(|t| !t.trim().is_empty()) {
        return Ok(t.trim().to_string());
    }
    let path = conn.account_token_file();
    std::fs::read_to_string(&path)
        .map(|t| t.trim().to_string())
        .map_err(|_| {
            ClientError::Usage(format!(
                "no account token in {}: `satstream account topup --sats N` opens an account",
                path.display()
            ))
        })
}

fn save_token(conn: &Conn, token: &str) -> Result<(), ClientError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(&conn.wallet_dir)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(conn.account_token_file())?;
    writeln!(f, "{token}")?;
    f.sync_all()?;
    Ok(())
}

pub async fn run(a: &AccountArgs) -> Result<(), ClientError> {
    let mut client = a.conn.connect().await?;
    match &a.cmd {
        AccountCmd::Balance => {
            let t = token(&a.conn, a.account_token.as_deref())?;
            let acc = client
                .get_account(GetAccountRequest { account_token: t })
                .await?
                .into_inner();
            println!(
                "available: {} msat (credited {}, spent {}, refunded {}, being refunded {})",
                acc.available_msat,
                acc.credited_msat,
                acc.spent_msat,
                acc.refunded_msat,
                acc.reserved_msat
            );
            Ok(())
        }
        AccountCmd::Topup { sats } => {
            let existing = token(&a.conn, a.account_token.as_deref()).ok();
            let (wallet, _) = a.conn.open().await?;
            let result = async {
                let t = client
                    .top_up(TopUpRequest {
                        account_token: existing.clone().unwrap_or_default(),
                        amount_msat: sats * 1000,
                    })
                    .await?
                    .into_inner();
                if existing.is_none() {
                    save_token(&a.conn, &t.account_token)?;
                    eprintln!(
                        "opened an account; its token is saved in {} (keep it: it is the account)",
                        a.conn.account_token_file().display()
                    );
                }
                match wallet.pay(&t.bolt11, Duration::from_secs(120)).await? {
                    PayOutcome::Succeeded { fee_msat, .. } => {
                        let acc = client
                            .get_account(GetAccountRequest {
                                account_token: t.account_token,
                            })
                            .await?
                            .into_inner();
                        println!(
                            "paid {} msat (fee {fee_msat} msat); available: {} msat",
                            t.amount_msat, acc.available_msat
                        );
                        Ok(())
                    }
                    PayOutcome::Failed { reason } => Err(ClientError::Payment(format!(
                        "the top-up was not paid: {reason}"
                    ))),
                }
            }
            .await;
            wallet.stop();
            result
        }
        AccountCmd::Refund { sats } => {
            let t = token(&a.conn, a.account_token.as_deref())?;
            let wallet = a.conn.open_wallet().await?;
            let result = async {
                let invoice = wallet.receive_invoice(sats.map(|s| s * 1000), "satstream refund")?;
                let r = client
                    .refund(RefundRequest {
                        account_token: t,
                        bolt11: invoice,
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                match r.state.as_str() {
                    "succeeded" => {
                        println!(
                            "refunded {} msat; {} msat left",
                            r.refunded_msat, r.balance_msat
                        );
                        Ok(())
                    }
                    "pending" => {
                        println!(
                            "refund of {} msat in flight (payment {}); check `account balance` later",
                            r.refunded_msat, r.payment_hash
                        );
                        Ok(())
                    }
                    _ => Err(ClientError::Payment(format!(
                        "the refund failed ({}); the balance is restored: {} msat",
                        r.detail, r.balance_msat
                    ))),
                }
            }
            .await;
            wallet.stop();
            result
        }
    }
}
