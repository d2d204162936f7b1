pub mod check;
pub mod compare;
pub mod docs;
pub mod live;
pub mod record;
pub mod report;
pub mod serve;
pub mod trace;

use std::{pin::Pin, time::Duration};

use anyhow::Context as _;
use tokio::signal::unix::{Signal, SignalKind, signal};

/// `--ring-mib` as bytes, after checking it is a power of two the kernel accepts.
pub fn ring_bytes(mib: u32) -> anyhow::Result<u32> {
    if !mib.is_power_of_two() || mib > 1024 {
        anyhow::bail!("--ring-mib must be a power of two between 1 and 1024");
    }
    Ok(mib << 20)
}

/// A one-line /proc file (hostname, kernel release), trimmed; empty if unreadable.
pub fn read_proc(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// When a running command should stop: SIGINT, SIGTERM, SIGHUP (the terminal or the ssh
/// session went away: summary, flush and terminal restored all the same), or the end of
/// `--duration`.
pub struct Stop {
    sigint: Signal,
    sigterm: Signal,
    sighup: Signal,
    /// `--duration`, counted from the first wait (once attached), not from start-up.
    duration: Option<f64>,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Stop {
    /// Takes over the signals at once (so one sent as soon as twtrace says it is tracing ends
    /// it cleanly); the `duration` starts with the first wait.
    pub fn new(duration: Option<f64>) -> anyhow::Result<Self> {
        Ok(Self {
            sigint: signal(SignalKind::interrupt()).context("SIGINT handler")?,
            sigterm: signal(SignalKind::terminate()).context("SIGTERM handler")?,
            sighup: signal(SignalKind::hangup()).context("SIGHUP handler")?,
            duration,
            deadline: None,
        })
    }

    /// Resolves once stopping is asked for; cancel-safe, for use in `select!`.
    pub async fn requested(&mut self) {
        if let Some(s) = self.duration.take() {
            self.deadline = Some(Box::pin(tokio::time::sleep(Duration::from_secs_f64(
                s.max(0.0),
            ))));
        }
        let deadline = async {
            match self.deadline.as_mut() {
                Some(d) => d.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = self.sigint.recv() => {}
            _ = self.sigterm.recv() => {}
            _ = self.sighup.recv() => {}
            _ = deadline => {}
        }
    }
}
