//! Who may do what (API.md §5): bearer tokens, stored only as SHA-256 hashes.
//!
//! Three kinds: a *device* token may post readings of its one device, a *gateway* token
//! readings of any device, a *read* token may use the query API. Tokens are 32 random
//! bytes from `rand`'s thread-local CSPRNG (ChaCha12, seeded from the operating
//! system), written `tp_<64 hex digits>` and shown once
//! when issued; the database keeps their hash. Verified tokens (and unknown ones) are
//! remembered for `auth.cache_ttl_secs`, so revoking a token takes effect within that
//! time and a request costs no database round trip in the common case. Requests that
//! miss the cache for one token while its look-up runs wait for that look-up instead of
//! sending their own: when a busy gateway token's grant expired, every request in flight
//! used to miss at once (up to 64 look-ups at each expiry under the bench's 64 clients).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::http::{header, HeaderMap};
use deadpool_postgres::Pool;
use rand::RngCore;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::db::LookUps;
use crate::sync::lock;

/// What a token allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// Post readings of this one device (shared, so a cached grant is copied without
    /// allocating).
    Device(Arc<str>),
    /// Post readings of any device.
    Gateway,
    /// Use the query API.
    Read,
}

impl Grant {
    /// Whether the grant allows posting a reading of `device_id`.
    pub fn may_ingest(&self, device_id: &str) -> bool {
        match self {
            Self::Device(own) => **own == *device_id,
            Self::Gateway => true,
            Self::Read => false,
        }
    }

