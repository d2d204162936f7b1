//! HTTP basic auth against bcrypt hashes (Prometheus exporter-toolkit's `basic_auth_users`).
//!
//! bcrypt is slow on purpose (tens of ms and up per check), so a flood of bad passwords must
//! not take the CPU from the tracer: checks run one at a time on the HTTP runtime's blocking
//! pool ([`MAX_CONCURRENT_CHECKS`]), a request waits for its turn at most [`CHECK_WAIT`] (then
//! 503), and a successful check is remembered for [`CACHE_TTL`] so a scraper pays for one
//! check a minute. An unknown user costs the same check as a wrong password (against another
//! user's hash), and bcrypt compares in constant time.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Mutex,
    time::{Duration, Instant},
};

use base64::Engine as _;
use tokio::sync::Semaphore;

/// bcrypt checks running at once.
pub const MAX_CONCURRENT_CHECKS: usize = 1;
/// How long a request waits for a check before it is answered 503.
pub const CHECK_WAIT: Duration = Duration::from_secs(5);
/// How long a successful check is remembered.
pub const CACHE_TTL: Duration = Duration::from_secs(60);
/// Successful checks remembered at most (the oldest is forgotten first).
const CACHE_ENTRIES: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// No credentials, malformed ones, an unknown user or a wrong password.
    Denied,
    /// Too many checks waiting: try later.
    Busy,
}

pub struct BasicAuth {
    /// User name -> bcrypt hash; never empty.
    users: BTreeMap<String, String>,
    checks: Semaphore,
    cache: Mutex<HashMap<[u8; 32], Instant>>,
}

impl BasicAuth {
    /// Auth for `users` (hashes already checked to parse, see web_config); `None` without
    /// users, which means no auth.
    pub fn new(users: BTreeMap<String, String>) -> Option<Self> {
        (!users.is_empty()).then(|| Self {
            users,
            checks: Semaphore::new(MAX_CONCURRENT_CHECKS),
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Whether the `Authorization` header's value lets the request through.
    pub async fn check(&self, authorization: Option<&[u8]>) -> Verdict {
        let Some((user, password)) = authorization.and_then(parse_basic) else {
            return Verdict::Denied;
        };
        let key = cache_key(&user, &password);
        let now = Instant::now();
        if self.cached(&key, now) {
            return Verdict::Allowed;
        }
        let (known, hash) = match self.users.get(&user) {
            Some(h) => (true, h.clone()),
            // Same work as a wrong password, so timing does not tell which users exist.
            None => (
                false,
                self.users.values().next().cloned().unwrap_or_default(),
            ),
        };
        let Ok(Ok(_permit)) = tokio::time::timeout(CHECK_WAIT, self.checks.acquire()).await else {
            return Verdict::Busy;
        };
        let matched =
            tokio::task::spawn_blocking(move || bcrypt::verify(&password, &hash).unwrap_or(false))
                .await
                .unwrap_or(false);
        if known && matched {
            self.remember(key, Instant::now());
            Verdict::Allowed
        } else {
            Verdict::Denied
        }
    }

    fn cached(&self, key: &[u8; 32], now: Instant) -> bool {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        match cache.get(key) {
            Some(until) if *until > now => true,
            Some(_) => {
                cache.remove(key);
                false
            }
            None => false,
        }
    }

    fn remember(&self, key: [u8; 32], now: Instant) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.retain(|_, until| *until > now);
        if cache.len() >= CACHE_ENTRIES
            && let Some(oldest) = cache.iter().min_by_key(|(_, u)| **u).map(|(k, _)| *k)
        {
            cache.remove(&oldest);
        }
        cache.insert(key, now + CACHE_TTL);
    }
}

/// `Basic base64(user:password)` -> (user, password); `None` for anything else.
fn parse_basic(value: &[u8]) -> Option<(String, String)> {
    let value = std::str::from_utf8(value).ok()?.trim();
    let (scheme, b64) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let raw = String::from_utf8(raw).ok()?;
    let (user, password) = raw.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

/// The cache holds digests, never passwords: SHA-256 of the length-prefixed user and password.
fn cache_key(user: &str, password: &str) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(&(user.len() as u64).to_le_bytes());
    ctx.update(user.as_bytes());
    ctx.update(password.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(user: &str, password: &str) -> Vec<u8> {
        let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        format!("Basic {b64}").into_bytes()
    }

    fn auth() -> BasicAuth {
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        BasicAuth::new(BTreeMap::from([("prom".to_string(), hash)])).unwrap()
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn right_credentials_pass_and_everything_else_is_denied() {
        let a = auth();
        block_on(async {
            assert_eq!(
                a.check(Some(&header("prom", "s3cret"))).await,
                Verdict::Allowed
            );
            assert_eq!(
                a.check(Some(&header("prom", "wrong"))).await,
                Verdict::Denied
            );
            assert_eq!(
                a.check(Some(&header("nobody", "s3cret"))).await,
                Verdict::Denied
            );
            assert_eq!(a.check(None).await, Verdict::Denied);
            for bad in [
                &b"Bearer abc"[..],
                b"Basic !!!",
                b"Basic",
                b"Basic cHJvbQ==", // "prom", no colon
                b"\xff\xfe",
            ] {
                assert_eq!(a.check(Some(bad)).await, Verdict::Denied, "{bad:?}");
            }
        });
    }

    #[test]
    fn a_successful_check_is_cached_and_a_wrong_one_is_not() {
        let a = auth();
        block_on(async {
            assert_eq!(
                a.check(Some(&header("prom", "s3cret"))).await,
                Verdict::Allowed
            );
            assert!(a.cached(&cache_key("prom", "s3cret"), Instant::now()));
            assert_eq!(
                a.check(Some(&header("prom", "nope"))).await,
                Verdict::Denied
            );
            assert!(!a.cached(&cache_key("prom", "nope"), Instant::now()));
            // Expired entries are not used.
            assert!(!a.cached(
                &cache_key("prom", "s3cret"),
                Instant::now() + CACHE_TTL + Duration::from_secs(1)
            ));
        });
    }

    #[test]
    fn the_cache_is_bounded_and_keys_do_not_collide_across_the_colon() {
        let a = auth();
        let now = Instant::now();
        for i in 0..1000u32 {
            a.remember(cache_key("u", &i.to_string()), now);
        }
        assert!(a.cache.lock().unwrap().len() <= CACHE_ENTRIES);
        assert_ne!(cache_key("a:b", "c"), cache_key("a", "b:c"));
    }

    #[test]
    fn no_users_is_no_auth() {
        assert!(BasicAuth::new(BTreeMap::new()).is_none());
    }

    #[test]
    fn parses_basic_credentials_with_a_colon_in_the_password() {
        assert_eq!(
            parse_basic(&header("u", "p:q")),
            Some(("u".into(), "p:q".into()))
        );
        assert_eq!(parse_basic(b"basic dTpw"), Some(("u".into(), "p".into())));
    }
}
