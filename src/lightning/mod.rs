//! The embedded Lightning node (ldk-node) and the money decisions that go with it.
//!
//! - [`invoices`]: every decision about an incoming payment, in one place: hold invoices with
//!   server-chosen preimages, what to do with an HTLC for an invoice in each state, the claim
//!   protocol (decide, commit, claim in LDK, deliver), settlements LDK reports, reconciliation
//!   at start-up and the watchdog for claims LDK never completed.
//! - [`refunds`]: paying refundable balances back, exactly once.
//! - [`closures`]: channel closures and what they did to claims in flight.
//! - [`pruning`], [`compaction`]: bounded state over months (ldk-node's payment records; a
//!   channel monitor's history, dropped by a splice).
//! - [`events`]: the one consumer of ldk-node's event queue (commit, then acknowledge).
//!
//! Money rule: the decision to claim a chunk belongs to whoever issued its invoice (a session);
//! it is told through a [`HeldHtlc`] when the payer's HTLC is locked in. Nobody listening means
//! nobody will deliver, so the HTLC is failed back. What LDK itself reports (its payment store,
//! its events) is the truth the ledger follows.

pub mod closures;
pub mod compaction;
pub mod events;
pub mod invoices;
pub mod pruning;
pub mod refunds;

use ldk_node::bitcoin::secp256k1::PublicKey;
use ldk_node::Node;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc};

use crate::config::{Config, Network};
use crate::fault::{Faults, Injected};
use crate::store::{InvoiceState, Store, StoreError};

pub use crate::node::{build_node, ldk_network, parse_address, parse_node_id};

