//! The cluster's shared secret: agents prove they hold it without ever sending it.
//!
//! A MAC is BLAKE3 in keyed mode under a key derived from the secret (BLAKE3's own key
//! derivation, with a context string per use), so the secret may be any length and the same
//! secret never keys two different protocols. Data connections use a challenge (the server's
//! random nonce, answered with its MAC); the control channel, where a challenge would cost a
//! round trip per call, sends a timestamped token that is accepted within a bounded skew.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Length of a nonce and of a MAC.
pub const MAC_LEN: usize = 32;

const DATA_CONTEXT: &str = "kvtier 2026 peer data-channel challenge";
const CONTROL_CONTEXT: &str = "kvtier 2026 peer control-channel token";

/// How far a control token's clock may be from ours.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(120);

/// Why a control token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token, or not in the `v1.<seconds>.<nonce>.<mac>` form.
    #[error("missing or malformed peer token")]
    Malformed,
    /// The token's time is too far from ours (a replay, or clocks out of sync).
    #[error("peer token is {skew_s} s away from this agent's clock (allowed {MAX_CLOCK_SKEW:?})")]
    Stale {
        /// The difference in seconds.
        skew_s: u64,
    },
    /// The MAC does not match: the peer holds another secret.
    #[error("peer token signed with a different shared secret")]
    WrongSecret,
}

/// A cluster's shared secret, reduced to the two keys derived from it.
#[derive(Clone)]
pub struct Secret {
    data: [u8; 32],
    control: [u8; 32],
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Secret {
    /// Derives the keys from the secret's bytes (trailing whitespace, as left by `echo` into a
    /// Kubernetes Secret, is ignored). `None` for an empty secret.
    pub fn new(secret: &[u8]) -> Option<Self> {
        let end = secret.iter().rposition(|b| !b.is_ascii_whitespace())? + 1;
        let secret = &secret[..end];
        Some(Self {
            data: blake3::derive_key(DATA_CONTEXT, secret),
            control: blake3::derive_key(CONTROL_CONTEXT, secret),
        })
    }

    /// The answer to a data connection's challenge.
    pub fn answer(&self, nonce: &[u8; MAC_LEN]) -> [u8; MAC_LEN] {
        *blake3::keyed_hash(&self.data, nonce).as_bytes()
    }

    /// Whether `answer` is the right answer to `nonce` (constant time).
    pub fn check_answer(&self, nonce: &[u8; MAC_LEN], answer: &[u8; MAC_LEN]) -> bool {
        blake3::keyed_hash(&self.data, nonce) == blake3::Hash::from_bytes(*answer)
    }

    /// A control-channel token for now.
    pub fn token(&self) -> String {
        self.token_at(unix_now(), &random_nonce())
    }

    fn token_at(&self, secs: u64, nonce: &[u8; MAC_LEN]) -> String {
        let nonce = hex(&nonce[..16]);
        let mac = self.control_mac(secs, &nonce);
        format!("v1.{secs}.{nonce}.{}", hex(mac.as_bytes()))
    }

    fn control_mac(&self, secs: u64, nonce: &str) -> blake3::Hash {
        blake3::keyed_hash(&self.control, format!("{secs}.{nonce}").as_bytes())
    }

    /// Checks a control-channel token.
    pub fn verify_token(&self, token: &str) -> Result<(), AuthError> {
        self.verify_token_at(token, unix_now())
    }

    fn verify_token_at(&self, token: &str, now: u64) -> Result<(), AuthError> {
        let mut parts = token.split('.');
        let (Some("v1"), Some(secs), Some(nonce), Some(mac), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(AuthError::Malformed);
        };
        let secs: u64 = secs.parse().map_err(|_| AuthError::Malformed)?;
        let mac = unhex32(mac).ok_or(AuthError::Malformed)?;
        // The MAC first: an attacker learns nothing about our clock from a forged token.
        if self.control_mac(secs, nonce) != blake3::Hash::from_bytes(mac) {
            return Err(AuthError::WrongSecret);
        }
        let skew_s = now.abs_diff(secs);
        if skew_s > MAX_CLOCK_SKEW.as_secs() {
            return Err(AuthError::Stale { skew_s });
        }
        Ok(())
    }
}

/// Random bytes from the kernel.
pub fn random_nonce() -> [u8; MAC_LEN] {
    let mut out = [0u8; MAC_LEN];
    let mut filled = 0;
    while filled < out.len() {
        match rustix::rand::getrandom(&mut out[filled..], rustix::rand::GetRandomFlags::empty()) {
            Ok(n) => filled += n,
            Err(rustix::io::Errno::INTR) => {}
            // getrandom(2) only fails for bad arguments or on kernels older than 3.17.
            Err(e) => panic!("getrandom failed: {e}"),
        }
    }
    out
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenge_answers_need_the_same_secret() {
        let a = Secret::new(b"cluster-one").unwrap();
        let b = Secret::new(b"cluster-two").unwrap();
        let nonce = random_nonce();
        assert!(a.check_answer(&nonce, &a.answer(&nonce)));
        assert!(!a.check_answer(&nonce, &b.answer(&nonce)));
        assert!(!a.check_answer(&random_nonce(), &a.answer(&nonce)));
        // A newline left by `echo` does not make another secret.
        let c = Secret::new(b"cluster-one\n").unwrap();
        assert!(a.check_answer(&nonce, &c.answer(&nonce)));
        assert!(Secret::new(b" \n").is_none());
        assert_eq!(format!("{a:?}"), "Secret(<redacted>)");
    }

    #[test]
    fn tokens_check_secret_form_and_time() {
        let a = Secret::new(b"s1").unwrap();
        let b = Secret::new(b"s2").unwrap();
        let t = a.token_at(1_000_000, &[7; 32]);
        assert_eq!(a.verify_token_at(&t, 1_000_010), Ok(()));
        assert_eq!(b.verify_token_at(&t, 1_000_010), Err(AuthError::WrongSecret));
        assert_eq!(
            a.verify_token_at(&t, 1_000_000 + 600),
            Err(AuthError::Stale { skew_s: 600 })
        );
        for bad in [
            "",
            "v1",
            "v2.1.aa.bb",
            "v1.x.aa.bb",
            &format!("{t}.extra"),
            &t[..t.len() - 1],
        ] {
            assert_eq!(
                a.verify_token_at(bad, 1_000_000),
                Err(AuthError::Malformed),
                "{bad}"
            );
        }
        // Changing the time invalidates the MAC.
        let forged = t.replacen("1000000", "1000001", 1);
        assert_eq!(a.verify_token_at(&forged, 1_000_000), Err(AuthError::WrongSecret));
        assert_eq!(a.verify_token(&a.token()), Ok(()));
    }
}
