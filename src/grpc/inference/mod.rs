//! The Inference service: one file per RPC.

mod end_session;
mod generate;
mod get_account;
pub(crate) mod get_receipt;
pub(crate) mod list_models;
pub(crate) mod owner;
mod quote;
pub(crate) mod refund;
pub(crate) mod request;
mod resume;
pub(crate) mod top_up;

use std::pin::Pin;
use std::sync::Arc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::app::App;
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
        let client = self.app.client_key(&r);
        generate::handle(self.app.clone(), r.into_inner(), client)
            .await
            .map(Response::new)
    }

    type ResumeStream = EventStream;

    async fn resume(
        &self,
        r: Request<proto::ResumeRequest>,
    ) -> Result<Response<Self::ResumeStream>, Status> {
        resume::handle(&self.app, r.into_inner())
            .await
            .map(Response::new)
    }

    async fn end_session(
        &self,
        r: Request<proto::EndSessionRequest>,
    ) -> Result<Response<proto::EndSessionResponse>, Status> {
        end_session::handle(&self.app, r.into_inner())
            .await
            .map(Response::new)
    }

    async fn get_receipt(
        &self,
        r: Request<proto::GetReceiptRequest>,
    ) -> Result<Response<proto::Receipt>, Status> {
        get_receipt::handle(&self.app, r.into_inner())
            .await
            .map(Response::new)
    }

    async fn top_up(
        &self,
        r: Request<proto::TopUpRequest>,
    ) -> Result<Response<proto::TopUpResponse>, Status> {
        let client = self.app.client_key(&r);
        top_up::handle(&self.app, r.into_inner(), client)
            .await
            .map(Response::new)
    }

    async fn refund(
        &self,
        r: Request<proto::RefundRequest>,
    ) -> Result<Response<proto::RefundResponse>, Status> {
        refund::handle(&self.app, r.into_inner())
            .await
            .map(Response::new)
    }

    async fn get_account(
        &self,
        r: Request<proto::GetAccountRequest>,
    ) -> Result<Response<proto::Account>, Status> {
        get_account::handle(&self.app, r.into_inner())
            .await
            .map(Response::new)
    }
}
