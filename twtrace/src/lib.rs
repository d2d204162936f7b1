//! twtrace explains TCP TIME_WAIT: which process closed first, how long each TIME_WAIT lived,
//! how it ended, and what TIME_WAIT costs.
//!
//! The pipeline: kernel programs (twtrace-ebpf) -> fixed-size records in a ring buffer ->
//! [`decode`] -> [`aggregate::Aggregator`] -> views ([`output`]).

pub mod advice;
pub mod aggregate;
pub mod alive;
pub mod cgroup;
pub mod cli;
pub mod compare;
pub mod decode;
pub mod event;
pub mod filter;
pub mod filter_now;
pub mod http;
pub mod kernel;
pub mod live;
pub mod metrics;
pub mod output;
pub mod reconcile;
pub mod record;
pub mod report;
pub mod safe_file;
pub mod source;
pub mod stats;
pub mod text;

/// The maps the per-event path touches. foldhash: their keys are kernel-made (cookies,
/// addresses, pids), and SipHash was a visible share of the reader's time at high churn.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
