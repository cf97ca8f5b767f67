//! L402 (bLIP-26): a `402 Payment Required` whose `WWW-Authenticate: L402 macaroon="…",
//! invoice="…"` names a top-up invoice, and the credential `Authorization: L402
//! <macaroon>:<preimage>` that paying it earns.
//!
//! The macaroon's identifier is Aperture's layout: version (u16 BE, 0), the invoice's payment
//! hash (32 bytes), a random token id (32 bytes). It carries two first-party caveats,
//! `services=satstream:0` and `satstream_valid_until=<unix>`, and is signed with a root key
//! kept in the data dir (0600). The credential proves two things: we minted the macaroon (its
//! signature), and its holder paid the invoice (SHA-256 of the preimage is the hash inside).
//! The invoice is a TopUp of an account: that account is whom the credential speaks for, on
//! every later request too, until the expiry caveat.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use libmacaroon::{Macaroon, MacaroonKey, Verifier};
use sha2::{Digest, Sha256};

/// The service name in caveats (Aperture's `services=<name>:<tier>`).
pub const SERVICE: &str = "satstream";
/// The identifier's version (Aperture: 0).
const VERSION: u16 = 0;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum L402Error {
    #[error("the macaroon is not valid base64 of a macaroon")]
    Malformed,
    #[error("the macaroon was not issued by this server, or was altered")]
    BadSignature,
    #[error("the macaroon expired; make a request without credentials for a new one")]
    Expired,
    #[error("the preimage is not 64 hex digits")]
    BadPreimage,
    #[error("the preimage does not match the macaroon's invoice")]
    WrongPreimage,
}

/// The root key that signs this server's macaroons.
pub struct L402 {
    root: MacaroonKey,
}

impl L402 {
    /// The key at `<data_dir>/l402.key`, created (0600) on first start.
    pub fn load_or_create(data_dir: &Path) -> std::io::Result<L402> {
        let path = key_path(data_dir);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut k = [0u8; 32];
                rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut k);
                crate::files::write_private(&path, &k)?;
                k.to_vec()
            }
            Err(e) => return Err(e),
        };
        let key: [u8; 32] = bytes.try_into().map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: not a 32-byte key", path.display()),
            )
        })?;
        Ok(L402::from_key(key))
    }

    pub fn from_key(key: [u8; 32]) -> L402 {
        L402 {
            root: MacaroonKey::from(key),
        }
    }

    /// A macaroon for the invoice `payment_hash`, valid until `valid_until` (unix seconds),
    /// serialized as Aperture does (V2 binary, standard base64).
    pub fn mint(&self, payment_hash: &[u8; 32], valid_until: u64) -> String {
        let mut id = Vec::with_capacity(66);
        id.extend_from_slice(&VERSION.to_be_bytes());
        id.extend_from_slice(payment_hash);
        let mut token_id = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut token_id);
        id.extend_from_slice(&token_id);
        let mut m = Macaroon::create(Some(SERVICE), &self.root, id).expect("66-byte identifier");
        m.add_first_party_caveat(format!("services={SERVICE}:0"))
            .expect("short caveat");
        m.add_first_party_caveat(format!("{SERVICE}_valid_until={valid_until}"))
            .expect("short caveat");
        let url_safe = m
            .serialize(libmacaroon::Format::V2)
            .expect("a valid macaroon serializes");
        let raw = base64::engine::general_purpose::URL_SAFE
            .decode(url_safe.trim_end_matches('='))
            .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(&url_safe))
            .expect("the crate's own base64");
        base64::engine::general_purpose::STANDARD.encode(raw)
    }

    /// Checks a presented credential at `now`; the payment hash it proves paid.
    pub fn verify(&self, macaroon: &str, preimage: &str, now: u64) -> Result<[u8; 32], L402Error> {
        let m = Macaroon::deserialize(macaroon.trim()).map_err(|_| L402Error::Malformed)?;
        let id = m.identifier();
        if id.len() != 66 || id[..2] != VERSION.to_be_bytes() {
            return Err(L402Error::Malformed);
        }
        let hash: [u8; 32] = id[2..34].try_into().expect("32 bytes");
        // Signature and caveats. An expired one is told apart from a forged one below.
        let mut v = Verifier::default();
        v.satisfy_exact(format!("services={SERVICE}:0"));
        let prefix = format!("{SERVICE}_valid_until=");
        v.satisfy_general(move |c: &[u8]| {
            std::str::from_utf8(c)
                .ok()
                .and_then(|c| c.strip_prefix(prefix.as_str()))
                .is_some_and(|t| t.parse::<u64>().is_ok())
        });
        v.verify(&m, &self.root, &[])
            .map_err(|_| L402Error::BadSignature)?;
        let valid_until = m
            .first_party_caveats()
            .iter()
            .filter_map(|c| c.as_first_party())
            .filter_map(|c| std::str::from_utf8(c.predicate()).ok())
            .filter_map(|c| c.strip_prefix(&format!("{SERVICE}_valid_until=")))
            .filter_map(|t| t.parse::<u64>().ok())
            .min()
            .ok_or(L402Error::BadSignature)?;
        if now >= valid_until {
            return Err(L402Error::Expired);
        }
        let pre = hex::decode(preimage.trim())
            .ok()
            .and_then(|v| <[u8; 32]>::try_from(v).ok())
            .ok_or(L402Error::BadPreimage)?;
        let got: [u8; 32] = Sha256::digest(pre).into();
        if !crate::session::secret::same(&got, &hash) {
            return Err(L402Error::WrongPreimage);
        }
        Ok(hash)
    }
}

