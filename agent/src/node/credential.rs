//! Sandbox ids and the per-sandbox credential.
//!
//! A token is 256 bits from the host CRNG, shown to its creator once. The node keeps only
//! its sha256 and compares a presented token's hash with it in constant time. Tokens have
//! no `Debug` or `Display` that shows them: they cannot reach a log by accident.

use std::fmt;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// A sandbox's id: `sb-` and 16 hex digits (64 random bits: unguessable enough that ids
/// need not be secret, and they are not the credential).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SandboxId(String);

#[derive(Debug, thiserror::Error)]
#[error(
    "{0:?} is not a sandbox id (ids look like sb-0123456789abcdef; `cleave sandbox ls` lists them)"
)]
pub struct BadSandboxId(String);

impl SandboxId {
    pub fn random() -> std::io::Result<SandboxId> {
        let bytes: [u8; 8] = crate::host::entropy::array()?;
        Ok(SandboxId(format!("sb-{}", hex::encode(bytes))))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for SandboxId {
    type Err = BadSandboxId;
    fn from_str(s: &str) -> Result<Self, BadSandboxId> {
        let ok = s.len() == 19
            && s.starts_with("sb-")
            && s[3..]
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if ok {
            Ok(SandboxId(s.to_string()))
        } else {
            // Bounded: a hostile caller's megabyte of "id" is not echoed back.
            Err(BadSandboxId(s.chars().take(40).collect()))
        }
    }
}

impl fmt::Display for SandboxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A freshly made token; [`Token::reveal`] is the one way to read it (for its creator).
pub struct Token([u8; 32]);

impl Token {
    pub fn random() -> std::io::Result<Token> {
        Ok(Token(crate::host::entropy::array()?))
    }

    /// The token as its holder presents it: 64 lowercase hex digits.
    pub fn reveal(&self) -> String {
        hex::encode(self.0)
    }

    pub fn credential(&self) -> Credential {
        Credential(Sha256::digest(self.reveal().as_bytes()).into())
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(..)")
    }
}

/// What the node keeps of a token: its sha256.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential([u8; 32]);

impl Credential {
    /// Whether `presented` is the token. The comparison takes the same time whatever the
    /// presented bytes are (the hash of any input is compared in full, in constant time).
    pub fn accepts(&self, presented: &str) -> bool {
        let h: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        self.0.ct_eq(&h).into()
    }

    /// A credential no token matches (used for unknown sandboxes, so a refusal for a
    /// sandbox that does not exist costs and says the same as a wrong token).
    pub fn nothing() -> Credential {
        Credential([0; 32])
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Credential(sha256:..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_accepted_only_by_its_own_credential() {
        let a = Token::random().unwrap();
        let b = Token::random().unwrap();
        assert_eq!(a.reveal().len(), 64);
        assert_ne!(a.reveal(), b.reveal());
        assert!(a.credential().accepts(&a.reveal()));
        assert!(!a.credential().accepts(&b.reveal()));
        assert!(!b.credential().accepts(&a.reveal()));
        assert!(!a.credential().accepts(""));
        assert!(!a.credential().accepts(&a.reveal().to_uppercase()));
        assert!(!Credential::nothing().accepts(&a.reveal()));
    }

    #[test]
    fn tokens_and_credentials_never_format_their_secret() {
        let t = Token::random().unwrap();
        let secret = t.reveal();
        assert!(!format!("{t:?}").contains(&secret[..8]));
        let c = t.credential();
        assert!(!format!("{c:?}").contains(&hex::encode(c.0)[..8]));
    }

    #[test]
    fn ids_are_checked_and_bad_ones_are_not_echoed_in_full() {
        let id = SandboxId::random().unwrap();
        assert_eq!(id.as_str().parse::<SandboxId>().unwrap(), id);
        for bad in [
            "",
            "sb-",
            "sb-0123",
            "sb-0123456789ABCDEF",
            "xx-0123456789abcdef",
            "../../etc",
        ] {
            assert!(bad.parse::<SandboxId>().is_err(), "{bad}");
        }
        let long = "x".repeat(10_000);
        let e = long.parse::<SandboxId>().unwrap_err().to_string();
        assert!(e.len() < 200, "{e}");
        assert!(e.contains("cleave sandbox ls"));
    }
}
