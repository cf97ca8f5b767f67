//! `satstream generate` and `satstream chat`: paid generations against any satstream server.

use clap::Args;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use super::{first_model, generate_request, user, Conn, Mode, Request};
use crate::client::console::Console;
use crate::client::{ClientError, ClientEvent, Summary, Wallet};
use crate::wire::proto::{inference_client::InferenceClient, ChatMessage, RefundRequest};

#[derive(Args, Clone, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub conn: Conn,
    #[command(flatten)]
    pub req: Request,
    /// PREPAID: the account token (default: the one `account topup` saved in the wallet dir).
    #[arg(long, env = "SATSTREAM_ACCOUNT_TOKEN", hide_env_values = true)]
    pub account_token: Option<String>,
}

/// One paid generation (or, `chat`, an interactive conversation).
pub async fn run(a: &GenerateArgs, chat: bool) -> Result<(), ClientError> {
    let (wallet, mut client) = match a.req.mode {
        // A prepaid account pays; the wallet only receives refunds.
        Mode::Prepaid => (a.conn.open_wallet().await?, a.conn.connect().await?),
        _ => a.conn.open().await?,
    };
    let result = async {
        let model = match &a.req.model {
            Some(m) => m.clone(),
            None => first_model(&mut client).await?,
        };
        let account = match a.req.mode {
            Mode::Prepaid => Some(super::account::token(&a.conn, a.account_token.as_deref())?),
            _ => None,
        };
        let stop = CancellationToken::new();
        tokio::spawn(crate::shutdown::cancel_on_signal(stop.clone()));
        if chat {
            chat_loop(&mut client, &wallet, model, &a.req, account, &stop).await
        } else {
            let prompt = a
                .req
                .prompt
                .clone()
                .ok_or_else(|| ClientError::Usage("--prompt is required".into()))?;
            let mut req = generate_request(model, vec![user(&prompt)], &a.req);
            req.account_token = account.unwrap_or_default();
            paid_generation(&mut client, &wallet, req, &a.req, &stop)
                .await
                .map(|_| ())
        }
    }
    .await;
    wallet.stop();
    result
}

/// Runs one paid generation, printing it live; Ctrl-C hangs up (which halts it server-side).
/// In KEYSEND, what the server holds and did not spend is asked back at the end (unless
/// `--no-refund`), and the summary says what the server recorded.
pub async fn paid_generation(
    client: &mut InferenceClient<Channel>,
    wallet: &Wallet,
    req: crate::wire::proto::GenerateRequest,
    r: &Request,
    stop: &CancellationToken,
) -> Result<Option<Summary>, ClientError> {
    let mut console = Console::new(r.json);
    let budget = r.max_sats.map(|s| s * 1000);
    let run = crate::client::generate(client, wallet, req, budget, |e| console.on_event(e));
    let mut summary = tokio::select! {
        s = run => s?,
        _ = stop.cancelled() => {
            eprintln!("\ninterrupted: hung up; the server ends the generation (a paid one after its grace for Resume)");
            return Ok(None);
        }
    };
    if matches!(r.mode, Mode::Keysend) && !r.no_refund && summary.refundable_msat > 0 {
        refund_leftover(client, wallet, &mut summary).await;
    }
    console.finish(&summary);
    if let (Some(path), Some(receipt)) = (&r.receipt, &summary.receipt) {
        super::receipt::save(path, receipt)?;
    }
    Ok(Some(summary))
}

/// Asks the server to pay a session's refundable balance back to this wallet (an amountless
/// invoice: the whole balance). Reported in the summary; a failure leaves the balance on the
/// server, refundable later.
pub async fn refund_leftover(
    client: &mut InferenceClient<Channel>,
    wallet: &Wallet,
    summary: &mut Summary,
) {
    let invoice = match wallet.receive_invoice(None, "satstream refund") {
        Ok(i) => i,
        Err(e) => {
            eprintln!("[refund] cannot create an invoice: {e}");
            return;
        }
    };
    let r = client
        .refund(RefundRequest {
            session_id: summary.session_id.clone(),
            session_token: summary.session_token.clone(),
            bolt11: invoice,
            ..Default::default()
        })
        .await;
    match r.map(|r| r.into_inner()) {
        Ok(r) if r.state == "succeeded" => {
            summary.refunded_msat = r.refunded_msat;
            summary.refundable_msat = r.balance_msat;
            summary.balance_msat = r.balance_msat;
        }
        Ok(r) => eprintln!(
            "[refund] {} msat not refunded ({}: {}); the server keeps it refundable for session {}",
            summary.refundable_msat, r.state, r.detail, summary.session_id
        ),
        Err(e) => eprintln!(
            "[refund] {} msat not refunded ({}); the server keeps it refundable for session {}",
            summary.refundable_msat,
            e.message(),
            summary.session_id
        ),
    }
}

async fn chat_loop(
    client: &mut InferenceClient<Channel>,
    wallet: &Wallet,
    model: String,
    r: &Request,
    account: Option<String>,
    stop: &CancellationToken,
) -> Result<(), ClientError> {
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
        let mut req = generate_request(model.clone(), history.clone(), r);
        req.account_token = account.clone().unwrap_or_default();
        let mut text = String::new();
        let mut console = Console::new(r.json);
        let budget = r.max_sats.map(|s| s * 1000);
        let run = crate::client::generate(client, wallet, req, budget, |e| {
            if let ClientEvent::Text { text: t, .. } = e {
                text.push_str(t);
            }
            console.on_event(e)
        });
        let mut summary = tokio::select! {
            s = run => s?,
            _ = stop.cancelled() => return Ok(()),
        };
        if matches!(r.mode, Mode::Keysend) && !r.no_refund && summary.refundable_msat > 0 {
            refund_leftover(client, wallet, &mut summary).await;
        }
        console.finish(&summary);
        history.push(ChatMessage {
            role: "assistant".into(),
            content: text,
        });
    }
}
