//! Everything that talks to the running kernel.

pub mod btf;
pub mod capability;
pub mod kallsyms;
pub mod netns;
pub mod privilege;
pub mod settings;
pub mod sock_diag;
pub mod sweep;
pub mod tracefs;
pub mod tracer;

use std::{fs, io::Read as _};

/// Used when the kernel's CONFIG_HZ cannot be read; only timer lengths depend on it.
const FALLBACK_HZ: u32 = 250;

/// [`config_hz`], or [`FALLBACK_HZ`] with a warning (once).
pub fn hz() -> u32 {
    static HZ: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *HZ.get_or_init(|| {
        config_hz().unwrap_or_else(|| {
            log::warn!("cannot read CONFIG_HZ; assuming {FALLBACK_HZ} for timer lengths");
            FALLBACK_HZ
        })
    })
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
    fn parses_hz() {
        assert_eq!(
            super::parse_hz("CONFIG_HZ_250=y\nCONFIG_HZ=250\n"),
            Some(250)
        );
        assert_eq!(super::parse_hz("# nothing\n"), None);
    }
}
