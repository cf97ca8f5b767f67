use tonic::Status;

use crate::app::App;
use crate::grpc::proto::{QuoteRequest, QuoteResponse};
use crate::pricing::Price;

pub(super) async fn handle(app: &App, req: QuoteRequest) -> Result<QuoteResponse, Status> {
    let model = super::model_config(app, &req.model)?;
    let prompt = super::prompt_of(&req.messages, &req.prompt)?;
    if req.max_tokens == 0 {
        return Err(Status::invalid_argument("max_tokens: must be at least 1"));
    }
    let price = Price::from_model(model);
    let prompt_tokens = app.engine.count_prompt_tokens(&model.id, &prompt).await?;
    Ok(QuoteResponse {
        prompt_tokens,
        prompt_price_msat: price.prompt(prompt_tokens),
        chunk_tokens: price.chunk_tokens,
        chunk_price_msat: price.full_chunk(),
        max_cost_msat: price.max_cost(prompt_tokens, req.max_tokens),
        node_id: app.lightning.node_id(),
        node_address: app.lightning.public_address().to_string(),
        inbound_liquidity_msat: app.lightning.inbound_liquidity_msat(),
        keysend_tlv_type: app.lightning.keysend_tlv_type(),
    })
}
