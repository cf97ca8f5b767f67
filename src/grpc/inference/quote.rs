use std::sync::Arc;
use tonic::Status;

use crate::app::App;
use crate::grpc::proto::{QuoteRequest, QuoteResponse};

pub(super) async fn handle(app: &Arc<App>, req: QuoteRequest) -> Result<QuoteResponse, Status> {
    let c = super::request::check(
        app,
        &req.model,
        &req.messages,
        &req.prompt,
        req.max_tokens,
        req.mode,
    )
    .await?;
    let n = c.prompt_tokens();
    Ok(QuoteResponse {
        prompt_tokens: n,
        prompt_price_msat: c.price.prompt(n),
        chunk_tokens: c.price.chunk_tokens,
        chunk_price_msat: c.price.full_chunk(),
        max_cost_msat: c.price.max_cost(n, req.max_tokens),
        node_id: app.lightning.node_id(),
        node_address: app.lightning.public_address().to_string(),
        inbound_liquidity_msat: app.lightning.inbound_liquidity().await,
        keysend_tlv_type: app.lightning.keysend_tlv_type(),
    })
}
