//! Who may do what (API.md §5): bearer tokens, stored only as SHA-256 hashes.
//!
//! Three kinds: a *device* token may post readings of its one device, a *gateway* token
//! readings of any device, a *read* token may use the query API. Tokens are 32 random
//! bytes from the operating system's CSPRNG, written `tp_<64 hex digits>` and shown once
//! when issued; the database keeps their hash. Verified tokens (and unknown ones) are
//! remembered for `auth.cache_ttl_secs`, so revoking a token takes effect within that
//! time and a request costs no database round trip in the common case.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::http::{header, HeaderMap};
use deadpool_postgres::Pool;
use rand::RngCore;
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// What a token allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// Post readings of this one device.
    Device(String),
    /// Post readings of any device.
    Gateway,
    /// Use the query API.
    Read,
}

impl Grant {
    /// Whether the grant allows posting a reading of `device_id`.
    pub fn may_ingest(&self, device_id: &str) -> bool {
        match self {
            Self::Device(own) => own == device_id,
            Self::Gateway => true,
            Self::Read => false,
        }
    }
}

/// Why a request is not authenticated, or could not be checked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token")]
    Missing,
    #[error("the bearer token is malformed, unknown or revoked")]
    Invalid,
    #[error("the credential store is unavailable")]
    Unavailable,
}

/// The kinds a token can be issued as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Device,
    Gateway,
    Read,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Device => "device",
            Self::Gateway => "gateway",
            Self::Read => "read",
        }
    }
}

const TOKEN_PREFIX: &str = "tp_";
/// Bounds the cache; past it, expired entries are dropped, then everything.
const CACHE_MAX: usize = 100_000;

type CacheEntry = (Option<Grant>, Instant);

/// Verifies bearer tokens against the database, with a short-lived cache.
pub struct Tokens {
    pool: Pool,
    ttl: Duration,
    cache: Mutex<HashMap<[u8; 32], CacheEntry>>,
}

impl Tokens {
    pub fn new(pool: Pool, ttl: Duration) -> Self {
        Self {
            pool,
            ttl,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The grant of the request's `Authorization: Bearer` token.
    pub async fn verify(&self, headers: &HeaderMap) -> Result<Grant, AuthError> {
        let token = bearer(headers)?;
        let hash = hash(token);
        if let Some(cached) = self.cached(&hash) {
            return cached.ok_or(AuthError::Invalid);
        }
        let grant = self.look_up(&hash).await?;
        self.remember(hash, grant.clone());
        grant.ok_or(AuthError::Invalid)
    }

    fn cached(&self, hash: &[u8; 32]) -> Option<Option<Grant>> {
        let cache = self.cache.lock().ok()?;
        let (grant, at) = cache.get(hash)?;
        (at.elapsed() < self.ttl).then(|| grant.clone())
    }

    fn remember(&self, hash: [u8; 32], grant: Option<Grant>) {
        if self.ttl.is_zero() {
            return;
        }
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= CACHE_MAX {
                let ttl = self.ttl;
                cache.retain(|_, (_, at)| at.elapsed() < ttl);
                if cache.len() >= CACHE_MAX {
                    cache.clear();
                }
            }
            cache.insert(hash, (grant, Instant::now()));
        }
    }

    async fn look_up(&self, hash: &[u8; 32]) -> Result<Option<Grant>, AuthError> {
        let client = self.pool.get().await.map_err(|_| AuthError::Unavailable)?;
        let row = client
            .query_opt(
                "SELECT kind, device_id FROM api_tokens WHERE token_hash = $1 AND revoked_at IS NULL",
                &[&&hash[..]],
            )
            .await
            .map_err(|_| AuthError::Unavailable)?;
        Ok(row.and_then(|row| {
            let kind: String = row.get(0);
            let device_id: Option<String> = row.get(1);
            match (kind.as_str(), device_id) {
                ("device", Some(device_id)) => Some(Grant::Device(device_id)),
                ("gateway", _) => Some(Grant::Gateway),
                ("read", _) => Some(Grant::Read),
                _ => None,
            }
        }))
    }
}

/// The token of an `Authorization: Bearer <token>` header.
fn bearer(headers: &HeaderMap) -> Result<&str, AuthError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or(AuthError::Missing)?;
    let text = value.to_str().map_err(|_| AuthError::Invalid)?;
    let (scheme, token) = text.split_once(' ').ok_or(AuthError::Invalid)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer")
        || !token.starts_with(TOKEN_PREFIX)
        || token.len() != TOKEN_PREFIX.len() + 64
    {
        return Err(AuthError::Invalid);
    }
    Ok(token)
}

fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A token as `tokens list` shows it (never the token itself).
#[derive(Debug, Clone)]
pub struct TokenInfo {
    pub id: Uuid,
    pub kind: String,
    pub device_id: Option<String>,
    pub label: String,
    pub created_at: time::OffsetDateTime,
    pub revoked_at: Option<time::OffsetDateTime>,
}

/// Creates a token; returns its id and the token, which is not stored anywhere.
pub async fn issue(
    pool: &Pool,
    kind: Kind,
    device_id: Option<&str>,
    label: &str,
) -> anyhow::Result<(Uuid, String)> {
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    let mut token = String::with_capacity(TOKEN_PREFIX.len() + 64);
    token.push_str(TOKEN_PREFIX);
    for byte in secret {
        let _ = write!(token, "{byte:02x}");
    }
    let id = Uuid::now_v7();
    let client = pool.get().await.context("connecting to PostgreSQL")?;
    client
        .execute(
            "INSERT INTO api_tokens (id, kind, device_id, token_hash, label) VALUES ($1, $2, $3, $4, $5)",
            &[&id, &kind.as_str(), &device_id, &&hash(&token)[..], &label],
        )
        .await
        .context("storing the token")?;
    Ok((id, token))
}

pub async fn list(pool: &Pool) -> anyhow::Result<Vec<TokenInfo>> {
    let client = pool.get().await.context("connecting to PostgreSQL")?;
    let rows = client
        .query(
            "SELECT id, kind, device_id, label, created_at, revoked_at FROM api_tokens ORDER BY created_at",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| TokenInfo {
            id: row.get(0),
            kind: row.get(1),
            device_id: row.get(2),
            label: row.get(3),
            created_at: row.get(4),
            revoked_at: row.get(5),
        })
        .collect())
}

/// Revokes a token; `false` if there is no such (unrevoked) token.
pub async fn revoke(pool: &Pool, id: Uuid) -> anyhow::Result<bool> {
    let client = pool.get().await.context("connecting to PostgreSQL")?;
    let revoked = client
        .execute(
            "UPDATE api_tokens SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL",
            &[&id],
        )
        .await?;
    Ok(revoked == 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(value).expect("valid header"),
        );
        headers
    }

    #[test]
    fn bearer_tokens_are_recognised_and_everything_else_is_not() {
        let token = format!("tp_{}", "ab".repeat(32));
        assert_eq!(
            bearer(&headers(&format!("Bearer {token}"))),
            Ok(token.as_str())
        );
        assert_eq!(
            bearer(&headers(&format!("bearer {token}"))),
            Ok(token.as_str())
        );
        assert_eq!(bearer(&HeaderMap::new()), Err(AuthError::Missing));
        for malformed in [
            "Bearer",
            "Bearer ",
            "Basic dXNlcjpwYXNz",
            "Bearer tp_short",
            &format!("Token {token}"),
        ] {
            assert_eq!(
                bearer(&headers(malformed)),
                Err(AuthError::Invalid),
                "{malformed}"
            );
        }
    }

    #[test]
    fn grants_decide_which_devices_may_post() {
        assert!(Grant::Device("a".to_owned()).may_ingest("a"));
        assert!(!Grant::Device("a".to_owned()).may_ingest("b"));
        assert!(Grant::Gateway.may_ingest("anything"));
        assert!(!Grant::Read.may_ingest("a"));
    }
}
