//! Errors in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`) with the HTTP
//! status a client library maps to the right exception. The gRPC handlers' statuses are
//! translated here, so both front doors refuse the same things with the same words.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// The request field at fault, when one is.
    pub param: Option<String>,
    /// An L402 challenge (402 only): `WWW-Authenticate`, and its parts in the body.
    pub challenge: Option<Box<Challenge>>,
}

#[derive(Debug, Clone)]
pub struct Challenge {
    pub macaroon: String,
    pub invoice: String,
    pub payment_hash: String,
    pub amount_msat: u64,
    pub expires_at_unix: u64,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            param: None,
            challenge: None,
        }
    }

    pub fn bad(param: &str, message: impl std::fmt::Display) -> ApiError {
        ApiError {
            param: Some(param.to_string()),
            ..ApiError::new(StatusCode::BAD_REQUEST, format!("{param}: {message}"))
        }
    }

    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, message)
    }

    /// OpenAI's `type` for this status.
    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE | StatusCode::NOT_FOUND => {
                "invalid_request_error"
            }
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => "authentication_error",
            StatusCode::PAYMENT_REQUIRED => "payment_required",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            StatusCode::CONFLICT => "conflict_error",
            _ => "server_error",
        }
    }

    fn code(&self) -> &'static str {
        match self.status {
            StatusCode::BAD_REQUEST => "invalid_request",
            StatusCode::UNAUTHORIZED => "invalid_api_key",
            StatusCode::FORBIDDEN => "forbidden",
            StatusCode::PAYMENT_REQUIRED => "payment_required",
            StatusCode::NOT_FOUND => "not_found",
            StatusCode::PAYLOAD_TOO_LARGE => "request_too_large",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_exceeded",
            StatusCode::CONFLICT => "conflict",
            StatusCode::SERVICE_UNAVAILABLE => "unavailable",
            _ => "internal_error",
        }
    }

    pub fn body(&self) -> serde_json::Value {
        let mut b = json!({
            "error": {
                "message": self.message,
                "type": self.kind(),
                "param": self.param,
                "code": self.code(),
            }
        });
        if let Some(c) = &self.challenge {
            b["l402"] = json!({
                "macaroon": c.macaroon,
                "invoice": c.invoice,
                "payment_hash": c.payment_hash,
                "amount_msat": c.amount_msat,
                "expires_at_unix": c.expires_at_unix,
            });
        }
        b
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(c) = &self.challenge {
            if let Ok(v) = HeaderValue::from_str(&super::l402::challenge(&c.macaroon, &c.invoice)) {
                r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
            }
        }
        r
    }
}

/// A gRPC handler's refusal, as HTTP. The message is the handler's own (it names the field).
impl From<tonic::Status> for ApiError {
    fn from(s: tonic::Status) -> ApiError {
        use tonic::Code::*;
        let status = match s.code() {
            InvalidArgument | OutOfRange => StatusCode::BAD_REQUEST,
            Unauthenticated => StatusCode::UNAUTHORIZED,
            PermissionDenied => StatusCode::FORBIDDEN,
            NotFound => StatusCode::NOT_FOUND,
            AlreadyExists | Aborted => StatusCode::CONFLICT,
            ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            FailedPrecondition => StatusCode::BAD_REQUEST,
            Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        // "field: message" names its parameter.
        let param = s
            .message()
            .split_once(':')
            .map(|(p, _)| p)
            .filter(|p| {
                !p.is_empty()
                    && p.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "_.[]".contains(c))
            })
            .map(str::to_string);
        ApiError {
            status,
            message: s.message().to_string(),
            param,
            challenge: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_openai_errors() {
        let e = ApiError::from(tonic::Status::invalid_argument(
            "max_tokens: must be at least 1",
        ));
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        let b = e.body();
        assert_eq!(b["error"]["param"], "max_tokens");
        assert_eq!(b["error"]["type"], "invalid_request_error");
        assert_eq!(b["error"]["message"], "max_tokens: must be at least 1");
        let e = ApiError::from(tonic::Status::not_found("model \"x\" is not on sale here"));
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        assert_eq!(e.body()["error"]["param"], serde_json::Value::Null);
        assert_eq!(
            ApiError::from(tonic::Status::resource_exhausted("full")).status,
            StatusCode::TOO_MANY_REQUESTS
        );
    }
}
