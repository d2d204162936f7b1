//! Writing a recording: a header frame, then a frame a second, each bounded in size so that
//! every frame it writes is one the reader accepts.

use std::{
    fs::File,
    io::Write,
    path::{Path, PathBuf},
};

use super::{
    Carried, Chain, FRAME_TARGET_BYTES, FRAME_TARGET_LINES, Header, LEVEL, RecordError, io_err,
};
use crate::{
    event::{Event, TwExisting},
    safe_file::{Existing, Owner, Target},
};

/// A start-up scan is written in parts of this many sockets (about 150 bytes each), so one
/// line stays far below a frame's bound however many TIME_WAITs the host holds.
const SCAN_PART: usize = 8192;

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
    /// Bytes of events written to this file (its header and restatement left out): a file
    /// is rotated only once it holds some, however small `--max-size`.
    body: u64,
    buf: Vec<u8>,
    /// Lines in `buf`.
    lines: usize,
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
        mut header: Header,
        rotation: Rotation,
    ) -> Result<Self, RecordError> {
        header.chain.get_or_insert_with(Chain::first);
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
            body: 0,
            buf: Vec::with_capacity(1 << 20),
            lines: 0,
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

    /// Adds an event to the frame being built; a full frame is written at once, so no frame
    /// exceeds [`FRAME_TARGET_BYTES`] by more than a line.
    pub fn push(&mut self, ev: &Event) -> Result<(), RecordError> {
        match ev {
            Event::TwExisting {
                ts_ns,
                sockets,
                more,
            } if sockets.len() > SCAN_PART => {
                let parts = sockets.len().div_ceil(SCAN_PART);
                for (i, part) in sockets.chunks(SCAN_PART).enumerate() {
                    self.push_one(&Event::TwExisting {
                        ts_ns: *ts_ns,
                        sockets: part.to_vec(),
                        more: *more || i + 1 < parts,
                    })?;
                }
                Ok(())
            }
            _ => self.push_one(ev),
        }
    }

    fn push_one(&mut self, ev: &Event) -> Result<(), RecordError> {
        serde_json::to_writer(&mut self.buf, ev).expect("events serialize");
        self.buf.push(b'\n');
        self.events += 1;
        self.lines += 1;
        if self.buf.len() >= FRAME_TARGET_BYTES || self.lines >= FRAME_TARGET_LINES {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes what was pushed since the last flush as one frame. It never rotates: a new
    /// file must restate what the events so far left alive, which [`super::Session`] knows.
    pub fn flush(&mut self) -> Result<(), RecordError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let buf = std::mem::take(&mut self.buf);
        self.write_frame(&buf)?;
        self.body += buf.len() as u64;
        self.buf = buf;
        self.buf.clear();
        self.lines = 0;
        Ok(())
    }

    /// Whether the current file has reached `--max-size`.
    pub fn rotation_due(&self) -> bool {
        self.rotation.max_bytes > 0 && self.written >= self.rotation.max_bytes && self.body > 0
    }

    /// Starts the next file: the header, with its place in the rotation and `carried`, then
    /// the TIME_WAITs `alive` at this moment (in parts, as a start-up scan), so that this
    /// file and those after it report right without the ones before.
    pub fn rotate(&mut self, carried: Carried, alive: Vec<TwExisting>) -> Result<(), RecordError> {
        self.flush()?;
        self.file = self.target.rotate(self.rotation.keep, self.owner)?;
        self.written = 0;
        let ts_ns = carried.ts_ns;
        let chain = self.header.chain.get_or_insert_with(Chain::first);
        chain.sequence += 1;
        chain.carried = Some(carried);
        self.write_header()?;
        self.push(&Event::TwExisting {
            ts_ns,
            sockets: alive,
            more: false,
        })?;
        self.flush()?;
        self.body = 0;
        Ok(())
    }

    /// This file's header as written.
    pub fn header(&self) -> &Header {
        &self.header
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