    /// Whether the grant allows posting readings of some device: a read token may post
    /// none, so its batch is refused as a whole.
    pub fn may_ingest_any(&self) -> bool {
        !matches!(self, Self::Read)
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
/// Bounds the cache of grants; past it, expired entries are dropped, then everything.
const CACHE_MAX: usize = 100_000;
/// Bounds the cache of unknown and revoked tokens alike, apart from the grants.
const REFUSED_CACHE_MAX: usize = 10_000;

/// One token's look-up under way, and its answer once it has one, shared by the
/// requests that missed the cache meanwhile.
#[derive(Debug)]
struct Flight {
    answer: tokio::sync::OnceCell<Result<Option<Grant>, AuthError>>,
    /// When its first request came: its answer may be read as of then.
    begun: Instant,
}

impl Flight {
    fn new(begun: Instant) -> Self {
        Self {
            answer: tokio::sync::OnceCell::new(),
            begun,
        }
    }
}

/// The look-ups under way, one per token.
type Flights = Mutex<HashMap<TokenHash, Arc<Flight>>>;

/// Verifies bearer tokens against the database, with a short-lived cache.
pub struct Tokens {
    look_ups: LookUps,
    cache: GrantCache,
    flights: Flights,
}

impl Tokens {
    pub fn new(look_ups: LookUps, ttl: Duration) -> Self {
        Self {
            look_ups,
            cache: GrantCache::new(ttl, CACHE_MAX, REFUSED_CACHE_MAX),
            flights: Mutex::default(),
        }
    }

    /// The pool the tokens are read from, for a readiness check.
    pub fn pool(&self) -> &Pool {
        self.look_ups.pool()
    }

    /// The grant of the request's `Authorization: Bearer` token.
    pub async fn verify(&self, headers: &HeaderMap) -> Result<Grant, AuthError> {
        let token = bearer(headers)?;
        let hash = TokenHash(hash(token));
        if let Some(cached) = self.cache.get(&hash, Instant::now()) {
            return cached.ok_or(AuthError::Invalid);
        }
        if !self.cache.caches() {
            // No cache: each request reads the token's state as of its own arrival, not
            // a look-up that may have begun before a revocation it follows.
            return self.look_up(&hash.0).await?.ok_or(AuthError::Invalid);
        }
        let joined = Joined::new(&self.flights, hash, Instant::now(), self.cache.ttl);
        let looked_up = joined
            .flight
            .answer
            .get_or_init(|| async {
                let now = Instant::now();
                let grant = self.look_up(&hash.0).await?;
                // Trusted for the ttl from *before* the query: a revocation committed
                // after that is then honoured within the ttl, however long it took.
                self.cache.insert(hash, grant.clone(), now);
                Ok(grant)
            })
            .await
            .clone();
        looked_up?.ok_or(AuthError::Invalid)
    }

    /// The token's grant as the database has it.
    ///
    /// A look-up is given up half-way when the request it serves reaches its deadline (a
    /// session holding a lock on `api_tokens` makes it wait as long as the lock is held)
    /// or its client hangs up; its query is then cancelled rather than left on a pooled
    /// connection for the next user to wait behind ([`crate::db::cancel_if_given_up`]). The
    /// flight the look-up ran for is not touched: a request still waiting on it runs the
    /// look-up itself. Look-ups hold at most the connections [`LookUps`] allows them.
    async fn look_up(&self, hash: &[u8; 32]) -> Result<Option<Grant>, AuthError> {
        metrics::counter!("auth_token_lookups_total").increment(1);
        let row = self
            .look_ups
            .run("token look-up", async |client| {
                client
                    .query_opt(
                        "SELECT kind, device_id FROM api_tokens WHERE token_hash = $1 AND revoked_at IS NULL",
                        &[&&hash[..]],
                    )
                    .await
            })
            .await;
        // The client gets a 503 that names no cause; the log keeps it (until 2026-12-07
        // it was dropped).
        let row = row.map_err(|error| {
            tracing::warn!(error = format!("{error:#}"), "token look-up failed");
            AuthError::Unavailable
        })?;
        Ok(row.and_then(|row| {
            let kind: String = row.get(0);
            let device_id: Option<String> = row.get(1);
            match (kind.as_str(), device_id) {
                ("device", Some(device_id)) => Some(Grant::Device(device_id.into())),
                ("gateway", _) => Some(Grant::Gateway),
                ("read", _) => Some(Grant::Read),
                _ => None,
            }
        }))
    }
}

/// A request's part in its token's flight. Leaving it, answered or cancelled (a client
/// that hung up), retires the flight once it has its answer, so that the next miss
/// looks up afresh, or once nobody else waits on it, so that no token leaves an entry
/// behind; a waiter left behind by a cancelled look-up runs the look-up itself.
struct Joined<'a> {
    flights: &'a Flights,
    hash: TokenHash,
    flight: Arc<Flight>,
}

impl<'a> Joined<'a> {
    /// Joins the token's flight at `now`, or begins one: a flight is joined only within
    /// `ttl` of its first request, since its answer may be read as of then. A look-up
    /// stalled past the ttl (a slow database) would otherwise hand a grant read before
    /// a revocation to requests that came more than the ttl after it (until 2026-12-07
    /// it did: the README's bound on a revocation did not hold for them).
    fn new(flights: &'a Flights, hash: TokenHash, now: Instant, ttl: Duration) -> Self {
        let mut under_way = lock(flights);
        let joinable = |flight: &Arc<Flight>| {
            flight
                .begun
                .checked_add(ttl)
                .is_some_and(|until| now < until)
        };
        let flight = match under_way.get(&hash) {
            Some(flight) if joinable(flight) => flight.clone(),
            _ => {
                let flight = Arc::new(Flight::new(now));
                under_way.insert(hash, flight.clone());
                flight
            }
        };
        drop(under_way);
        Self {
            flights,
            hash,
            flight,
        }
    }
}

impl Drop for Joined<'_> {
    fn drop(&mut self) {
        let mut flights = lock(self.flights);
        // Clones are made under this lock only, so the count is exact here: the map's
        // and this one.
        let retire = flights
            .get(&self.hash)
            .is_some_and(|current| Arc::ptr_eq(current, &self.flight))
            && (self.flight.answer.initialized() || Arc::strong_count(&self.flight) == 2);
        if retire {
            flights.remove(&self.hash);
        }
    }
}

/// The SHA-256 of a token, as the cache's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TokenHash([u8; 32]);

impl Hash for TokenHash {
    /// A SHA-256 digest is uniform, so its first 8 bytes pick a bucket as well as all 32
    /// would, at a quarter of the hashing. Equality still compares all 32 bytes, and the
    /// map's hasher stays keyed per process (`RandomState`), so nobody can aim tokens at
    /// one bucket.
    fn hash<H: Hasher>(&self, state: &mut H) {
        let [b0, b1, b2, b3, b4, b5, b6, b7, ..] = self.0;
        state.write_u64(u64::from_le_bytes([b0, b1, b2, b3, b4, b5, b6, b7]));
    }
}

/// What the cache knows of a token: its grant (`None`: unknown or revoked) until
/// `expires_at`.
#[derive(Debug)]
struct CacheEntry {
    grant: Option<Grant>,
    expires_at: Instant,
}

