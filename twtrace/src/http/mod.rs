//! The metrics server of `twtrace serve`: hyper on its own thread and runtime, serving the
//! exposition text the tracer loop last rendered ([`snapshot`]), so nothing a client does can
//! hold up the tracer.
//!
//! Every limit is here, in one place (the README's Security section lists them):
//! a cap on connections, a deadline for the request head and one for writing each response,
//! a bound on the head's size, bounded keep-alive, backoff on accept errors, rate-limited logs,
//! and optional TLS and basic auth from a `--web.config.file` ([`web_config`]).

pub mod auth;
pub mod deadline;
pub mod ratelog;
pub mod routes;
pub mod server;
pub mod snapshot;
pub mod web_config;

use std::time::Duration;

/// Connections served at once. Past it, new connections wait in the kernel's listen backlog
/// (holding no fd of twtrace's) until one of these ends; each ends within the deadlines below.
pub const MAX_CONNECTIONS: usize = 64;
/// Listen backlog: connections the kernel queues for twtrace beyond [`MAX_CONNECTIONS`].
pub const LISTEN_BACKLOG: u32 = 128;
/// The whole request head must arrive within this (from the first byte awaited, so it also
/// bounds an idle keep-alive connection), and a TLS handshake too.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// A response must be written out within this from its first byte: a client that never reads
/// loses its connection.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of request head buffered at most (hyper's minimum is 8 KiB); more is 431.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Socket send buffer of each connection (the kernel doubles it), instead of autotuning up
/// to megabytes: bounds the kernel memory a client that never reads can pin, and makes its
/// responses back up into the write deadline. An exposition (150 KB at most) still goes out
/// at 1 MB/s over a 100 ms round trip.
pub const SEND_BUFFER: u32 = 64 * 1024;
/// Header fields in a request head at most; more is 431.
pub const MAX_HEADERS: usize = 64;
/// Requests served on one keep-alive connection, after which it is closed.
pub const MAX_REQUESTS_PER_CONNECTION: u32 = 100;
/// A connection's whole life at most, keep-alive included (then closed after the response in
/// flight).
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(120);
/// Accept errors (EMFILE...): the first retry waits this, each failure after doubles it...
pub const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// ... up to this.
pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// One log line per kind of error per this interval; the rest are counted in the next line.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);
