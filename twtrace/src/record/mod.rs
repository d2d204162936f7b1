//! Trace files: what `twtrace record` writes and `report`, `replay` and `compare` read.
//!
//! Format: newline-delimited JSON, the first object a [`Header`], every other one an
//! [`Event`] (the aggregator's input, tagged by `ev`), compressed as a sequence of independent
//! zstd frames, one per second (or per [`FRAME_TARGET_BYTES`], whichever comes first), each
//! with a content checksum.
//!
//! The writer ([`writer`]) and the reader ([`reader`]) agree on a frame's bounds: the reader
//! holds a few frames at a time, never the file, so reading any file takes bounded memory.
//!
//! Why this over a binary format of our own, Arrow IPC or Parquet:
//! - any tool that reads zstd reads it: `zstdcat f.twt | jq`, DuckDB's `read_json`, pandas'
//!   `read_json(lines=True, compression="zstd")`; no twtrace needed;
//! - a frame per second makes it a stream that survives a crash: after `kill -9` only the frame
//!   being built is lost; a truncated or damaged file still opens, from the next good frame;
//! - zstd (a well-kept library, with checksums) removes the repetition of JSON keys: a
//!   recording at churn costs a few tens of bytes per event (BENCH.md has the measured figure);
//! - Parquet needs its footer, so a killed recording is unreadable; Arrow IPC would add a large
//!   dependency and leave jq out.

mod parse;
pub mod reader;
pub mod session;
mod split;
pub mod writer;

use std::{io, path::Path};

use serde::{Deserialize, Serialize};

use crate::{
    event::{Event, NetnsSettings},
    safe_file::SafeFileError,
};

pub use reader::Reader;
pub use session::Session;
pub use writer::{Recorder, Rotation};

pub const FORMAT: &str = "twtrace-trace";
pub const VERSION: u32 = 1;
/// zstd's frame magic number, little-endian.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
/// The recorder compresses on the host it observes, at that host's churn rate. On recorded
/// churn, level 1 made frames 4 % bigger than level 6 (13.1 against 12.6 bytes per event) and
/// ran 6.5 times faster (1.65 GB/s against 0.25 GB/s of JSON lines).
const LEVEL: i32 = 1;

/// The writer ends a frame once it holds this much text, or [`FRAME_TARGET_LINES`] lines,
/// before its second is up: at 100,000 TIME_WAITs a second (two lines of about 150 bytes
/// each) that is a frame every 0.15 s.
pub const FRAME_TARGET_BYTES: usize = 4 << 20;
pub const FRAME_TARGET_LINES: usize = 32_768;
/// What the reader accepts: four times what the writer makes (a line may overshoot). A larger
/// frame is no frame of twtrace's (a decompression bomb, say): it is skipped, said in a
/// warning, without its memory ever being taken.
pub const MAX_FRAME_BYTES: usize = 4 * FRAME_TARGET_BYTES;
pub const MAX_FRAME_LINES: usize = 4 * FRAME_TARGET_LINES;

/// First line of every trace file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Header {
    /// Always "header": lets `jq 'select(.ev == "header")'` find it.
    pub ev: String,
    pub format: String,
    pub version: u32,
    pub hostname: String,
    pub kernel: String,
    /// RFC 3339.
    pub boot_time: String,
    pub twtrace_version: String,
    pub command_line: Vec<String>,
    /// CONFIG_HZ, which timer lengths in events are counted in.
    pub hz: u32,
    /// CLOCK_REALTIME - CLOCK_MONOTONIC in ns: event `ts_ns` + this = Unix time in ns.
    pub clock_offset_ns: i128,
    /// Settings of each traced namespace at the start, by inode.
    pub settings: std::collections::BTreeMap<String, NetnsSettings>,
    /// What the recording kernel could not show, one line each (`twtrace check`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub degraded: Vec<String>,
    /// Which recording this file belongs to and where in its rotation. Absent in recordings
    /// made before rotations restated their state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain: Option<Chain>,
}

