//! Unpaid TopUp invoices per client: an anonymous TopUp costs its caller nothing and the
//! server an account, an invoice and a Lightning payment record, so each client (its key, see
//! [`crate::net::ClientKeys`]) may hold at most `limits.max_open_topups_per_client` open at
//! once. One is open until it is paid or expires (the sweeper then fails it in the node);
//! a restart cancels every open invoice, so this record can live in memory.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use crate::store::{now_unix, InvoiceState, Store, StoreError};

type ByClient = Arc<Mutex<HashMap<IpAddr, Vec<Entry>>>>;

#[derive(Default)]
pub struct OpenTopUps {
    by_client: ByClient,
}

#[derive(Clone, Copy)]
struct Entry {
    /// None while its invoice is being created.
    hash: Option<[u8; 32]>,
    expires_at: u64,
}

/// A place taken for one TopUp invoice being created: [`Slot::issued`] records its invoice;
/// dropped without that, the place is freed.
pub struct Slot {
    owner: ByClient,
    client: IpAddr,
    issued: bool,
}

/// Longest an invoice can take to create: a place reserved for it expires after this.
const CREATING_SECS: u64 = 60;

impl OpenTopUps {
    /// Takes a place for `client` if it holds fewer than `max` open TopUps; Err(max) if not.
    /// Entries whose invoice the store no longer has open (paid, swept) are dropped first.
    pub fn reserve(&self, store: &Store, client: IpAddr, max: u32) -> Result<Slot, u32> {
        let now = now_unix();
        let mut to_check = Vec::new();
        {
            let mut m = self.lock();
            if m.len() > 4096 {
                // Clients that went away: drop what can no longer count.
                m.retain(|_, v| v.iter().any(|e| e.expires_at > now));
            }
            let v = m.entry(client).or_default();
            v.retain(|e| e.expires_at > now);
            if v.len() < max as usize {
                v.push(Entry {
                    hash: None,
                    expires_at: now + CREATING_SECS,
                });
                return Ok(Slot {
                    owner: self.by_client.clone(),
                    client,
                    issued: false,
                });
            }
            to_check.extend(v.iter().filter_map(|e| e.hash));
        }
        // At the cap: some may have been paid since. Ask the store (outside the lock).
        let closed: Vec<[u8; 32]> = to_check
            .into_iter()
            .filter(|h| !matches!(open(store, h), Ok(true)))
            .collect();
        let mut m = self.lock();
        let v = m.entry(client).or_default();
        v.retain(|e| e.expires_at > now && !e.hash.is_some_and(|h| closed.contains(&h)));
        if v.len() >= max as usize {
            return Err(max);
        }
        v.push(Entry {
            hash: None,
            expires_at: now + CREATING_SECS,
        });
        Ok(Slot {
            owner: self.by_client.clone(),
            client,
            issued: false,
        })
    }

    /// Open TopUps `client` holds (tests, metrics).
    pub fn open_of(&self, client: IpAddr) -> usize {
        let now = now_unix();
        self.lock()
            .get(&client)
            .map_or(0, |v| v.iter().filter(|e| e.expires_at > now).count())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Vec<Entry>>> {
        lock(&self.by_client)
    }
}

fn lock(m: &ByClient) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Vec<Entry>>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Frees one place being created (the invoice failed to be made).
fn release_creating(owner: &ByClient, client: IpAddr) {
    {
        let mut m = lock(owner);
        if let Some(v) = m.get_mut(&client) {
            if let Some(i) = v.iter().position(|e| e.hash.is_none()) {
                v.swap_remove(i);
            }
            if v.is_empty() {
                m.remove(&client);
            }
        }
    }
}

fn open(store: &Store, hash: &[u8; 32]) -> Result<bool, StoreError> {
    Ok(store
        .invoice(hash)?
        .is_some_and(|i| i.state == InvoiceState::Open))
}

impl Slot {
    /// The invoice was issued: it holds the place until paid or expired.
    pub fn issued(mut self, hash: [u8; 32], expires_at: u64) {
        let mut m = lock(&self.owner);
        if let Some(e) = m
            .get_mut(&self.client)
            .and_then(|v| v.iter_mut().find(|e| e.hash.is_none()))
        {
            *e = Entry {
                hash: Some(hash),
                expires_at,
            };
        }
        self.issued = true;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if !self.issued {
            release_creating(&self.owner, self.client);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_holds_at_most_max_open_topups_and_a_paid_one_frees_its_place() {
        let (store, _d) = crate::store::test_store();
        let t = OpenTopUps::default();
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let far = now_unix() + 600;
        // Hashes the store does not know count as closed once checked: use a real open one.
        let open_hash = [7u8; 32];
        store
            .insert_invoice(&crate::store::NewInvoice {
                payment_hash: open_hash,
                preimage: [8u8; 32],
                bolt11: "lnbcrt1".into(),
                amount_msat: 1000,
                session_id: None,
                account_id: None,
                chunk_index: None,
                purpose: crate::store::InvoicePurpose::TopUp,
                expires_at_unix: far,
            })
            .unwrap();
        t.reserve(&store, a, 2).unwrap().issued(open_hash, far);
        let s = t.reserve(&store, a, 2).unwrap();
        // Two places taken (one issued, one being created): a third is refused...
        assert_eq!(t.reserve(&store, a, 2).err(), Some(2));
        // ...but another client is not affected.
        drop(t.reserve(&store, b, 2).unwrap());
        // A creation that fails frees its place.
        drop(s);
        assert_eq!(t.open_of(a), 1);
        // An issued invoice the store no longer has open (here: unknown) frees its place.
        t.reserve(&store, a, 2).unwrap().issued([9u8; 32], far);
        assert_eq!(t.open_of(a), 2);
        let again = t.reserve(&store, a, 2);
        assert!(again.is_ok(), "the unknown invoice's place was freed");
        assert_eq!(t.open_of(a), 2);
    }
}
