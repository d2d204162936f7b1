//! A rotated recording, written through the real writer, reported from each of its files on:
//! every suffix of a rotation must add up.

use std::path::{Path, PathBuf};

use super::*;
use crate::{
    aggregate::{
        Aggregator, ReplayClock,
        tests::{end, enter},
    },
    event::{EndReason, Substate, TwKey},
    filter::Filters,
    report::{self, ReportError, Window},
    safe_file::Existing,
};

const S: u64 = 1_000_000_000;
const MS: u64 = 1_000_000;
/// Seconds recorded; a file each (every file is full after one frame).
const SECONDS: u64 = 8;
const PER_SECOND: u64 = 10;
/// Each TIME_WAIT is reused this many seconds after it began.
const LIFE: u64 = 3;

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("twtrace-rot-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Second `s`: 10 TIME_WAITs begin, those of `s - LIFE` end, and a snapshot says 5 more
/// passive closes. Returns the current file's path; `FILE.k` is part `SECONDS - 1 - k`.
fn write(dir: &Path) -> PathBuf {
    let p = dir.join("r.twt");
    let rec = Recorder::create(
        &p,
        Existing::Refuse,
        Header::new("h", 250),
        Rotation {
            max_bytes: 1,
            keep: 20,
        },
    )
    .unwrap();
    let clock = ReplayClock::default();
    let mut session = Session::new(rec, Aggregator::new(clock.clone(), 250));
    let push = |session: &mut Session<ReplayClock>, ev: Event| {
        clock.set(ev.ts_ns());
        session.push(ev).unwrap();
    };
    for s in 0..SECONDS {
        for j in 0..PER_SECOND {
            push(
                &mut session,
                enter(cookie(s, j), s * S + j * MS, Substate::TimeWait),
            );
        }
        if s >= LIFE {
            for j in 0..PER_SECOND {
                push(
                    &mut session,
                    end(
                        cookie(s - LIFE, j),
                        s * S + 500 * MS + j * MS,
                        EndReason::Reused,
                    ),
                );
            }
        }
        push(
            &mut session,
            Event::Snapshot {
                ts_ns: s * S + 999 * MS,
                passive_closes: vec![(1, 5 * (s + 1))],
                loss: Default::default(),
            },
        );
        session.flush().unwrap();
    }
    drop(session);
    p
}

fn cookie(s: u64, j: u64) -> TwKey {
    TwKey::Cookie(s * PER_SECOND + j + 1)
}

fn file(p: &Path, part: u64) -> PathBuf {
    match SECONDS - 1 - part {
        0 => p.to_path_buf(),
        k => PathBuf::from(format!("{}.{k}", p.display())),
    }
}

fn report_of(files: &[PathBuf]) -> Result<report::Report, ReportError> {
    let mut traces: Vec<(String, Reader)> = files
        .iter()
        .map(|f| (f.display().to_string(), Reader::open(f).unwrap()))
        .collect();
    report::build(&mut traces, &Filters::default(), Window::default())
}

#[test]
fn every_suffix_of_a_rotation_reports_exactly() {
    let d = dir("suffix");
    let p = write(&d);
    for part in 0..SECONDS {
        assert!(file(&p, part).exists(), "part {part}");
    }
    assert!(!Path::new(&format!("{}.{SECONDS}", p.display())).exists());
    for first in 0..SECONDS {
        let files: Vec<PathBuf> = (first..SECONDS).map(|k| file(&p, k)).collect();
        let r = report_of(&files).unwrap();
        let seconds = SECONDS - first;
        let ended = (first..SECONDS).filter(|&s| s >= LIFE).count() as u64 * PER_SECOND;
        let carried = first.min(LIFE) * PER_SECOND;
        let t = &r.totals;
        assert_eq!(t.entered, seconds * PER_SECOND, "from part {first}");
        assert_eq!(t.ended, ended, "from part {first}");
        assert_eq!(t.reused, ended, "from part {first}");
        assert_eq!(t.carried, carried, "from part {first}");
        assert_eq!(r.alive_at_start, 0, "from part {first}: counted as carried");
        assert_eq!(r.ends_without_start, 0, "from part {first}");
        assert_eq!(t.unmatched_ends, 0, "from part {first}");
        assert_eq!(t.overdue_dropped, 0, "from part {first}");
        // What is left alive: the last LIFE seconds' TIME_WAITs, however far back it starts.
        assert_eq!(carried + t.entered - t.ended, LIFE * PER_SECOND);
        assert_eq!(
            r.alive_at_end as u64,
            LIFE * PER_SECOND,
            "from part {first}"
        );
        assert_eq!(
            r.alive_peak as u64,
            (LIFE + 1) * PER_SECOND,
            "from part {first}"
        );
        // Passive closes count from the file's start: 5 a second, as TIME_WAITs 10 a second.
        assert_eq!(r.passive_closes, Some(5 * seconds), "from part {first}");
        assert_eq!(r.connections_closed, 15 * seconds, "from part {first}");
        let per = r.time_waits_per_1000_closed.unwrap();
        assert!(
            (per - 10_000.0 / 15.0).abs() < 1e-9,
            "from part {first}: {per}"
        );
        // Lifetimes of the TIME_WAITs carried over are whole: 3 s plus the 0.5 s offset.
        assert!((r.lifetime.max_ms.unwrap() - 3_500.0).abs() < 1.0);
        assert!((r.lifetime.mean_ms.unwrap() - 3_500.0).abs() < 1.0);
    }
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn rotated_files_out_of_order_are_refused_with_the_order_to_give() {
    let d = dir("order");
    let p = write(&d);
    let (older, newer) = (file(&p, 5), file(&p, 6));
    let e = report_of(&[newer.clone(), older.clone()]).expect_err("refused");
    assert!(matches!(e, ReportError::OutOfOrder { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains(&format!(
            "twtrace report {} {}",
            older.display(),
            newer.display()
        )),
        "{msg}"
    );
    assert!(!msg.contains('\n'), "one line: {msg}");
    let e = report_of(&[older.clone(), older.clone()]).expect_err("refused");
    assert!(e.to_string().contains("the same file as"), "{e}");
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn a_missing_file_in_the_middle_is_said_and_counted_around() {
    let d = dir("gap");
    let p = write(&d);
    // Parts 4, 6 and 7: part 5 is missing.
    let r = report_of(&[file(&p, 4), file(&p, 6), file(&p, 7)]).unwrap();
    assert!(
        r.warnings
            .iter()
            .any(|w| w.starts_with("1 file of this recording is missing between")),
        "{:?}",
        r.warnings
    );
    let t = &r.totals;
    assert_eq!(t.entered, 3 * PER_SECOND);
    assert_eq!(t.ended, 3 * PER_SECOND);
    // 30 carried into part 4, and the 30 alive after the gap, restated by part 6.
    assert_eq!(t.carried, 2 * LIFE * PER_SECOND);
    assert_eq!(r.ends_without_start, 0);
    assert_eq!(t.overdue_dropped, 0);
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn a_rotated_file_restates_what_was_alive_and_the_running_counts() {
    let d = dir("restate");
    let p = write(&d);
    let r = Reader::open(&file(&p, 5)).unwrap();
    let chain = r.header.chain.clone().expect("a chain");
    assert_eq!(chain.sequence, 5);
    let c = chain.carried.expect("carried");
    assert_eq!(c.alive, LIFE * PER_SECOND);
    assert_eq!(c.totals.entered, 5 * PER_SECOND);
    assert_eq!(c.totals.ended, 2 * PER_SECOND);
    assert_eq!(c.passive_closes, vec![(1, 25)]);
    let first = Reader::open(&file(&p, 0)).unwrap();
    let c0 = first.header.chain.clone().expect("a chain");
    assert_eq!((c0.sequence, c0.carried), (0, None));
    assert_eq!(c0.recording, chain.recording);
    std::fs::remove_dir_all(d).unwrap();
}
