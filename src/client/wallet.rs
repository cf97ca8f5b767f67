//! The client's Lightning wallet: its own ldk-node (own data dir and seed), its own event loop
//! (every event is broadcast to whoever waits for it, then acknowledged). The CLI client, the
//! demo, the benchmarks and the tests all pay through it.

use ldk_node::lightning::ln::channelmanager::PaymentId;
use ldk_node::lightning_invoice::Bolt11Invoice;
use ldk_node::{CustomTlvRecord, Event, Node};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::ClientError;
use crate::config::{ChainConfig, Network};
use crate::node::{build_node, parse_node_id};

/// How an outgoing payment ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PayOutcome {
    Succeeded { preimage: [u8; 32], fee_msat: u64 },
    Failed { reason: String },
}

pub struct Wallet {
    pub node: Arc<Node>,
    events: broadcast::Sender<Event>,
    stop: CancellationToken,
    pub listen: String,
}

impl Wallet {
    /// Builds and starts a node in `dir` (its seed is kept there); `store_wal` as the
    /// server's `lightning.store_wal`. Blocking: call from a multi-thread runtime, via
    /// `spawn_blocking` in async code.
    pub fn start(
        dir: &std::path::Path,
        network: Network,
        listen: &str,
        chain: &ChainConfig,
        store_wal: bool,
    ) -> Result<Wallet, ClientError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| ClientError::Wallet(format!("{}: {e}", dir.display())))?;
        let node = build_node(
            dir,
            network,
            listen,
            Some("satstream-client"),
            None,
            chain,
            store_wal,
        )?;
        node.start()
            .map_err(|e| ClientError::Wallet(format!("cannot start the wallet's node: {e}")))?;
        let node = Arc::new(node);
        let (events, _) = broadcast::channel(4096);
        let stop = CancellationToken::new();
        tokio::spawn(event_loop(node.clone(), events.clone(), stop.clone()));
        Ok(Wallet {
            node,
            events,
            stop,
            listen: listen.to_string(),
        })
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    pub fn node_id(&self) -> String {
        self.node.node_id().to_string()
    }

    /// An invoice of this wallet (refunds are paid to it); None: amountless.
    pub fn receive_invoice(
        &self,
        amount_msat: Option<u64>,
        description: &str,
    ) -> Result<String, ClientError> {
        use ldk_node::lightning_invoice::{Bolt11InvoiceDescription, Description};
        let d = Description::new(description.to_string())
            .map_err(|e| ClientError::Wallet(format!("invoice description: {e}")))?;
        let d = Bolt11InvoiceDescription::Direct(d);
        let pay = self.node.bolt11_payment();
        match amount_msat {
            Some(a) => pay.receive(a, &d, 3600),
            None => pay.receive_variable_amount(&d, 3600),
        }
        .map(|i| i.to_string())
        .map_err(|e| ClientError::Wallet(format!("cannot create an invoice: {e}")))
    }

    /// Starts paying `bolt11`; returns the payment hash without waiting.
    pub fn send(&self, bolt11: &str) -> Result<[u8; 32], ClientError> {
        let inv = Bolt11Invoice::from_str(bolt11)
            .map_err(|e| ClientError::Payment(format!("bad invoice: {e}")))?;
        let id: PaymentId = self
            .node
            .bolt11_payment()
            .send(&inv, None)
            .map_err(|e| ClientError::Payment(format!("send: {e}")))?;
        Ok(id.0)
    }

    /// Sends `amount_msat` as an underpayment/overpayment test would: any amount, invoice or not.
    pub fn send_amount(&self, bolt11: &str, amount_msat: u64) -> Result<[u8; 32], ClientError> {
        let inv = Bolt11Invoice::from_str(bolt11)
            .map_err(|e| ClientError::Payment(format!("bad invoice: {e}")))?;
        let id = self
            .node
            .bolt11_payment()
            .send_using_amount(&inv, amount_msat, None)
            .map_err(|e| ClientError::Payment(format!("send: {e}")))?;
        Ok(id.0)
    }

    /// Pays and waits for the outcome.
    pub async fn pay(&self, bolt11: &str, timeout: Duration) -> Result<PayOutcome, ClientError> {
        let rx = self.subscribe();
        let hash = self.send(bolt11)?;
        self.wait_outcome(rx, hash, timeout).await
    }

    /// Keysend with custom TLV records; returns the payment hash.
    pub fn keysend(
        &self,
        node_id: &str,
        amount_msat: u64,
        tlvs: Vec<(u64, Vec<u8>)>,
    ) -> Result<[u8; 32], ClientError> {
        let pk = parse_node_id(node_id)?;
        let records = tlvs
            .into_iter()
            .map(|(type_num, value)| CustomTlvRecord { type_num, value })
            .collect();
        let id = self
            .node
            .spontaneous_payment()
            .send_with_custom_tlvs(amount_msat, pk, None, records)
            .map_err(|e| ClientError::Payment(format!("keysend: {e}")))?;
        Ok(id.0)
    }

    /// Waits for the end of payment `hash` on a receiver subscribed before it was sent.
    pub async fn wait_outcome(
        &self,
        mut rx: broadcast::Receiver<Event>,
        hash: [u8; 32],
        timeout: Duration,
    ) -> Result<PayOutcome, ClientError> {
        let wait = async {
            loop {
                match rx.recv().await {
                    Ok(Event::PaymentSuccessful {
                        payment_hash,
                        payment_preimage,
                        fee_paid_msat,
                        ..
                    }) if payment_hash.0 == hash => {
                        return Ok(PayOutcome::Succeeded {
                            preimage: payment_preimage.map(|p| p.0).unwrap_or_default(),
                            fee_msat: fee_paid_msat.unwrap_or(0),
                        })
                    }
                    Ok(Event::PaymentFailed {
                        payment_hash: Some(h),
                        reason,
                        ..
                    }) if h.0 == hash => {
                        return Ok(PayOutcome::Failed {
                            reason: format!("{reason:?}"),
                        })
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        return Err(ClientError::Payment(format!("missed {n} payer events")))
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        return Err(ClientError::Payment("payer stopped".into()))
                    }
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| ClientError::Timeout("payment outcome"))?
    }

    /// Whether a usable channel can take one more outgoing HTLC now. LDK caps the HTLCs in
    /// flight on a channel (the peer's `max_accepted_htlcs`, 50 with LDK's defaults) and
    /// reports a channel whose slots are all taken with `next_outbound_htlc_limit_msat` 0;
    /// its router then finds no route.
    pub fn has_htlc_slot(&self) -> bool {
        self.node
            .list_channels()
            .iter()
            .any(|c| c.is_usable && c.next_outbound_htlc_limit_msat > 0)
    }

    /// Usable outbound capacity, msat.
    pub fn outbound_msat(&self) -> u64 {
        self.node
            .list_channels()
            .iter()
            .filter(|c| c.is_usable)
            .map(|c| c.outbound_capacity_msat)
            .sum()
    }

    /// A fresh on-chain address to fund the wallet.
    pub fn new_address(&self) -> Result<String, ClientError> {
        Ok(self
            .node
            .onchain_payment()
            .new_address()
            .map_err(|e| ClientError::Wallet(format!("new address: {e}")))?
            .to_string())
    }

    /// (on-chain spendable sat, on-chain total sat, lightning outbound msat).
    pub fn balances(&self) -> (u64, u64, u64) {
        let b = self.node.list_balances();
        (
            b.spendable_onchain_balance_sats,
            b.total_onchain_balance_sats,
            self.outbound_msat(),
        )
    }

    /// Opens a channel of `sats` to `node_id@address` (as Quote reports them). Returns once the
    /// funding transaction is queued for broadcast (ChannelPending), so the process may exit after it;
    /// the channel is usable after confirmations.
    pub async fn open_channel(
        &self,
        node_id: &str,
        address: &str,
        sats: u64,
    ) -> Result<String, ClientError> {
        let pk = parse_node_id(node_id)?;
        let addr = ldk_node::lightning::ln::msgs::SocketAddress::from_str(address)
            .map_err(|_| ClientError::Wallet(format!("bad node address {address:?}")))?;
        // The on-chain balance must be current, or a freshly funded wallet has nothing to spend.
        let node = self.node.clone();
        tokio::task::spawn_blocking(move || node.sync_wallets())
            .await
            .map_err(|e| ClientError::Wallet(e.to_string()))?
            .map_err(|e| ClientError::Wallet(format!("sync: {e}")))?;
        let spendable = self.node.list_balances().spendable_onchain_balance_sats;
        if spendable <= sats {
            return Err(ClientError::Wallet(format!(
                "{spendable} sat spendable on-chain is not enough for a {sats} sat channel \
                 plus fees: fund `satstream wallet address` (coinbase needs 100 blocks to mature)"
            )));
        }
        let mut events = self.subscribe();
        let id = self
            .node
            .open_channel(pk, addr, sats, None, None)
            .map_err(|e| ClientError::Wallet(format!("open channel: {e}")))?;
        let wait = async {
            loop {
                match events.recv().await {
                    Ok(Event::ChannelPending {
                        user_channel_id,
                        funding_txo,
                        ..
                    }) if user_channel_id == id => return Ok(funding_txo.txid),
                    Ok(Event::ChannelClosed {
                        user_channel_id,
                        reason,
                        ..
                    }) if user_channel_id == id => {
                        return Err(ClientError::Wallet(format!(
                            "the channel was refused or closed: {reason:?}"
                        )))
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => {
                        return Err(ClientError::Wallet("the wallet stopped".into()))
                    }
                }
            }
        };
        // LDK queues the funding transaction for broadcast before it emits ChannelPending, and
        // ldk-node's broadcaster sends it as soon as it is queued.
        let txid = tokio::time::timeout(Duration::from_secs(60), wait)
            .await
            .map_err(|_| ClientError::Timeout("the channel's funding transaction"))??;
        Ok(txid.to_string())
    }

    /// Waits until the wallet can pay over one of its channels. After a start, a channel is
    /// usable only once its peer is reconnected and the channel re-established, and ldk-node
    /// redials persisted peers on its own schedule, so this dials them now. Ok(false): the
    /// wallet has no channel at all (open one first).
    pub async fn wait_usable(&self, timeout: Duration) -> Result<bool, ClientError> {
        let peers: Vec<_> = self
            .node
            .list_channels()
            .iter()
            .map(|c| c.counterparty_node_id)
            .collect();
        if peers.is_empty() {
            return Ok(false);
        }
        for p in self.node.list_peers() {
            if peers.contains(&p.node_id) && !p.is_connected {
                let node = self.node.clone();
                let (id, addr) = (p.node_id, p.address.clone());
                // A failed dial is not fatal: ldk-node retries, and the wait below is bounded.
                let r = tokio::task::spawn_blocking(move || node.connect(id, addr, true)).await;
                if let Ok(Err(e)) = r {
                    tracing::debug!(peer = %p.node_id, error = %e, "reconnect");
                }
            }
        }
        let deadline = tokio::time::Instant::now() + timeout;
        // ldk-node has no event for "re-established", so poll the channel list.
        while self.outbound_msat() == 0 {
            if tokio::time::Instant::now() >= deadline {
                return Err(ClientError::Wallet(format!(
                    "no usable channel after {} s: is it confirmed (6 blocks) and is its peer \
                     reachable?",
                    timeout.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(true)
    }

    pub fn stop(&self) {
        self.stop.cancel();
        let _ = self.node.stop();
    }
}

async fn event_loop(node: Arc<Node>, tx: broadcast::Sender<Event>, stop: CancellationToken) {
    loop {
        let e = tokio::select! {
            _ = stop.cancelled() => return,
            e = node.next_event_async() => e,
        };
        tracing::debug!(event = ?e, "payer event");
        let _ = tx.send(e);
        if let Err(e) = node.event_handled() {
            tracing::warn!(error = %e, "payer event_handled");
        }
    }
}
