//! The bench must keep working: a tiny run of it (no peers, fractions of a second).

use twtrace_integration::can_run;

#[test]
fn bench_smoke_run_writes_its_results() {
    if !can_run() {
        return;
    }
    let out = std::env::temp_dir().join(format!("twtrace-bench-{}", std::process::id()));
    let bench =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/twbench");
    let status = std::process::Command::new(&bench)
        .args(["--smoke", "--out"])
        .arg(&out)
        .status()
        .expect("twbench (built by cargo xtask test)");
    assert!(status.success());
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("bench-results.json")).unwrap())
            .unwrap();
    for w in ["churn-client", "churn-server", "bulk"] {
        assert!(
            r["throughput"][w]["trace"]["ratio"].as_f64().unwrap() > 0.0,
            "{r:#}"
        );
    }
    assert_eq!(r["exactness"]["exact"], true, "{r:#}");
    assert!(r["memory"]["rss_kib"].as_u64().unwrap() > 0);
    assert!(r["recording"]["bytes_per_event"].as_f64().unwrap() > 0.0);
    assert!(r["report"]["report_s"].as_f64().unwrap() > 0.0);
    assert!(r["attach"]["median_s"].as_f64().unwrap() > 0.0);
    let md = std::fs::read_to_string(out.join("BENCH.md")).unwrap();
    assert!(md.contains("## Goals"));
    let _ = std::fs::remove_dir_all(out);
}
