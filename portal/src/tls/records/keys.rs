//! The traffic keys of one direction of a client's TLS as rustls hands them over
//! (`ConnectionTrafficSecrets`), the AEAD rustls builds from them, and the record sequence
//! number that goes with them.
//!
//! A suite with a 32-byte key (AES-256-GCM, ChaCha20-Poly1305) is held as its key and IV only,
//! wiped on drop, and rustls' AEAD is built for each batch of records: an idle client holds
//! 44 bytes a direction instead of rustls' 560-byte AEAD. AES-128-GCM keeps the AEAD rustls
//! built: rustls' public `AeadKey` can only be made from 32 bytes (`From<[u8; 32]>`), and
//! its AES-128 AEAD refuses a 32-byte key, so a 16-byte key cannot be handed back to it.
//!
//! May import: the rest of `tls` only.

use rustls::{
    crypto::cipher::{AeadKey, Iv, MessageDecrypter, MessageEncrypter, NONCE_LEN},
    ConnectionTrafficSecrets, SupportedCipherSuite,
};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::tls::TlsError;

/// rustls' own ceiling on a sequence number, below the suite's confidentiality limit.
const SEQ_SOFT_LIMIT: u64 = 0xffff_ffff_ffff_0000;

/// A key and IV, wiped when dropped.
pub(super) struct Secret {
    pub(super) key: [u8; 32],
    pub(super) iv: [u8; NONCE_LEN],
}

impl Zeroize for Secret {
    fn zeroize(&mut self) {
        self.key.zeroize();
        self.iv.zeroize();
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.zeroize();
    }
}

impl ZeroizeOnDrop for Secret {}

/// An AEAD rustls builds for a suite: its record decrypter or encrypter.
pub(super) trait Build {
    fn build(suite: SupportedCipherSuite, key: AeadKey, iv: &[u8; NONCE_LEN]) -> Box<Self>;
}

impl Build for dyn MessageDecrypter {
    fn build(suite: SupportedCipherSuite, key: AeadKey, iv: &[u8; NONCE_LEN]) -> Box<Self> {
        match suite {
            SupportedCipherSuite::Tls13(s) => s.aead_alg.decrypter(key, Iv::from(*iv)),
            SupportedCipherSuite::Tls12(s) => {
                let fixed = s.aead_alg.key_block_shape().fixed_iv_len;
                s.aead_alg.decrypter(key, &iv[..fixed])
            }
        }
    }
}

impl Build for dyn MessageEncrypter {
    fn build(suite: SupportedCipherSuite, key: AeadKey, iv: &[u8; NONCE_LEN]) -> Box<Self> {
        match suite {
            SupportedCipherSuite::Tls13(s) => s.aead_alg.encrypter(key, Iv::from(*iv)),
            SupportedCipherSuite::Tls12(s) => {
                // rustls' TLS 1.2 IV: the fixed part, then the explicit nonce's start.
                let shape = s.aead_alg.key_block_shape();
                let (fixed, rest) = iv.split_at(shape.fixed_iv_len);
                s.aead_alg
                    .encrypter(key, fixed, &rest[..shape.explicit_nonce_len])
            }
        }
    }
}

/// What a direction holds between batches of records.
enum Held<T: ?Sized> {
    Secret(Secret),
    Built(Box<T>),
}

/// The keys of one direction.
pub(super) struct Keys<T: ?Sized> {
    pub(super) suite: SupportedCipherSuite,
    held: Held<T>,
    /// The sequence number of the next record.
    pub(super) seq: u64,
}

impl<T: ?Sized + Build> Keys<T> {
    pub(super) fn new(
        suite: SupportedCipherSuite,
        (seq, secrets): (u64, ConnectionTrafficSecrets),
    ) -> Result<Self, TlsError> {
        let (key, iv, keep_aead) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (key, iv, true),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv }
            | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (key, iv, false),
            _ => {
                return Err(TlsError::Handshake(
                    "the negotiated cipher suite has no record layer here".into(),
                ))
            }
        };
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(iv.as_ref());
        let held = match <[u8; 32]>::try_from(key.as_ref()) {
            Ok(bytes) if !keep_aead => Held::Secret(Secret {
                key: bytes,
                iv: nonce,
            }),
            _ => {
                let built = T::build(suite, key, &nonce);
                nonce.zeroize();
                Held::Built(built)
            }
        };
        Ok(Keys { suite, held, seq })
    }

    /// The AEAD for this batch of records: the one kept, or one built into `batch` (and
    /// dropped with it).
    pub(super) fn aead<'a>(&'a mut self, batch: &'a mut Option<Box<T>>) -> &'a mut T {
        match &mut self.held {
            Held::Built(aead) => aead,
            Held::Secret(s) => {
                batch.get_or_insert_with(|| T::build(self.suite, AeadKey::from(s.key), &s.iv))
            }
        }
    }
}

impl<T: ?Sized> Keys<T> {
    pub(super) fn tls13(&self) -> bool {
        matches!(self.suite, SupportedCipherSuite::Tls13(_))
    }

    /// Records that may be sealed under one key: the suite's confidentiality limit (2^24 for
    /// AES-GCM), or rustls' own ceiling.
    pub(super) fn record_limit(&self) -> u64 {
        let common = match self.suite {
            SupportedCipherSuite::Tls13(s) => &s.common,
            SupportedCipherSuite::Tls12(s) => &s.common,
        };
        common.confidentiality_limit.min(SEQ_SOFT_LIMIT)
    }

    /// The key material held, if this direction holds its secret (for the wiping test).
    #[cfg(test)]
    pub(super) fn secret(&mut self) -> Option<&mut Secret> {
        match &mut self.held {
            Held::Secret(s) => Some(s),
            Held::Built(_) => None,
        }
    }
}