/// Where the root key lives.
pub fn key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("l402.key")
}

/// The challenge header's value (bLIP-26).
pub fn challenge(macaroon: &str, bolt11: &str) -> String {
    format!("L402 macaroon=\"{macaroon}\", invoice=\"{bolt11}\"")
}

/// What an `Authorization` header presents.
#[derive(Debug, PartialEq, Eq)]
pub enum Credential {
    None,
    /// `Bearer <account token>`.
    Bearer(String),
    /// `L402 <macaroon>:<preimage>` (also the older `LSAT`).
    L402 {
        macaroon: String,
        preimage: String,
    },
    /// Some other scheme, or an L402 without its preimage.
    Malformed(&'static str),
}

pub fn credential(header: Option<&str>) -> Credential {
    let Some(h) = header.map(str::trim).filter(|h| !h.is_empty()) else {
        return Credential::None;
    };
    let (scheme, rest) = h.split_once(' ').unwrap_or((h, ""));
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return Credential::Bearer(rest.to_string());
    }
    if scheme.eq_ignore_ascii_case("l402") || scheme.eq_ignore_ascii_case("lsat") {
        return match rest.rsplit_once(':') {
            Some((m, p)) if !m.is_empty() && !p.is_empty() => Credential::L402 {
                macaroon: m.to_string(),
                preimage: p.to_string(),
            },
            _ => Credential::Malformed("an L402 credential is `L402 <macaroon>:<preimage>`"),
        };
    }
    Credential::Malformed(
        "use `Authorization: Bearer <account token>` or `L402 <macaroon>:<preimage>`",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paid() -> ([u8; 32], String) {
        let pre = [7u8; 32];
        (Sha256::digest(pre).into(), hex::encode(pre))
    }

    #[test]
    fn a_paid_macaroon_verifies_and_proves_its_invoice() {
        let k = L402::from_key([1; 32]);
        let (hash, pre) = paid();
        let m = k.mint(&hash, 2_000);
        // Standard base64 of a V2 binary macaroon, as Aperture writes it.
        let raw = base64::engine::general_purpose::STANDARD
            .decode(&m)
            .unwrap();
        assert_eq!(raw[0], 2);
        assert_eq!(k.verify(&m, &pre, 1_000), Ok(hash));
        // Two mints for one invoice differ (their token ids), and both verify.
        assert_ne!(k.mint(&hash, 2_000), m);
    }

    #[test]
    fn forged_altered_expired_and_unpaid_credentials_are_refused() {
        let k = L402::from_key([1; 32]);
        let (hash, pre) = paid();
        let m = k.mint(&hash, 2_000);
        assert_eq!(k.verify(&m, &pre, 2_000), Err(L402Error::Expired));
        // Another server's key.
        assert_eq!(
            L402::from_key([2; 32]).verify(&m, &pre, 1_000),
            Err(L402Error::BadSignature)
        );
        // One byte of the identifier changed (another invoice's hash).
        let mut raw = base64::engine::general_purpose::STANDARD
            .decode(&m)
            .unwrap();
        let at = raw.windows(32).position(|w| w == hash).unwrap();
        raw[at] ^= 1;
        let altered = base64::engine::general_purpose::STANDARD.encode(&raw);
        assert_eq!(
            k.verify(&altered, &pre, 1_000),
            Err(L402Error::BadSignature)
        );
        // A caveat added by the holder that we do not know (or a later expiry) fails.
        let mut mac = Macaroon::deserialize(&m).unwrap();
        mac.add_first_party_caveat("satstream_valid_until=9999999999")
            .unwrap();
        let extended = mac.serialize(libmacaroon::Format::V2).unwrap();
        assert_eq!(k.verify(&extended, &pre, 5_000), Err(L402Error::Expired));
        // Another invoice's preimage.
        assert_eq!(
            k.verify(&m, &hex::encode([8u8; 32]), 1_000),
            Err(L402Error::WrongPreimage)
        );
        assert_eq!(k.verify(&m, "zz", 1_000), Err(L402Error::BadPreimage));
        assert_eq!(
            k.verify("not base64!", &pre, 1_000),
            Err(L402Error::Malformed)
        );
    }

    #[test]
    fn authorization_headers_parse() {
        assert_eq!(credential(None), Credential::None);
        assert_eq!(credential(Some("  ")), Credential::None);
        assert_eq!(
            credential(Some("Bearer abc")),
            Credential::Bearer("abc".into())
        );
        assert_eq!(
            credential(Some("L402 mac=:ff")),
            Credential::L402 {
                macaroon: "mac=".into(),
                preimage: "ff".into()
            }
        );
        assert!(matches!(
            credential(Some("LSAT mac")),
            Credential::Malformed(_)
        ));
        assert!(matches!(
            credential(Some("Basic dXNlcg==")),
            Credential::Malformed(_)
        ));
        assert_eq!(
            challenge("m", "lnbcrt1"),
            "L402 macaroon=\"m\", invoice=\"lnbcrt1\""
        );
    }
}
