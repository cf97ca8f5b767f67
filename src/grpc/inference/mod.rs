//! The Inference service: one file per RPC.

use std::pin::Pin;
use std::sync::Arc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::app::App;
use crate::grpc::proto::{self, inference_server::Inference};

pub struct InferenceService {
    #[allow(dead_code)]
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

#[tonic::async_trait]
impl Inference for InferenceService {
    async fn list_models(
        &self,
        _r: Request<proto::ListModelsRequest>,
    ) -> Result<Response<proto::ListModelsResponse>, Status> {
        Err(not_yet("ListModels"))
    }

    async fn quote(
        &self,
        _r: Request<proto::QuoteRequest>,
    ) -> Result<Response<proto::QuoteResponse>, Status> {
        Err(not_yet("Quote"))
    }

    type GenerateStream = EventStream;

    async fn generate(
        &self,
        _r: Request<proto::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        Err(not_yet("Generate"))
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
