//! Everything that talks to the running kernel.

pub mod btf;
pub mod capability;
pub mod end_check;
pub mod kallsyms;
pub mod netns;
pub mod pidns;
pub mod privilege;
pub mod settings;
pub mod sock_diag;
pub mod sweep;
pub mod tracefs;
pub mod tracer;

use std::{fs, io::Read as _};

/// Used when CONFIG_HZ can be neither read nor measured; only timer lengths depend on it.
const FALLBACK_HZ: u32 = 250;
/// The values CONFIG_HZ can take.
const HZ_CHOICES: [u32; 4] = [100, 250, 300, 1000];

/// The kernel's CONFIG_HZ as [`found_hz`] finds it, else [`FALLBACK_HZ`] with a warning
/// (once).
pub fn hz() -> u32 {
    static HZ: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *HZ.get_or_init(|| match found_hz() {
        Some((hz, how)) => {
            log::info!("CONFIG_HZ {hz}, {how}");
            hz
        }
        None => {
            log::warn!(
                "cannot read or measure CONFIG_HZ; assuming {FALLBACK_HZ} for timer lengths"
            );
            FALLBACK_HZ
        }
    })
}

/// CONFIG_HZ and how it was found: [`config_hz`], else measured from the jiffies counter
/// ([`measured_hz`]: Debian ships neither /proc/config.gz nor, in containers, /boot).
pub fn found_hz() -> Option<(u32, &'static str)> {
    config_hz()
        .map(|h| (h, "from the kernel's config"))
        .or_else(|| measured_hz().map(|h| (h, "measured from how fast jiffies count")))
}

/// CONFIG_HZ from how fast jiffies count: two readings of /proc/timer_list (root only) 200 ms
/// apart, each with the kernel's clock. `None` unless the rate is within 5 % of a value
/// CONFIG_HZ can take.
pub fn measured_hz() -> Option<u32> {
    let read = || parse_timer_list(&fs::read_to_string("/proc/timer_list").ok()?);
    let (j0, t0) = read()?;
    std::thread::sleep(std::time::Duration::from_millis(200));
    let (j1, t1) = read()?;
    hz_from(j1.checked_sub(j0)?, t1.checked_sub(t0)?)
}

/// (jiffies, now in ns) from /proc/timer_list.
fn parse_timer_list(text: &str) -> Option<(u64, u64)> {
    let now = text
        .lines()
        .find_map(|l| l.strip_prefix("now at ")?.strip_suffix(" nsecs"))?
        .trim()
        .parse()
        .ok()?;
    let jiffies = text
        .lines()
        .find_map(|l| l.strip_prefix("jiffies: "))?
        .trim()
        .parse()
        .ok()?;
    Some((jiffies, now))
}

fn hz_from(jiffies: u64, ns: u64) -> Option<u32> {
    if ns < 50_000_000 {
        return None;
    }
    let rate = jiffies as f64 * 1e9 / ns as f64;
    HZ_CHOICES
        .into_iter()
        .find(|&c| (rate - f64::from(c)).abs() <= f64::from(c) * 0.05)
}

/// The kernel's CONFIG_HZ (timer lengths are counted in jiffies), from /proc/config.gz or
/// /boot/config-$(uname -r). `None` when neither says.
pub fn config_hz() -> Option<u32> {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let text = fs::File::open("/proc/config.gz")
        .ok()
        .and_then(|f| {
            let mut s = String::new();
            flate2::read::GzDecoder::new(f)
                .read_to_string(&mut s)
                .ok()?;
            Some(s)
        })
        .or_else(|| fs::read_to_string(format!("/boot/config-{}", release.trim())).ok())?;
    parse_hz(&text)
}

fn parse_hz(config: &str) -> Option<u32> {
    config
        .lines()
        .find_map(|l| l.strip_prefix("CONFIG_HZ="))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    #[test]
    fn measures_hz_from_jiffies() {
        let text = "Timer List Version: v0.10\nHRTIMER_MAX_CLOCK_BASES: 8\nnow at 14769854294961 nsecs\n\ncpu: 0\n  .idle_jiffies   : 4298584084\njiffies: 4298585077\n";
        assert_eq!(
            super::parse_timer_list(text),
            Some((4298585077, 14769854294961))
        );
        assert_eq!(super::hz_from(50, 200_000_000), Some(250));
        assert_eq!(super::hz_from(21, 200_000_000), Some(100));
        assert_eq!(super::hz_from(60, 200_000_000), Some(300));
        assert_eq!(super::hz_from(199, 200_000_000), Some(1000));
        assert_eq!(
            super::hz_from(40, 200_000_000),
            None,
            "200/s is no CONFIG_HZ"
        );
        assert_eq!(super::hz_from(1, 1_000), None, "too short to tell");
    }

    /// On this machine (root), the measurement agrees with the kernel's config where it can
    /// be read.
    #[test]
    fn the_measured_hz_is_the_configured_one() {
        if let (Some(c), Some(m)) = (super::config_hz(), super::measured_hz()) {
            assert_eq!(c, m);
        }
    }

    #[test]
    fn parses_hz() {
        assert_eq!(
            super::parse_hz("CONFIG_HZ_250=y\nCONFIG_HZ=250\n"),
            Some(250)
        );
        assert_eq!(super::parse_hz("# nothing\n"), None);
    }
}
