//! The Inference service: one file per RPC.

mod generate;
mod list_models;
mod quote;

use std::pin::Pin;
use std::sync::Arc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::app::App;
use crate::engine::{ChatMessage, Prompt};
use crate::grpc::proto::{self, inference_server::Inference};

pub struct InferenceService {
    app: Arc<App>,
}

impl InferenceService {
    pub fn new(app: Arc<App>) -> Self {
        InferenceService { app }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<proto::GenerateEvent, Status>> + Send>>;

fn not_yet(rpc: &str) -> Status {
    Status::unimplemented(format!(
        "{rpc} is not available in this version of satstream"
    ))
}

/// The model a request names, or NotFound listing the ids on sale.
fn model_config<'a>(app: &'a App, id: &str) -> Result<&'a crate::config::ModelConfig, Status> {
    if id.is_empty() {
        return Err(Status::invalid_argument(
            "model: required; ListModels shows the ids",
        ));
    }
    app.config
        .models
        .iter()
        .find(|m| m.id == id)
        .ok_or_else(|| {
            let ids: Vec<_> = app.config.models.iter().map(|m| m.id.as_str()).collect();
            Status::not_found(format!(
                "model {id:?} is not on sale here; available: {ids:?}"
            ))
        })
}

/// Exactly one of `messages` (chat) or `prompt` (raw text).
fn prompt_of(messages: &[proto::ChatMessage], prompt: &str) -> Result<Prompt, Status> {
    match (messages.is_empty(), prompt.is_empty()) {
        (false, true) => {
            for (i, m) in messages.iter().enumerate() {
                if !matches!(m.role.as_str(), "system" | "user" | "assistant") {
                    return Err(Status::invalid_argument(format!(
                        "messages[{i}].role: {:?} is not one of \"system\", \"user\", \"assistant\"",
                        m.role
                    )));
                }
            }
            if messages.iter().all(|m| m.content.trim().is_empty()) {
                return Err(Status::invalid_argument("messages: every message is empty"));
            }
            Ok(Prompt::Chat(
                messages
                    .iter()
                    .map(|m| ChatMessage {
                        role: m.role.clone(),
                        content: m.content.clone(),
                    })
                    .collect(),
            ))
        }
        (true, false) => Ok(Prompt::Text(prompt.to_string())),
        (true, true) => Err(Status::invalid_argument(
            "prompt: empty; give `messages` (chat) or `prompt` (raw text)",
        )),
        (false, false) => Err(Status::invalid_argument(
            "give either `messages` or `prompt`, not both",
        )),
    }
}

#[tonic::async_trait]
impl Inference for InferenceService {
    async fn list_models(
        &self,
        _r: Request<proto::ListModelsRequest>,
    ) -> Result<Response<proto::ListModelsResponse>, Status> {
        Ok(Response::new(list_models::handle(&self.app)))
    }

    async fn quote(
        &self,
        r: Request<proto::QuoteRequest>,
    ) -> Result<Response<proto::QuoteResponse>, Status> {
        quote::handle(&self.app, r.into_inner())
            .await
            .map(Response::new)
    }

    type GenerateStream = EventStream;

    async fn generate(
        &self,
        r: Request<proto::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        generate::handle(self.app.clone(), r.into_inner())
            .await
            .map(Response::new)
    }

    async fn get_receipt(
        &self,
        _r: Request<proto::GetReceiptRequest>,
    ) -> Result<Response<proto::Receipt>, Status> {
        Err(not_yet("GetReceipt"))
    }

    async fn top_up(
        &self,
        _r: Request<proto::TopUpRequest>,
    ) -> Result<Response<proto::TopUpResponse>, Status> {
        Err(not_yet("TopUp"))
    }

    async fn refund(
        &self,
        _r: Request<proto::RefundRequest>,
    ) -> Result<Response<proto::RefundResponse>, Status> {
        Err(not_yet("Refund"))
    }
}
