use crate::app::App;
use crate::grpc::proto::{ListModelsResponse, ModelInfo, PaymentMode};

pub(crate) fn handle(app: &App) -> ListModelsResponse {
    let modes = vec![
        PaymentMode::Bolt11 as i32,
        PaymentMode::Atomic as i32,
        PaymentMode::Keysend as i32,
        PaymentMode::Prepaid as i32,
    ];
    ListModelsResponse {
        models: app
            .engine
            .models()
            .into_iter()
            .map(|m| ModelInfo {
                id: m.id,
                context_length: m.context_length,
                msat_per_token: m.msat_per_token,
                msat_per_prompt_token: m.msat_per_prompt_token,
                chunk_tokens: m.chunk_tokens,
                modes: modes.clone(),
            })
            .collect(),
    }
}
