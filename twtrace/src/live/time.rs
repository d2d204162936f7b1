//! Times of day in the live view say their zone: an SRE comparing them with logs from
//! another box must not have to guess whether they are UTC.

use crate::output::TimeBase;

/// `HH:MM:SS ZONE` for the monotonic time `mono_ns`, in local time with the zone's
/// abbreviation ("CET", "UTC"), or its offset ("+01:00") when the C library has none.
pub fn clock_time(tb: &TimeBase, mono_ns: u64) -> String {
    let t = tb.local(mono_ns);
    format!("{} {}", t.format("%H:%M:%S"), zone(tb, mono_ns))
}

/// The local zone at the monotonic time `mono_ns`: its abbreviation, else its offset.
pub fn zone(tb: &TimeBase, mono_ns: u64) -> String {
    let t = tb.local(mono_ns);
    zone_abbreviation(t.timestamp()).unwrap_or_else(|| t.format("%:z").to_string())
}

/// The local zone's abbreviation at `secs` since the epoch (as `date +%Z` prints it).
// musl's libc crate marks time_t deprecated (it is 64-bit on x86-64 either way).
#[allow(deprecated)]
fn zone_abbreviation(secs: i64) -> Option<String> {
    let t: libc::time_t = secs;
    // SAFETY: localtime_r writes only into `tm`; tm_zone, when set, points at a static
    // NUL-terminated string of the C library's zone table.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    if unsafe { libc::localtime_r(&t, &mut tm) }.is_null() || tm.tm_zone.is_null() {
        return None;
    }
    let zone = unsafe { std::ffi::CStr::from_ptr(tm.tm_zone) }.to_string_lossy();
    // Only letters and a sign or digits ("UTC", "CEST", "+03"), never control characters.
    (!zone.is_empty()
        && zone
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '-'))
    .then(|| zone.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_time_says_its_zone() {
        let s = clock_time(&TimeBase::with_offset_ns(1_700_000_000_000_000_000), 0);
        let (hms, zone) = s.split_once(' ').expect("a zone after the time");
        assert_eq!(hms.len(), 8, "{s}");
        assert!(hms.chars().filter(|c| *c == ':').count() == 2, "{s}");
        assert!(!zone.is_empty() && !zone.contains(' '), "{s}");
    }
}
