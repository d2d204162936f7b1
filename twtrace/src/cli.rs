//! Command-line interface.

use clap::{Args, Parser, Subcommand};

use crate::{event::Family, filter::Filters, kernel::netns};

#[derive(Debug, Parser)]
#[command(
    name = "twtrace",
    version,
    about = "Explains TCP TIME_WAIT: who closed first, how long each TIME_WAIT lived, how it ended",
    long_about = None
)]
pub struct Cli {
    /// Log more (-v: twtrace and kernel-side diagnostics, -vv: debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// With no command: the live view.
    #[command(flatten)]
    pub live: LiveArgs,
    #[command(subcommand)]
    pub command: Option<Command>,
}

impl Cli {
    /// Parses the command line. Options shown in the top-level help (`-v`) work before and
    /// after a command; the live view's own options are refused beside a command, in clap's
    /// usual form (exit status 2).
    pub fn parse_checked() -> Self {
        use clap::{Args as _, CommandFactory as _, FromArgMatches as _, parser::ValueSource};
        let mut cmd = Self::command();
        let matches = cmd.get_matches_mut();
        let cli = Self::from_arg_matches(&matches).unwrap_or_else(|e| e.format(&mut cmd).exit());
        if let Some((name, _)) = matches.subcommand() {
            let live = LiveArgs::augment_args(clap::Command::new("live"));
            for arg in live.get_arguments() {
                let id = arg.get_id().as_str();
                if matches.try_contains_id(id).unwrap_or(false)
                    && matches.value_source(id) == Some(ValueSource::CommandLine)
                {
                    let flag = arg
                        .get_long()
                        .map(|l| format!("--{l}"))
                        .unwrap_or_else(|| id.to_string());
                    cmd.error(
                        clap::error::ErrorKind::ArgumentConflict,
                        format!(
                            "{flag} belongs to the live view: put it after `{name}` if `{name}` takes it, or leave out `{name}`"
                        ),
                    )
                    .exit();
                }
            }
        }
        cli
    }
}

/// Whether the `twtrace record` command line a recording's header keeps traced all of each
/// namespace's traffic (no filter but `--netns`); None when it is no such command line.
pub fn recorded_whole_namespaces(command_line: &[String]) -> Option<bool> {
    use clap::Parser as _;
    match Cli::try_parse_from(command_line).ok()?.command? {
        Command::Record(r) => Some(r.filter.whole_namespaces()),
        _ => None,
    }
}

