//! Buffers lent by the thread: a pooled client takes one for what it reads (and a new
//! server connection for what it answers) while it has bytes to work on, and gives it back
//! when it is empty again. Idle clients therefore hold no buffer, and busy ones do not allocate
//! and free one per transaction: the thread keeps a few for whichever client runs next.
//!
//! May import: nothing of the crate.

use std::cell::RefCell;

/// Buffers kept per thread.
const KEPT: usize = 64;

/// The largest buffer kept; a larger one (a big COPY, a large row) is freed.
const MAX_KEPT: usize = 64 << 10;

thread_local! {
    static BYTES: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// An empty byte buffer, with the capacity of one given back before if there is one.
pub fn bytes() -> Vec<u8> {
    BYTES
        .with(|s| s.try_borrow_mut().ok().and_then(|mut s| s.pop()))
        .unwrap_or_default()
}

/// Gives `buf` back for the next [`bytes`] on this thread (its contents are dropped).
pub fn give_bytes(mut buf: Vec<u8>) {
    if buf.capacity() == 0 || buf.capacity() > MAX_KEPT {
        return;
    }
    buf.clear();
    BYTES.with(|s| {
        if let Ok(mut s) = s.try_borrow_mut() {
            if s.len() < KEPT {
                s.push(buf);
            }
        }
    });
}

/// Gives back what `buf` holds if it is empty, leaving it without a buffer.
pub fn give_if_empty(buf: &mut Vec<u8>) {
    if buf.is_empty() && buf.capacity() > 0 {
        give_bytes(std::mem::take(buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_given_back_is_lent_again_empty() {
        let mut a = bytes();
        a.extend_from_slice(b"hello");
        let ptr = a.as_ptr();
        give_bytes(a);
        let b = bytes();
        assert!(b.is_empty());
        assert_eq!(b.as_ptr(), ptr, "the same buffer, not a new one");
        assert!(b.capacity() >= 5);
        // A huge one is freed, not kept.
        give_bytes(Vec::with_capacity(MAX_KEPT + 1));
        assert!(bytes().capacity() <= MAX_KEPT);
        // A buffer with something in it stays where it is.
        let mut c = b"x".to_vec();
        give_if_empty(&mut c);
        assert_eq!(c, b"x");
        c.clear();
        give_if_empty(&mut c);
        assert_eq!(c.capacity(), 0);
    }
}
