//! The integration tests' kit, shared by every module: a world on the real regtest harness
//! (Bitcoin Core, the server's ldk-node, a payer node, a channel) serving the tiny
//! deterministic model (a chat prompt yields "abcdefghij…", one letter per token), requests,
//! the pay-until-done loop, and the books checked against the server node's own payment
//! records.

use std::path::PathBuf;
use std::sync::Once;
use std::time::Duration;
use tonic::Streaming;

use satstream::config::{BackendKind, ModelConfig};
use satstream::engine::tiny_model::write_tiny_model;
use satstream::harness::upstream::Upstream;
use satstream::harness::{wait_until, Harness, HarnessOptions};
use satstream::store::SessionState;
use satstream::wire::proto::{
    generate_event::Event as Ev, inference_client::InferenceClient, ChatMessage, GenerateEvent,
    GenerateRequest, PaymentMode, SamplingParams,
};

/// Logs to the test output when RUST_LOG is set (e.g. RUST_LOG=satstream=debug).
pub fn init_tracing() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("RUST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_test_writer()
                .try_init();
        }
    });
}

/// The grpcurl binary scripts/setup-grpcurl.sh installed (or $GRPCURL).
pub fn grpcurl() -> PathBuf {
    let p = std::env::var_os("GRPCURL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/satstream/grpcurl/grpcurl")
        });
    assert!(
        p.is_file(),
        "grpcurl not found at {}: run scripts/setup-grpcurl.sh",
        p.display()
    );
    p
}

pub const T: Duration = Duration::from_secs(60);
pub const MSAT_PER_TOKEN: u64 = 1_000;
pub const CHUNK: u32 = 4;

/// Where a test's tiny model runs: in process, or behind the gateway on real upstreams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Mistralrs,
    Llamacpp,
    /// llama-cpp-python's server, spoken to over OpenAI's API.
    Openai,
    /// llama.cpp's `llama-server`, spoken to over its native API (token ids).
    LlamaServer,
}

impl Backend {
    pub fn kind(self) -> BackendKind {
        match self {
            Backend::Mistralrs => BackendKind::Mistralrs,
            Backend::Llamacpp => BackendKind::Llamacpp,
            Backend::Openai | Backend::LlamaServer => BackendKind::Openai,
        }
    }
}

pub struct World {
    pub h: Harness,
    /// The `openai` backend's replicas (none for the in-process backends).
    pub upstreams: Vec<Upstream>,
    _model_dir: tempfile::TempDir,
}

pub async fn world(sets: &[&str]) -> World {
    world_with(sets, 0, 0, CHUNK).await
}

/// A world whose tiny model runs on `backend`.
pub async fn world_on(backend: Backend, sets: &[&str]) -> World {
    world_full(sets, 0, 0, CHUNK, backend, 2).await
}

/// A world whose tiny model is served by `replicas` llama-cpp-python servers (`openai`).
pub async fn world_remote(replicas: usize, sets: &[&str]) -> World {
    world_full(sets, 0, 0, CHUNK, Backend::Openai, replicas).await
}

/// A world on the tiny model priced `msat_per_prompt_token` per prompt token, with a
/// `server_channel_sat` channel server → payer (the server's outbound liquidity, for refunds).
pub async fn world_with(
    sets: &[&str],
    msat_per_prompt_token: u64,
    server_channel_sat: u64,
    chunk_tokens: u32,
) -> World {
    world_full(
        sets,
        msat_per_prompt_token,
        server_channel_sat,
        chunk_tokens,
        Backend::Mistralrs,
        0,
    )
    .await
}

async fn world_full(
    sets: &[&str],
    msat_per_prompt_token: u64,
    server_channel_sat: u64,
    chunk_tokens: u32,
    backend: Backend,
    replicas: usize,
) -> World {
    super::support::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let path = write_tiny_model(dir.path()).unwrap();
    let upstreams = super::engine::tiny_upstreams_of(backend, &path, replicas).await;
    let upstream = (!upstreams.is_empty()).then(|| super::engine::upstream_config(&upstreams));
    let h = Harness::start(HarnessOptions {
        models: vec![ModelConfig {
            id: "tiny".into(),
            path,
            context_length: 0,
            msat_per_token: MSAT_PER_TOKEN,
            msat_per_prompt_token,
            chunk_tokens,
            max_concurrent: 8,
            max_queue: 16,
            backend: backend.kind(),
            upstream,
        }],
        sets: kit_sets(sets),
        server_channel_sat,
        ..HarnessOptions::default()
    })
    .await
    .unwrap();
    World {
        h,
        upstreams,
        _model_dir: dir,
    }
}

