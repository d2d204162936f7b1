//! One compressed frame to its events: decompressed within a bound, parsed line by line.

use super::{Header, MAX_FRAME_BYTES, MAX_FRAME_LINES};
use crate::event::Event;

/// One frame's events.
#[derive(Debug, Default)]
pub(super) struct Frame {
    /// The frame's first line, when it is a header (the first frame of every file).
    pub header: Option<Header>,
    pub events: Vec<Event>,
    /// Lines that are not events.
    pub bad: u64,
    /// The frame failed its checksum or would not decompress.
    pub damaged: bool,
    /// The frame inflates past [`MAX_FRAME_BYTES`] or holds more than [`MAX_FRAME_LINES`]
    /// lines: no frame of twtrace's (a decompression bomb, say). Nothing of it is kept.
    pub oversized: bool,
}

/// Decompresses and parses frames, reusing its context and buffer from one frame to the next
/// (a fresh buffer per frame is fresh pages to fault in).
pub(super) struct FrameReader {
    dctx: Option<zstd::bulk::Decompressor<'static>>,
    pub(super) buf: Vec<u8>,
    limit: usize,
    max_lines: usize,
}

enum Inflated {
    Ok,
    Damaged,
    TooLarge,
}

impl Default for FrameReader {
    fn default() -> Self {
        Self::new(MAX_FRAME_BYTES, MAX_FRAME_LINES)
    }
}

impl FrameReader {
    pub(super) fn new(limit: usize, max_lines: usize) -> Self {
        Self {
            dctx: None,
            buf: Vec::new(),
            limit,
            max_lines,
        }
    }

    fn decompress(&mut self, frame: &[u8]) -> Inflated {
        let declared = match zstd::zstd_safe::get_frame_content_size(frame) {
            Ok(size) => size,
            Err(_) => return Inflated::Damaged,
        };
        if declared.is_some_and(|d| d > self.limit as u64) {
            return Inflated::TooLarge;
        }
        self.buf.clear();
        if let Some(size) = declared.filter(|&s| s > 0) {
            if self.dctx.is_none() {
                self.dctx = zstd::bulk::Decompressor::new().ok();
            }
            self.buf.reserve(size as usize);
            if let Some(d) = &mut self.dctx
                && d.decompress_to_buffer(frame, &mut self.buf).is_ok()
            {
                return Inflated::Ok;
            }
            self.buf.clear();
        }
        // The size is not in the frame header, or the bulk call failed: stream it, reading
        // one byte past the limit to tell a frame that is too large.
        let Ok(dec) = zstd::stream::read::Decoder::new(frame) else {
            return Inflated::Damaged;
        };
        let mut limited = std::io::Read::take(dec, self.limit as u64 + 1);
        let got = std::io::Read::read_to_end(&mut limited, &mut self.buf);
        let out = match got {
            Ok(n) if n <= self.limit => return Inflated::Ok,
            Ok(_) => Inflated::TooLarge,
            Err(_) => Inflated::Damaged,
        };
        self.buf = Vec::new();
        out
    }

    pub(super) fn parse(&mut self, frame: &[u8]) -> Frame {
        match self.decompress(frame) {
            Inflated::Ok => {}
            Inflated::Damaged => {
                return Frame {
                    damaged: true,
                    ..Frame::default()
                };
            }
            Inflated::TooLarge => {
                return Frame {
                    oversized: true,
                    ..Frame::default()
                };
            }
        }
        let text = &self.buf[..];
        let lines = text.iter().filter(|&&b| b == b'\n').count();
        if lines > self.max_lines {
            return Frame {
                oversized: true,
                ..Frame::default()
            };
        }
        let mut out = Frame {
            events: Vec::with_capacity(lines),
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
            // A header (the first line of a file; rotation writes one per file) is not an
            // event. Anywhere else, or unreadable, it is a bad line like any other.
            if line.starts_with(r#"{"ev":"header""#) {
                match serde_json::from_str(line) {
                    Ok(h) if is_first => out.header = Some(h),
                    _ => out.bad += 1,
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
    use super::*;

    #[test]
    fn a_frame_that_inflates_past_the_limit_is_oversized_not_allocated() {
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
            let mut r = FrameReader::new(1 << 20, 100);
            let f = r.parse(frame);
            assert!(f.oversized && !f.damaged);
            assert!(r.buf.capacity() <= 2 << 20);
            let mut r = FrameReader::new(4 << 20, 100);
            let f = r.parse(frame);
            assert!(!f.oversized && !f.damaged);
        }
    }

    #[test]
    fn a_frame_of_more_lines_than_twtrace_writes_is_oversized() {
        let text = "{}\n".repeat(1000);
        let frame = zstd::bulk::compress(text.as_bytes(), 1).unwrap();
        let f = FrameReader::new(1 << 20, 999).parse(&frame);
        assert!(f.oversized && f.events.is_empty());
        let f = FrameReader::new(1 << 20, 1000).parse(&frame);
        assert!(!f.oversized);
        assert_eq!(f.bad, 1000, "not events");
    }

    #[test]
    fn garbage_is_damaged() {
        let f = FrameReader::default().parse(b"\x28\xb5\x2f\xfdnot a frame");
        assert!(f.damaged && !f.oversized);
    }
}
