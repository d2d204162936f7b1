//! The writer and the reader together: what one writes, the other reads back, around damage.

use std::{
    fs,
    path::{Path, PathBuf},
};

use super::*;
use crate::{
    aggregate::tests::{end, enter},
    event::{EndReason, Substate, TwKey},
    safe_file::Existing,
};

/// A whole recording read back.
struct Read {
    header: Header,
    events: Vec<Event>,
    warnings: Vec<String>,
}

fn read(path: &Path) -> Result<Read, RecordError> {
    read_all(Reader::open(path)?)
}

fn read_all(mut r: Reader) -> Result<Read, RecordError> {
    let mut events = Vec::new();
    while let Some(f) = r.next_frame()? {
        events.extend(f);
    }
    Ok(Read {
        header: r.header.clone(),
        events,
        warnings: r.warnings(),
    })
}
#[test]
fn a_file_that_is_no_recording_is_refused_before_it_is_read() {
    let dir = std::env::temp_dir().join(format!("twt-magic-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("zeros.twt");
    let f = std::fs::File::create(&p).unwrap();
    // A sparse gigabyte: reading it whole would cost a gigabyte.
    f.set_len(1 << 30).unwrap();
    let e = read(&p).err().expect("refused");
    assert!(
        e.to_string().contains("does not start with a zstd frame"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

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

/// A new recording at `path`, never rotated.
fn recorder(path: &Path) -> Recorder {
    Recorder::create(
        path,
        Existing::Refuse,
        header(),
        Rotation {
            max_bytes: 0,
            keep: 0,
        },
    )
    .unwrap()
}

fn write(path: &Path, seconds: u64) -> Vec<Event> {
    let mut r = recorder(path);
    let mut all = vec![];
    for s in 0..seconds {
        let k = TwKey::Cookie(s + 1);
        for e in [
            enter(k, s * 1_000_000_000, Substate::TimeWait),
            end(k, s * 1_000_000_000 + 5, EndReason::Expired),
        ] {
            r.push(&e).unwrap();
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
    let chain = t
        .header
        .chain
        .clone()
        .expect("a new recording has its place in a rotation");
    assert_eq!((chain.sequence, chain.recording.len()), (0, 16));
    assert_eq!(
        t.header,
        Header {
            chain: Some(chain),
            ..header()
        }
    );
    assert_eq!(t.events, written);
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
    assert_eq!(t.events, written[..8], "the last second is lost, no more");
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
        t.events.len() >= written.len() - 4,
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
    assert!(t.events.len() >= written.len() - 2);
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
    let r = Recorder::create(
        &p,
        Existing::Refuse,
        header(),
        Rotation {
            max_bytes: 1,
            keep: 2,
        },
    )
    .unwrap();
    let clock = crate::aggregate::ReplayClock::default();
    let mut r = Session::new(r, crate::aggregate::Aggregator::new(clock, 250));
    for s in 0..5u64 {
        r.push(enter(TwKey::Cookie(s + 1), s, Substate::TimeWait))
            .unwrap();
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

/// Reads a recording held in memory, on `workers` threads.
fn read_bytes(data: Vec<u8>, workers: usize) -> Result<Read, RecordError> {
    read_all(Reader::from_source(
        "mem",
        Box::new(std::io::Cursor::new(data)),
        workers,
    )?)
}

/// A real recording (twtrace/tests/data/make-loopback.sh): every kind of event.
const FIXTURE: &[u8] = include_bytes!("../../tests/data/loopback.twt");

/// The fixture's lines, its header first.
fn fixture_lines() -> Vec<String> {
    let text = zstd::stream::decode_all(FIXTURE).unwrap();
    String::from_utf8(text)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

/// `lines` as a recording: the header frame, then frames of the given sizes (cycled).
fn recording(header: &str, lines: &[String], sizes: &[usize]) -> Vec<u8> {
    let mut out = zstd::bulk::compress(format!("{header}\n").as_bytes(), 1).unwrap();
    let mut rest = lines;
    for &n in sizes.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (now, later) = rest.split_at(n.clamp(1, rest.len()));
        let text: String = now.iter().map(|l| format!("{l}\n")).collect();
        out.extend(zstd::bulk::compress(text.as_bytes(), 1).unwrap());
        rest = later;
    }
    out
}

/// Hostile values a field may be given.
fn hostile(i: usize) -> serde_json::Value {
    use serde_json::json;
    [
        json!(u64::MAX),
        json!(0),
        json!(-1),
        json!(1e308),
        json!(""),
        json!("\u{1b}[2J\u{7}\n"),
        json!("x".repeat(5000)),
        json!(null),
        json!([]),
        json!({}),
        json!(true),
        json!(u32::MAX as u64 + 1),
        json!("header"),
    ][i % 13]
        .clone()
}

/// Every leaf of `v`, as a JSON pointer.
fn leaves(v: &serde_json::Value, at: String, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) if !m.is_empty() => {
            for (k, c) in m {
                leaves(c, format!("{at}/{k}"), out);
            }
        }
        serde_json::Value::Array(a) if !a.is_empty() => {
            for (i, c) in a.iter().enumerate() {
                leaves(c, format!("{at}/{i}"), out);
            }
        }
        _ => out.push(at),
    }
}

/// `line` with one leaf (picked by `leaf`) set to a hostile value, or removed.
fn mutate(line: &str, leaf: usize, value: usize) -> String {
    let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
    let mut all = Vec::new();
    leaves(&v, String::new(), &mut all);
    let path = &all[leaf % all.len()];
    if value % 14 == 13 {
        let (parent, key) = path.rsplit_once('/').unwrap();
        if let Some(serde_json::Value::Object(m)) = v.pointer_mut(parent) {
            m.remove(key);
        }
    } else if let Some(slot) = v.pointer_mut(path) {
        *slot = hostile(value);
    }
    v.to_string()
}

#[test]
fn the_fixture_reads_back_whole_in_any_framing_on_any_number_of_workers() {
    let lines = fixture_lines();
    let want: Vec<Event> = lines[1..]
        .iter()
        .map(|l| Event::from_json(l).unwrap())
        .collect();
    for sizes in [&[1][..], &[3, 1, 7][..], &[1000][..]] {
        for workers in [0, 2, 4] {
            let r = read_bytes(recording(&lines[0], &lines[1..], sizes), workers).unwrap();
            assert_eq!(r.events, want, "{sizes:?} on {workers} workers");
            assert!(r.warnings.is_empty(), "{:?}", r.warnings);
            assert_eq!(
                r.header.hostname,
                serde_json::from_str::<Header>(&lines[0]).unwrap().hostname
            );
        }
    }
}

#[test]
fn unreadable_lines_in_the_header_frame_are_counted() {
    let lines = fixture_lines();
    let text = format!("{}\nnot an event\n{}\n", lines[0], lines[1]);
    let data = zstd::bulk::compress(text.as_bytes(), 1).unwrap();
    let r = read_bytes(data, 0).unwrap();
    assert_eq!(r.events.len(), 1);
    assert!(
        r.warnings
            .iter()
            .any(|w| w.ends_with("1 unreadable lines skipped")),
        "{:?}",
        r.warnings
    );
}

#[test]
fn a_recording_of_decompression_bombs_is_read_in_bounded_memory() {
    // Frames of 4 MiB of one repeated valid line each: a few kB of file for 64 MiB of text.
    let lines = fixture_lines();
    let line = format!("{}\n", lines[2]);
    let bomb = line.repeat((MAX_FRAME_BYTES + 1) / line.len() + 1);
    let mut data = zstd::bulk::compress(format!("{}\n", lines[0]).as_bytes(), 1).unwrap();
    let frame = zstd::bulk::compress(bomb.as_bytes(), 19).unwrap();
    for _ in 0..16 {
        data.extend_from_slice(&frame);
    }
    data.extend(zstd::bulk::compress(line.as_bytes(), 1).unwrap());
    assert!(data.len() < 64 << 10, "{} bytes", data.len());
    let r = read_bytes(data, 2).unwrap();
    assert_eq!(r.events.len(), 1, "only the honest frame");
    assert!(
        r.warnings
            .iter()
            .any(|w| w.contains("16 frames skipped that inflate past")),
        "{:?}",
        r.warnings
    );
}

#[test]
fn a_scan_larger_than_a_frame_is_written_in_parts_and_read_back_whole() {
    let p = tmp("bigscan.twt");
    let mut r = recorder(&p);
    let lines = fixture_lines();
    let scan: Event = lines[1..]
        .iter()
        .filter_map(|l| Event::from_json(l).ok())
        .find(|e| matches!(e, Event::TwExisting { .. }))
        .expect("the fixture has a scan");
    let Event::TwExisting { ts_ns, .. } = scan else {
        unreachable!()
    };
    let one = crate::event::TwExisting {
        cookie: 1,
        conn: crate::aggregate::tests::alive_tw(TwKey::Cookie(1)).conn,
        substate: Substate::TimeWait,
        remaining_ms: 30_000,
        seen: None,
    };
    // 200,000 TIME_WAITs at start: 30 MB of JSON in one event.
    let sockets: Vec<_> = (1..=200_000u64)
        .map(|c| crate::event::TwExisting {
            cookie: c,
            ..one.clone()
        })
        .collect();
    r.push(&Event::TwExisting {
        ts_ns,
        sockets,
        more: false,
    })
    .unwrap();
    drop(r);
    let back = read(&p).unwrap();
    assert!(back.warnings.is_empty(), "{:?}", back.warnings);
    let parts: Vec<_> = back
        .events
        .iter()
        .filter_map(|e| match e {
            Event::TwExisting { sockets, more, .. } => Some((sockets.len(), *more)),
            _ => None,
        })
        .collect();
    assert_eq!(parts.iter().map(|p| p.0).sum::<usize>(), 200_000);
    assert!(parts.len() > 1 && parts[..parts.len() - 1].iter().all(|p| p.1));
    assert!(!parts.last().unwrap().1, "the last part ends the scan");
    let mut agg = crate::aggregate::Aggregator::new(crate::aggregate::ReplayClock::default(), 250);
    let mut out = Vec::new();
    for e in back.events {
        agg.ingest(e, &mut out);
    }
    assert_eq!(agg.alive_count(), 200_000);
    fs::remove_file(p).unwrap();
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(96))]

    /// Valid frames of real events, some fields set to hostile values: whatever a line that
    /// still parses says, it is read, in order, and the rest counted; the report over it
    /// ends in bounded time.
    #[test]
    fn mutated_fields_in_valid_frames_are_read_or_counted(
        mutations in proptest::collection::vec((0usize..200, 0usize..1000, 0usize..14), 0..12),
        sizes in proptest::collection::vec(1usize..40, 1..4),
        workers in 0usize..3,
    ) {
        let all = fixture_lines();
        let mut lines = all[1..].to_vec();
        for &(line, leaf, value) in &mutations {
            let i = line % lines.len();
            lines[i] = mutate(&lines[i], leaf, value);
        }
        let data = recording(&all[0], &lines, &sizes);
        match read_bytes(data, workers) {
            Ok(r) => {
                let want: Vec<Event> =
                    lines.iter().filter_map(|l| Event::from_json(l).ok()).collect();
                let dropped = (lines.len() - want.len()) as u64;
                proptest::prop_assert_eq!(&r.events, &want);
                if dropped > 0 {
                    let said = format!("{dropped} unreadable lines skipped");
                    proptest::prop_assert!(r.warnings.iter().any(|w| w.ends_with(&said)), "{:?}", r.warnings);
                }
                let started = std::time::Instant::now();
                let mut traces = [("mem".to_string(), InMemory {
                    header: r.header,
                    frames: vec![r.events].into(),
                    warnings: vec![],
                })];
                let report = crate::report::build(&mut traces, &Default::default(), Default::default()).unwrap();
                proptest::prop_assert!(started.elapsed() < std::time::Duration::from_secs(5));
                let _ = crate::output::report_text::report(&report);
            }
            // A line turned into a header at the start of a frame reads as a second recording.
            Err(RecordError::Concatenated { .. }) => {
                let header = r#"{"ev":"header""#;
                proptest::prop_assert!(lines.iter().any(|l| l.starts_with(header)));
            }
            Err(e) => proptest::prop_assert!(false, "{e}"),
        }
    }

    /// Valid recordings with bytes flipped and cut anywhere: never a panic, and every frame
    /// left whole is read.
    #[test]
    fn damaged_bytes_lose_at_most_their_frames(
        flips in proptest::collection::vec((0usize..100_000, 1u8..=255), 0..4),
        cut in 0usize..100_000,
        workers in 0usize..3,
    ) {
        let all = fixture_lines();
        let mut data = recording(&all[0], &all[1..], &[10]);
        let len = data.len();
        for &(at, x) in &flips {
            data[at % len] ^= x;
        }
        data.truncate(len - cut % (len / 2));
        if let Ok(r) = read_bytes(data, workers) {
            proptest::prop_assert!(r.events.len() < all.len());
            if flips.is_empty() && cut % (len / 2) == 0 {
                proptest::prop_assert_eq!(r.events.len(), all.len() - 1);
            }
        }
    }
}