/// Grants of recently verified tokens, each trusted for `ttl` after it was read from the
/// database: that is the revocation bound. Read-mostly, so a hit takes only the read
/// lock and copies no string (a device grant is an `Arc<str>`).
///
/// Tokens found unknown or revoked are remembered in a map of their own, with its own
/// bound: anyone can send made-up tokens, and they fill and clear only that map, never
/// the grants the devices' requests depend on. (Until 2026-12-07 one map held both,
/// and 100,000 made-up tokens within the ttl cleared every grant, so every device's
/// next request waited for a look-up behind theirs.)
struct GrantCache {
    ttl: Duration,
    granted: Bounded,
    refused: Bounded,
}

/// One map of [`GrantCache`] and its bound.
struct Bounded {
    max_entries: usize,
    entries: RwLock<HashMap<TokenHash, CacheEntry>>,
}

impl Bounded {
    fn new(max_entries: usize) -> Self {
        Self {
            max_entries,
            entries: RwLock::new(HashMap::new()),
        }
    }

    fn get(&self, hash: &TokenHash, now: Instant) -> Option<Option<Grant>> {
        // A panic elsewhere cannot leave the map half-updated in a way that matters
        // here: at worst an entry is missing and read from the database again.
        let entries = self.entries.read().unwrap_or_else(PoisonError::into_inner);
        let entry = entries.get(hash)?;
        (now < entry.expires_at).then(|| entry.grant.clone())
    }

    fn insert(&self, hash: TokenHash, entry: CacheEntry, now: Instant) {
        let mut entries = self.entries.write().unwrap_or_else(PoisonError::into_inner);
        if entries.len() >= self.max_entries && !entries.contains_key(&hash) {
            entries.retain(|_, entry| now < entry.expires_at);
            if entries.len() >= self.max_entries {
                entries.clear();
            }
        }
        entries.insert(hash, entry);
    }
}

impl GrantCache {
    fn new(ttl: Duration, max_granted: usize, max_refused: usize) -> Self {
        Self {
            ttl,
            granted: Bounded::new(max_granted),
            refused: Bounded::new(max_refused),
        }
    }

    /// Whether grants are remembered at all: a zero ttl turns the cache off.
    fn caches(&self) -> bool {
        !self.ttl.is_zero()
    }

    /// The cached grant of `hash` if it was read less than `ttl` before `now`.
    fn get(&self, hash: &TokenHash, now: Instant) -> Option<Option<Grant>> {
        self.granted
            .get(hash, now)
            .or_else(|| self.refused.get(hash, now))
    }

    /// Remembers `grant`, read from the database after `now`.
    fn insert(&self, hash: TokenHash, grant: Option<Grant>, now: Instant) {
        // A ttl too large for the clock is treated as no cache rather than trusting a
        // token forever.
        let Some(expires_at) = now.checked_add(self.ttl).filter(|_| self.caches()) else {
            return;
        };
        let map = if grant.is_some() {
            &self.granted
        } else {
            &self.refused
        };
        map.insert(hash, CacheEntry { grant, expires_at }, now);
    }
}

