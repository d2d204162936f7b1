//! `twtrace report` on recordings made to hurt it, as a user would run it on a file sent after
//! an incident: time and peak memory are measured on the real binary. A test binary of its own
//! (one test): the peak RSS of waited-for children is then this test's alone.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

/// Peak RSS of every child waited for so far, in MB.
fn children_peak_rss_mb() -> u64 {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the rusage it is given.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, ru.as_mut_ptr()) };
    assert_eq!(rc, 0);
    // SAFETY: initialised by the successful call above.
    let ru = unsafe { ru.assume_init() };
    ru.ru_maxrss as u64 / 1024
}

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
    took: Duration,
}

fn report(path: &std::path::Path, json: bool) -> Run {
    let started = Instant::now();
    let mut c = Command::new(twtrace_integration::twtrace_bin());
    c.arg("report").arg(path);
    if json {
        c.arg("--json");
    }
    let out = c.stdin(Stdio::null()).output().expect("twtrace report");
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        took: started.elapsed(),
    }
}

fn header() -> Vec<u8> {
    let h = twtrace::record::Header::new("hostile", 250);
    let line = format!("{}\n", serde_json::to_string(&h).unwrap());
    zstd::bulk::compress(line.as_bytes(), 1).unwrap()
}

/// A real start (from the fixture recording) with its key and time replaced.
fn enter_line(cookie: u64, ts_ns: u64) -> String {
    let text =
        zstd::stream::decode_all(&include_bytes!("../../twtrace/tests/data/loopback.twt")[..])
            .unwrap();
    let line = String::from_utf8(text)
        .unwrap()
        .lines()
        .find(|l| l.starts_with(r#"{"ev":"tw_enter""#))
        .expect("the fixture has a start")
        .to_string();
    let mut v: serde_json::Value = serde_json::from_str(&line).unwrap();
    v["key"] = serde_json::json!({ "Cookie": cookie });
    v["ts_ns"] = ts_ns.into();
    v.to_string()
}

#[test]
fn hostile_recordings_cost_bounded_time_and_memory() {
    let dir = std::env::temp_dir().join(format!("twt-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let line = format!("{}\n", enter_line(1, 1_000_000_000));
    assert!(
        twtrace::event::Event::from_json(line.trim()).is_ok(),
        "the line is a valid event"
    );

    // 1. Frames of repeated valid lines, each a little under the reader's bounds: a small
    //    file for millions of events. Read whole, as a stream.
    let per_frame = (twtrace::record::MAX_FRAME_BYTES / line.len() - 1)
        .min(twtrace::record::MAX_FRAME_LINES - 1);
    let frame = zstd::bulk::compress(line.repeat(per_frame).as_bytes(), 19).unwrap();
    let frames = 20;
    let mut data = header();
    for _ in 0..frames {
        data.extend_from_slice(&frame);
    }
    let many = dir.join("many-lines.twt");
    std::fs::write(&many, &data).unwrap();
    let r = report(&many, true);
    assert!(r.ok, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["events"], (per_frame * frames) as u64, "every line read");
    let rss = children_peak_rss_mb();
    eprintln!(
        "{} events in a {} kB file: {:.1} s, peak RSS {rss} MB",
        per_frame * frames,
        data.len() >> 10,
        r.took.as_secs_f64()
    );
    assert!(rss < 400, "peak RSS {rss} MB");

    // 2. Frames that inflate past the bound: skipped, said, never allocated.
    let bomb =
        zstd::bulk::compress(&vec![b'\n'; twtrace::record::MAX_FRAME_BYTES + 1], 19).unwrap();
    let mut data = header();
    for _ in 0..200 {
        data.extend_from_slice(&bomb);
    }
    data.extend(zstd::bulk::compress(line.as_bytes(), 1).unwrap());
    let bombs = dir.join("bombs.twt");
    std::fs::write(&bombs, &data).unwrap();
    let r = report(&bombs, false);
    assert!(r.ok, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("200 frames skipped that inflate past 16 MiB"),
        "{}",
        r.stderr
    );
    assert!(r.took < Duration::from_secs(60), "{:?}", r.took);

    // 3. A sparse terabyte that is no recording: refused at once.
    let sparse = dir.join("sparse.twt");
    std::fs::File::create(&sparse)
        .unwrap()
        .set_len(1 << 40)
        .unwrap();
    let r = report(&sparse, false);
    assert!(!r.ok);
    assert!(r.stderr.contains("not a twtrace trace"), "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(r.took < Duration::from_secs(5), "{:?}", r.took);

    // 4. A timestamp at the end of time: not stepped through second by second.
    let mut data = header();
    let text = format!("{line}{}\n", enter_line(2, u64::MAX));
    data.extend(zstd::bulk::compress(text.as_bytes(), 1).unwrap());
    let late = dir.join("end-of-time.twt");
    std::fs::write(&late, &data).unwrap();
    let r = report(&late, false);
    assert!(r.ok, "{}", r.stderr);
    assert!(r.took < Duration::from_secs(10), "{:?}", r.took);

    let rss = children_peak_rss_mb();
    assert!(rss < 400, "peak RSS {rss} MB");
    std::fs::remove_dir_all(&dir).unwrap();
}
