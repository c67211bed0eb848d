//! Wire formats: one module per protocol's framing, pure byte layouts and the incremental
//! readers and writers of them.
//!
//! May import: nothing from the rest of the crate (std, tokio's I/O traits, thiserror). TLS,
//! health and sessions import these; these import none of them.

pub mod mysql;
pub mod postgres;
pub mod resp;

/// A printable excerpt of `bytes` (at most 80, escaped), for messages about what a peer sent.
pub fn excerpt(bytes: &[u8]) -> String {
    const MAX: usize = 80;
    let mut out = String::new();
    for &b in bytes.iter().take(MAX) {
        match b {
            b'\r' => out.push_str("\\r"),
            b'\n' => out.push_str("\\n"),
            b'\\' => out.push_str("\\\\"),
            0x20..=0x7e => out.push(b as char),
            _ => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    if bytes.len() > MAX {
        out.push('…');
    }
    out
}
