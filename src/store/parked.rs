//! LDK events whose handler kept failing. The event loop acknowledges such an event so that one
//! bad event cannot hold up every later payment, and keeps it here for the operator.

use rusqlite::{params, Row};

use super::{decode_page_token, ledger, now_unix, page, Page, Store, StoreError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParkedEvent {
    pub id: u64,
    pub at_unix: u64,
    pub kind: String,
    pub payment_hash: Option<[u8; 32]>,
    pub attempts: u32,
    pub error: String,
    /// A description of the event without secrets (no preimages).
    pub event: String,
}

fn from_row(r: &Row<'_>) -> rusqlite::Result<ParkedEvent> {
    let hash: Option<Vec<u8>> = r.get(3)?;
    Ok(ParkedEvent {
        id: r.get::<_, i64>(0)? as u64,
        at_unix: r.get::<_, i64>(1)? as u64,
        kind: r.get(2)?,
        payment_hash: hash.and_then(|h| h.try_into().ok()),
        attempts: r.get(4)?,
        error: r.get(5)?,
        event: r.get(6)?,
    })
}

/// A parked keysend's payment hash and the session its TLV named.
pub type ParkedKeysend = ([u8; 32], Option<[u8; 16]>);

impl Store {
    /// Parks an event; `session_id`: the session a keysend's TLV named (to book it later).
    pub fn park_event(
        &self,
        kind: &str,
        payment_hash: Option<&[u8; 32]>,
        session_id: Option<&[u8; 16]>,
        attempts: u32,
        error: &str,
        event: &str,
    ) -> Result<u64, StoreError> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO parked_events(at, kind, payment_hash, attempts, error, event,
                     session_id)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    now_unix() as i64,
                    kind,
                    payment_hash.map(|h| h.as_slice()),
                    attempts,
                    error,
                    event,
                    session_id.map(|s| s.as_slice())
                ],
            )?;
            let id = tx.last_insert_rowid() as u64;
            ledger::append(
                tx,
                "event_parked",
                None,
                payment_hash,
                0,
                &format!("{kind}: {error}"),
            )?;
            Ok(id)
        })
    }

    /// Parked `PaymentReceived` events of payments that are neither an invoice of ours nor a
    /// booked keysend credit (keysends whose credit was never committed), with the session
    /// their TLV named.
    pub fn unbooked_parked_keysends(&self) -> Result<Vec<ParkedKeysend>, StoreError> {
        let c = self.lock();
        let mut st = c.prepare(
            "SELECT DISTINCT p.payment_hash, p.session_id FROM parked_events p
             WHERE p.kind = 'payment_received' AND p.payment_hash IS NOT NULL
               AND NOT EXISTS (SELECT 1 FROM keysend_credits k WHERE k.payment_hash = p.payment_hash)
               AND NOT EXISTS (SELECT 1 FROM invoices i WHERE i.payment_hash = p.payment_hash)",
        )?;
        let rows = st
            .query_map([], |r| {
                Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, Option<Vec<u8>>>(1)?))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows
            .into_iter()
            .filter_map(|(h, s)| Some((h.try_into().ok()?, s.and_then(|s| s.try_into().ok()))))
            .collect())
    }

    /// Parked events, newest first.
    pub fn parked_events(
        &self,
        page_size: u32,
        page_token: &str,
    ) -> Result<Page<ParkedEvent>, StoreError> {
        let offset = decode_page_token(page_token)?;
        let c = self.lock();
        let mut st = c.prepare(
            "SELECT id, at, kind, payment_hash, attempts, error, event FROM parked_events
             ORDER BY id DESC LIMIT ?1 OFFSET ?2",
        )?;
        let rows = st
            .query_map(params![page_size as i64 + 1, offset as i64], from_row)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(page(rows, offset, page_size))
    }
}
