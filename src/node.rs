//! Building an ldk-node from configuration, shared by the server's node ([`crate::lightning`])
//! and the client's wallet ([`crate::client::Wallet`]), and parsing node ids and addresses.

use ldk_node::bitcoin::secp256k1::PublicKey;
use ldk_node::lightning::ln::msgs::SocketAddress;
use ldk_node::{Builder, Node};
use std::str::FromStr;

use crate::config::{ChainSource, Network};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot build the Lightning node: {0}")]
    Build(String),
    #[error("invalid {what}: {reason}")]
    Invalid { what: &'static str, reason: String },
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
) -> Result<Node, NodeError> {
    let addr = SocketAddress::from_str(listen).map_err(|_| NodeError::Invalid {
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
            .map_err(|e| NodeError::Build(format!("alias: {e}")))?;
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
    std::fs::create_dir_all(storage_dir)
        .map_err(|e| NodeError::Build(format!("cannot create {}: {e}", storage_dir.display())))?;
    set_store_journal(storage_dir, store_wal)?;
    b.build().map_err(|e| NodeError::Build(e.to_string()))
}

/// ldk-node opens its SQLite store with SQLite's defaults: a rollback journal, so every
/// write (each channel-monitor update, each stale-update removal) costs several fsyncs. The
/// journal mode is a property of the database file, so setting WAL here, before ldk-node
/// opens it, makes each write one fsync (synchronous stays FULL: still durable). This is
/// what shortens the claim on the payment path and LDK's periodic monitor rewrites.
fn set_store_journal(storage_dir: &std::path::Path, wal: bool) -> Result<(), NodeError> {
    let path = storage_dir.join(ldk_node::io::sqlite_store::SQLITE_DB_FILE_NAME);
    let mode = if wal { "WAL" } else { "DELETE" };
    let err = |e: rusqlite::Error| {
        NodeError::Build(format!("{}: journal_mode={mode}: {e}", path.display()))
    };
    let conn = rusqlite::Connection::open(&path).map_err(err)?;
    let now: String = conn
        .query_row(&format!("PRAGMA journal_mode={mode}"), [], |r| r.get(0))
        .map_err(err)?;
    if !now.eq_ignore_ascii_case(mode) {
        return Err(NodeError::Build(format!(
            "{}: journal_mode is {now}, not {mode}",
            path.display()
        )));
    }
    Ok(())
}

pub fn parse_node_id(s: &str) -> Result<PublicKey, NodeError> {
    PublicKey::from_str(s).map_err(|_| NodeError::Invalid {
        what: "node id",
        reason: format!("{s:?} is not a 33-byte hex public key"),
    })
}

pub fn parse_address(s: &str) -> Result<SocketAddress, NodeError> {
    SocketAddress::from_str(s).map_err(|_| NodeError::Invalid {
        what: "address",
        reason: format!("{s:?} is not host:port"),
    })
}