/// `sudo twtrace`: the live view.
#[derive(Debug, Args, Default)]
pub struct LiveArgs {
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Seconds between refreshes.
    #[arg(long, value_name = "SECS", default_value_t = 1.0, value_parser = parse_interval)]
    pub interval: f64,
    /// Stop after this many seconds.
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    pub duration: Option<f64>,
    /// Kernel ring buffer size in MiB (a power of two).
    #[arg(long, value_name = "MIB", default_value_t = 8)]
    pub ring_mib: u32,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print one line per finished TIME_WAIT and per close that skipped TIME_WAIT.
    Trace(TraceArgs),
    /// Record every event to a file for later `report`, `replay` or `compare`.
    Record(RecordArgs),
    /// Summarise one or more recordings (no root needed).
    Report(ReportArgs),
    /// Compare two recordings: did the tuning work?
    Compare(CompareArgs),
    /// The live view, driven by a recording (no root needed).
    Replay(ReplayArgs),
    /// Serve Prometheus metrics on /metrics (a daemon; see dist/twtrace.service).
    Serve(ServeArgs),
    /// Check that this kernel and these privileges can run twtrace: what it can show here,
    /// what is degraded and why, and which program variants it chose.
    Check(CheckArgs),
    /// Print a shell completion script on stdout (packaging; `twtrace completions bash`).
    #[command(hide = true)]
    Completions(CompletionsArgs),
    /// Write the man pages, twtrace.1 and one per command, into a directory (packaging).
    #[command(hide = true)]
    Man(ManArgs),
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell: bash, zsh, fish, elvish or powershell.
    #[arg(value_name = "SHELL")]
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
pub struct ManArgs {
    /// Where to write them (created files are never links; existing ones are refused unless
    /// --force).
    #[arg(value_name = "DIR", default_value = ".")]
    pub dir: std::path::PathBuf,
    /// Replace pages that exist.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args, Default)]
pub struct CheckArgs {
    /// One JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RecordArgs {
    #[command(flatten)]
    pub filter: FilterArgs,
    /// The trace file to write (zstd-compressed NDJSON; created 0600, never through a
    /// symbolic link). An existing file is refused unless --force.
    #[arg(short, long, value_name = "FILE")]
    pub output: std::path::PathBuf,
    /// Replace FILE if it exists: a new file is renamed over it (a symbolic link is still
    /// refused).
    #[arg(long)]
    pub force: bool,
    /// Stop after this many seconds.
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    pub duration: Option<f64>,
    /// Start a new file once this much is written (e.g. 100M, 2G); the old one becomes FILE.1.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_size: Option<u64>,
    /// Rotated files to keep (FILE.1 ... FILE.N).
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub keep: u32,
    /// Skip the start-up scan for TIME_WAITs that already exist.
    #[arg(long)]
    pub no_existing: bool,
    /// Kernel ring buffer size in MiB (a power of two).
    #[arg(long, value_name = "MIB", default_value_t = 8)]
    pub ring_mib: u32,
    /// On exit, print the live totals as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Trace files, in order (rotated files oldest first).
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<std::path::PathBuf>,
    #[command(flatten)]
    pub filter: FilterArgs,
    /// JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Start of the window: RFC 3339, or an offset from the first event (30s, 5m, 1h).
    #[arg(long, value_name = "TIME")]
    pub from: Option<String>,
    /// End of the window, same forms as --from.
    #[arg(long, value_name = "TIME")]
    pub to: Option<String>,
}

/// twtrace's default metrics port.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9659";

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Address to serve /metrics on. Loopback by default; name an address to expose it.
    #[arg(long, value_name = "ADDR:PORT", default_value = DEFAULT_LISTEN)]
    pub listen: std::net::SocketAddr,
    /// TLS and basic auth for /metrics: a YAML file in the format of Prometheus's
    /// exporter-toolkit (tls_server_config, basic_auth_users). Off by default.
    #[arg(long = "web.config.file", value_name = "FILE")]
    pub web_config_file: Option<std::path::PathBuf>,
    /// Kernel ring buffer size in MiB (a power of two).
    #[arg(long, value_name = "MIB", default_value_t = 8)]
    pub ring_mib: u32,
    /// Stop after this many seconds.
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    pub duration: Option<f64>,
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// The recording.
    pub file: std::path::PathBuf,
    /// Playback speed: 2 is twice as fast as it happened.
    #[arg(long, default_value_t = 1.0, value_parser = parse_speed)]
    pub speed: f64,
    /// Seconds between refreshes (of playback time).
    #[arg(long, value_name = "SECS", default_value_t = 1.0, value_parser = parse_interval)]
    pub interval: f64,
}

#[derive(Debug, Args)]
pub struct CompareArgs {
    /// The recording before the change.
    pub before: std::path::PathBuf,
    /// The recording after the change.
    pub after: std::path::PathBuf,
    /// JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// "100M", "2G", "4096" -> bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'k' | 'K')) => (&s[..i], 1u64 << 10),
        Some((i, 'm' | 'M')) => (&s[..i], 1 << 20),
        Some((i, 'g' | 'G')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 100M or 2G"))?;
    match n.checked_mul(mult) {
        Some(b) if (1..=MAX_SIZE).contains(&b) => Ok(b),
        _ => Err(format!("{s:?} is not between 1 and 1024G")),
    }
}

/// The largest `--max-size`: far beyond any disk a recording rotates on.
const MAX_SIZE: u64 = 1 << 40;
/// Ten years: longer than any run, and within what a timer can hold.
const MAX_SECS: f64 = 10.0 * 365.0 * 86_400.0;

fn number(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => Err(format!("{s:?} is not a number")),
    }
}

/// `--duration`: seconds, more than 0 and at most ten years.
pub fn parse_secs(s: &str) -> Result<f64, String> {
    let v = number(s)?;
    if v > 0.0 && v <= MAX_SECS {
        Ok(v)
    } else {
        Err(format!("{s} is not between 0 and {MAX_SECS} seconds"))
    }
}

/// `--interval`: seconds between refreshes, 0.05 to 3600.
pub fn parse_interval(s: &str) -> Result<f64, String> {
    let v = number(s)?;
    if (0.05..=3600.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{s} is not between 0.05 and 3600 seconds"))
    }
}

/// `--speed`: a playback factor, 0.01 to 1000000.
pub fn parse_speed(s: &str) -> Result<f64, String> {
    let v = number(s)?;
    if (0.01..=1e6).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{s} is not between 0.01 and 1000000"))
    }
}

