//! Prepaid accounts (mode PREPAID): credited by paid TopUp invoices, drawn down per delivered
//! chunk, paid back by refunds. The owner proves itself with a bearer token; only its SHA-256
//! is stored.

use rusqlite::{params, OptionalExtension, Row};

use super::{decode_page_token, ledger, now_unix, page, Page, Store, StoreError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub id: [u8; 16],
    pub token_hash: [u8; 32],
    /// Paid top-ups (what their HTLCs carried).
    pub credited_msat: u64,
    /// Drawn by sessions (prompts and chunks).
    pub spent_msat: u64,
    pub refunded_msat: u64,
    /// Refunds in flight.
    pub reserved_msat: u64,
    pub created_at_unix: u64,
}

impl Account {
    /// What the owner can spend or have refunded now.
    pub fn available_msat(&self) -> u64 {
        self.credited_msat
            .saturating_sub(self.spent_msat)
            .saturating_sub(self.refunded_msat)
            .saturating_sub(self.reserved_msat)
    }
}

/// Sums over every account (Admin, metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AccountTotals {
    pub accounts: u64,
    pub credited_msat: u64,
    pub spent_msat: u64,
    pub refunded_msat: u64,
    pub available_msat: u64,
}

const COLUMNS: &str =
    "id, token_hash, credited_msat, spent_msat, refunded_msat, reserved_msat, created_at";

fn from_row(r: &Row<'_>) -> rusqlite::Result<Account> {
    let bad = |what: &str| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Blob,
            format!("bad {what}").into(),
        )
    };
    Ok(Account {
        id: r.get::<_, Vec<u8>>(0)?.try_into().map_err(|_| bad("id"))?,
        token_hash: r
            .get::<_, Vec<u8>>(1)?
            .try_into()
            .map_err(|_| bad("token_hash"))?,
        credited_msat: r.get::<_, i64>(2)? as u64,
        spent_msat: r.get::<_, i64>(3)? as u64,
        refunded_msat: r.get::<_, i64>(4)? as u64,
        reserved_msat: r.get::<_, i64>(5)? as u64,
        created_at_unix: r.get::<_, i64>(6)? as u64,
    })
}

pub(super) fn account_in(c: &rusqlite::Connection, id: &[u8; 16]) -> Result<Account, StoreError> {
    c.query_row(
        &format!("SELECT {COLUMNS} FROM accounts WHERE id = ?1"),
        [id.as_slice()],
        from_row,
    )
    .optional()?
    .ok_or_else(|| StoreError::NotFound {
        what: "account",
        id: hex::encode(id),
    })
}

