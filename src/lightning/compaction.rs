//! Bounded channel state over months: a channel's `ChannelMonitor` keeps the HTLCs of every
//! past counterparty commitment transaction for as long as the channel's funding output is
//! unspent (it needs them to punish a revoked commitment; rust-lightning issue #3049). Every
//! paid chunk adds commitments, so the monitor grows with the channel's history: ~150 bytes
//! per chunk invoice measured here. ldk-node holds it in memory, rewrites it whole every 100
//! updates (a stall on the payment path that grows with it) and reads it whole at start.
//!
//! A splice replaces the funding output; once the splice is locked LDK drops the old
//! funding's commitments and the monitor starts small again. So when a channel's stored
//! monitor passes `lightning.compact_monitor_bytes`, the watchdog splices
//! `lightning.compact_splice_sat`: out of the channel to the node's on-chain wallet when the
//! operator's own balance covers it, else into the channel from that wallet (at least 1.1 % of
//! the channel when the balance is below its reserve, which LDK requires; either way the
//! money stays the operator's; an on-chain fee each time). Never the customers' money: a
//! splice out is chosen only if the channel's outbound capacity still covers everything
//! refundable afterwards. The counterparty must support splicing (ldk-node does; a refusal is
//! logged and retried, the wait doubling up to [`RETRY_AFTER`]). A channel is not due again until ldk-node has
//! written its monitor whole after the lock (the stored size is the last whole write).

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use ldk_node::bitcoin::Txid;
use ldk_node::lightning::chain::transaction::OutPoint;
use ldk_node::lightning::ln::types::ChannelId;

use super::{Lightning, LightningError};

/// A splice not locked after this long is forgotten (and may be started again).
const PATIENCE: Duration = Duration::from_secs(6 * 3600);
/// After a refused splice, wait this long before asking again, doubled after each further
/// refusal up to [`RETRY_AFTER`]. A refusal is often a splice already pending in LDK that this
/// process did not start (it was started before a restart): asked again soon after its lock.
const FIRST_RETRY: Duration = Duration::from_secs(30);
/// The longest wait between two attempts (and between two warnings of a splice nobody can
/// pay for).
const RETRY_AFTER: Duration = Duration::from_secs(600);

/// What compaction knows of one channel.
#[derive(Debug, Clone, Copy)]
pub(super) enum Splice {
    /// Started while the channel was funded by `from`: done when its funding moves.
    Pending {
        from: ldk_node::bitcoin::OutPoint,
        at: Instant,
    },
    /// Locked when its stored monitor was `bytes`: not due again before ldk-node has written
    /// it whole since (without the old funding's history).
    Locked { bytes: u64 },
    /// Refused `tries` times in a row (by ldk-node or the counterparty): not asked again
    /// before `until`.
    Refused { until: Instant, tries: u32 },
    /// Due, but neither the channel's own balance nor the wallet covered it: tried (and
    /// said) again after `until`.
    Unaffordable { until: Instant },
}

/// `lightning.compact_*`.
#[derive(Debug, Clone, Copy)]
pub struct Compaction {
    /// A channel whose stored monitor is larger is spliced (0: never).
    pub monitor_bytes: u64,
    /// Spliced out to the node's wallet each time.
    pub splice_sat: u64,
}

impl Lightning {
    /// The size of every channel's stored monitor ([`stored_monitor_sizes`]).
    pub fn monitor_sizes(&self) -> Result<HashMap<[u8; 32], u64>, LightningError> {
        stored_monitor_sizes(&self.ldk_dir).map_err(|e| LightningError::Invalid {
            what: "ldk-node store",
            reason: e.to_string(),
        })
    }