/// `--pressure-pct`: a share of the ports, 0 to 100.
pub fn parse_pct(s: &str) -> Result<f64, String> {
    let v = number(s)?;
    if (0.0..=100.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{s} is not between 0 and 100"))
    }
}

/// "30s", "5m", "1h", "250ms" -> nanoseconds.
pub fn parse_offset(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.')?;
    let (n, unit) = s.split_at(split);
    let n: f64 = n.parse().ok()?;
    let mult = match unit {
        "ms" => 1e6,
        "s" => 1e9,
        "m" | "min" => 60e9,
        "h" => 3600e9,
        _ => return None,
    };
    Some((n * mult) as u64)
}

#[derive(Debug, Args, Default)]
pub struct FilterArgs {
    /// Only TIME_WAITs whose closing process has this pid, as seen in twtrace's pid
    /// namespace (inside a container, the container's pid). A pid no process has is a
    /// warning.
    #[arg(short = 'p', long)]
    pub pid: Option<u32>,
    /// Only TIME_WAITs whose closing task has this command name (exact, as in /proc/PID/comm).
    #[arg(long)]
    pub comm: Option<String>,
    /// Only this local port (repeatable, up to 8).
    #[arg(short = 'L', long = "lport", value_name = "PORT")]
    pub lports: Vec<u16>,
    /// Only this remote port (repeatable, up to 8).
    #[arg(short = 'D', long = "rport", value_name = "PORT")]
    pub rports: Vec<u16>,
    /// IPv4 only.
    #[arg(short = '4', long = "ipv4", conflicts_with = "ipv6")]
    pub ipv4: bool,
    /// IPv6 only.
    #[arg(short = '6', long = "ipv6")]
    pub ipv6: bool,
    /// Only this network namespace: inode number, `ip netns` name, or nsfs path.
    /// Default: every namespace. An inode no namespace has now is a warning; a file that is
    /// not a network namespace, an error.
    #[arg(long)]
    pub netns: Option<String>,
}

impl FilterArgs {
    /// No filter but `--netns`: all of each traced namespace's traffic.
    pub fn whole_namespaces(&self) -> bool {
        self.pid.is_none()
            && self.comm.is_none()
            && self.lports.is_empty()
            && self.rports.is_empty()
            && !self.ipv4
            && !self.ipv6
    }

    pub fn filters(&self) -> Result<Filters, netns::NetnsError> {
        Ok(Filters {
            pid: self.pid,
            comm: self.comm.clone(),
            lports: self.lports.clone(),
            rports: self.rports.clone(),
            family: match (self.ipv4, self.ipv6) {
                (true, _) => Some(Family::Ipv4),
                (_, true) => Some(Family::Ipv6),
                _ => None,
            },
            netns: self.netns.as_deref().map(netns::resolve).transpose()?,
        })
    }
}

