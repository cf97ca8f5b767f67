//! `satstream receipt verify FILE`: checks a saved receipt offline (no server, no wallet): its
//! signature by the node id it names, that its chunks add up, and optionally that it is signed
//! by the node you expected and covers a text you have.

use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};

use crate::client::ClientError;
use crate::wire::proto::Receipt;
use crate::wire::receipt;

#[derive(Args, Clone, Debug)]
pub struct ReceiptArgs {
    #[command(subcommand)]
    pub cmd: ReceiptCmd,
}

#[derive(Subcommand, Clone, Debug)]
pub enum ReceiptCmd {
    /// Check a receipt file written by `generate --receipt FILE`.
    Verify {
        file: PathBuf,
        /// Require this signer (the server's node id, hex).
        #[arg(long)]
        node_id: Option<String>,
        /// Require that the receipt covers exactly this text (the generation's output).
        #[arg(long)]
        text_file: Option<PathBuf>,
    },
}

/// Writes a receipt in the file form `receipt verify` reads (readable by its owner only: it
/// names the session).
pub fn save(path: &Path, r: &Receipt) -> Result<(), ClientError> {
    crate::files::write_private(path, receipt::to_file(r).as_bytes())
        .map_err(|e| ClientError::Usage(format!("--receipt {}: {e}", path.display())))
}

pub fn run(a: &ReceiptArgs) -> Result<(), ClientError> {
    match &a.cmd {
        ReceiptCmd::Verify {
            file,
            node_id,
            text_file,
        } => {
            let read = |p: &Path| {
                std::fs::read_to_string(p)
                    .map_err(|e| ClientError::Usage(format!("{}: {e}", p.display())))
            };
            let r = receipt::from_file(&read(file)?)
                .map_err(|e| ClientError::Protocol(format!("{}: {e}", file.display())))?;
            let text = text_file.as_deref().map(read).transpose()?;
            let body = receipt::verify(&r, node_id.as_deref(), text.as_deref(), None)
                .map_err(|e| ClientError::Protocol(format!("{}: INVALID: {e}", file.display())))?;
            println!(
                "{}: valid receipt signed by {}: session {} ({}, {}), {} prompt + {} completion \
                 tokens in {} chunks, {} msat paid, {} msat refundable, ended {} {}",
                file.display(),
                body.node_id,
                body.session_id,
                body.model,
                body.mode,
                body.prompt_tokens,
                body.completion_tokens,
                body.chunks.len(),
                body.paid_msat,
                body.refundable_msat,
                body.state,
                body.reason
            );
            Ok(())
        }
    }
}
