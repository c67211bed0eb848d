//! The traffic keys of one direction of a client's TLS and how they change: the IV and
//! sequence number that make each record's nonce, and TLS 1.3 KeyUpdate (RFC 8446 7.2, 7.3).
//!
//! May import: the rest of `tls` only.

use ring::{aead, hkdf};
use rustls::ConnectionTrafficSecrets;

use super::GCM_RECORD_LIMIT;
use crate::tls::TlsError;

/// The AEAD of a suite.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Aead {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20,
}

impl Aead {
    pub(super) fn algorithm(self) -> &'static aead::Algorithm {
        match self {
            Aead::Aes128Gcm => &aead::AES_128_GCM,
            Aead::Aes256Gcm => &aead::AES_256_GCM,
            Aead::Chacha20 => &aead::CHACHA20_POLY1305,
        }
    }

    pub(super) fn key_len(self) -> usize {
        match self {
            Aead::Aes128Gcm => 16,
            Aead::Aes256Gcm | Aead::Chacha20 => 32,
        }
    }

    /// The TLS 1.3 suite's hash: SHA-384 for AES-256-GCM, SHA-256 for the others.
    pub(super) fn hkdf(self) -> (hkdf::Algorithm, usize) {
        match self {
            Aead::Aes256Gcm => (hkdf::HKDF_SHA384, 48),
            Aead::Aes128Gcm | Aead::Chacha20 => (hkdf::HKDF_SHA256, 32),
        }
    }

    pub(super) fn record_limit(self) -> u64 {
        match self {
            Aead::Aes128Gcm | Aead::Aes256Gcm => GCM_RECORD_LIMIT,
            Aead::Chacha20 => u64::MAX,
        }
    }

    /// TLS 1.2 AES-GCM carries 8 bytes of its nonce in each record.
    pub(super) fn explicit_nonce(self, tls13: bool) -> usize {
        match (tls13, self) {
            (false, Aead::Aes128Gcm | Aead::Aes256Gcm) => 8,
            _ => 0,
        }
    }
}

/// The keys of one direction.
#[derive(Clone)]
pub(super) struct Keys {
    pub(super) aead: Aead,
    pub(super) tls13: bool,
    pub(super) key: [u8; 32],
    pub(super) iv: [u8; 12],
    /// The TLS 1.3 traffic secret these keys come from (the first `hash_len` bytes), for
    /// KeyUpdate.
    pub(super) secret: [u8; 48],
    pub(super) seq: u64,
}

impl Keys {
    pub(super) fn new(
        (seq, secrets): (u64, ConnectionTrafficSecrets),
        tls13: bool,
        secret: Option<&[u8]>,
    ) -> Result<Self, TlsError> {
        let (aead, key, iv) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (Aead::Aes128Gcm, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (Aead::Aes256Gcm, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (Aead::Chacha20, key, iv),
            _ => {
                return Err(TlsError::Handshake(
                    "the negotiated cipher suite has no record layer here".into(),
                ))
            }
        };
        let mut keys = Keys {
            aead,
            tls13,
            key: [0; 32],
            iv: [0; 12],
            secret: [0; 48],
            seq,
        };
        keys.key[..aead.key_len()].copy_from_slice(key.as_ref());
        keys.iv.copy_from_slice(iv.as_ref());
        if tls13 {
            let secret = secret.ok_or_else(|| {
                TlsError::Handshake("TLS 1.3 traffic secret not seen during the handshake".into())
            })?;
            if secret.len() != aead.hkdf().1 {
                return Err(TlsError::Handshake(format!(
                    "TLS 1.3 traffic secret of {} bytes for {aead:?}",
                    secret.len()
                )));
            }
            keys.secret[..secret.len()].copy_from_slice(secret);
            // The caught secret must be the one these keys come from, or a KeyUpdate would
            // derive keys the client does not have.
            let mut derived = keys.clone();
            derived.derive();
            if derived.key != keys.key || derived.iv != keys.iv {
                return Err(TlsError::Handshake(
                    "TLS 1.3 traffic secret does not match the connection's keys".into(),
                ));
            }
        }
        Ok(keys)
    }

    pub(super) fn sealing(&self) -> aead::LessSafeKey {
        let key = aead::UnboundKey::new(self.aead.algorithm(), &self.key[..self.aead.key_len()])
            .expect("key length matches its algorithm");
        aead::LessSafeKey::new(key)
    }

    /// The per-record nonce: the IV with the sequence number XORed into its last 8 bytes.
    pub(super) fn nonce(&self) -> [u8; 12] {
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        nonce
    }

    /// TLS 1.3 KeyUpdate: the next traffic secret, its key and IV; the sequence restarts.
    pub(super) fn update(&mut self) {
        let (alg, len) = self.aead.hkdf();
        let mut next = [0u8; 48];
        expand_label(alg, &self.secret[..len], b"traffic upd", &mut next[..len]);
        self.secret = next;
        self.derive();
        self.seq = 0;
    }

    /// Key and IV from the traffic secret (RFC 8446 7.3).
    pub(super) fn derive(&mut self) {
        let (alg, len) = self.aead.hkdf();
        let key_len = self.aead.key_len();
        let secret = self.secret;
        expand_label(alg, &secret[..len], b"key", &mut self.key[..key_len]);
        expand_label(alg, &secret[..len], b"iv", &mut self.iv);
    }
}

/// HKDF-Expand-Label with an empty context (RFC 8446 7.1).
fn expand_label(alg: hkdf::Algorithm, secret: &[u8], label: &[u8], out: &mut [u8]) {
    struct Len(usize);
    impl hkdf::KeyType for Len {
        fn len(&self) -> usize {
            self.0
        }
    }
    let length = (out.len() as u16).to_be_bytes();
    let label_len = [(6 + label.len()) as u8];
    let info: [&[u8]; 5] = [&length, &label_len, b"tls13 ", label, &[0]];
    hkdf::Prk::new_less_safe(alg, secret)
        .expand(&info, Len(out.len()))
        .and_then(|okm| okm.fill(out))
        .expect("HKDF output within 255 hash lengths");
}
