//! Cuts a recording into its compressed zstd frames, reading the file a piece at a time: the
//! reader never holds more of it than one frame and one read ahead, whatever its size.

use std::io::{self, Read};

use super::{MAX_FRAME_BYTES, ZSTD_MAGIC};

/// The most a frame of at most [`MAX_FRAME_BYTES`] can take compressed (zstd's bound).
pub(super) fn max_compressed() -> usize {
    zstd::zstd_safe::compress_bound(MAX_FRAME_BYTES)
}

/// What reading the file gave next.
#[derive(Debug, PartialEq)]
pub(super) enum Piece {
    /// One whole compressed frame.
    Frame(Vec<u8>),
    /// Bytes that are no frame were skipped, as this sentence says.
    Damage(String),
}

pub(super) struct Splitter<R> {
    src: R,
    name: String,
    buf: Vec<u8>,
    /// Where the unread part of `buf` starts.
    start: usize,
    /// The file offset of `buf[start]`.
    offset: u64,
    eof: bool,
    /// The largest compressed frame accepted (whatever is longer is damage).
    limit: usize,
    chunk: usize,
}

impl<R: Read> Splitter<R> {
    pub(super) fn new(src: R, name: &str) -> Self {
        Self::with_limit(src, name, max_compressed())
    }

    pub(super) fn with_limit(src: R, name: &str, limit: usize) -> Self {
        Self {
            src,
            name: name.to_string(),
            buf: Vec::new(),
            start: 0,
            offset: 0,
            eof: false,
            limit,
            chunk: 256 << 10,
        }
    }

    /// Says that `src` is positioned at `offset` of the file (for the offsets in warnings).
    pub(super) fn at(mut self, offset: u64) -> Self {
        self.offset = offset;
        self
    }

    /// The source back; what was read ahead of [`Splitter::offset`] is dropped.
    pub(super) fn into_inner(self) -> R {
        self.src
    }

    /// The file offset of the next unread byte.
    pub(super) fn offset(&self) -> u64 {
        self.offset
    }

    fn avail(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    /// Reads one more chunk; false at the end of the file.
    fn fill(&mut self) -> io::Result<bool> {
        if self.eof {
            return Ok(false);
        }
        if self.start > 0 && self.start >= self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let old = self.buf.len();
        self.buf.resize(old + self.chunk, 0);
        let n = loop {
            match self.src.read(&mut self.buf[old..]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.buf.truncate(old);
                    return Err(e);
                }
            }
        };
        self.buf.truncate(old + n);
        self.eof = n == 0;
        Ok(n > 0)
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        self.offset += n as u64;
    }

    /// The next frame or skipped damage; `None` at the end of the file.
    pub(super) fn next_piece(&mut self) -> io::Result<Option<Piece>> {
        loop {
            if self.avail().is_empty() && !self.fill()? {
                return Ok(None);
            }
            let rest = self.avail();
            let found = zstd::zstd_safe::find_frame_compressed_size(rest).ok();
            let (len, framed) = (rest.len(), rest.starts_with(&ZSTD_MAGIC));
            match found {
                Some(n) if n <= len && n <= self.limit => {
                    let frame = self.avail()[..n].to_vec();
                    self.consume(n);
                    return Ok(Some(Piece::Frame(frame)));
                }
                // Too short to tell: read on.
                _ if len < ZSTD_MAGIC.len() && self.fill()? => continue,
                // A frame perhaps only cut by the read: read on, up to the largest frame
                // there can be. What does not start with the magic is damage at once.
                _ if framed && len <= self.limit && self.fill()? => continue,
                _ => return self.skip_damage().map(Some),
            }
        }
    }

    /// At bytes that start no whole frame: skips to the next frame magic, or to the end.
    fn skip_damage(&mut self) -> io::Result<Piece> {
        let from = self.offset;
        self.consume(1);
        loop {
            if let Some(p) = self
                .avail()
                .windows(ZSTD_MAGIC.len())
                .position(|w| w == ZSTD_MAGIC)
            {
                self.consume(p);
                return Ok(Piece::Damage(format!(
                    "{}: damaged data at bytes {from}..{} skipped (about a second of events lost)",
                    self.name, self.offset
                )));
            }
            // Keep the last bytes: a magic number may straddle two reads.
            let keep = (ZSTD_MAGIC.len() - 1).min(self.avail().len());
            let drop = self.avail().len() - keep;
            self.consume(drop);
            if !self.fill()? {
                let end = self.offset + self.avail().len() as u64;
                self.consume(self.avail().len());
                return Ok(Piece::Damage(format!(
                    "{}: file cut short at byte {from} of {end}: the last second or so of events is lost",
                    self.name
                )));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(text: &[u8]) -> Vec<u8> {
        zstd::bulk::compress(text, 1).unwrap()
    }

    fn pieces(data: &[u8], chunk: usize, limit: usize) -> Vec<Piece> {
        let mut s = Splitter::with_limit(data, "f", limit);
        s.chunk = chunk;
        std::iter::from_fn(|| s.next_piece().unwrap()).collect()
    }

    #[test]
    fn frames_come_out_whole_whatever_the_read_size() {
        let (a, b) = (frame(&[b'a'; 5000]), frame(b"bb\n"));
        let data = [a.clone(), b.clone()].concat();
        for chunk in [1, 3, 7, 64, 1 << 20] {
            assert_eq!(
                pieces(&data, chunk, 1 << 20),
                vec![Piece::Frame(a.clone()), Piece::Frame(b.clone())],
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn damage_between_frames_is_skipped_and_located() {
        let (a, b) = (frame(b"a\n"), frame(b"b\n"));
        let data = [a.clone(), b"garbage".to_vec(), b.clone()].concat();
        let got = pieces(&data, 4, 1 << 20);
        assert_eq!(got[0], Piece::Frame(a.clone()));
        let Piece::Damage(w) = &got[1] else {
            panic!("{got:?}")
        };
        assert!(
            w.contains(&format!("bytes {}..{}", a.len(), a.len() + 7)),
            "{w}"
        );
        assert_eq!(got[2], Piece::Frame(b));
    }

    #[test]
    fn a_cut_frame_at_the_end_says_so() {
        let a = frame(&[b'a'; 3000]);
        let data = [frame(b"x\n"), a[..a.len() - 3].to_vec()].concat();
        let got = pieces(&data, 16, 1 << 20);
        let Piece::Damage(w) = got.last().unwrap() else {
            panic!("{got:?}")
        };
        assert!(w.contains("cut short"), "{w}");
        assert!(w.contains(&format!("of {}", data.len())), "{w}");
    }

    #[test]
    fn a_frame_larger_than_the_limit_is_damage_not_buffered() {
        let big: Vec<u8> = (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect();
        let data = [frame(&big), frame(b"after\n")].concat();
        let mut s = Splitter::with_limit(&data[..], "f", 4096);
        s.chunk = 1024;
        let mut peak = 0;
        let mut got = vec![];
        while let Some(p) = s.next_piece().unwrap() {
            peak = peak.max(s.buf.capacity());
            got.push(p);
        }
        assert!(matches!(&got[0], Piece::Damage(_)), "{got:?}");
        assert_eq!(got.last(), Some(&Piece::Frame(frame(b"after\n"))));
        assert!(peak < 16 << 10, "buffered {peak} bytes");
    }
}