/// The kit's worlds cut every chunk at `chunk_tokens`, the first too (the product's default
/// first chunk is one token; a test of it asks for it).
fn kit_sets(sets: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    if !v
        .iter()
        .any(|s| s.starts_with("payments.first_chunk_tokens="))
    {
        v.push("payments.first_chunk_tokens=0".into());
    }
    v
}

pub fn request(max_tokens: u32, mode: PaymentMode) -> GenerateRequest {
    GenerateRequest {
        model: "tiny".into(),
        messages: vec![ChatMessage {
            role: "user".into(),
            content: "hi".into(),
        }],
        max_tokens,
        mode: mode as i32,
        sampling: Some(SamplingParams {
            temperature: Some(0.0),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn letters(n: usize) -> String {
    (0..n).map(|i| (b'a' + (i % 26) as u8) as char).collect()
}

/// A client of the world's server.
pub async fn client(w: &World) -> InferenceClient<tonic::transport::Channel> {
    InferenceClient::connect(format!("http://{}", w.h.server().grpc_addr))
        .await
        .unwrap()
}

/// A client whose connection comes from `ip` (a loopback address, 127.0.0.x): another client
/// on this machine, as the server tells clients apart.
pub async fn client_from(w: &World, ip: &str) -> InferenceClient<tonic::transport::Channel> {
    satstream::harness::client_from(w.h.server().grpc_addr, ip.parse().unwrap())
        .await
        .unwrap()
}

pub async fn open(w: &World, req: GenerateRequest) -> Streaming<GenerateEvent> {
    client(w).await.generate(req).await.unwrap().into_inner()
}

pub fn sid(hex_id: &str) -> [u8; 16] {
    hex::decode(hex_id).unwrap().try_into().unwrap()
}

/// Waits (up to `timeout`) for the session to end; returns it as stored.
pub async fn session_ended_within(
    w: &World,
    id: [u8; 16],
    timeout: Duration,
) -> satstream::store::Session {
    let store = w.h.server().app.store.clone();
    wait_until("the session to end", timeout, || {
        let store = store.clone();
        async move { store.session(&id).unwrap().unwrap().state != SessionState::Open }
    })
    .await
    .unwrap();
    store.session(&id).unwrap().unwrap()
}

pub async fn next(s: &mut Streaming<GenerateEvent>) -> Ev {
    tokio::time::timeout(T, s.message())
        .await
        .expect("event in time")
        .expect("stream ok")
        .expect("stream not ended")
        .event
        .expect("event set")
}

/// SPEC invariants for one session, with the money checked against the server node's own
/// payment records (LDK's payment store), not the store against itself.
pub fn assert_invariants(w: &World, session_hex: &str) -> satstream::store::Session {
    assert_books(&w.h, session_hex, MSAT_PER_TOKEN)
}

pub fn assert_books(
    h: &Harness,
    session_hex: &str,
    msat_per_token: u64,
) -> satstream::store::Session {
    let store = &h.server().app.store;
    let sid: [u8; 16] = hex::decode(session_hex).unwrap().try_into().unwrap();
    let s = store.session(&sid).unwrap().unwrap();
    let a = store.audit_session(&sid).unwrap();
    assert_eq!(
        a.balance_msat(),
        s.refundable_msat() as i128,
        "claimed + credited + debited = prompt + delivered + refundable ({a:?}, {s:?})"
    );
    assert_eq!(a.delivered_tokens, s.completion_tokens);
    assert_eq!(
        a.delivered_msat,
        a.delivered_tokens as u64 * msat_per_token,
        "exact prices"
    );
    assert_eq!(
        a.unresolved_invoices, 0,
        "nothing open, held or claiming is left"
    );
    assert_ne!(s.state, SessionState::Open);
    // Every msat the ledger books for this session, the node received, and vice versa.
    let node = h.server().app.lightning.node();
    // A record LDK no longer has (lightning::pruning) was checked against the ledger before
    // it was removed: the ledger's figure stands for it.
    let pruned = |hash: &[u8; 32]| store.ldk_pruned(hash).unwrap();
    let received = |hash: &[u8; 32]| {
        node.payment(&ldk_node::lightning::ln::channelmanager::PaymentId(*hash))
            .filter(|p| p.status == ldk_node::payment::PaymentStatus::Succeeded)
            .and_then(|p| p.amount_msat)
    };
    let mut booked = 0;
    for inv in store
        .list_invoices(500, "", None, Some(&sid))
        .unwrap()
        .items
    {
        let got = if pruned(&inv.payment_hash) {
            inv.received_msat
                .filter(|_| inv.state == satstream::store::InvoiceState::Claimed)
        } else {
            received(&inv.payment_hash)
        };
        if inv.state == satstream::store::InvoiceState::Claimed {
            assert_eq!(
                got, inv.received_msat,
                "claimed per the ledger, per LDK: {inv:?}"
            );
            booked += got.unwrap();
        } else {
            assert_eq!(
                got, None,
                "LDK received a payment the ledger did not book: {inv:?}"
            );
        }
    }
    for e in store.ledger_for_session(&sid).unwrap() {
        if e.kind == "keysend_credited" {
            let hash = e.payment_hash.unwrap();
            let got = if pruned(&hash) {
                Some(e.amount_msat as u64)
            } else {
                received(&hash)
            };
            assert_eq!(
                got,
                Some(e.amount_msat as u64),
                "keysend credit per LDK: {e:?}"
            );
            booked += got.unwrap();
        }
    }
    assert_eq!(
        booked,
        a.claimed_msat + a.credited_msat,
        "every booked msat is LDK's"
    );
    s
}

/// How a paid stream ended: the text it delivered and its last event (Done or Halted).
pub struct Paid {
    pub text: String,
    /// The payment hashes of the invoices paid, in order.
    pub invoices: Vec<String>,
    pub end: Ev,
}

/// Reads a stream to its end, paying every invoice it asks for from the payer node (without
/// waiting for each payment) and collecting the text of its Tokens.
pub async fn pay_until_done(w: &World, s: &mut Streaming<GenerateEvent>) -> Paid {
    let (mut text, mut invoices) = (String::new(), Vec::new());
    loop {
        match next(s).await {
            Ev::Invoice(inv) => {
                w.h.payer.send(&inv.bolt11).unwrap();
                invoices.push(inv.payment_hash);
            }
            Ev::Tokens(t) => text.push_str(&t.text),
            end @ (Ev::Done(_) | Ev::Halted(_)) => {
                return Paid {
                    text,
                    invoices,
                    end,
                }
            }
            Ev::Accepted(_) | Ev::Balance(_) | Ev::SessionOpened(_) => {}
            // ATOMIC: paid as they come (our client would wait for the ciphertext); the text
            // is not decrypted here.
            Ev::EncryptedChunk(_) | Ev::ChunkKey(_) => {}
        }
    }
}

/// The server node's own record of the payment `hash` (it must have one).
pub fn server_payment(w: &World, hash: [u8; 32]) -> ldk_node::payment::PaymentDetails {
    w.h.server()
        .app
        .lightning
        .node()
        .payment(&ldk_node::lightning::ln::channelmanager::PaymentId(hash))
        .expect("the server node has a record of the payment")
}

/// An invoice of the payer's wallet (None: amountless).
pub fn payer_invoice(w: &World, amount_msat: Option<u64>) -> String {
    use ldk_node::lightning_invoice::{Bolt11InvoiceDescription, Description};
    let d = Bolt11InvoiceDescription::Direct(Description::new("refund".into()).unwrap());
    let pay = w.h.payer.node.bolt11_payment();
    match amount_msat {
        Some(a) => pay.receive(a, &d, 600),
        None => pay.receive_variable_amount(&d, 600),
    }
    .unwrap()
    .to_string()
}

/// Runs each named test body (`async fn name(backend: Backend)`) on every backend, as one test
/// per backend: the two in process, and the gateway on two real upstreams, llama-cpp-python
/// over OpenAI's API and llama.cpp's `llama-server` over its native one.
macro_rules! on_every_backend {
    (workers = $w:literal; $($name:ident),* $(,)?) => {
        $(
            mod $name {
                use super::*;

                #[tokio::test(flavor = "multi_thread", worker_threads = $w)]
                async fn mistralrs() {
                    super::$name(Backend::Mistralrs).await
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = $w)]
                async fn llamacpp() {
                    super::$name(Backend::Llamacpp).await
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = $w)]
                async fn openai() {
                    super::$name(Backend::Openai).await
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = $w)]
                async fn llama_server() {
                    super::$name(Backend::LlamaServer).await
                }
            }
        )*
    };
}
pub(crate) use on_every_backend;
