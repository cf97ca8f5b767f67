//! A session's last event, `Done` or `Halted`, built in one place: by the meter when the
//! session ends, and by a replay of an ended session (Resume), from the store.

use crate::wire::proto::{self, generate_event::Event as Ev};

/// What a session delivered and holds at its end.
pub struct Totals {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub chunks: u32,
    pub paid_msat: u64,
    pub refundable_msat: u64,
    /// PREPAID: the account's available balance; otherwise the session's refundable balance.
    pub balance_msat: u64,
    pub receipt: Option<proto::Receipt>,
}

/// How it ended.
pub enum Ending {
    Done(proto::FinishReason),
    Halted(proto::HaltReason, String),
}

pub fn last_event(e: Ending, t: Totals) -> Ev {
    match e {
        Ending::Done(finish) => Ev::Done(proto::Done {
            finish_reason: finish as i32,
            prompt_tokens: t.prompt_tokens,
            completion_tokens: t.completion_tokens,
            chunks: t.chunks,
            paid_msat: t.paid_msat,
            refundable_msat: t.refundable_msat,
            receipt: t.receipt,
            balance_msat: t.balance_msat,
        }),
        Ending::Halted(reason, message) => Ev::Halted(proto::Halted {
            reason: reason as i32,
            message,
            completion_tokens_delivered: t.completion_tokens,
            chunks_delivered: t.chunks,
            paid_msat: t.paid_msat,
            refundable_msat: t.refundable_msat,
            balance_msat: t.balance_msat,
            receipt: t.receipt,
        }),
    }
}