impl Store {
    /// Opens an empty account owned by whoever holds the token whose SHA-256 is `token_hash`.
    pub fn create_account(
        &self,
        id: [u8; 16],
        token_hash: [u8; 32],
    ) -> Result<Account, StoreError> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO accounts(id, token_hash, created_at) VALUES (?1, ?2, ?3)",
                params![id.as_slice(), token_hash.as_slice(), now_unix() as i64],
            )?;
            ledger::append_account(tx, "account_opened", &id, None, 0, "")?;
            account_in(tx, &id)
        })
    }

    pub fn account(&self, id: &[u8; 16]) -> Result<Option<Account>, StoreError> {
        match account_in(&self.lock(), id) {
            Ok(a) => Ok(Some(a)),
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The account whose token hashes to `token_hash`.
    pub fn account_by_token(&self, token_hash: &[u8; 32]) -> Result<Option<Account>, StoreError> {
        Ok(self
            .lock()
            .query_row(
                &format!("SELECT {COLUMNS} FROM accounts WHERE token_hash = ?1"),
                [token_hash.as_slice()],
                from_row,
            )
            .optional()?)
    }

    /// Accounts, newest first.
    pub fn list_accounts(
        &self,
        page_size: u32,
        page_token: &str,
    ) -> Result<Page<Account>, StoreError> {
        let offset = decode_page_token(page_token)?;
        let c = self.read();
        let mut st = c.prepare(&format!(
            "SELECT {COLUMNS} FROM accounts ORDER BY created_at DESC, rowid DESC LIMIT ?1 OFFSET ?2"
        ))?;
        let rows = st
            .query_map(params![page_size as i64 + 1, offset as i64], from_row)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(page(rows, offset, page_size))
    }

    pub fn account_totals(&self) -> Result<AccountTotals, StoreError> {
        Ok(self.read().query_row(
            "SELECT COUNT(*), COALESCE(SUM(credited_msat), 0), COALESCE(SUM(spent_msat), 0),
                    COALESCE(SUM(refunded_msat), 0),
                    COALESCE(SUM(MAX(credited_msat - spent_msat - refunded_msat - reserved_msat, 0)), 0)
             FROM accounts",
            [],
            |r| {
                Ok(AccountTotals {
                    accounts: r.get::<_, i64>(0)? as u64,
                    credited_msat: r.get::<_, i64>(1)? as u64,
                    spent_msat: r.get::<_, i64>(2)? as u64,
                    refunded_msat: r.get::<_, i64>(3)? as u64,
                    available_msat: r.get::<_, i64>(4)? as u64,
                })
            },
        )?)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::store::{test_store, ChunkDelivery, InvoicePurpose, InvoiceState, NewInvoice};

    /// An account [a; 16] credited with `msat` through a paid TopUp invoice.
    pub(crate) fn funded_account(s: &Store, a: u8, msat: u64) -> Account {
        s.create_account([a; 16], [a; 32]).unwrap();
        let hash = [a.wrapping_add(50); 32];
        s.insert_invoice(&NewInvoice {
            payment_hash: hash,
            preimage: [1; 32],
            bolt11: "lnbcrt".into(),
            amount_msat: msat,
            session_id: None,
            account_id: Some([a; 16]),
            chunk_index: None,
            purpose: InvoicePurpose::TopUp,
            expires_at_unix: now_unix() + 60,
        })
        .unwrap();
        s.transition_invoice(&hash, InvoiceState::Held, Some(msat), "")
            .unwrap();
        s.begin_claim(&[hash], None).unwrap();
        s.record_settlement(&hash, msat).unwrap();
        s.account(&[a; 16]).unwrap().unwrap()
    }

    #[test]
    fn topup_credits_and_chunks_draw_exactly_or_not_at_all() {
        let (s, _d) = test_store();
        assert_eq!(funded_account(&s, 3, 40_000).available_msat(), 40_000);
        let mut sess = crate::store::sessions::tests::new_session(1);
        sess.mode = "PREPAID";
        sess.account_id = Some([3; 16]);
        s.insert_session(&sess).unwrap();
        s.charge_prompt(&[1; 16], 3_000).unwrap();
        let chunk = |k: u32, price: u64| ChunkDelivery {
            session_id: [1; 16],
            chunk_index: k,
            first_token: k * 16,
            tokens: 16,
            price_msat: price,
            payment_hash: None,
            prompt_msat: 0,
            account_id: Some([3; 16]),
            text: String::new(),
        };
        s.deliver_chunk(&chunk(0, 16_000)).unwrap();
        s.deliver_chunk(&chunk(1, 16_000)).unwrap();
        // 5 000 left: a 16 000 chunk is refused and nothing moves.
        match s.deliver_chunk(&chunk(2, 16_000)) {
            Err(StoreError::InsufficientBalance {
                available_msat: 5_000,
                needed_msat: 16_000,
                ..
            }) => {}
            other => panic!("expected InsufficientBalance, got {other:?}"),
        }
        let a = s.account(&[3; 16]).unwrap().unwrap();
        assert_eq!((a.spent_msat, a.available_msat()), (35_000, 5_000));
        let audit = s.audit_session(&[1; 16]).unwrap();
        assert_eq!(audit.debited_msat, 35_000);
        assert_eq!(audit.delivered_msat + audit.prompt_msat, 35_000);
        assert_eq!(audit.balance_msat(), 0);
        // A prompt the balance cannot cover is refused too.
        assert!(matches!(
            s.charge_prompt(&[1; 16], 6_000),
            Err(StoreError::InsufficientBalance { .. })
        ));
        assert_eq!(s.account_by_token(&[3; 32]).unwrap().unwrap().id, [3; 16]);
        let totals = s.account_totals().unwrap();
        assert_eq!((totals.accounts, totals.available_msat), (1, 5_000));
    }
}
