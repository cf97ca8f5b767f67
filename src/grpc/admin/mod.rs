//! The Admin service: one file per RPC. Every call passed the bearer-token interceptor
//! ([`crate::grpc::auth`]) before it gets here.

mod close_channel;
mod connect_peer;
mod get_balances;
mod get_info;
mod get_session;
mod list_accounts;
mod list_channels;
mod list_invoices;
mod list_losses;
mod list_parked_events;
mod list_payments;
mod list_sessions;
mod new_address;
mod open_channel;
mod pay_invoice;

use std::sync::Arc;
use tonic::{Request, Response, Status};

use crate::app::App;
use crate::grpc::proto::{self, admin_server::Admin};

pub struct AdminService {
    app: Arc<App>,
}

impl AdminService {
    pub fn new(app: Arc<App>) -> Self {
        AdminService { app }
    }
}

/// Runs a handler that may block (ldk-node calls block in place) without stalling the
/// runtime's other tasks.
async fn blocking<T, F>(app: &Arc<App>, f: F) -> Result<Response<T>, Status>
where
    T: Send + 'static,
    F: FnOnce(&App) -> Result<T, Status> + Send + 'static,
{
    let app = app.clone();
    tokio::task::spawn_blocking(move || f(&app))
        .await
        .map_err(|e| Status::internal(format!("handler panicked: {e}")))?
        .map(Response::new)
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn get_info(
        &self,
        r: Request<proto::GetInfoRequest>,
    ) -> Result<Response<proto::GetInfoResponse>, Status> {
        let req = r.into_inner();
        blocking(&self.app, move |a| get_info::handle(a, req)).await
    }

    async fn get_balances(
        &self,
        r: Request<proto::GetBalancesRequest>,
    ) -> Result<Response<proto::GetBalancesResponse>, Status> {
        let req = r.into_inner();
        blocking(&self.app, move |a| get_balances::handle(a, req)).await
    }

    async fn new_address(
        &self,
        r: Request<proto::NewAddressRequest>,
    ) -> Result<Response<proto::NewAddressResponse>, Status> {
        let req = r.into_inner();
        blocking(&self.app, move |a| new_address::handle(a, req)).await
    }

    async fn connect_peer(
        &self,
        r: Request<proto::ConnectPeerRequest>,
    ) -> Result<Response<proto::ConnectPeerResponse>, Status> {
        let req = r.into_inner();
        blocking(&self.app, move |a| connect_peer::handle(a, req)).await
    }

    async fn open_channel(
        &self,
        r: Request<proto::OpenChannelRequest>,
    ) -> Result<Response<proto::OpenChannelResponse>, Status> {
        let req = r.into_inner();
        blocking(&self.app, move |a| open_channel::handle(a, req)).await
    }

    async fn close_channel(
        &self,
        r: Request<proto::CloseChannelRequest>,
    ) -> Result<Response<proto::CloseChannelResponse>, Status> {
        let req = r.into_inner();
        blocking(&self.app, move |a| close_channel::handle(a, req)).await
    }

    async fn list_channels(
        &self,
        r: Request<proto::ListChannelsRequest>,
    ) -> Result<Response<proto::ListChannelsResponse>, Status> {
        let req = r.into_inner();
        blocking(&self.app, move |a| list_channels::handle(a, req)).await
    }

    async fn list_sessions(
        &self,
        r: Request<proto::ListSessionsRequest>,
    ) -> Result<Response<proto::ListSessionsResponse>, Status> {
        let req = r.into_inner();
        blocking(&self.app, move |a| list_sessions::handle(a, req)).await
    }

    async fn get_session(
        &self,
        r: Request<proto::GetSessionRequest>,
    ) -> Result<Response<proto::SessionDetail>, Status> {
        let req = r.into_inner();
        blocking(&self.app, move |a| get_session::handle(a, req)).await
    }

    async fn list_invoices(
        &self,
        r: Request<proto::ListInvoicesRequest>,
    ) -> Result<Response<proto::ListInvoicesResponse>, Status> {
        let req = r.into_inner();
        blocking(&self.app, move |a| list_invoices::handle(a, req)).await
    }

    async fn pay_invoice(
        &self,
        r: Request<proto::PayInvoiceRequest>,
    ) -> Result<Response<proto::PayInvoiceResponse>, Status> {
        let req = r.into_inner();
        blocking(&self.app, move |a| pay_invoice::handle(a, req)).await
    }

    async fn list_accounts(
        &self,
        r: Request<proto::ListAccountsRequest>,
    ) -> Result<Response<proto::ListAccountsResponse>, Status> {
        let req = r.into_inner();
        blocking(&self.app, move |a| list_accounts::handle(a, req)).await
    }

    async fn list_parked_events(
        &self,
        r: Request<proto::ListParkedEventsRequest>,
    ) -> Result<Response<proto::ListParkedEventsResponse>, Status> {
        let req = r.into_inner();
        blocking(&self.app, move |a| list_parked_events::handle(a, req)).await
    }

    async fn list_losses(
        &self,
        r: Request<proto::ListLossesRequest>,
    ) -> Result<Response<proto::ListLossesResponse>, Status> {
        let req = r.into_inner();
        blocking(&self.app, move |a| list_losses::handle(a, req)).await
    }

    async fn list_payments(
        &self,
        r: Request<proto::ListPaymentsRequest>,
    ) -> Result<Response<proto::ListPaymentsResponse>, Status> {
        let req = r.into_inner();
        blocking(&self.app, move |a| list_payments::handle(a, req)).await
    }
}

/// Store rows → wire messages, shared by the session and invoice RPCs.
pub(crate) fn session_summary(s: &crate::store::Session) -> proto::SessionSummary {
    proto::SessionSummary {
        session_id: hex::encode(s.id),
        model: s.model.clone(),
        mode: s.mode.clone(),
        state: s.state.as_str().to_string(),
        prompt_tokens: s.prompt_tokens,
        completion_tokens: s.completion_tokens,
        chunks_delivered: s.chunks_delivered,
        paid_msat: s.paid_msat,
        refundable_msat: s.refundable_msat(),
        created_at_unix: s.created_at_unix,
        ended_at_unix: s.ended_at_unix.unwrap_or(0),
        end_reason: s.end_reason.clone().unwrap_or_default(),
    }
}

pub(crate) fn invoice_info(i: &crate::store::Invoice) -> proto::InvoiceInfo {
    proto::InvoiceInfo {
        payment_hash: hex::encode(i.payment_hash),
        session_id: i.session_id.map(hex::encode).unwrap_or_default(),
        chunk_index: i.chunk_index,
        amount_msat: i.amount_msat,
        state: i.state.as_str().to_string(),
        received_msat: i.received_msat.unwrap_or(0),
        bolt11: i.bolt11.clone(),
        created_at_unix: i.created_at_unix,
        expires_at_unix: i.expires_at_unix,
        paid_at_unix: i.paid_at_unix.unwrap_or(0),
        purpose: i.purpose.as_str().to_string(),
    }
}
