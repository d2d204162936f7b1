//! Reading a recording back as a stream of frames in file order, in bounded memory.
//!
//! The file is read a piece at a time ([`Splitter`]); frames are decompressed and parsed on
//! worker threads, at most [`Reader::window`] of them ahead of the consumer. So the reader
//! holds at most `window` compressed frames and their events, plus one text buffer of at most
//! [`MAX_FRAME_BYTES`] per worker, whatever the file's size: with 4 workers (the most it
//! starts), about 8 x (16 + 16) MiB + 4 x 16 MiB = 320 MiB at the very worst, a few MiB for
//! twtrace's own recordings (README, Security).

use std::{
    collections::VecDeque,
    fs::File,
    io::{self, Read, Seek, SeekFrom},
    path::Path,
    sync::{
        Arc, Mutex,
        mpsc::{Receiver, SyncSender, sync_channel},
    },
    thread::JoinHandle,
};

use super::{
    FORMAT, Frames, Header, MAX_FRAME_BYTES, MAX_FRAME_LINES, RecordError, VERSION, ZSTD_MAGIC,
    io_err,
    parse::{Frame, FrameReader},
    split::{Piece, Splitter},
};
use crate::event::{Event, Substate};

/// What a recording is read from: a file, or bytes in memory (tests, fuzzing).
pub trait Source: Read + Seek + Send + 'static {}
impl<T: Read + Seek + Send + 'static> Source for T {}

/// At most this many frames are read past a damaged header to infer CONFIG_HZ.
const INFER_FRAMES: usize = 64;

type Job = (Vec<u8>, SyncSender<Frame>);

/// Frames read from the file and not yet handed to the consumer, in file order.
enum Pending {
    Parsing(Receiver<Frame>),
    Parsed(Box<Frame>),
}

/// Threads that parse frames; none for one CPU (and for fuzzing).
struct Pool {
    jobs: Option<SyncSender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

impl Pool {
    fn new(workers: usize) -> Self {
        if workers <= 1 {
            return Self {
                jobs: None,
                threads: Vec::new(),
            };
        }
        let (tx, rx) = sync_channel::<Job>(workers);
        let rx = Arc::new(Mutex::new(rx));
        let threads = (0..workers)
            .map(|_| {
                let rx = rx.clone();
                std::thread::spawn(move || {
                    let mut parser = FrameReader::default();
                    loop {
                        let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                        let Ok((frame, reply)) = job else { return };
                        let _ = reply.send(parser.parse(&frame));
                    }
                })
            })
            .collect();
        Self {
            jobs: Some(tx),
            threads,
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.jobs = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A recording, read frame by frame.
pub struct Reader {
    pub header: Header,
    name: String,
    split: Splitter<Box<dyn Source>>,
    /// Parses frames on this thread when there is no pool.
    inline: FrameReader,
    pool: Pool,
    pending: VecDeque<Pending>,
    window: usize,
    /// Read ahead by `first_ts_ns`.
    peeked: Option<Vec<Event>>,
    /// Frames handed out, the header's included: where a second header sits.
    frames: usize,
    warnings: Vec<String>,
    bad: u64,
    damaged: u64,
    oversized: u64,
    done: bool,
}

impl Reader {
    /// Opens a recording file. What is no recording is refused before more than its first
    /// bytes are read.
    pub fn open(path: &Path) -> Result<Self, RecordError> {
        let file = File::open(path).map_err(io_err(path))?;
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
        Self::from_source(&path.display().to_string(), Box::new(file), workers)
    }

    /// Reads a recording from `src`, parsing on `workers` threads (none for 0 or 1).
    pub fn from_source(
        name: &str,
        mut src: Box<dyn Source>,
        workers: usize,
    ) -> Result<Self, RecordError> {
        let io = |source: io::Error| RecordError::Io {
            path: name.to_string(),
            source,
        };
        let not_trace = |why: &str| RecordError::NotATrace {
            path: name.to_string(),
            why: why.to_string(),
        };
        // The magic first: a file that is no recording (a sparse gigabyte of zeros, say) is
        // refused before it is read.
        let mut magic = [0u8; 4];
        match src.read_exact(&mut magic) {
            Ok(()) if magic == ZSTD_MAGIC => {}
            Ok(()) => return Err(not_trace("it does not start with a zstd frame")),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(not_trace("it does not start with a zstd frame"));
            }
            Err(e) => return Err(io(e)),
        }
        src.seek(SeekFrom::Start(0)).map_err(io)?;
        let mut split = Splitter::new(src, name);
        let mut inline = FrameReader::default();
        let mut warnings = Vec::new();
        let first = match split.next_piece().map_err(io)? {
            Some(Piece::Frame(f)) => inline.parse(&f),
            Some(Piece::Damage(w)) => {
                warnings.push(w);
                Frame {
                    damaged: true,
                    ..Frame::default()
                }
            }
            None => return Err(not_trace("no twtrace header")),
        };
        // Lines of the header frame that are no events count with the others'.
        let first_bad = first.bad;
        let (header, rest) = match first {
            Frame {
                header: Some(h), ..
            } if h.format == FORMAT => {
                let events = first.events;
                (h, events)
            }
            // The header frame is damaged but events follow: read them with what can be
            // inferred from the frames that follow.
            Frame { header: None, .. } if first.damaged || first.oversized => {
                let resume = split.offset();
                let mut src = split.into_inner();
                let hz = infer_hz(&mut src, name, resume).map_err(io)?;
                let Some(hz) = hz else {
                    return Err(not_trace("no twtrace header"));
                };
                src.seek(SeekFrom::Start(resume)).map_err(io)?;
                split = Splitter::new(src, name).at(resume);
                warnings.push(format!(
                    "{name}: the header frame is damaged: host, kernel and settings are unknown; CONFIG_HZ {hz} inferred from the TIME_WAIT timers"
                ));
                (Header::new("unknown", hz), Vec::new())
            }
            _ => return Err(not_trace("no twtrace header")),
        };
        if header.version > VERSION {
            return Err(RecordError::Version {
                path: name.to_string(),
                found: header.version,
            });
        }
        let pool = Pool::new(workers);
        let window = if pool.jobs.is_some() { 2 * workers } else { 1 };
        Ok(Self {
            header,
            name: name.to_string(),
            split,
            inline,
            pool,
            pending: VecDeque::new(),
            window,
            peeked: (!rest.is_empty()).then_some(rest),
            frames: 1,
            warnings,
            bad: first_bad,
            damaged: 0,
            oversized: 0,
            done: false,
        })
    }

    /// Reads frames from the file until `window` are in flight or the file ends.
    fn read_ahead(&mut self) -> Result<(), RecordError> {
        while self.pending.len() < self.window {
            let piece = self.split.next_piece().map_err(|source| RecordError::Io {
                path: self.name.clone(),
                source,
            })?;
            match piece {
                None => return Ok(()),
                Some(Piece::Damage(w)) => self.warnings.push(w),
                Some(Piece::Frame(f)) => {
                    let p = match &self.pool.jobs {
                        Some(jobs) => {
                            let (tx, rx) = sync_channel(1);
                            match jobs.send((f, tx)) {
                                Ok(()) => Pending::Parsing(rx),
                                Err(_) => Pending::Parsed(Box::new(Frame {
                                    damaged: true,
                                    ..Frame::default()
                                })),
                            }
                        }
                        None => Pending::Parsed(Box::new(self.inline.parse(&f))),
                    };
                    self.pending.push_back(p);
                }
            }
        }
        Ok(())
    }

    fn next_parsed(&mut self) -> Result<Option<Vec<Event>>, RecordError> {
        if let Some(p) = self.peeked.take() {
            return Ok(Some(p));
        }
        loop {
            self.read_ahead()?;
            let Some(p) = self.pending.pop_front() else {
                self.finish();
                return Ok(None);
            };
            let f = match p {
                Pending::Parsed(f) => *f,
                Pending::Parsing(rx) => rx.recv().unwrap_or(Frame {
                    damaged: true,
                    ..Frame::default()
                }),
            };
            self.frames += 1;
            if f.header.is_some() {
                return Err(RecordError::Concatenated {
                    path: self.name.clone(),
                    frame: self.frames - 1,
                });
            }
            self.bad += f.bad;
            self.damaged += u64::from(f.damaged);
            self.oversized += u64::from(f.oversized);
            if !f.events.is_empty() {
                return Ok(Some(f.events));
            }
        }
    }

    /// Adds the counts of what was skipped, once, at the end.
    fn finish(&mut self) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let name = &self.name;
        if self.damaged > 0 {
            self.warnings.push(format!(
                "{name}: {} damaged frames skipped (about a second of events lost each)",
                self.damaged
            ));
        }
        if self.oversized > 0 {
            self.warnings.push(format!(
                "{name}: {} frames skipped that inflate past {} MiB or {MAX_FRAME_LINES} lines: twtrace writes none so large (a damaged or forged file)",
                self.oversized,
                MAX_FRAME_BYTES >> 20
            ));
        }
        if self.bad > 0 {
            self.warnings
                .push(format!("{name}: {} unreadable lines skipped", self.bad));
        }
    }
}

impl Frames for Reader {
    fn header(&self) -> &Header {
        &self.header
    }