    /// Publishes the largest stored monitor's size and starts a splice on every channel whose
    /// monitor passed the limit; how many.
    pub fn compact_monitors(&self) -> Result<usize, LightningError> {
        let sizes = self.monitor_sizes()?;
        crate::metrics::channel_monitor_bytes(sizes.values().max().copied().unwrap_or(0));
        let c = self.compaction;
        if c.monitor_bytes == 0 {
            return Ok(0);
        }
        let channels = self.node.list_channels();
        let due: Vec<_> = {
            let mut splices = self.splices.lock().unwrap();
            splices.retain(|id, _| channels.iter().any(|ch| ch.channel_id.0 == *id));
            for ch in &channels {
                let (id, size) = (ch.channel_id.0, sizes.get(&ch.channel_id.0).copied());
                let next = match splices.get(&id) {
                    Some(Splice::Pending { from, .. }) if ch.funding_txo != Some(*from) => {
                        tracing::info!(channel = %ch.channel_id, "channel monitor compaction: splice locked");
                        Some(Splice::Locked {
                            bytes: size.unwrap_or(0),
                        })
                    }
                    Some(Splice::Pending { at, .. }) if at.elapsed() > PATIENCE => None,
                    // Written whole again since the lock: without the old funding's history.
                    Some(Splice::Locked { bytes }) if size != Some(*bytes) => None,
                    Some(Splice::Unaffordable { until }) if Instant::now() >= *until => None,
                    Some(s) => Some(*s),
                    None => None,
                };
                match next {
                    Some(s) => splices.insert(id, s),
                    None => splices.remove(&id),
                };
            }
            channels
                .iter()
                .filter(|ch| {
                    ch.is_usable
                        && sizes
                            .get(&ch.channel_id.0)
                            .is_some_and(|b| *b > c.monitor_bytes)
                        && match splices.get(&ch.channel_id.0) {
                            None => true,
                            Some(Splice::Refused { until, .. }) => Instant::now() >= *until,
                            Some(_) => false,
                        }
                })
                .cloned()
                .collect()
        };
        if due.is_empty() {
            return Ok(0);
        }
        let owed = self.store.total_refundable_msat()?;
        let mut started = 0;
        for ch in due {
            let Some(from) = ch.funding_txo else { continue };
            let (id, peer) = (&ch.user_channel_id, ch.counterparty_node_id);
            // Out of the channel when the operator's own balance (beyond everything customers
            // may be refunded) covers it; else into it, from the node's wallet.
            let out =
                ch.outbound_capacity_msat >= c.splice_sat.saturating_mul(1000).saturating_add(owed);
            let sat = if out || ch.outbound_capacity_msat > 0 {
                c.splice_sat
            } else {
                // A balance below the channel's reserve (nothing spendable) must end above
                // the spliced channel's reserve (1 % of its value): bring 1.1 % at least.
                c.splice_sat
                    .max(ch.channel_value_sats.saturating_mul(11) / 1000)
            };
            let r = if out {
                let address = self.node.onchain_payment().new_address()?;
                self.node.splice_out(id, peer, &address, sat)
            } else {
                self.node.splice_in(id, peer, sat)
            };
            let mut splices = self.splices.lock().unwrap();
            match r {
                Ok(()) => {
                    let direction = if out { "out" } else { "in" };
                    tracing::info!(channel = %ch.channel_id, splice_sat = sat, direction,
                        "channel monitor compaction: splice started");
                    crate::metrics::monitor_compaction(direction);
                    let at = Instant::now();
                    splices.insert(ch.channel_id.0, Splice::Pending { from, at });
                    started += 1;
                }
                Err(ldk_node::NodeError::InsufficientFunds) => {
                    let until = Instant::now() + RETRY_AFTER;
                    splices.insert(ch.channel_id.0, Splice::Unaffordable { until });
                    tracing::warn!(
                        channel = %ch.channel_id,
                        outbound_msat = ch.outbound_capacity_msat,
                        refundable_msat = owed,
                        splice_sat = sat,
                        "channel monitor due for compaction, but neither the channel's own \
                         balance beyond what customers may be refunded nor the wallet covers \
                         a splice"
                    );
                }
                Err(e) => {
                    drop(splices);
                    self.refused(&ch.channel_id, &e.to_string());
                }
            }
        }
        Ok(started)
    }

    /// The splice of `channel` was refused (by ldk-node, or by the counterparty: LDK's
    /// `SpliceFailed`): asked again after a wait that doubles with each refusal in a row.
    pub fn refused(&self, channel: &ChannelId, why: &str) {
        let mut splices = self.splices.lock().unwrap();
        let tries = match splices.get(&channel.0) {
            Some(Splice::Refused { tries, .. }) => tries + 1,
            _ => 0,
        };
        if tries == 0 {
            tracing::warn!(channel = %channel, why, "channel monitor compaction: splice refused");
        } else {
            tracing::debug!(channel = %channel, why, tries, "channel monitor compaction: splice refused again");
        }
        let wait = FIRST_RETRY
            .saturating_mul(1 << tries.min(10))
            .min(RETRY_AFTER);
        splices.insert(
            channel.0,
            Splice::Refused {
                until: Instant::now() + wait,
                tries,
            },
        );
    }
}

/// The size of every channel's monitor in ldk-node's store at `ldk_dir`, by channel id, as
/// ldk-node last wrote it whole (at most 100 updates old).
pub fn stored_monitor_sizes(ldk_dir: &Path) -> Result<HashMap<[u8; 32], u64>, rusqlite::Error> {
    let db = ldk_store(ldk_dir)?;
    let mut q = db.prepare(&format!(
        "SELECT key, LENGTH(value) FROM {} WHERE primary_namespace = 'monitors' \
         AND secondary_namespace = ''",
        ldk_node::io::sqlite_store::KV_TABLE_NAME
    ))?;
    let rows = q.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
    let mut sizes = HashMap::new();
    for row in rows {
        let (key, len) = row?;
        if let Some(id) = monitor_channel(&key) {
            sizes.insert(id, len.max(0) as u64);
        }
    }
    Ok(sizes)
}

/// ldk-node's SQLite store at `ldk_dir`, read-only (ldk-node keeps writing it).
pub fn ldk_store(ldk_dir: &Path) -> Result<rusqlite::Connection, rusqlite::Error> {
    rusqlite::Connection::open_with_flags(
        ldk_dir.join(ldk_node::io::sqlite_store::SQLITE_DB_FILE_NAME),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
}

/// The channel a stored monitor's key names: the id of a v1 channel is derived from its
/// first funding outpoint (`<txid>_<index>`, kept across splices); a v2 channel's key is its id.
fn monitor_channel(key: &str) -> Option<[u8; 32]> {
    match key.split_once('_') {
        Some((txid, index)) => {
            let txid: Txid = txid.parse().ok()?;
            let index: u16 = index.parse().ok()?;
            Some(ChannelId::v1_from_funding_outpoint(OutPoint { txid, index }).0)
        }
        None => {
            let bytes = hex::decode(key).ok()?;
            bytes.try_into().ok()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monitor_keys_name_their_channels() {
        let txid: Txid = "a9388254ef3f9b7eb28bb8d14505db9490d50f8a2fc22d5a4403e2a07d5e1840"
            .parse()
            .unwrap();
        let v1 = ChannelId::v1_from_funding_outpoint(OutPoint { txid, index: 1 });
        assert_eq!(monitor_channel(&format!("{txid}_1")), Some(v1.0));
        assert_ne!(monitor_channel(&format!("{txid}_0")), Some(v1.0));
        assert_eq!(monitor_channel(&hex::encode([7u8; 32])), Some([7u8; 32]));
        assert_eq!(monitor_channel("not a key"), None);
        assert_eq!(monitor_channel(&format!("{txid}_x")), None);
    }
}
