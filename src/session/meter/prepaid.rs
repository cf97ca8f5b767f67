//! PREPAID: each chunk is drawn from the account in the transaction that delivers it, and
//! sent at once; the engine runs at most one chunk beyond what the balance covers.

use super::{blocking, End, Meter, Unpaid};
use crate::store::StoreError;
use crate::wire::proto;

impl Meter {
    /// PREPAID: the chunk is drawn from the account in the transaction that delivers it, and
    /// sent at once; a balance that cannot cover it ends the session.
    pub(super) async fn deliver_from_account(&mut self, u: Unpaid) -> Result<(), End> {
        match self.record_balance_delivery(&u).await? {
            Ok(_) => {
                self.after_commit()?;
                self.live.paid();
                self.spent_msat += u.price_msat;
                self.refresh_account().await?;
                self.release(u).await?;
                self.send_balance().await
            }
            Err(StoreError::InsufficientBalance { available_msat, .. }) => Err(End::halt(
                proto::HaltReason::BalanceExhausted,
                format!(
                    "the account's balance ({available_msat} msat) does not cover chunk {} ({} msat); TopUp to continue",
                    u.chunk.index, u.price_msat
                ),
            )),
            Err(e) => Err(End::payment(format!("store: {e}"))),
        }
    }

    /// PREPAID: the account's balance, as the store has it.
    pub(super) async fn refresh_account(&mut self) -> Result<(), End> {
        let Some(aid) = self.spec.account_id else {
            return Ok(());
        };
        let store = self.parts.store.clone();
        let a = blocking(move || store.account(&aid))
            .await?
            .map_err(|e| End::payment(format!("store: {e}")))?
            .ok_or_else(|| End::payment("the account no longer exists"))?;
        // The mirror: what this session spent plus what the account has left.
        self.credited_msat = self.spent_msat.saturating_add(a.available_msat());
        Ok(())
    }
}
