//! `GET /v1/models`: OpenAI's list, each model with our prices in an extension field.

use axum::Json;
use serde_json::{json, Value};

pub async fn list(axum::extract::State(h): super::State) -> Json<Value> {
    let models = crate::grpc::inference::list_models::handle(&h.app);
    Json(json!({
        "object": "list",
        "data": models.models.iter().map(|m| json!({
            "id": m.id,
            "object": "model",
            "created": 0,
            "owned_by": "satstream",
            "context_length": m.context_length,
            // What a completion costs here: tokens × msat, drawn from the account per chunk.
            "satstream": {
                "msat_per_token": m.msat_per_token,
                "msat_per_prompt_token": m.msat_per_prompt_token,
                "chunk_tokens": m.chunk_tokens,
            },
        })).collect::<Vec<_>>(),
    }))
}
