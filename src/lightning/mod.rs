//! The embedded Lightning node (ldk-node): built from config, hold invoices with server-chosen
//! preimages, claim / fail decisions, and the one event loop ([`events`]).
//!
//! Money rule: the decision to claim belongs to whoever issued the invoice (a session); it is
//! told through a [`HeldHtlc`] when the payer's HTLC is locked in. Nobody listening means
//! nobody will deliver, so the HTLC is failed back.

pub mod events;

use ldk_node::bitcoin::hashes::{sha256, Hash};
use ldk_node::bitcoin::secp256k1::PublicKey;
use ldk_node::lightning::ln::msgs::SocketAddress;
use ldk_node::lightning_invoice::{Bolt11InvoiceDescription, Description};
use ldk_node::lightning_types::payment::{PaymentHash, PaymentPreimage};
use ldk_node::{Builder, Node};
use rand::RngCore;
use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use tokio::sync::{broadcast, mpsc};

use crate::config::{ChainSource, Config, Network};
use crate::store::{Invoice, InvoicePurpose, InvoiceState, NewInvoice, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum LightningError {
    #[error("cannot build the Lightning node: {0}")]
    Build(String),
    #[error("Lightning node: {0}")]
    Node(#[from] ldk_node::NodeError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("invalid {what}: {reason}")]
    Invalid { what: &'static str, reason: String },
    #[error("invoice {0} is not held (state {1}): nothing to claim")]
    NotHeld(String, InvoiceState),
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
}

pub struct Lightning {
    node: Arc<Node>,
    store: Store,
    /// payment hash → who decides about it. Entries are removed when the HTLC is delivered
    /// or the invoice is cancelled.
    holds: Mutex<HashMap<[u8; 32], mpsc::UnboundedSender<HeldHtlc>>>,
    /// session id → live KEYSEND session, told the amount of each committed credit.
    credits: Mutex<HashMap<[u8; 16], mpsc::UnboundedSender<u64>>>,
    notices: broadcast::Sender<NodeNotice>,
    public_address: String,
    network: Network,
    keysend_tlv_type: u64,
}

pub fn ldk_network(n: Network) -> ldk_node::bitcoin::Network {
    match n {
        Network::Regtest => ldk_node::bitcoin::Network::Regtest,
        Network::Signet => ldk_node::bitcoin::Network::Signet,
        Network::Testnet => ldk_node::bitcoin::Network::Testnet,
        Network::Bitcoin => ldk_node::bitcoin::Network::Bitcoin,
    }
}

/// Builds an ldk-node from the node-related parts of the config (also used for payer nodes
/// in the harness and the client wallet).
pub fn build_node(
    storage_dir: &std::path::Path,
    network: Network,
    listen: &str,
    alias: Option<&str>,
    seed_file: Option<&std::path::Path>,
    chain: &crate::config::ChainConfig,
    store_wal: bool,
) -> Result<Node, LightningError> {
    let addr = SocketAddress::from_str(listen).map_err(|_| LightningError::Invalid {
        what: "listen address",
        reason: listen.to_string(),
    })?;
    let cfg = ldk_node::config::Config {
        network: ldk_network(network),
        storage_dir_path: storage_dir.display().to_string(),
        listening_addresses: Some(vec![addr]),
        ..Default::default()
    };
    let mut b = Builder::from_config(cfg);
    b.set_log_facade_logger();
    if let Some(a) = alias {
        b.set_node_alias(a.to_string())
            .map_err(|e| LightningError::Build(format!("alias: {e}")))?;
    }
    if let Some(seed) = seed_file {
        b.set_entropy_seed_path(seed.display().to_string());
    }
    match chain.source {
        ChainSource::BitcoindRpc => {
            b.set_chain_source_bitcoind_rpc(
                chain.bitcoind_rpc_host.clone(),
                chain.bitcoind_rpc_port,
                chain.bitcoind_rpc_user.clone(),
                chain.bitcoind_rpc_password.clone(),
            );
        }
        ChainSource::Esplora => {
            b.set_chain_source_esplora(chain.esplora_url.clone(), None);
        }
        ChainSource::Electrum => {
            b.set_chain_source_electrum(chain.electrum_url.clone(), None);
        }
    }
    std::fs::create_dir_all(storage_dir).map_err(|e| {
        LightningError::Build(format!("cannot create {}: {e}", storage_dir.display()))
    })?;
    set_store_journal(storage_dir, store_wal)?;
    b.build().map_err(|e| LightningError::Build(e.to_string()))
}

/// ldk-node opens its SQLite store with SQLite's defaults: a rollback journal, so every
/// write (each channel-monitor update, each stale-update removal) costs several fsyncs. The
/// journal mode is a property of the database file, so setting WAL here, before ldk-node
/// opens it, makes each write one fsync (synchronous stays FULL: still durable). This is
/// what shortens the claim on the payment path and LDK's periodic monitor rewrites.
fn set_store_journal(storage_dir: &std::path::Path, wal: bool) -> Result<(), LightningError> {
    let path = storage_dir.join(ldk_node::io::sqlite_store::SQLITE_DB_FILE_NAME);
    let mode = if wal { "WAL" } else { "DELETE" };
    let err = |e: rusqlite::Error| {
        LightningError::Build(format!("{}: journal_mode={mode}: {e}", path.display()))
    };
    let conn = rusqlite::Connection::open(&path).map_err(err)?;
    let now: String = conn
        .query_row(&format!("PRAGMA journal_mode={mode}"), [], |r| r.get(0))
        .map_err(err)?;
    if !now.eq_ignore_ascii_case(mode) {
        return Err(LightningError::Build(format!(
            "{}: journal_mode is {now}, not {mode}",
            path.display()
        )));
    }
    Ok(())
}

pub fn parse_node_id(s: &str) -> Result<PublicKey, LightningError> {
    PublicKey::from_str(s).map_err(|_| LightningError::Invalid {
        what: "node id",
        reason: format!("{s:?} is not a 33-byte hex public key"),
    })
}

pub fn parse_address(s: &str) -> Result<SocketAddress, LightningError> {
    SocketAddress::from_str(s).map_err(|_| LightningError::Invalid {
        what: "address",
        reason: format!("{s:?} is not host:port"),
    })
}

impl Lightning {
    /// Builds and starts the server's node, then settles what a previous run left unresolved.
    /// Must run on a multi-thread tokio runtime (ldk-node blocks in place).
    pub fn start(config: &Config, store: Store) -> Result<Arc<Lightning>, LightningError> {
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
        let (notices, _) = broadcast::channel(256);
        let ln = Arc::new(Lightning {
            node: Arc::new(node),
            store,
            holds: Mutex::new(HashMap::new()),
            credits: Mutex::new(HashMap::new()),
            notices,
            public_address: config.public_ln_address().to_string(),
            network: config.lightning.network,
            keysend_tlv_type: config.payments.keysend_tlv_type,
        });
        ln.settle_leftovers()?;
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

    pub fn subscribe(&self) -> broadcast::Receiver<NodeNotice> {
        self.notices.subscribe()
    }

    /// What we can receive over usable channels right now.
    pub fn inbound_liquidity_msat(&self) -> u64 {
        self.node
            .list_channels()
            .iter()
            .filter(|c| c.is_usable)
            .map(|c| c.inbound_capacity_msat)
            .sum()
    }

    /// Issues a hold invoice. The preimage is ours (random unless given: ATOMIC uses the
    /// chunk key); the invoice is committed before its BOLT11 leaves this function, and
    /// `notify` hears when the payer's HTLC is locked in.
    #[allow(clippy::too_many_arguments)]
    pub fn create_hold_invoice(
        &self,
        amount_msat: u64,
        description: &str,
        expiry_secs: u32,
        purpose: InvoicePurpose,
        session_id: Option<[u8; 16]>,
        chunk_index: Option<u32>,
        preimage: Option<[u8; 32]>,
        notify: mpsc::UnboundedSender<HeldHtlc>,
    ) -> Result<Invoice, LightningError> {
        let preimage = preimage.unwrap_or_else(|| {
            let mut p = [0u8; 32];
            rand::thread_rng().fill_bytes(&mut p);
            p
        });
        let hash = sha256::Hash::hash(&preimage).to_byte_array();
        let desc =
            Description::new(description.to_string()).map_err(|e| LightningError::Invalid {
                what: "invoice description",
                reason: e.to_string(),
            })?;
        let bolt11 = self.node.bolt11_payment().receive_for_hash(
            amount_msat,
            &Bolt11InvoiceDescription::Direct(desc),
            expiry_secs,
            PaymentHash(hash),
        )?;
        // Register the listener before anyone can see the invoice: a payment can only come
        // after the BOLT11 string is handed out.
        self.holds.lock().unwrap().insert(hash, notify);
        let inv = self.store.insert_invoice(&NewInvoice {
            payment_hash: hash,
            preimage,
            bolt11: bolt11.to_string(),
            amount_msat,
            session_id,
            chunk_index,
            purpose,
            expires_at_unix: crate::store::now_unix() + expiry_secs as u64,
        });
        match inv {
            Ok(inv) => Ok(inv),
            Err(e) => {
                self.holds.lock().unwrap().remove(&hash);
                Err(e.into())
            }
        }
    }

    /// Claims a held HTLC (the funds become ours and the payer learns the preimage) and
    /// records the delivery of its chunk, if any, which the caller sends right after, in the
    /// same commit. LDK first, then the commit: if we crash in between, LDK's PaymentReceived
    /// (persisted, replayed) records the claim.
    pub fn claim(
        &self,
        hash: &[u8; 32],
        delivery: Option<&crate::store::ChunkDelivery>,
    ) -> Result<Invoice, LightningError> {
        let inv = self
            .store
            .invoice(hash)?
            .ok_or_else(|| StoreError::NotFound {
                what: "invoice",
                id: hex::encode(hash),
            })?;
        match inv.state {
            InvoiceState::Held => {}
            InvoiceState::Claimed => {
                if let Some(d) = delivery {
                    self.store.deliver_chunk(d)?;
                }
                return Ok(inv);
            }
            s => return Err(LightningError::NotHeld(hex::encode(hash), s)),
        }
        self.node.bolt11_payment().claim_for_hash(
            PaymentHash(*hash),
            inv.received_msat.unwrap_or(inv.amount_msat),
            PaymentPreimage(inv.preimage),
        )?;
        let t = self.store.claim_and_deliver(hash, delivery)?;
        Ok(t.invoice().clone())
    }

    /// Fails a held HTLC back to the payer (commit first: the payer's money was never ours,
    /// and a replayed PaymentClaimable for a failed invoice is failed again).
    pub fn fail(&self, hash: &[u8; 32], reason: &str) -> Result<(), LightningError> {
        self.holds.lock().unwrap().remove(hash);
        self.store
            .transition_invoice(hash, InvoiceState::Failed, None, reason)?;
        self.fail_in_node(hash);
        Ok(())
    }

    /// Withdraws an unpaid invoice (its session ended). A later payment for it is failed.
    pub fn cancel(&self, hash: &[u8; 32], reason: &str) -> Result<(), LightningError> {
        self.holds.lock().unwrap().remove(hash);
        let inv = self.store.invoice(hash)?;
        match inv.map(|i| i.state) {
            Some(InvoiceState::Open) => {
                self.store
                    .transition_invoice(hash, InvoiceState::Canceled, None, reason)?;
            }
            Some(InvoiceState::Held) => return self.fail(hash, reason),
            _ => {}
        }
        Ok(())
    }

    fn fail_in_node(&self, hash: &[u8; 32]) {
        if let Err(e) = self.node.bolt11_payment().fail_for_hash(PaymentHash(*hash)) {
            // Unknown to the node, or already resolved: nothing is held.
            tracing::debug!(payment_hash = %hex::encode(hash), error = %e, "fail_for_hash");
        }
    }

    /// After a restart no session survives: anything open is cancelled, anything held is
    /// failed back (or recorded as claimed, if LDK finished a claim we had not committed).
    fn settle_leftovers(&self) -> Result<(), LightningError> {
        for inv in self.store.unresolved_invoices()? {
            let hash = inv.payment_hash;
            let ldk = self
                .node
                .payment(&ldk_node::lightning::ln::channelmanager::PaymentId(hash));
            let succeeded =
                ldk.is_some_and(|p| p.status == ldk_node::payment::PaymentStatus::Succeeded);
            match inv.state {
                InvoiceState::Held if succeeded => {
                    self.store.transition_invoice(
                        &hash,
                        InvoiceState::Claimed,
                        None,
                        "claim completed before restart",
                    )?;
                }
                InvoiceState::Held => self.fail(&hash, "server restarted")?,
                _ => {
                    self.store.transition_invoice(
                        &hash,
                        InvoiceState::Canceled,
                        None,
                        "server restarted",
                    )?;
                    self.fail_in_node(&hash);
                }
            }
        }
        self.store.halt_open_sessions("server_restart")?;
        Ok(())
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

    /// Routes committed keysend credits for `session_id` to `tx` until unregistered.
    pub fn register_keysend_session(&self, session_id: [u8; 16], tx: mpsc::UnboundedSender<u64>) {
        self.credits.lock().unwrap().insert(session_id, tx);
    }

    pub fn unregister_keysend_session(&self, session_id: &[u8; 16]) {
        self.credits.lock().unwrap().remove(session_id);
    }

    fn notify_credit(&self, session_id: &[u8; 16], amount_msat: u64) {
        if let Some(tx) = self.credits.lock().unwrap().get(session_id) {
            let _ = tx.send(amount_msat);
        }
    }

    /// Takes the listener of a payment hash, if any (each HTLC is announced once).
    fn take_listener(&self, hash: &[u8; 32]) -> Option<mpsc::UnboundedSender<HeldHtlc>> {
        self.holds.lock().unwrap().remove(hash)
    }

    pub fn stop(&self) {
        if let Err(e) = self.node.stop() {
            tracing::warn!(error = %e, "stopping the Lightning node");
        }
    }
}
