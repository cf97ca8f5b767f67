//! What every request handler shares: configuration, store, Lightning node.

use std::sync::Arc;

use crate::config::Config;
use crate::lightning::Lightning;
use crate::store::Store;

pub struct App {
    pub config: Config,
    pub store: Store,
    pub lightning: Arc<Lightning>,
}
