//! Shows a paid generation on a terminal: the text as each chunk is paid, with a compact live
//! status line (chunks paid, sats spent, tok/s, time waiting for payment) when stdout is a
//! terminal, or one JSON object per event with `--json`. Then a one-line summary.

use std::io::{IsTerminal, Write};
use std::time::Instant;

use super::{ClientEvent, Summary};

pub struct Console {
    json: bool,
    tty: bool,
    started: Instant,
    /// The unfinished last line of text, redrawn under the status while it grows.
    line: String,
    chunks: u32,
    tokens: u32,
    spent_msat: u64,
    waiting_ms: f64,
    /// Times the stream dropped and was resumed (shown on the status line).
    resumes: u32,
}

/// Lines longer than this are wrapped at a space so the redraw never spans two screen rows.
const WRAP: usize = 70;

impl Console {
    pub fn new(json: bool) -> Self {
        Console {
            json,
            tty: !json && std::io::stdout().is_terminal(),
            started: Instant::now(),
            line: String::new(),
            chunks: 0,
            tokens: 0,
            spent_msat: 0,
            waiting_ms: 0.0,
            resumes: 0,
        }
    }

    pub fn on_event(&mut self, ev: &ClientEvent) {
        let mut out = std::io::stdout().lock();
        if self.json {
            let _ = writeln!(out, "{}", serde_json::to_string(ev).unwrap_or_default());
            let _ = out.flush();
            return;
        }
        match ev {
            ClientEvent::Text { text, tokens, .. } => {
                self.chunks += 1;
                self.tokens += tokens;
                if !self.tty {
                    let _ = write!(out, "{text}");
                } else {
                    self.line.push_str(text);
                    let _ = write!(out, "\r\x1b[2K");
                    while let Some(cut) = self.line_break() {
                        let rest = self.line.split_off(cut);
                        let _ = writeln!(out, "{}", self.line.trim_end_matches('\n'));
                        self.line = rest.trim_start_matches([' ', '\n']).to_string();
                    }
                }
            }
            ClientEvent::Paid {
                amount_msat, ms, ..
            } => {
                self.spent_msat += amount_msat;
                self.waiting_ms += ms;
            }
            ClientEvent::BudgetReached {
                spent_msat,
                next_msat,
            } => {
                if self.tty {
                    let _ = write!(out, "\r\x1b[2K{}\n", self.line);
                    self.line.clear();
                }
                let _ = writeln!(
                    out,
                    "\n[budget reached: {spent_msat} msat spent, next chunk {next_msat} msat; stopping]"
                );
            }
            ClientEvent::Resumed { from_chunk, ms } => {
                self.resumes += 1;
                if !self.tty {
                    let _ = writeln!(
                        out,
                        "\n[connection dropped; resumed after {ms} ms from chunk {from_chunk}]"
                    );
                }
            }
            ClientEvent::PaymentFailed { chunk, reason } => {
                let _ = writeln!(out, "\n[payment for chunk {chunk:?} failed: {reason}]");
            }
            _ => {}
        }
        if self.tty {
            let _ = write!(
                out,
                "\r\x1b[2K{}  \x1b[2m{}\x1b[0m",
                self.line,
                self.status()
            );
        }
        let _ = out.flush();
    }

    fn line_break(&self) -> Option<usize> {
        if let Some(i) = self.line.find('\n') {
            return Some(i + 1);
        }
        if self.line.chars().count() <= WRAP {
            return None;
        }
        let limit = self.line.char_indices().nth(WRAP).map(|(i, _)| i)?;
        Some(
            self.line[..limit]
                .rfind(' ')
                .map(|i| i + 1)
                .unwrap_or(limit),
        )
    }

    fn status(&self) -> String {
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let resumed = match self.resumes {
            0 => String::new(),
            n => format!(" | resumed {n}x"),
        };
        format!(
            "[{} chunks paid | {:.3} sat | {:.1} tok/s | waiting for payment {:.2} s{resumed}]",
            self.chunks,
            self.spent_msat as f64 / 1000.0,
            self.tokens as f64 / secs,
            self.waiting_ms / 1000.0
        )
    }

    /// Prints the final summary line (a JSON object with `--json`).
    pub fn finish(&mut self, s: &Summary) {
        let mut out = std::io::stdout().lock();
        if self.json {
            let mut v = serde_json::to_value(s).unwrap_or_default();
            v["event"] = "summary".into();
            let _ = writeln!(out, "{v}");
            return;
        }
        if self.tty {
            let _ = write!(out, "\r\x1b[2K{}", self.line);
            self.line.clear();
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "summary: outcome={} tokens={} chunks={} paid_msat={} payments={} fees_msat={} \
             server_paid_msat={} refunded_msat={} refundable_msat={} tok/s={:.1} \
             waiting_for_payment_ms={} stream_ms={} elapsed_ms={}",
            s.outcome,
            s.tokens,
            s.chunks,
            s.spent_msat,
            s.payments,
            s.fees_msat,
            s.server_paid_msat,
            s.refunded_msat,
            s.refundable_msat,
            s.tokens_per_sec,
            s.waiting_for_payment_ms,
            s.stream_ms,
            s.elapsed_ms
        );
        if !s.message.is_empty() {
            let _ = writeln!(out, "         {}", s.message);
        }
        let _ = writeln!(out, "receipt: {}", s.receipt_check);
        let _ = out.flush();
    }
}
