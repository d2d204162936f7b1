//! A write deadline on a connection: hyper has none, and a client that sends requests and never
//! reads its responses would otherwise keep its connection (and fd) for ever.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{Instant, Sleep},
};

/// Wraps a stream so that everything written from a first byte until the next completed
/// flush (one response, a TLS handshake flight) must be gone within `limit`; past it every
/// write fails with `TimedOut`, which ends the connection. Reads pass through.
pub struct WriteDeadline<T> {
    inner: T,
    limit: Duration,
    sleep: Pin<Box<Sleep>>,
    armed: bool,
}

impl<T> WriteDeadline<T> {
    pub fn new(inner: T, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            sleep: Box::pin(tokio::time::sleep(limit)),
            armed: false,
        }
    }

    fn arm(&mut self) {
        if !self.armed {
            self.armed = true;
            self.sleep.as_mut().reset(Instant::now() + self.limit);
        }
    }

    /// Whether the armed deadline has passed; otherwise registers to be woken when it does.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if self.armed && self.sleep.as_mut().poll(cx).is_ready() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "response not read within the write timeout",
            ));
        }
        Ok(())
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteDeadline<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.arm();
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.arm();
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check(cx)?;
        ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
        self.armed = false;
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.arm();
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap()
    }

    #[test]
    fn a_peer_that_never_reads_times_the_write_out() {
        runtime().block_on(async {
            let (ours, _theirs) = tokio::io::duplex(1024);
            let mut w = WriteDeadline::new(ours, Duration::from_secs(10));
            let start = Instant::now();
            let err = w.write_all(&[0u8; 1 << 20]).await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::TimedOut);
            assert_eq!(start.elapsed(), Duration::from_secs(10));
        });
    }

    #[test]
    fn each_flushed_response_gets_its_own_deadline() {
        runtime().block_on(async {
            let (ours, mut theirs) = tokio::io::duplex(64);
            let mut w = WriteDeadline::new(ours, Duration::from_secs(10));
            let reader = tokio::spawn(async move {
                let mut got = 0;
                let mut buf = [0u8; 64];
                // A slow but steady reader: 100 bytes every 6 s, each response in time.
                while got < 300 {
                    tokio::time::sleep(Duration::from_secs(6)).await;
                    let mut n = 0;
                    while n < 100 {
                        n += theirs.read(&mut buf[..(100 - n).min(64)]).await.unwrap();
                    }
                    got += n;
                }
                got
            });
            for _ in 0..3 {
                w.write_all(&[1u8; 100]).await.unwrap();
                w.flush().await.unwrap();
            }
            assert_eq!(reader.await.unwrap(), 300);
        });
    }
}
