//! What KEYSEND and PREPAID share: a balance the store draws on per chunk (it refuses a chunk
//! or prompt the balance cannot cover), and the Balance events that mirror it.

use super::{blocking, End, Meter, Mode, PromptPay, Unpaid};
use crate::store::StoreError;
use crate::wire::proto::{self, generate_event::Event as Ev};

impl Meter {
    /// KEYSEND/PREPAID: draws the prompt from the balance (the store refuses if it cannot
    /// cover it), then starts the engine.
    pub(super) async fn charge_prompt(&mut self) -> Result<(), End> {
        let (store, sid, price) = (
            self.parts.store.clone(),
            self.sid(),
            self.spec.prompt_price_msat,
        );
        match blocking(move || store.charge_prompt(&sid, price)).await? {
            Ok(()) => {
                self.prompt = PromptPay::Done;
                self.live.paid();
                self.spent_msat += price;
                if self.spec.mode == Mode::Prepaid {
                    self.refresh_account().await?;
                }
                self.send_balance().await?;
                self.start_engine().await
            }
            Err(StoreError::InsufficientBalance { available_msat, .. }) => {
                if self.spec.mode == Mode::Prepaid {
                    Err(End::halt(
                        proto::HaltReason::BalanceExhausted,
                        format!(
                            "the account's balance ({available_msat} msat) does not cover the prompt ({price} msat); TopUp and try again"
                        ),
                    ))
                } else {
                    Ok(())
                }
            }
            Err(e) => Err(End::payment(format!("store: {e}"))),
        }
    }

    /// Records a balance-funded chunk's delivery (the store refuses it if the balance cannot
    /// cover it).
    pub(super) async fn record_balance_delivery(
        &self,
        u: &Unpaid,
    ) -> Result<Result<bool, StoreError>, End> {
        let (store, d) = (self.parts.store.clone(), self.delivery(u));
        blocking(move || store.deliver_chunk(&d)).await
    }

    pub(super) async fn send_balance(&mut self) -> Result<(), End> {
        if !matches!(self.spec.mode, Mode::Keysend | Mode::Prepaid) {
            return Ok(());
        }
        self.send(Ev::Balance(proto::Balance {
            credited_msat: self.credited_msat,
            spent_msat: self.spent_msat,
            available_msat: self.available_msat(),
        }))
        .await
    }
}
