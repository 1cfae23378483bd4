//! Bytes waiting to be written to a socket, for tasks that read and write one
//! stream from a single poll loop (no split halves, no second task).
//!
//! Small frames are copied into one buffer so that a burst goes out in one
//! write (one TLS record, one syscall); large ones are kept as they are, without
//! a copy. Order is kept.

use bytes::{Buf, Bytes, BytesMut};
use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::AsyncWrite;

/// A buffer that grew past this while draining is dropped once empty, so that
/// one burst does not pin its memory for the life of the connection.
const KEEP_CAPACITY: usize = 64 * 1024;

pub struct WriteQueue {
    /// Large frames (and small ones frozen ahead of them), in order, before `tail`.
    chunks: VecDeque<Bytes>,
    /// Small frames copied back to back; written after `chunks`.
    tail: BytesMut,
    len: usize,
    /// Frames of at least this many bytes are queued without a copy.
    copy_below: usize,
    /// Bytes were written since the last flush.
    dirty: bool,
}

impl WriteQueue {
    pub fn new(copy_below: usize) -> Self {
        WriteQueue {
            chunks: VecDeque::new(),
            tail: BytesMut::new(),
            len: 0,
            copy_below,
            dirty: false,
        }
    }

    /// Bytes queued and not yet written.
    pub fn queued_bytes(&self) -> usize {
        self.len
    }

    /// Nothing left to write or flush.
    pub fn is_idle(&self) -> bool {
        self.len == 0 && !self.dirty
    }

    pub fn push(&mut self, b: Bytes) {
        if b.is_empty() {
            return;
        }
        self.len += b.len();
        if b.len() < self.copy_below {
            self.tail.extend_from_slice(&b);
        } else {
            if !self.tail.is_empty() {
                self.chunks.push_back(self.tail.split().freeze());
            }
            self.chunks.push_back(b);
        }
    }

    pub fn push_slice(&mut self, b: &[u8]) {
        self.len += b.len();
        self.tail.extend_from_slice(b);
    }

    /// Write everything queued, then flush. `Ready(Ok(()))` once all of it is
    /// written and flushed; `Pending` (with the waker registered) while the
    /// socket cannot take more.
    pub fn poll_write<W: AsyncWrite + ?Sized>(
        &mut self,
        mut w: Pin<&mut W>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        while self.len > 0 {
            let n = if let Some(front) = self.chunks.front_mut() {
                let n = ready!(w.as_mut().poll_write(cx, front))?;
                front.advance(n.min(front.len()));
                if front.is_empty() {
                    self.chunks.pop_front();
                }
                n
            } else {
                let n = ready!(w.as_mut().poll_write(cx, &self.tail))?;
                self.tail.advance(n.min(self.tail.len()));
                n
            };
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.dirty = true;
            self.len -= n;
        }
        if self.tail.capacity() > KEEP_CAPACITY {
            self.tail = BytesMut::new();
        } else {
            self.tail.clear();
        }
        if self.dirty {
            ready!(w.as_mut().poll_flush(cx))?;
            self.dirty = false;
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;

    #[tokio::test]
    async fn keeps_order_across_copied_and_kept_frames() {
        let mut q = WriteQueue::new(8);
        q.push(Bytes::from_static(b"ab"));
        q.push(Bytes::from_static(b"0123456789"));
        q.push(Bytes::from_static(b"cd"));
        q.push_slice(b"ef");
        q.push(Bytes::new());
        assert_eq!(q.queued_bytes(), 16);
        let mut out: Vec<u8> = Vec::new();
        poll_fn(|cx| q.poll_write(Pin::new(&mut out), cx))
            .await
            .unwrap();
        assert_eq!(&out[..], b"ab0123456789cdef");
        assert!(q.is_idle());
    }

    #[tokio::test]
    async fn partial_writes_resume_where_they_stopped() {
        let (mut a, mut b) = tokio::io::duplex(3);
        let mut q = WriteQueue::new(4);
        q.push(Bytes::from_static(b"xy"));
        q.push(Bytes::from_static(b"long frame"));
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut b, &mut got)
                .await
                .unwrap();
            got
        });
        poll_fn(|cx| q.poll_write(Pin::new(&mut a), cx))
            .await
            .unwrap();
        drop(a);
        assert_eq!(&reader.await.unwrap()[..], b"xylong frame");
    }
}
