//! The exposition text, handed from the tracer loop to the HTTP thread.
//!
//! The tracer loop owns the aggregator and renders; the HTTP side only ever clones the last
//! rendered text (a reference count), so it never holds anything of the tracer's while it
//! writes to a socket. A scrape takes a rendering younger than [`MIN_RENDER_INTERVAL`] as it
//! is, and otherwise asks for a fresh one and waits a little for it; the loop renders at most
//! once per [`MIN_RENDER_INTERVAL`] on request (and once per tick), so a flood of scrapes costs
//! the tracer at most ten renderings a second.

use std::{sync::Arc, time::Duration};

use hyper::body::Bytes;
use tokio::{
    sync::{Notify, watch},
    time::Instant,
};

/// Renderings on request at most this often; one this young is fresh.
pub const MIN_RENDER_INTERVAL: Duration = Duration::from_millis(100);
/// How long a scrape waits for a fresh rendering before it takes the last one.
pub const FRESH_WAIT: Duration = Duration::from_secs(1);

/// The tracer loop's end.
pub struct Publisher {
    tx: watch::Sender<(Bytes, Instant)>,
    wanted: Arc<Notify>,
    pending: bool,
    last: Instant,
}

/// The HTTP side's end.
#[derive(Clone)]
pub struct Reader {
    rx: watch::Receiver<(Bytes, Instant)>,
    wanted: Arc<Notify>,
}

/// A channel starting with `first` (the exposition before any event).
pub fn channel(first: String) -> (Publisher, Reader) {
    let (tx, rx) = watch::channel((Bytes::from(first), Instant::now()));
    let wanted = Arc::new(Notify::new());
    (
        Publisher {
            tx,
            wanted: wanted.clone(),
            pending: false,
            last: Instant::now(),
        },
        Reader { rx, wanted },
    )
}

impl Publisher {
    /// Resolves when a scrape wants a fresh rendering and [`MIN_RENDER_INTERVAL`] has passed
    /// since the last one. Cancel-safe (for `select!`): a request seen is remembered.
    pub async fn wanted(&mut self) {
        if !self.pending {
            self.wanted.notified().await;
            self.pending = true;
        }
        tokio::time::sleep_until(self.last + MIN_RENDER_INTERVAL).await;
    }

    /// Hands a new rendering to the HTTP side.
    pub fn publish(&mut self, text: String) {
        self.pending = false;
        self.last = Instant::now();
        self.tx.send_replace((Bytes::from(text), self.last));
    }
}

impl Reader {
    /// The exposition: a fresh rendering if the tracer loop makes one within [`FRESH_WAIT`],
    /// else the last one.
    pub async fn latest(&self) -> Bytes {
        let mut rx = self.rx.clone();
        {
            let (text, at) = &*rx.borrow_and_update();
            if at.elapsed() < MIN_RENDER_INTERVAL {
                return text.clone();
            }
        }
        self.wanted.notify_one();
        let _ = tokio::time::timeout(FRESH_WAIT, rx.changed()).await;
        rx.borrow().0.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scrape_gets_a_fresh_rendering_and_floods_are_coalesced() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            let (mut p, r) = channel("0".into());
            let renders = tokio::spawn(async move {
                let mut n = 0;
                let until = Instant::now() + Duration::from_secs(1);
                loop {
                    tokio::select! {
                        _ = p.wanted() => { n += 1; p.publish(n.to_string()); }
                        _ = tokio::time::sleep_until(until) => return n,
                    }
                }
            });
            // The first text is fresh for a moment, then a scrape asks for a new one.
            assert_eq!(r.latest().await, "0");
            tokio::time::sleep(MIN_RENDER_INTERVAL).await;
            assert_eq!(r.latest().await, "1");
            // 1000 scrapes in a second: at most one rendering per interval.
            let mut scrapes = Vec::new();
            for _ in 0..1000 {
                let r = r.clone();
                scrapes.push(tokio::spawn(async move { r.latest().await }));
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let n = renders.await.unwrap();
            assert!(n <= 11, "{n} renderings");
            for s in scrapes {
                assert!(!s.await.unwrap().is_empty());
            }
        });
    }

    #[test]
    fn without_a_renderer_a_scrape_takes_the_last_text() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            let (_p, r) = channel("old".into());
            tokio::time::sleep(MIN_RENDER_INTERVAL).await;
            let start = Instant::now();
            assert_eq!(r.latest().await, "old");
            assert_eq!(start.elapsed(), FRESH_WAIT);
        });
    }
}