/// A file's place in one `record` run: every file of a rotation has the same `recording`,
/// and `sequence` counts them from 0, so files out of order, or one missing, are seen.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chain {
    /// Random, 16 hex digits.
    pub recording: String,
    pub sequence: u64,
    /// For a file a rotation began: what it carries over from the files before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub carried: Option<Carried>,
}

/// The state of a recording when a rotation began a file. The TIME_WAITs alive then follow
/// the header as `tw_existing` events (with `seen`); these are the running counts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Carried {
    pub ts_ns: u64,
    /// TIME_WAITs restated after the header.
    pub alive: u64,
    /// What the files before this one counted.
    pub totals: crate::aggregate::Totals,
    /// Cumulative since the recording began (as snapshots carry them): a report that starts
    /// at this file counts from these.
    pub passive_closes: Vec<(u32, u64)>,
    pub loss: crate::kernel::tracer::Loss,
}

impl Chain {
    /// The first file of a new recording.
    pub fn first() -> Self {
        let mut id = [0u8; 8];
        // A clock-based id if getrandom fails: only distinctness matters.
        if rustix::rand::getrandom(&mut id, rustix::rand::GetRandomFlags::empty()).is_err() {
            let ns = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            id = (ns ^ u64::from(std::process::id()) << 40).to_le_bytes();
        }
        Self {
            recording: id.iter().map(|b| format!("{b:02x}")).collect(),
            sequence: 0,
            carried: None,
        }
    }
}

impl Header {
    /// A header of this format and version for `hostname`; what else describes the host is
    /// left empty for the caller to fill in.
    pub fn new(hostname: impl Into<String>, hz: u32) -> Self {
        Self {
            ev: "header".into(),
            format: FORMAT.into(),
            version: VERSION,
            hostname: hostname.into(),
            kernel: String::new(),
            boot_time: String::new(),
            twtrace_version: String::new(),
            command_line: vec![],
            hz,
            clock_offset_ns: 0,
            settings: Default::default(),
            degraded: Vec::new(),
            chain: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("{path}: not a twtrace trace ({why})")]
    NotATrace { path: String, why: String },
    #[error(
        "{path}: two recordings one after the other (a second header in frame {frame}): give each recording to twtrace as a file of its own"
    )]
    Concatenated { path: String, frame: usize },
    #[error(
        "{path}: trace format version {found} is newer than this twtrace reads ({VERSION}): read it with a newer twtrace"
    )]
    Version { path: String, found: u32 },
    #[error(transparent)]
    File(#[from] SafeFileError),
}

impl RecordError {
    /// The user can correct it (another output path, --force).
    pub fn is_usage(&self) -> bool {
        matches!(self, Self::File(e) if e.is_usage())
    }
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> RecordError + '_ {
    move |source| RecordError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// A recording read back frame by frame, in order: a file ([`Reader`]) or, in tests, events
/// held in memory ([`InMemory`]).
pub trait Frames {
    fn header(&self) -> &Header;
    /// The next frame's events; `None` at the end.
    fn next_frame(&mut self) -> Result<Option<Vec<Event>>, RecordError>;
    /// The damage found so far, one sentence each (complete once `next_frame` gave `None`).
    fn warnings(&self) -> Vec<String>;
    /// The timestamp of the first event, reading ahead as far as the first frame with one.
    fn first_ts_ns(&mut self) -> Result<Option<u64>, RecordError>;
}

/// Events in memory, as a recording would give them.
pub struct InMemory {
    pub header: Header,
    pub frames: std::collections::VecDeque<Vec<Event>>,
    pub warnings: Vec<String>,
}

impl Frames for InMemory {
    fn header(&self) -> &Header {
        &self.header
    }

    fn next_frame(&mut self) -> Result<Option<Vec<Event>>, RecordError> {
        Ok(self.frames.pop_front())
    }

    fn warnings(&self) -> Vec<String> {
        self.warnings.clone()
    }

    fn first_ts_ns(&mut self) -> Result<Option<u64>, RecordError> {
        Ok(self.frames.iter().flatten().next().map(Event::ts_ns))
    }
}

#[cfg(test)]
mod rotation_tests;
#[cfg(test)]
mod tests;