    fn next_frame(&mut self) -> Result<Option<Vec<Event>>, RecordError> {
        self.next_parsed()
    }

    fn warnings(&self) -> Vec<String> {
        self.warnings.clone()
    }

    fn first_ts_ns(&mut self) -> Result<Option<u64>, RecordError> {
        if self.peeked.is_none() {
            self.peeked = self.next_parsed()?;
        }
        Ok(self
            .peeked
            .as_ref()
            .and_then(|f| f.first())
            .map(Event::ts_ns))
    }
}

/// CONFIG_HZ from the events themselves: a true TIME_WAIT is armed for 60 s, so the most
/// common timer length of TIME_WAIT-substate starts is 60 x HZ. Looks at the frames from
/// `from`, at most [`INFER_FRAMES`] of them; `None` when they hold no events at all.
fn infer_hz(src: &mut Box<dyn Source>, name: &str, from: u64) -> io::Result<Option<u32>> {
    src.seek(SeekFrom::Start(from))?;
    let mut split = Splitter::new(src.by_ref(), name);
    let mut parser = FrameReader::default();
    let mut counts: std::collections::HashMap<u32, u64> = std::collections::HashMap::new();
    let mut any = false;
    let mut frames = 0;
    while frames < INFER_FRAMES {
        let Some(piece) = split.next_piece()? else {
            break;
        };
        let Piece::Frame(f) = piece else { continue };
        frames += 1;
        for e in parser.parse(&f).events {
            any = true;
            if let Event::TwEnter(t) = e
                && t.substate == Substate::TimeWait
                && t.recovered.is_none()
                && t.timeout_jiffies > 0
            {
                *counts.entry(t.timeout_jiffies).or_default() += 1;
            }
        }
    }
    if !any {
        return Ok(None);
    }
    let Some((jiffies, _)) = counts.into_iter().max_by_key(|&(j, n)| (n, j)) else {
        return Ok(Some(250));
    };
    // Armed a jiffy or two late at most: round to a whole HZ.
    let hz = (f64::from(jiffies) / 60.0).round() as u32;
    Ok([100u32, 250, 300, 1000]
        .into_iter()
        .min_by_key(|c| c.abs_diff(hz)))
}
