//! Trace files: what `twtrace record` writes and `report`, `replay` and `compare` read.
//!
//! Format: newline-delimited JSON, the first object a [`Header`], every other one an
//! [`Event`] (the aggregator's input, tagged by `ev`), compressed as a sequence of independent
//! zstd frames, one per second, each with a content checksum.
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

use std::{
    fs::{self, File},
    io::{self, Write},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{
    event::{Event, NetnsSettings},
    safe_file::{Existing, Owner, SafeFileError, Target},
};

pub const FORMAT: &str = "twtrace-trace";
pub const VERSION: u32 = 1;
/// zstd's frame magic number, little-endian.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
/// The recorder compresses on the host it observes, at that host's churn rate. On recorded
/// churn, level 1 made frames 4 % bigger than level 6 (13.1 against 12.6 bytes per event) and
/// ran 6.5 times faster (1.65 GB/s against 0.25 GB/s of JSON lines).
const LEVEL: i32 = 1;

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
    #[error("{path}: trace format version {found} is newer than this twtrace reads ({VERSION})")]
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

/// Where and how to rotate.
#[derive(Clone, Debug)]
pub struct Rotation {
    /// Start a new file once this many bytes are written (0: never).
    pub max_bytes: u64,
    /// Rotated files kept besides the current one (FILE.1 ... FILE.N).
    pub keep: u32,
}

/// Writes a trace file, one zstd frame per [`Recorder::flush`].
pub struct Recorder {
    path: PathBuf,
    /// The file's directory, opened once: rotation renames within it.
    target: Target,
    header: Header,
    file: File,
    written: u64,
    buf: Vec<u8>,
    compressor: zstd::bulk::Compressor<'static>,
    rotation: Rotation,
    owner: Owner,
    pub events: u64,
    pub bytes: u64,
}

impl Recorder {
    /// Whether [`Recorder::create`] would refuse `path` now: lets `record` say so before it
    /// attaches to the kernel.
    pub fn check(path: &Path, existing: Existing) -> Result<(), RecordError> {
        Ok(Target::new(path)?.check(existing)?)
    }

    /// Creates `path`, mode 0600, owned by the invoking user under sudo (see
    /// [`crate::safe_file`]): refuses an existing file, or replaces it atomically with
    /// [`Existing::Replace`]; never writes through a symbolic link.
    pub fn create(
        path: &Path,
        existing: Existing,
        header: Header,
        rotation: Rotation,
    ) -> Result<Self, RecordError> {
        let owner = sudo_owner();
        let target = Target::new(path)?;
        let mut compressor = zstd::bulk::Compressor::new(LEVEL).map_err(io_err(path))?;
        compressor
            .set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))
            .map_err(io_err(path))?;
        let mut r = Self {
            path: path.to_path_buf(),
            file: target.create(existing, owner)?,
            target,
            header,
            written: 0,
            buf: Vec::with_capacity(1 << 20),
            compressor,
            rotation,
            owner,
            events: 0,
            bytes: 0,
        };
        r.write_header()?;
        Ok(r)
    }

    /// Starts a file: its header, in a frame of its own.
    fn write_header(&mut self) -> Result<(), RecordError> {
        let mut line = serde_json::to_vec(&self.header).expect("header serializes");
        line.push(b'\n');
        self.write_frame(&line)
    }

    fn write_frame(&mut self, data: &[u8]) -> Result<(), RecordError> {
        let frame = self.compressor.compress(data).map_err(io_err(&self.path))?;
        self.file.write_all(&frame).map_err(io_err(&self.path))?;
        self.written += frame.len() as u64;
        self.bytes += frame.len() as u64;
        Ok(())
    }

    pub fn push(&mut self, ev: &Event) {
        serde_json::to_writer(&mut self.buf, ev).expect("events serialize");
        self.buf.push(b'\n');
        self.events += 1;
    }

    /// Writes what was pushed since the last flush as one frame; rotates if due.
    pub fn flush(&mut self) -> Result<(), RecordError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let buf = std::mem::take(&mut self.buf);
        self.write_frame(&buf)?;
        self.buf = buf;
        self.buf.clear();
        if self.rotation.max_bytes > 0 && self.written >= self.rotation.max_bytes {
            self.rotate()?;
        }
        Ok(())
    }

    fn rotate(&mut self) -> Result<(), RecordError> {
        self.file = self.target.rotate(self.rotation.keep, self.owner)?;
        self.written = 0;
        self.write_header()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

/// The user who ran `sudo twtrace`, so the recording is theirs (set through the fd).
fn sudo_owner() -> Owner {
    let id = |var| {
        std::env::var(var)
            .ok()?
            .parse::<u32>()
            .ok()
            .filter(|&n| n != u32::MAX)
    };
    Some((id("SUDO_UID")?, id("SUDO_GID")?))
}

/// A trace file read back, with what had to be skipped.
pub struct Trace {
    pub header: Header,
    /// The events, frame by frame, in file order.
    pub frames: Vec<Vec<Event>>,
    /// Damage found and skipped, one sentence each.
    pub warnings: Vec<String>,
}

impl Trace {
    pub fn events(&self) -> impl Iterator<Item = &Event> {
        self.frames.iter().flatten()
    }

    pub fn into_events(self) -> std::iter::Flatten<std::vec::IntoIter<Vec<Event>>> {
        self.frames.into_iter().flatten()
    }

    pub fn first_ts_ns(&self) -> Option<u64> {
        self.events().next().map(Event::ts_ns)
    }
}

/// Reads a whole trace file. A truncated or partly corrupt file is read up to and around the
/// damage, which `warnings` describes.
pub fn read(path: &Path) -> Result<Trace, RecordError> {
    let name = path.display().to_string();
    // The magic first: a file that is no recording (a sparse gigabyte of zeros, say) is
    // refused before it is read.
    let mut magic = [0u8; 4];
    let is_zstd = fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .map(|()| magic == ZSTD_MAGIC);
    match is_zstd {
        Ok(true) => {}
        Ok(false) => {
            return Err(RecordError::NotATrace {
                path: name,
                why: "it does not start with a zstd frame".into(),
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(RecordError::NotATrace {
                path: name,
                why: "it does not start with a zstd frame".into(),
            });
        }
        Err(e) => return Err(io_err(path)(e)),
    }
    let data = fs::read(path).map_err(io_err(path))?;
    let mut warnings = Vec::new();
    let mut frames: Vec<&[u8]> = Vec::new();
    let mut off = 0usize;
    while off < data.len() {
        let rest = &data[off..];
        match zstd::zstd_safe::find_frame_compressed_size(rest)
            .ok()
            .filter(|&n| n <= rest.len())
        {
            Some(n) => {
                frames.push(&rest[..n]);
                off += n;
            }
            None => {
                // Cut short: skip to the next frame, if any.
                let next = data[off + 1..]
                    .windows(4)
                    .position(|w| w == ZSTD_MAGIC)
                    .map(|p| off + 1 + p);
                match next {
                    Some(n) => {
                        warnings.push(format!(
                            "{name}: damaged data at bytes {off}..{n} skipped (about a second of events lost)"
                        ));
                        off = n;
                    }
                    None => {
                        warnings.push(format!(
                            "{name}: file cut short at byte {off} of {}: the last second or so of events is lost",
                            data.len()
                        ));
                        break;
                    }
                }
            }
        }
    }
    // Frames are independent (each holds whole lines): decompress and parse them on every
    // CPU, in contiguous runs so the events stay in file order.
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per = frames.len().div_ceil(workers).max(1);
    let parsed: Vec<Vec<Frame>> = std::thread::scope(|scope| {
        let handles: Vec<_> = frames
            .chunks(per)
            .map(|run| {
                scope.spawn(move || {
                    let mut reader = FrameReader::new(MAX_FRAME_BYTES);
                    run.iter().map(|f| reader.parse(f)).collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let first = parsed.first().and_then(|run| run.first());
    let header: Header = match first {
        Some(f) if f.header.as_ref().is_some_and(|h| h.format == FORMAT) => {
            f.header.clone().expect("checked")
        }
        // The header frame is damaged but events follow: read them with what can be inferred.
        Some(f) if f.damaged && parsed.iter().flatten().any(|f| !f.events.is_empty()) => {
            let hz = infer_hz(parsed.iter().flatten().flat_map(|f| &f.events)).unwrap_or(250);
            warnings.push(format!(
                "{name}: the header frame is damaged: host, kernel and settings are unknown; CONFIG_HZ {hz} inferred from the TIME_WAIT timers"
            ));
            Header::new("unknown", hz)
        }
        _ => {
            return Err(RecordError::NotATrace {
                path: name,
                why: "no twtrace header".into(),
            });
        }
    };
    if let Some(i) = parsed
        .iter()
        .flatten()
        .skip(1)
        .position(|f| f.header.is_some())
    {
        return Err(RecordError::Concatenated {
            path: name,
            frame: i + 1,
        });
    }
    if header.version > VERSION {
        return Err(RecordError::Version {
            path: name,
            found: header.version,
        });
    }
    // Kept per frame: one vector of ten million events would be copied and faulted in again.
    let mut frames = Vec::with_capacity(frames.len());
    let (mut bad, mut damaged) = (0u64, 0u64);
    for f in parsed.into_iter().flatten() {
        frames.push(f.events);
        bad += f.bad;
        damaged += u64::from(f.damaged);
    }
    if damaged > 0 {
        warnings.push(format!(
            "{name}: {damaged} damaged frames skipped (about a second of events lost each)"
        ));
    }
    if bad > 0 {
        warnings.push(format!("{name}: {bad} unreadable lines skipped"));
    }
    Ok(Trace {
        header,
        frames,
        warnings,
    })
}

/// CONFIG_HZ from the events themselves: a true TIME_WAIT is armed for 60 s, so the most
/// common timer length of TIME_WAIT-substate starts is 60 x HZ.
fn infer_hz<'a>(events: impl Iterator<Item = &'a Event>) -> Option<u32> {
    let mut counts: std::collections::HashMap<u32, u64> = std::collections::HashMap::new();
    for e in events {
        if let Event::TwEnter(t) = e
            && t.substate == crate::event::Substate::TimeWait
            && t.recovered.is_none()
            && t.timeout_jiffies > 0
        {
            *counts.entry(t.timeout_jiffies).or_default() += 1;
        }
    }
    let (jiffies, _) = counts.into_iter().max_by_key(|&(j, n)| (n, j))?;
    // Armed a jiffy or two late at most: round to a whole HZ.
    let hz = (f64::from(jiffies) / 60.0).round() as u32;
    [100u32, 250, 300, 1000]
        .into_iter()
        .min_by_key(|c| c.abs_diff(hz))
}

/// One frame's events.
#[derive(Default)]
struct Frame {
    /// The frame's first line, when it is a header (the first frame of every file).
    header: Option<Header>,
    events: Vec<Event>,
    /// Lines that are not events.
    bad: u64,
    /// The frame failed its checksum or would not decompress.
    damaged: bool,
}

/// The most a frame may inflate to. The recorder writes a frame a second; a second of events
/// at a million TIME_WAITs a second (each a start and an end line of about 120 bytes) is about
/// 240 MB. A larger frame is no frame of twtrace's (a decompression bomb): it is skipped as
/// damaged, without its memory ever being taken.
pub const MAX_FRAME_BYTES: usize = 256 << 20;

/// Decompresses and parses frames, reusing its context and buffer from one frame to the next
/// (a fresh buffer per frame is fresh pages to fault in).
struct FrameReader {
    dctx: Option<zstd::bulk::Decompressor<'static>>,
    buf: Vec<u8>,
    limit: usize,
}

impl FrameReader {
    fn new(limit: usize) -> Self {
        Self {
            dctx: None,
            buf: Vec::new(),
            limit,
        }
    }

    fn decompress(&mut self, frame: &[u8]) -> bool {
        let declared = zstd::zstd_safe::get_frame_content_size(frame)
            .ok()
            .flatten()
            .unwrap_or(0);
        if declared > self.limit as u64 {
            return false;
        }
        let size = declared as usize;
        self.buf.clear();
        if size > 0 {
            if self.dctx.is_none() {
                self.dctx = zstd::bulk::Decompressor::new().ok();
            }
            self.buf.reserve(size);
            if let Some(d) = &mut self.dctx
                && d.decompress_to_buffer(frame, &mut self.buf).is_ok()
            {
                return true;
            }
        }
        // The size is not in the frame header, or the bulk call failed: stream it, reading
        // one byte past the limit to tell a frame that is too large.
        let Ok(dec) = zstd::stream::read::Decoder::new(frame) else {
            return false;
        };
        let mut limited = std::io::Read::take(dec, self.limit as u64 + 1);
        match std::io::Read::read_to_end(&mut limited, &mut self.buf) {
            Ok(n) if n <= self.limit => true,
            _ => {
                self.buf = Vec::new();
                false
            }
        }
    }

    fn parse(&mut self, frame: &[u8]) -> Frame {
        if !self.decompress(frame) {
            return Frame {
                damaged: true,
                ..Frame::default()
            };
        }
        let text = &self.buf[..];
        let mut out = Frame {
            events: Vec::with_capacity(text.iter().filter(|&&b| b == b'\n').count()),
            ..Frame::default()
        };
        // UTF-8 is checked once for the frame (fast, vectorised), not string by string; a frame
        // with a bad byte is checked line by line so only that line is lost.
        let whole = std::str::from_utf8(text).is_ok();
        let mut first = true;
        for raw in text.split(|&b| b == b'\n') {
            let line = if whole {
                // SAFETY: a sub-slice of valid UTF-8 cut at ASCII newlines is valid UTF-8.
                unsafe { std::str::from_utf8_unchecked(raw) }
            } else {
                match std::str::from_utf8(raw) {
                    Ok(l) => l,
                    Err(_) => {
                        out.bad += 1;
                        continue;
                    }
                }
            };
            if line.is_empty() {
                continue;
            }
            let is_first = std::mem::take(&mut first);
            // A header (the first line of a file; rotation writes one per file) is not an event.
            if line.starts_with(r#"{"ev":"header""#) {
                if is_first {
                    out.header = serde_json::from_str(line).ok();
                }
                continue;
            }
            match Event::from_json(line) {
                Ok(e) => out.events.push(e),
                Err(_) => out.bad += 1,
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_frame_that_inflates_past_the_limit_is_damaged_not_allocated() {
        // Two MiB of one line, against a reader limited to one: refused, with or without the
        // size in the frame's header.
        let text = vec![b'x'; 2 << 20];
        let with_size = zstd::bulk::compress(&text, 1).unwrap();
        let mut streamed = Vec::new();
        {
            let mut enc = zstd::stream::write::Encoder::new(&mut streamed, 1).unwrap();
            enc.include_contentsize(false).unwrap();
            std::io::Write::write_all(&mut enc, &text).unwrap();
            enc.finish().unwrap();
        }
        for frame in [&with_size, &streamed] {
            let mut r = super::FrameReader::new(1 << 20);
            assert!(r.parse(frame).damaged);
            assert!(r.buf.capacity() <= 2 << 20);
            let mut r = super::FrameReader::new(4 << 20);
            assert!(!r.parse(frame).damaged);
        }
    }

    #[test]
    fn a_file_that_is_no_recording_is_refused_before_it_is_read() {
        let dir = std::env::temp_dir().join(format!("twt-magic-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("zeros.twt");
        let f = std::fs::File::create(&p).unwrap();
        // A sparse gigabyte: reading it whole would cost a gigabyte.
        f.set_len(1 << 30).unwrap();
        let e = super::read(&p).err().expect("refused");
        assert!(
            e.to_string().contains("does not start with a zstd frame"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    use super::*;
    use crate::aggregate::tests::{end, enter};
    use crate::event::{EndReason, Substate, TwKey};

    fn header() -> Header {
        Header {
            kernel: "6.18".into(),
            boot_time: "2026-01-01T00:00:00Z".into(),
            twtrace_version: "0".into(),
            command_line: vec!["twtrace".into(), "record".into()],
            ..Header::new("h", 250)
        }
    }

    fn tmp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("twtrace-{}-{name}", std::process::id()))
    }

    fn write(path: &Path, seconds: u64) -> Vec<Event> {
        let mut r = Recorder::create(
            path,
            Existing::Refuse,
            header(),
            Rotation {
                max_bytes: 0,
                keep: 0,
            },
        )
        .unwrap();
        let mut all = vec![];
        for s in 0..seconds {
            let k = TwKey::Cookie(s + 1);
            for e in [
                enter(k, s * 1_000_000_000, Substate::TimeWait),
                end(k, s * 1_000_000_000 + 5, EndReason::Expired),
            ] {
                r.push(&e);
                all.push(e);
            }
            r.flush().unwrap();
        }
        all
    }

    #[test]
    fn round_trip_and_permissions() {
        let p = tmp("rt.twt");
        let written = write(&p, 3);
        let t = read(&p).unwrap();
        assert_eq!(t.header, header());
        assert_eq!(t.events().cloned().collect::<Vec<_>>(), written);
        assert!(t.warnings.is_empty());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        fs::remove_file(p).unwrap();
    }

    #[test]
    fn truncated_file_keeps_whole_frames_and_says_so() {
        let p = tmp("trunc.twt");
        let written = write(&p, 5);
        let len = fs::metadata(&p).unwrap().len();
        let f = fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(len - 7).unwrap();
        let t = read(&p).unwrap();
        assert_eq!(
            t.events().cloned().collect::<Vec<_>>(),
            written[..8],
            "the last second is lost, no more"
        );
        assert!(t.warnings[0].contains("cut short"), "{:?}", t.warnings);
        fs::remove_file(p).unwrap();
    }

    #[test]
    fn corrupt_frame_is_skipped() {
        let p = tmp("corrupt.twt");
        let written = write(&p, 4);
        let mut data = fs::read(&p).unwrap();
        // Damage the middle of the file: one frame fails its checksum.
        let mid = data.len() / 2;
        data[mid] ^= 0xff;
        data[mid + 1] ^= 0xff;
        fs::write(&p, &data).unwrap();
        let t = read(&p).unwrap();
        assert!(!t.warnings.is_empty());
        assert!(
            t.events().count() >= written.len() - 4,
            "only the damaged frame is lost"
        );
        fs::remove_file(p).unwrap();
    }

    #[test]
    fn a_damaged_header_frame_still_opens_and_says_what_is_unknown() {
        let p = tmp("badheader.twt");
        let written = write(&p, 4);
        let mut data = fs::read(&p).unwrap();
        // Inside the first frame, past its zstd header: its checksum fails.
        data[12] ^= 0xff;
        data[13] ^= 0xff;
        fs::write(&p, &data).unwrap();
        let t = read(&p).unwrap();
        assert_eq!(t.header.hz, 250, "inferred from the 60 s timers");
        assert_eq!(t.header.hostname, "unknown");
        assert!(
            t.warnings
                .iter()
                .any(|w| w.contains("header frame is damaged")),
            "{:?}",
            t.warnings
        );
        assert!(t.events().count() >= written.len() - 2);
        fs::remove_file(p).unwrap();
    }

    #[test]
    fn two_recordings_one_after_the_other_are_refused_in_one_line() {
        let (a, b) = (tmp("cat-a.twt"), tmp("cat-b.twt"));
        write(&a, 2);
        write(&b, 2);
        let mut both = fs::read(&a).unwrap();
        both.extend(fs::read(&b).unwrap());
        fs::remove_file(&a).unwrap();
        fs::write(&a, &both).unwrap();
        let e = read(&a).err().expect("refused");
        assert!(matches!(e, RecordError::Concatenated { .. }), "{e}");
        assert!(e.to_string().contains("two recordings one after the other"));
        fs::remove_file(a).unwrap();
        fs::remove_file(b).unwrap();
    }

    #[test]
    fn rotation_keeps_n_files_each_with_a_header() {
        let p = tmp("rot.twt");
        let mut r = Recorder::create(
            &p,
            Existing::Refuse,
            header(),
            Rotation {
                max_bytes: 1,
                keep: 2,
            },
        )
        .unwrap();
        for s in 0..5u64 {
            r.push(&enter(TwKey::Cookie(s + 1), s, Substate::TimeWait));
            r.flush().unwrap();
        }
        drop(r);
        for f in [
            p.clone(),
            PathBuf::from(format!("{}.1", p.display())),
            PathBuf::from(format!("{}.2", p.display())),
        ] {
            assert_eq!(read(&f).unwrap().header.format, FORMAT, "{}", f.display());
            fs::remove_file(f).unwrap();
        }
        assert!(!Path::new(&format!("{}.3", p.display())).exists());
    }

    #[test]
    fn rejects_what_is_not_a_trace() {
        let p = tmp("nottrace");
        fs::write(&p, b"hello").unwrap();
        assert!(matches!(read(&p), Err(RecordError::NotATrace { .. })));
        fs::remove_file(p).unwrap();
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(proptest::num::u8::ANY, 0..400)) {
            let p = tmp(&format!("fuzz-{}", data.len()));
            let mut d = ZSTD_MAGIC.to_vec();
            d.extend(data);
            fs::write(&p, &d).unwrap();
            let _ = read(&p);
            fs::remove_file(p).unwrap();
        }
    }
}