/// The token of an `Authorization: Bearer <token>` header. Two `Authorization` headers
/// are refused: which one the client meant cannot be known (until 2026-12-07 the
/// second was ignored).
fn bearer(headers: &HeaderMap) -> Result<&str, AuthError> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let value = values.next().ok_or(AuthError::Missing)?;
    if values.next().is_some() {
        return Err(AuthError::Invalid);
    }
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

    fn token_hash(seed: u8) -> TokenHash {
        TokenHash(hash(&format!("tp_{}", format!("{seed:02x}").repeat(32))))
    }

    #[test]
    fn a_flight_is_retired_once_answered_or_once_nobody_waits_on_it() {
        let flights = Flights::default();
        let in_flight = |flights: &Flights| lock(flights).len();
        let start = Instant::now();
        let join = |seed| Joined::new(&flights, token_hash(seed), start, Duration::from_secs(5));

        // Two requests share one flight; the first to leave, unanswered, keeps it for
        // the other (who then looks up itself), which retires it on leaving.
        let first = join(1);
        let second = join(1);
        assert!(Arc::ptr_eq(&first.flight, &second.flight));
        drop(first);
        assert_eq!(in_flight(&flights), 1);
        drop(second);
        assert_eq!(in_flight(&flights), 0);

        // Answered, it is retired by the first to leave: the next miss looks up again.
        let first = join(2);
        let second = join(2);
        first
            .flight
            .answer
            .set(Ok(Some(Grant::Gateway)))
            .expect("not answered before");
        drop(first);
        assert_eq!(in_flight(&flights), 0);
        let next = join(2);
        assert!(!Arc::ptr_eq(&next.flight, &second.flight));
        assert!(!next.flight.answer.initialized());
        // The answered one, left last, does not retire the new one.
        drop(second);
        assert_eq!(in_flight(&flights), 1);
        drop(next);
        assert_eq!(in_flight(&flights), 0);
    }

    #[test]
    fn a_flight_is_joined_only_within_the_ttl_of_its_first_request() {
        let flights = Flights::default();
        let ttl = Duration::from_secs(5);
        let start = Instant::now();
        let join = |after: Duration| Joined::new(&flights, token_hash(1), start + after, ttl);
        let first = join(Duration::ZERO);
        let within = join(ttl - Duration::from_millis(1));
        assert!(Arc::ptr_eq(&first.flight, &within.flight));
        // Still unanswered at the ttl (its look-up stalled): a request from then on
        // begins its own, whose answer is read after it came.
        let late = join(ttl);
        assert!(!Arc::ptr_eq(&first.flight, &late.flight));
        let later = join(ttl + Duration::from_millis(1));
        assert!(
            Arc::ptr_eq(&late.flight, &later.flight),
            "the new one is joined"
        );
        // The stalled flight's requests leave without retiring the new one.
        drop(first);
        drop(within);
        assert_eq!(lock(&flights).len(), 1);
        drop(late);
        drop(later);
        assert_eq!(lock(&flights).len(), 0);
    }

    #[test]
    fn a_cached_grant_is_served_until_the_ttl_and_read_again_from_then_on() {
        let cache = GrantCache::new(Duration::from_secs(5), 10, 10);
        let read_at = Instant::now();
        cache.insert(token_hash(1), Some(Grant::Device("a".into())), read_at);
        assert_eq!(
            cache.get(&token_hash(1), read_at + Duration::from_millis(4_999)),
            Some(Some(Grant::Device("a".into())))
        );
        assert_eq!(
            cache.get(&token_hash(1), read_at + Duration::from_secs(5)),
            None,
            "at the ttl the token is read from the database again: the revocation bound"
        );
        assert_eq!(cache.get(&token_hash(2), read_at), None, "never seen");
    }

    #[test]
    fn unknown_and_revoked_tokens_are_remembered_as_such() {
        let cache = GrantCache::new(Duration::from_secs(5), 10, 10);
        let read_at = Instant::now();
        cache.insert(token_hash(1), None, read_at);
        assert_eq!(cache.get(&token_hash(1), read_at), Some(None));
    }

    #[test]
    fn made_up_tokens_fill_and_clear_only_their_own_map() {
        let cache = GrantCache::new(Duration::from_secs(5), 10, 3);
        let read_at = Instant::now();
        cache.insert(token_hash(1), Some(Grant::Gateway), read_at);
        for seed in 2..=12 {
            cache.insert(token_hash(seed), None, read_at);
        }
        assert_eq!(
            cache.get(&token_hash(1), read_at),
            Some(Some(Grant::Gateway)),
            "the grant outlives any number of refused tokens"
        );
        assert_eq!(cache.get(&token_hash(12), read_at), Some(None));
    }

    #[test]
    fn a_zero_ttl_caches_nothing() {
        let cache = GrantCache::new(Duration::ZERO, 10, 10);
        let read_at = Instant::now();
        cache.insert(token_hash(1), Some(Grant::Gateway), read_at);
        assert_eq!(cache.get(&token_hash(1), read_at), None);
    }

    #[test]
    fn a_full_cache_drops_expired_entries_first_then_everything() {
        let cache = GrantCache::new(Duration::from_secs(5), 2, 2);
        let start = Instant::now();
        cache.insert(token_hash(1), Some(Grant::Gateway), start);
        cache.insert(
            token_hash(2),
            Some(Grant::Gateway),
            start + Duration::from_secs(3),
        );
        let later = start + Duration::from_secs(6);
        cache.insert(token_hash(3), Some(Grant::Read), later);
        assert_eq!(cache.get(&token_hash(2), later), Some(Some(Grant::Gateway)));
        assert_eq!(cache.get(&token_hash(3), later), Some(Some(Grant::Read)));
        cache.insert(token_hash(4), Some(Grant::Read), later);
        assert_eq!(
            cache.get(&token_hash(2), later),
            None,
            "nothing expired: cleared"
        );
        assert_eq!(cache.get(&token_hash(4), later), Some(Some(Grant::Read)));
    }

    #[test]
    fn grants_decide_which_devices_may_post() {
        assert!(Grant::Device("a".into()).may_ingest("a"));
        assert!(!Grant::Device("a".into()).may_ingest("b"));
        assert!(Grant::Gateway.may_ingest("anything"));
        assert!(!Grant::Read.may_ingest("a"));
    }
}
