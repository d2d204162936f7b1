//! Any bytes as a recording: read frame by frame, then reported on, as `twtrace report` and
//! `compare` do. Must never panic, hang or take more memory than the reader's bound
//! (`cargo xtask fuzz` sets libFuzzer's RSS and malloc limits to it).
#![no_main]

use twtrace::{
    filter::Filters,
    output::report_text,
    record::Reader,
    report::{self, Window},
};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let src = Box::new(std::io::Cursor::new(data.to_vec()));
    // No worker threads: libFuzzer runs an input at a time, and the window is then one frame.
    let Ok(reader) = Reader::from_source("fuzz", src, 0) else {
        return;
    };
    let mut traces = [("fuzz".to_string(), reader)];
    if let Ok(r) = report::build(&mut traces, &Filters::default(), Window::default()) {
        let _ = report_text::report(&r);
        let _ = serde_json::to_string(&r);
    }
});
