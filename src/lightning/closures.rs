//! Channel closures and the claims they catch in flight.
//!
//! A cooperative close needs every HTLC resolved first, so only a force close (ours, the
//! peer's, or LDK's own at start when its ChannelManager is older than a ChannelMonitor after
//! a hard kill) can strand a claim. Once the commitment transaction is confirmed, LDK's
//! balances say what is still to be had on chain: an HTLC we claimed and can still sweep shows
//! as `ContentiousClaimable` with its payment hash. One below the dust limit has no output at
//! all: it went to fees. ldk-node does not say which HTLCs were in flight when the channel
//! closed, so the claims that may have been are estimated: those LDK reported within
//! [`IN_FLIGHT_WINDOW_SECS`] of the last ledger activity before the closure, below
//! [`DUST_LIMIT_SAT`], and not claimable on chain. That estimate can only overstate the loss,
//! so nothing is ever counted as income that was not.

use ldk_node::lightning::events::ClosureReason;
use ldk_node::LightningBalance;
use std::collections::HashSet;

use super::{Lightning, LightningError, NodeNotice};

/// An off-chain fulfil completes within one round trip (milliseconds on a live connection);
/// claims older than this before the channel's last activity had settled.
pub const IN_FLIGHT_WINDOW_SECS: u64 = 2;
/// HTLCs below this have no output in an anchor channel's commitment (LDK's minimum dust
/// limit, 354 sat).
pub const DUST_LIMIT_SAT: u64 = 354;

fn is_forced(reason: &Option<ClosureReason>) -> bool {
    !matches!(
        reason,
        Some(
            ClosureReason::LegacyCooperativeClosure
                | ClosureReason::CounterpartyInitiatedCooperativeClosure
                | ClosureReason::LocallyInitiatedCooperativeClosure
                | ClosureReason::CounterpartyCoopClosedUnfundedChannel
                | ClosureReason::LocallyCoopClosedUnfundedChannel
        )
    )
}

impl Lightning {
    /// LDK closed a channel (`ChannelClosed`): record it; its claims are classified once the
    /// closure is confirmed on chain ([`Lightning::resolve_closures`]).
    pub(super) fn on_channel_closed(
        &self,
        channel_id: &[u8; 32],
        counterparty: Option<ldk_node::bitcoin::secp256k1::PublicKey>,
        reason: &Option<ClosureReason>,
    ) -> Result<(), LightningError> {
        let forced = is_forced(reason);
        let why = reason
            .as_ref()
            .map(|r| format!("{r:?}"))
            .unwrap_or_else(|| "unknown".into());
        let who = counterparty.map(|c| c.to_string()).unwrap_or_default();
        if self.store.record_closure(channel_id, &who, &why, forced)? {
            if forced {
                tracing::warn!(channel_id = %hex::encode(channel_id), counterparty = %who, reason = %why, "channel force-closed");
            } else {
                tracing::info!(channel_id = %hex::encode(channel_id), counterparty = %who, "channel closed");
            }
        }
        if !forced {
            self.store
                .resolve_closure(channel_id, &[], "cooperative: no HTLC in flight")?;
        }
        let _ = self
            .notices
            .send(NodeNotice::ChannelClosed { counterparty });
        Ok(())
    }

    /// Classifies the claims of force-closed channels whose closing transaction LDK now sees
    /// confirmed (no `ClaimableOnChannelClose` balance left for them). Returns how many
    /// closures it resolved.
    pub fn resolve_closures(&self) -> Result<usize, LightningError> {
        let open = self.store.unresolved_closures()?;
        if open.is_empty() {
            return Ok(0);
        }
        let balances = self.node.list_balances().lightning_balances;
        let mut resolved = 0;
        for c in open {
            let pending_close = balances.iter().any(|b| {
                matches!(b, LightningBalance::ClaimableOnChannelClose { channel_id, .. } if channel_id.0 == c.channel_id)
            });
            if pending_close {
                continue;
            }
            let on_chain: HashSet<[u8; 32]> = balances
                .iter()
                .filter_map(|b| match b {
                    LightningBalance::ContentiousClaimable {
                        channel_id,
                        payment_hash,
                        ..
                    } if channel_id.0 == c.channel_id => Some(payment_hash.0),
                    _ => None,
                })
                .collect();
            let last_activity = self.store.last_activity_before_closure(&c.channel_id)?;
            let since = last_activity.saturating_sub(IN_FLIGHT_WINDOW_SECS);
            let lost: Vec<([u8; 32], String)> = self
                .store
                .claimed_since(since)?
                .into_iter()
                .filter(|i| i.paid_at_unix.unwrap_or(0) <= c.closed_at_unix)
                .filter(|i| i.received_msat.unwrap_or(i.amount_msat) < DUST_LIMIT_SAT * 1000)
                .filter(|i| !on_chain.contains(&i.payment_hash))
                .map(|i| {
                    (
                        i.payment_hash,
                        format!(
                            "claimed within {IN_FLIGHT_WINDOW_SECS} s of the force close of channel {}, below the dust limit",
                            hex::encode(c.channel_id)
                        ),
                    )
                })
                .collect();
            let detail = format!(
                "{} claim(s) claimable on chain, {} possibly lost below the dust limit",
                on_chain.len(),
                lost.len()
            );
            if !lost.is_empty() {
                tracing::error!(channel_id = %hex::encode(c.channel_id), lost = lost.len(), "claims lost in a force close: the operator's loss");
            }
            self.store.resolve_closure(&c.channel_id, &lost, &detail)?;
            resolved += 1;
        }
        Ok(resolved)
    }
}
