//! The chat page at `/`: a person with a Lightning wallet tops up (QR code or WebLN), chats,
//! and watches each chunk's price leave the balance. It is a client of the HTTP face's own
//! endpoints (the account and chat completions), never a second way to pay.
//!
//! The assets are compiled into the binary (nothing is fetched at run time, no CDN) and are
//! served with a strict Content-Security-Policy: only this origin's script, style, images and
//! fetches; no inline script, no framing. The page inserts user and model text as text.
//! Invoices' QR codes are drawn here as SVG (`/qr.svg`), so the page needs no QR library.

use axum::extract::Query;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::ApiError;

const INDEX: &str = include_str!("page/index.html");
const APP_JS: &str = include_str!("page/app.js");
const APP_CSS: &str = include_str!("page/app.css");
const ICON: &str = include_str!("page/icon.svg");

/// Only this origin's assets; nothing inline; no plugins, frames, forms or base changes.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    img-src 'self'; connect-src 'self'; manifest-src 'self'; base-uri 'none'; \
    form-action 'none'; frame-ancestors 'none'";

/// Longest text `/qr.svg` encodes: a BOLT11 invoice with a long description stays well under.
const QR_MAX: usize = 2_000;

fn asset(content_type: &'static str, body: impl Into<axum::body::Body>) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CSP),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            ),
            // A new binary may bring a new page: revalidate rather than run a stale script.
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body.into(),
    )
        .into_response()
}

pub async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX)
}

pub async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

pub async fn app_css() -> Response {
    asset("text/css; charset=utf-8", APP_CSS)
}

pub async fn icon() -> Response {
    asset("image/svg+xml", ICON)
}

#[derive(Deserialize)]
pub struct Qr {
    data: String,
}

/// `GET /qr.svg?data=…`: the text as a QR code (SVG). The page shows a top-up invoice with it.
pub async fn qr(Query(q): Query<Qr>) -> Result<Response, ApiError> {
    Ok(asset("image/svg+xml", qr_svg(&q.data)?))
}

/// The SVG of `data`'s QR code, black on white with its quiet zone.
pub fn qr_svg(data: &str) -> Result<String, ApiError> {
    if data.is_empty() || data.len() > QR_MAX {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("`data` must be 1 to {QR_MAX} bytes (it was {})", data.len()),
        ));
    }
    let code = qrcode::QrCode::with_error_correction_level(data.as_bytes(), qrcode::EcLevel::M)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("`data`: {e}")))?;
    Ok(code
        .render::<qrcode::render::svg::Color>()
        .min_dimensions(240, 240)
        .quiet_zone(true)
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_invoice_becomes_an_svg_qr_code_and_bad_data_is_refused() {
        let inv =
            "LIGHTNING:LNBCRT10U1P5XYZPP5QQQSYQCYQ5RQWZQFQQQSYQCYQ5RQWZQFQQQSYQCYQ5RQWZQFQYPQ";
        let svg = qr_svg(inv).unwrap();
        assert!(svg.starts_with("<?xml"), "{}", &svg[..40]);
        assert!(svg.contains("<svg") && svg.contains("<path"), "{svg}");
        // Uppercase invoices use the QR alphanumeric mode: a smaller code than bytes would.
        let lower = qr_svg(&inv.to_lowercase()).unwrap();
        assert!(svg.len() < lower.len(), "{} vs {}", svg.len(), lower.len());
        assert!(qr_svg("").is_err());
        assert!(qr_svg(&"A".repeat(QR_MAX + 1)).is_err());
    }

    #[test]
    fn the_page_runs_no_inline_script_and_uses_only_its_own_assets() {
        // The CSP forbids inline script: the page must not need any.
        assert!(!INDEX.contains("<script>"), "inline script in index.html");
        let handler = INDEX.split(" on").skip(1).find(|rest| {
            let name: String = rest.chars().take_while(char::is_ascii_lowercase).collect();
            !name.is_empty() && rest[name.len()..].starts_with('=')
        });
        assert_eq!(handler, None, "an inline event handler in index.html");
        for external in ["http://", "https://", "//cdn"] {
            for (name, text) in [
                ("index.html", INDEX),
                ("app.js", APP_JS),
                ("app.css", APP_CSS),
            ] {
                let hits: Vec<_> = text
                    .lines()
                    .filter(|l| l.contains(external) && !l.contains("www.w3.org"))
                    .collect();
                assert!(hits.is_empty(), "{name} loads from elsewhere: {hits:?}");
            }
        }
        // Text goes into the page as text.
        assert!(!APP_JS.contains("innerHTML"), "app.js writes HTML");
        assert!(!APP_JS.contains("insertAdjacentHTML"), "app.js writes HTML");
    }
}