#[derive(Debug, Args, Default)]
pub struct TraceArgs {
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Print NDJSON, one object per line, instead of columns.
    #[arg(long)]
    pub json: bool,
    /// Stop after this many seconds.
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    pub duration: Option<f64>,
    /// Skip the start-up scan for TIME_WAITs that already exist.
    #[arg(long)]
    pub no_existing: bool,
    /// Kernel ring buffer size in MiB (a power of two).
    #[arg(long, value_name = "MIB", default_value_t = 8)]
    pub ring_mib: u32,
    /// Every 10 s, print destinations whose local ports are at least this % held.
    #[arg(long, value_name = "PCT", default_value_t = 50.0, value_parser = parse_pct)]
    pub pressure_pct: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_command_line_tells_whether_whole_namespaces_were_traced() {
        let argv = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let whole = |a: &[&str]| recorded_whole_namespaces(&argv(a));
        assert_eq!(whole(&["twtrace", "record", "-o", "x.twt"]), Some(true));
        assert_eq!(
            whole(&["twtrace", "record", "--netns", "web", "-o", "x.twt"]),
            Some(true)
        );
        assert_eq!(
            whole(&["twtrace", "record", "-p", "7", "-o", "x"]),
            Some(false)
        );
        assert_eq!(whole(&["twtrace", "record", "-4", "-o", "x"]), Some(false));
        assert_eq!(whole(&["twtrace", "trace"]), None);
        assert_eq!(whole(&["twtrace", "record", "--bogus"]), None);
        assert_eq!(whole(&[]), None);
    }

    #[test]
    fn numbers_out_of_range_are_refused_not_panicked_on() {
        for bad in ["inf", "nan", "-1", "0", "1e300", "x"] {
            assert!(parse_secs(bad).is_err(), "--duration {bad}");
        }
        assert_eq!(parse_secs("2.5"), Ok(2.5));
        for bad in ["0", "nan", "inf", "0.01", "4000"] {
            assert!(parse_interval(bad).is_err(), "--interval {bad}");
        }
        assert_eq!(parse_interval("0.5"), Ok(0.5));
        assert!(parse_speed("0").is_err() && parse_speed("nan").is_err());
        assert!(parse_pct("101").is_err() && parse_pct("-inf").is_err());
        assert!(parse_size("99999999999G").is_err());
        assert!(parse_size("0").is_err());
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        // Through clap: one line and exit status 2.
        use clap::Parser as _;
        for argv in [
            &["twtrace", "trace", "--duration", "inf"][..],
            &["twtrace", "--interval", "nan"],
            &["twtrace", "replay", "x.twt", "--interval", "0"],
            &["twtrace", "record", "-o", "x", "--max-size", "99999999999G"],
        ] {
            let e = Cli::try_parse_from(argv).expect_err("refused");
            assert_eq!(e.exit_code(), 2, "{argv:?}");
        }
    }

    #[test]
    fn packaging_commands_parse_but_are_not_in_the_help() {
        use clap::{CommandFactory as _, Parser as _};
        let cli = Cli::try_parse_from(["twtrace", "completions", "fish"]).expect("parses");
        assert!(matches!(cli.command, Some(Command::Completions(_))));
        let cli = Cli::try_parse_from(["twtrace", "man", "/tmp/pages"]).expect("parses");
        assert!(matches!(
            cli.command,
            Some(Command::Man(ManArgs { force: false, .. }))
        ));
        let e = Cli::try_parse_from(["twtrace", "completions", "tcsh"]).expect_err("no tcsh");
        assert_eq!(e.exit_code(), 2);
        let help = Cli::command().render_help().to_string();
        assert!(help.contains("trace") && !help.contains("completions") && !help.contains("man "));
    }

    #[test]
    fn sizes_and_offsets() {
        assert_eq!(parse_size("100M"), Ok(100 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("lots").is_err());
        assert_eq!(parse_offset("30s"), Some(30_000_000_000));
        assert_eq!(parse_offset("1.5m"), Some(90_000_000_000));
        assert_eq!(parse_offset("250ms"), Some(250_000_000));
        assert_eq!(parse_offset("soon"), None);
    }
}
