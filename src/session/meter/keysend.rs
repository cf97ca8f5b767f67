//! KEYSEND: the client streams spontaneous payments naming the session; each chunk is
//! released, in order, while the credited balance covers it.

use super::{End, Meter, PromptPay};
use crate::store::StoreError;

impl Meter {
    /// KEYSEND: a payment credited to the session (committed): the prompt first, then the
    /// chunks waiting for balance.
    pub(super) async fn on_credit(&mut self, amount_msat: u64) -> Result<(), End> {
        self.live.paid();
        self.credited_msat += amount_msat;
        self.send_balance().await?;
        if let PromptPay::AwaitingBalance { .. } = self.prompt {
            if self.available_msat() >= self.spec.prompt_price_msat {
                self.charge_prompt().await?;
            }
            return Ok(());
        }
        self.release_from_balance().await
    }

    /// KEYSEND: release waiting chunks, in order, while the balance covers them (not while
    /// the client is away: its balance is spent only on chunks it can see).
    pub(super) async fn release_from_balance(&mut self) -> Result<(), End> {
        if self.away_since().is_some() {
            return Ok(());
        }
        let mut spent_any = false;
        while let Some((&k, u)) = self.unpaid.iter().next() {
            if u.price_msat > self.available_msat() {
                break;
            }
            let u = self.unpaid.remove(&k).expect("present");
            match self.record_balance_delivery(&u).await? {
                Ok(_) => {}
                // A refund took the balance meanwhile: wait for more.
                Err(StoreError::InsufficientBalance { available_msat, .. }) => {
                    self.credited_msat = self.spent_msat + available_msat;
                    self.unpaid.insert(k, u);
                    break;
                }
                Err(e) => return Err(End::payment(format!("store: {e}"))),
            }
            self.after_commit()?;
            self.spent_msat += u.price_msat;
            spent_any = true;
            self.release(u).await?;
        }
        if spent_any {
            self.send_balance().await?;
        }
        Ok(())
    }
}