#[derive(Debug, thiserror::Error)]
pub enum LightningError {
    #[error(transparent)]
    Setup(#[from] crate::node::NodeError),
    #[error("Lightning node: {0}")]
    Node(#[from] ldk_node::NodeError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("invalid {what}: {reason}")]
    Invalid { what: &'static str, reason: String },
    #[error("invoice {0} is not held (state {1}): nothing to claim")]
    NotHeld(String, InvoiceState),
    #[error("LDK refused the claim of {hash}: {reason}")]
    ClaimRefused { hash: String, reason: String },
    #[error(transparent)]
    Injected(#[from] Injected),
}

/// A payer's HTLC is locked in for one of our invoices: the issuer must claim or fail it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldHtlc {
    pub payment_hash: [u8; 32],
    pub received_msat: u64,
    pub claim_deadline_height: Option<u32>,
    /// When the event loop handled the payment event (for payment → tokens latency).
    pub at: std::time::Instant,
}

/// What a live session hears from the event loop, after the commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionNotice {
    /// A keysend payment naming the session was credited.
    Credit { amount_msat: u64 },
    /// LDK reported the claim of one of the session's invoices: its money is booked.
    Settled {
        payment_hash: [u8; 32],
        amount_msat: u64,
    },
}

/// Node-level happenings other parts may want to wait for (channel life, payments).
#[derive(Debug, Clone)]
pub enum NodeNotice {
    ChannelPending {
        counterparty: PublicKey,
    },
    ChannelReady {
        counterparty: Option<PublicKey>,
    },
    ChannelClosed {
        counterparty: Option<PublicKey>,
    },
    PaymentReceived {
        payment_hash: [u8; 32],
        amount_msat: u64,
    },
    /// An outgoing payment (a refund) succeeded or failed; its outcome is committed.
    PaymentSent {
        payment_hash: [u8; 32],
        succeeded: bool,
    },
}

pub struct Lightning {
    node: Arc<Node>,
    store: Store,
    /// payment hash → who decides about it. Entries are removed when the HTLC is announced
    /// or the invoice is withdrawn.
    holds: Mutex<HashMap<[u8; 32], mpsc::UnboundedSender<HeldHtlc>>>,
    /// payment hash → the block height by which LDK needs the held HTLC claimed
    /// (`claim_deadline`); a claim too close to it is refused (failed back) instead.
    deadlines: Mutex<HashMap<[u8; 32], u32>>,
    /// session id → live session, told of credits and settlements once committed.
    sessions: Mutex<HashMap<[u8; 16], mpsc::UnboundedSender<SessionNotice>>>,
    notices: broadcast::Sender<NodeNotice>,
    public_address: String,
    network: Network,
    keysend_tlv_type: u64,
    /// A claim LDK has not reported completed after this long is checked and, if LDK never
    /// made it, written off.
    claim_confirm_timeout: Duration,
    /// Routing fees the operator pays at most for one refund.
    refund_max_fee_msat: u64,
    refund_fee_ppm: u64,
    /// Records of final payments are removed from the node after this long.
    payment_retention: Duration,
    /// When a channel's monitor is spliced to drop its history ([`compaction`]).
    compaction: compaction::Compaction,
    /// channel id → a splice compaction started or refused.
    splices: Mutex<HashMap<[u8; 32], compaction::Splice>>,
    /// ldk-node's storage (its SQLite file: the monitors' sizes are read there).
    ldk_dir: std::path::PathBuf,
    faults: Arc<Faults>,
}

impl Lightning {
    /// Builds and starts the server's node, then reconciles what a previous run left
    /// unresolved with LDK's own records ([`Lightning::reconcile_at_start`]). Must run on a
    /// multi-thread tokio runtime (ldk-node blocks in place).
    pub fn start(
        config: &Config,
        store: Store,
        faults: Arc<Faults>,
    ) -> Result<Arc<Lightning>, LightningError> {
        let seed = (!config.lightning.seed_file.as_os_str().is_empty())
            .then_some(config.lightning.seed_file.as_path());
        let node = build_node(
            &config.ldk_dir(),
            config.lightning.network,
            &config.lightning.listen,
            Some(&config.lightning.alias),
            seed,
            &config.chain,
            config.lightning.store_wal,
        )?;
        node.start()?;
        let (notices, _) = broadcast::channel(1024);
        let ln = Arc::new(Lightning {
            node: Arc::new(node),
            store,
            holds: Mutex::new(HashMap::new()),
            deadlines: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
            notices,
            public_address: config.public_ln_address().to_string(),
            network: config.lightning.network,
            keysend_tlv_type: config.payments.keysend_tlv_type,
            claim_confirm_timeout: Duration::from_secs(config.payments.claim_confirm_timeout_secs),
            refund_max_fee_msat: config.payments.refund_max_fee_msat,
            refund_fee_ppm: config.payments.refund_fee_ppm,
            payment_retention: Duration::from_secs(config.lightning.payment_retention_secs),
            compaction: compaction::Compaction {
                monitor_bytes: config.lightning.compact_monitor_bytes,
                splice_sat: config.lightning.compact_splice_sat,
            },
            splices: Mutex::new(HashMap::new()),
            ldk_dir: config.ldk_dir(),
            faults,
        });
        ln.reconcile_at_start()?;
        Ok(ln)
    }

    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    pub fn node_id(&self) -> String {
        self.node.node_id().to_string()
    }

    pub fn public_address(&self) -> &str {
        &self.public_address
    }

    pub fn network(&self) -> Network {
        self.network
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn faults(&self) -> &Arc<Faults> {
        &self.faults
    }

    pub fn subscribe(&self) -> broadcast::Receiver<NodeNotice> {
        self.notices.subscribe()
    }

    /// What we can receive over usable channels right now.
    /// [`Lightning::inbound_liquidity_msat`] on a blocking thread: `list_channels` takes the
    /// channel manager's locks, which a persisting LDK can hold for a while.
    pub async fn inbound_liquidity(self: &Arc<Self>) -> u64 {
        let ln = self.clone();
        tokio::task::spawn_blocking(move || ln.inbound_liquidity_msat())
            .await
            .unwrap_or(0)
    }

    pub fn inbound_liquidity_msat(&self) -> u64 {
        self.node
            .list_channels()
            .iter()
            .filter(|c| c.is_usable)
            .map(|c| c.inbound_capacity_msat)
            .sum()
    }

    /// The session a keysend payment names in our TLV record, if it carries a well-formed one.
    pub fn keysend_session(&self, records: &[ldk_node::CustomTlvRecord]) -> Option<[u8; 16]> {
        records
            .iter()
            .find(|r| r.type_num == self.keysend_tlv_type)
            .and_then(|r| <[u8; 16]>::try_from(r.value.as_slice()).ok())
    }

    pub fn keysend_tlv_type(&self) -> u64 {
        self.keysend_tlv_type
    }

    /// Routes committed credits and settlements for `session_id` to `tx` until unregistered.
    pub fn register_session(&self, session_id: [u8; 16], tx: mpsc::UnboundedSender<SessionNotice>) {
        self.sessions.lock().unwrap().insert(session_id, tx);
    }

    pub fn unregister_session(&self, session_id: &[u8; 16]) {
        self.sessions.lock().unwrap().remove(session_id);
    }

    fn notify_session(&self, session_id: &[u8; 16], notice: SessionNotice) {
        if let Some(tx) = self.sessions.lock().unwrap().get(session_id) {
            let _ = tx.send(notice);
        }
    }

    /// Takes the listener of a payment hash, if any (each HTLC is announced once).
    fn take_listener(&self, hash: &[u8; 32]) -> Option<mpsc::UnboundedSender<HeldHtlc>> {
        self.holds.lock().unwrap().remove(hash)
    }

    /// Whether anybody is still waiting for an HTLC of this invoice (tests check that none
    /// outlives its session).
    pub fn has_listener(&self, hash: &[u8; 32]) -> bool {
        self.holds.lock().unwrap().contains_key(hash)
    }

    /// Invoices with a live listener (0 when no session is running).
    pub fn listeners(&self) -> usize {
        self.holds.lock().unwrap().len()
    }

    pub fn stop(&self) {
        if let Err(e) = self.node.stop() {
            tracing::warn!(error = %e, "stopping the Lightning node");
        }
    }
}
