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
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print one line per finished TIME_WAIT and per close that skipped TIME_WAIT.
    Trace(TraceArgs),
    /// Check that this kernel and these privileges can run twtrace, and show what it resolved.
    Check,
}

#[derive(Debug, Args, Default)]
pub struct FilterArgs {
    /// Only TIME_WAITs whose closing process has this pid.
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
    /// Default: every namespace.
    #[arg(long)]
    pub netns: Option<String>,
}

impl FilterArgs {
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
    #[arg(long, value_name = "SECS")]
    pub duration: Option<f64>,
    /// Skip the start-up scan for TIME_WAITs that already exist.
    #[arg(long)]
    pub no_existing: bool,
    /// Kernel ring buffer size in MiB (a power of two).
    #[arg(long, value_name = "MIB", default_value_t = 8)]
    pub ring_mib: u32,
    /// Every 10 s, print destinations whose local ports are at least this % held.
    #[arg(long, value_name = "PCT", default_value_t = 50.0)]
    pub pressure_pct: f64,
}

impl TraceArgs {
    /// What `twtrace` with no command runs until the live view exists.
    pub fn default_for_live() -> Self {
        Self {
            ring_mib: 8,
            pressure_pct: 50.0,
            ..Self::default()
        }
    }
}
