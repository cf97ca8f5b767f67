//! The gRPC edge: generated types, one module per service (one file per RPC), and the mapping
//! of library errors to `tonic::Status` with messages that say what to fix.

pub mod admin;
pub mod auth;
pub mod inference;

pub use crate::wire::proto;

use tonic::Status;

use crate::lightning::LightningError;
use crate::store::StoreError;

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Status {
        match e {
            StoreError::NotFound { .. } => Status::not_found(e.to_string()),
            StoreError::BadPageToken => Status::invalid_argument(
                "page_token: not a token from a previous response; leave it empty for the first page",
            ),
            StoreError::IllegalTransition { .. } | StoreError::InsufficientBalance { .. } => {
                Status::failed_precondition(e.to_string())
            }
            StoreError::DuplicateRefund { .. } => Status::already_exists(e.to_string()),
            other => {
                tracing::error!(error = %other, "store failure");
                Status::internal("storage failure; see the server log")
            }
        }
    }
}

impl From<crate::node::NodeError> for Status {
    fn from(e: crate::node::NodeError) -> Status {
        match e {
            crate::node::NodeError::Invalid { .. } => Status::invalid_argument(e.to_string()),
            crate::node::NodeError::Build(_) => Status::unavailable(e.to_string()),
        }
    }
}

impl From<LightningError> for Status {
    fn from(e: LightningError) -> Status {
        match e {
            LightningError::Invalid { .. } => Status::invalid_argument(e.to_string()),
            LightningError::Store(s) => s.into(),
            LightningError::NotHeld(..) | LightningError::ClaimRefused { .. } => {
                Status::failed_precondition(e.to_string())
            }
            LightningError::Node(n) => node_status(n),
            LightningError::Setup(crate::node::NodeError::Invalid { .. }) => {
                Status::invalid_argument(e.to_string())
            }
            LightningError::Setup(_) | LightningError::Injected(_) => {
                Status::unavailable(e.to_string())
            }
        }
    }
}

impl From<crate::engine::EngineError> for Status {
    fn from(e: crate::engine::EngineError) -> Status {
        use crate::engine::EngineError as E;
        match e {
            E::UnknownModel(_) => Status::not_found(format!("{e}; ListModels shows the ids")),
            E::InvalidArgument(_) | E::PromptTooLong { .. } => {
                Status::invalid_argument(e.to_string())
            }
            E::Busy { .. } => Status::resource_exhausted(e.to_string()),
            E::Load { .. } | E::Config(_) | E::Backend { .. } => Status::unavailable(e.to_string()),
        }
    }
}

fn node_status(e: ldk_node::NodeError) -> Status {
    use ldk_node::NodeError as E;
    let msg = format!("Lightning node: {e}");
    match e {
        E::NotRunning => Status::unavailable(msg),
        E::InsufficientFunds => Status::failed_precondition(msg),
        E::ConnectionFailed | E::ChannelCreationFailed | E::ChannelClosingFailed => {
            Status::unavailable(msg)
        }
        E::InvalidAddress
        | E::InvalidSocketAddress
        | E::InvalidPublicKey
        | E::InvalidInvoice
        | E::InvalidAmount
        | E::InvalidChannelId
        | E::InvalidNodeId => Status::invalid_argument(msg),
        E::DuplicatePayment => Status::already_exists(msg),
        _ => Status::internal(msg),
    }
}

/// Page size with the default and upper bound every List RPC uses.
pub(crate) fn page_size(requested: u32) -> u32 {
    match requested {
        0 => 50,
        n => n.min(500),
    }
}

pub(crate) fn parse_hex<const N: usize>(field: &str, s: &str) -> Result<[u8; N], Status> {
    let v = hex::decode(s)
        .map_err(|_| Status::invalid_argument(format!("{field}: {s:?} is not hex")))?;
    v.try_into().map_err(|_| {
        Status::invalid_argument(format!("{field}: must be {N} bytes ({} hex digits)", N * 2))
    })
}
