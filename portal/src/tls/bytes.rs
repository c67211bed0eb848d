//! Reading onto and from byte buffers that are freed when empty: what lets a waiting stream
//! hold no buffer of its own.
//!
//! May import: nothing of the crate.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, ReadBuf};

/// Most bytes [`poll_read_onto`] reads at once.
const READ_CHUNK: usize = 16 << 10;

/// Reads what `rd` has onto the end of `out`, through a buffer on the stack of this poll: a
/// reader that waits holds no buffer of its own. `Ok(0)` is the end of the stream.
pub fn poll_read_onto<R: AsyncRead + Unpin + ?Sized>(
    rd: &mut R,
    cx: &mut Context<'_>,
    out: &mut Vec<u8>,
) -> Poll<io::Result<usize>> {
    poll_read_onto_or(rd, cx, out, Vec::new)
}

/// [`poll_read_onto`], with `fresh` giving `out` its buffer when bytes arrive and it has none
/// (a buffer lent for as long as it holds bytes).
pub fn poll_read_onto_or<R: AsyncRead + Unpin + ?Sized>(
    rd: &mut R,
    cx: &mut Context<'_>,
    out: &mut Vec<u8>,
    fresh: impl FnOnce() -> Vec<u8>,
) -> Poll<io::Result<usize>> {
    let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); READ_CHUNK];
    let mut buf = ReadBuf::uninit(&mut chunk);
    std::task::ready!(Pin::new(rd).poll_read(cx, &mut buf))?;
    if out.capacity() == 0 && !buf.filled().is_empty() {
        *out = fresh();
    }
    out.extend_from_slice(buf.filled());
    Poll::Ready(Ok(buf.filled().len()))
}

/// Copies what `bytes` holds from `*pos` into `buf`; once all of it is read, `bytes` is freed.
pub(super) fn drain_into(bytes: &mut Vec<u8>, pos: &mut usize, buf: &mut ReadBuf<'_>) {
    let n = buf.remaining().min(bytes.len() - *pos);
    buf.put_slice(&bytes[*pos..*pos + n]);
    *pos += n;
    if *pos == bytes.len() {
        *bytes = Vec::new();
        *pos = 0;
    }
}
