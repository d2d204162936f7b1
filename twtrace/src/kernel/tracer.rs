//! Loads and attaches the kernel programs, and reads what they could not deliver.

use std::{
    mem,
    os::fd::{AsFd, AsRawFd},
    path::Path,
};

use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{BtfTracePoint, ProgramError, TracePoint},
};
use twtrace_ebpf::{Config, Filter, counter};

use super::{
    btf::{BtfError, KernelBtf, Resolved},
    kallsyms::{self, KallsymsError},
    privilege::{self, and_list},
    tracefs,
};

/// The kernel programs, built by build.rs from twtrace-ebpf.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/twtrace-ebpf"));

/// A kernel program and the BTF tracepoint it attaches to.
struct Hook {
    program: &'static str,
    tracepoint: &'static str,
    /// The same hook's program that returns at once (for [`HooksOnly`]).
    empty: &'static str,
}

const HOOKS: &[Hook] = &[
    Hook {
        program: "set_state",
        tracepoint: "inet_sock_set_state",
        empty: "empty_set_state",
    },
    Hook {
        program: "tcp_send_reset",
        tracepoint: "tcp_send_reset",
        empty: "empty_tcp_send_reset",
    },
    Hook {
        program: "tcp_receive_reset",
        tracepoint: "tcp_receive_reset",
        empty: "empty_tcp_receive_reset",
    },
    Hook {
        program: "timer_start",
        tracepoint: "timer_start",
        empty: "empty_timer_start",
    },
    Hook {
        program: "timer_cancel",
        tracepoint: "timer_cancel",
        empty: "empty_timer_cancel",
    },
    Hook {
        program: "timer_expire_entry",
        tracepoint: "timer_expire_entry",
        empty: "empty_timer_expire_entry",
    },
];

pub const BTF_PATH: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum TracerError {
    /// `needed`: every capability tracing needs here; `missing`: those this process lacks.
    #[error(
        "tracing needs {} here and this process lacks {}: run twtrace as root (sudo), or grant it {} (`twtrace check` lists what each capability gives)",
        and_list(needed),
        and_list(missing),
        and_list(missing)
    )]
    NotPrivileged {
        needed: Vec<&'static str>,
        missing: Vec<&'static str>,
    },
    #[error(
        "this kernel has no BTF ({BTF_PATH} is missing): twtrace needs a kernel built with CONFIG_DEBUG_INFO_BTF=y (Linux 5.8 or later)"
    )]
    NoBtf,
    #[error(
        "this kernel has no BPF ring buffer (Linux 5.8 or later has one): twtrace cannot trace here; `twtrace report` still reads recordings made elsewhere"
    )]
    NoRingBuf,
    #[error("{0}")]
    Btf(#[from] BtfError),
    #[error("{0}")]
    Kallsyms(#[from] KallsymsError),
    #[error("{0}")]
    PidNs(#[from] super::pidns::PidNsError),
    #[error("loading twtrace's eBPF object failed: {0}")]
    Load(#[from] aya::EbpfError),
    #[error(
        "the kernel refused twtrace's program for tracepoint {hook} ({reason}); `twtrace check -vv` shows the verifier's log"
    )]
    Attach { hook: &'static str, reason: String },
    #[error("eBPF object has no {0}: the build is broken")]
    Missing(&'static str),
    #[error("reading eBPF map {0}: {1}")]
    Map(&'static str, aya::maps::MapError),
}

/// What to trace and how.
#[derive(Clone, Debug, Default)]
pub struct TracerOptions {
    pub filter: Filter,
    /// Emit kernel-side diagnostics through aya-log.
    pub verbose: bool,
    /// Ring buffer size in bytes (a power of two, at least a page).
    pub ring_bytes: Option<u32>,
}

/// Events the kernel side could not deliver, and program runs the kernel skipped.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Loss {
    /// Events dropped because the ring buffer was full.
    pub ringbuf_full: u64,
    /// Connections not remembered (map update failed): their closer is unknown.
    pub conn_map_fail: u64,
    /// Kernel memory reads that failed.
    pub read_fail: u64,
    /// Program runs the kernel skipped because the same program was already running on that
    /// CPU (an interrupt nested inside it).
    pub recursion_misses: u64,
    /// Skipped runs per program.
    pub recursion_misses_by_program: std::collections::BTreeMap<String, u64>,
}

impl Loss {
    /// What was lost after `base` (counts only grow while one tracer runs).
    pub fn since(&self, base: &Loss) -> Loss {
        Loss {
            ringbuf_full: self.ringbuf_full.saturating_sub(base.ringbuf_full),
            conn_map_fail: self.conn_map_fail.saturating_sub(base.conn_map_fail),
            read_fail: self.read_fail.saturating_sub(base.read_fail),
            recursion_misses: self.recursion_misses.saturating_sub(base.recursion_misses),
            recursion_misses_by_program: self
                .recursion_misses_by_program
                .iter()
                .map(|(p, &n)| {
                    let b = base
                        .recursion_misses_by_program
                        .get(p)
                        .copied()
                        .unwrap_or(0);
                    (p.clone(), n.saturating_sub(b))
                })
                .filter(|&(_, n)| n > 0)
                .collect(),
        }
    }

    /// Nothing lost.
    pub fn is_zero(&self) -> bool {
        self.ringbuf_full == 0
            && self.conn_map_fail == 0
            && self.read_fail == 0
            && self.recursion_misses == 0
    }
}

/// Checks what can be checked before touching the kernel, so a user error is one clear line.
pub fn preflight() -> Result<(), TracerError> {
    let cx = privilege::Context::current();
    let missing = privilege::missing_required(&cx);
    if !missing.is_empty() {
        let needed = privilege::privileges(&cx)
            .into_iter()
            .filter(|p| p.need == privilege::Need::Required)
            .map(|p| p.name)
            .collect();
        return Err(TracerError::NotPrivileged { needed, missing });
    }
    if !Path::new(BTF_PATH).exists() {
        return Err(TracerError::NoBtf);
    }
    Ok(())
}

/// Resolves everything the programs need from the running kernel.
/// The reader is woken when this share of the ring buffer is waiting (see `wakeup_flags` in
/// the kernel programs); it also drains every [`DRAIN_EVERY`].
const WAKEUP_DIVISOR: u64 = 16;
/// How often the reader drains the ring buffer without being woken.
pub const DRAIN_EVERY: std::time::Duration = std::time::Duration::from_millis(100);
const DEFAULT_RING_BYTES: u32 = 8 << 20;

/// What twtrace resolved from the running kernel: the programs' configuration and what this
/// kernel lacks.
#[derive(Clone, Debug)]
pub struct KernelSetup {
    pub config: Config,
    pub resolved: Resolved,
    /// Why bind() failures cannot be seen, when they cannot.
    pub bind_missing: Option<String>,
}

pub fn kernel_config(opts: &TracerOptions) -> Result<KernelSetup, TracerError> {
    let btf = KernelBtf::load(Path::new(BTF_PATH))?;
    let syms = kallsyms::lookup(&["tw_timer_handler", "reqsk_timer_handler"])?;
    if !btf.has_func("bpf_ringbuf_output") {
        return Err(TracerError::NoRingBuf);
    }
    let resolved = btf.resolve()?;
    let mut off = resolved.off;
    // The bind() hooks need tracefs and their BTF offsets; without them twtrace still traces
    // TIME_WAIT.
    let bind_missing = match (&resolved.bind_missing, bind_record_offsets()) {
        (Some(why), _) => Some(why.clone()),
        (None, Err(e)) => Some(e.to_string()),
        (None, Ok((fd, addr, ret))) => {
            off.tp_bind_fd = fd;
            off.tp_bind_addr = addr;
            off.tp_exit_ret = ret;
            None
        }
    };
    let (pidns_dev, pidns_ino) = super::pidns::own()?.unwrap_or((0, 0));
    let config = Config {
        tw_timer_handler: syms["tw_timer_handler"],
        reqsk_timer_handler: syms["reqsk_timer_handler"],
        off,
        filter: opts.filter,
        wakeup_bytes: u64::from(opts.ring_bytes.unwrap_or(DEFAULT_RING_BYTES)) / WAKEUP_DIVISOR,
        self_pid: std::process::id(),
        verbose: opts.verbose as u32,
        features: resolved.features,
        tw_count_bias: resolved.tw_count_bias,
        pidns_dev,
        pidns_ino,
    };
    Ok(KernelSetup {
        config,
        resolved,
        bind_missing,
    })
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK (later ones to the memory cgroup):
/// lift it for twtrace's maps. Where it cannot be raised, the kernel's refusal says so.
fn raise_memlock() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct we pass and nothing else.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        log::debug!(
            "cannot raise RLIMIT_MEMLOCK: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn bind_record_offsets() -> Result<(u32, u32, u32), tracefs::TracefsError> {
    tracefs::ensure_mounted()?;
    Ok((
        tracefs::field_offset("syscalls", "sys_enter_bind", "fd")?,
        tracefs::field_offset("syscalls", "sys_enter_bind", "umyaddr")?,
        tracefs::field_offset("syscalls", "sys_exit_bind", "ret")?,
    ))
}

/// Classic tracepoints for bind(): optional, attached when tracefs described them. (program,
/// event, the program that returns at once).
const BIND_HOOKS: &[(&str, &str, &str)] = &[
    ("sys_enter_bind", "sys_enter_bind", "empty_sys_enter_bind"),
    ("sys_exit_bind", "sys_exit_bind", "empty_sys_exit_bind"),
];

pub struct Tracer {
    ebpf: Ebpf,
    counters: PerCpuArray<MapData, u64>,
    passive_closes: PerCpuHashMap<MapData, u32, u64>,
    degraded: Vec<String>,
    _logger: Option<tokio::task::JoinHandle<()>>,
}

impl Tracer {
    /// Loads the programs with this kernel's offsets and attaches them. Returns the tracer and
    /// the ring buffer its events arrive on.
    pub fn start(opts: &TracerOptions) -> Result<(Self, RingBuf<MapData>), TracerError> {
        preflight()?;
        let setup = kernel_config(opts)?;
        let config = setup.config;
        raise_memlock();
        let btf = Btf::from_sys_fs().map_err(|_| TracerError::NoBtf)?;
        let mut loader = EbpfLoader::new();
        loader
            .btf(Some(&btf))
            .override_global("CONFIG", &config, true);
        if let Some(bytes) = opts.ring_bytes {
            loader.map_max_entries("EVENTS", bytes);
        }
        let mut ebpf = loader.load(PROGRAMS)?;
        let logger = if opts.verbose {
            start_logger(&mut ebpf)
        } else {
            None
        };
        for hook in HOOKS {
            attach_btf(&mut ebpf, &btf, hook.program, hook.tracepoint)?;
        }
        let mut bind_missing = setup.bind_missing.clone();
        if bind_missing.is_none() {
            for &(program, event, _) in BIND_HOOKS {
                if let Err(e) = attach_syscall(&mut ebpf, program, event) {
                    bind_missing = Some(e.to_string());
                    break;
                }
            }
        }
        let sock_diag = super::sock_diag::probe().err().map(|e| e.to_string());
        let mut degraded = super::capability::degraded(
            &setup.resolved,
            bind_missing.as_deref(),
            sock_diag.as_deref(),
        );
        degraded.extend(privilege::degraded(&privilege::Context::current()));
        for d in &degraded {
            log::warn!("{d}");
        }
        let ring = RingBuf::try_from(
            ebpf.take_map("EVENTS")
                .ok_or(TracerError::Missing("EVENTS"))?,
        )
        .map_err(|e| TracerError::Map("EVENTS", e))?;
        let counters = PerCpuArray::try_from(
            ebpf.take_map("COUNTERS")
                .ok_or(TracerError::Missing("COUNTERS"))?,
        )
        .map_err(|e| TracerError::Map("COUNTERS", e))?;
        let passive_closes = PerCpuHashMap::try_from(
            ebpf.take_map("PASSIVE_CLOSES")
                .ok_or(TracerError::Missing("PASSIVE_CLOSES"))?,
        )
        .map_err(|e| TracerError::Map("PASSIVE_CLOSES", e))?;
        // Loading parsed the kernel's BTF (megabytes, now freed): hand that memory back rather
        // than keep it resident for the whole run. (glibc only; musl returns freed memory.)
        #[cfg(target_env = "gnu")]
        // SAFETY: malloc_trim only walks the allocator's own free lists.
        unsafe {
            libc::malloc_trim(0)
        };
        Ok((
            Self {
                ebpf,
                counters,
                passive_closes,
                degraded,
                _logger: logger,
            },
            ring,
        ))
    }

    /// The kernel's map of connections closed first, for the sweep (it can be taken once).
    pub fn take_closing(
        &mut self,
    ) -> Result<aya::maps::HashMap<MapData, u64, twtrace_ebpf::Closing>, TracerError> {
        aya::maps::HashMap::try_from(
            self.ebpf
                .take_map("CONNS")
                .ok_or(TracerError::Missing("CONNS"))?,
        )
        .map_err(|e| TracerError::Map("CONNS", e))
    }

    /// What this kernel cannot show, one line each (empty where nothing is missing).
    pub fn degraded(&self) -> &[String] {
        &self.degraded
    }

    /// Passive closes (LAST_ACK->CLOSE) so far, per network namespace.
    pub fn passive_closes(&self) -> Vec<(u32, u64)> {
        self.passive_closes
            .iter()
            .filter_map(Result::ok)
            .map(|(netns, per_cpu)| (netns, per_cpu.iter().sum()))
            .collect()
    }

    /// Reads the loss counters (cheap: a few syscalls).
    pub fn loss(&self) -> Loss {
        let sum = |idx: u32| -> u64 {
            self.counters
                .get(&idx, 0)
                .map(|v| v.iter().sum())
                .unwrap_or(0)
        };
        let mut loss = Loss {
            ringbuf_full: sum(counter::RINGBUF_FULL),
            conn_map_fail: sum(counter::CONN_MAP_FAIL),
            read_fail: sum(counter::READ_FAIL),
            ..Loss::default()
        };
        for hook in HOOKS {
            let Some(fd) = self.ebpf.program(hook.program).and_then(|p| p.fd().ok()) else {
                continue;
            };
            let misses = recursion_misses(fd.as_fd().as_raw_fd());
            loss.recursion_misses += misses;
            loss.recursion_misses_by_program
                .insert(hook.program.to_string(), misses);
        }
        loss
    }
}

fn attach_syscall(
    ebpf: &mut Ebpf,
    program: &'static str,
    event: &'static str,
) -> Result<(), TracerError> {
    let tp: &mut TracePoint = ebpf
        .program_mut(program)
        .ok_or(TracerError::Missing(program))?
        .try_into()
        .map_err(|e| attach_error(event, e))?;
    tp.load().map_err(|e| attach_error(event, e))?;
    tp.attach("syscalls", event)
        .map_err(|e| attach_error(event, e))?;
    Ok(())
}

fn attach_btf(
    ebpf: &mut Ebpf,
    btf: &Btf,
    program: &'static str,
    tp: &'static str,
) -> Result<(), TracerError> {
    let refused = |e: ProgramError| attach_error(tp, e);
    let prog: &mut BtfTracePoint = ebpf
        .program_mut(program)
        .ok_or(TracerError::Missing(program))?
        .try_into()
        .map_err(refused)?;
    prog.load(tp, btf).map_err(refused)?;
    prog.attach().map_err(refused)?;
    Ok(())
}

/// twtrace's tracepoints with programs that return at once, attached until dropped: what the
/// hooks alone cost (each run of a tracepoint-to-BPF dispatch), which no program work can
/// remove. The bench measures it beside twtrace.
pub struct HooksOnly {
    _ebpf: Ebpf,
}

impl HooksOnly {
    /// `tracepoints`: which of twtrace's tracepoints to hook (all of them when empty).
    pub fn attach(tracepoints: &[&str]) -> Result<Self, TracerError> {
        preflight()?;
        let btf = Btf::from_sys_fs().map_err(|_| TracerError::NoBtf)?;
        let mut ebpf = EbpfLoader::new().btf(Some(&btf)).load(PROGRAMS)?;
        let wanted = |tp: &str| tracepoints.is_empty() || tracepoints.contains(&tp);
        for hook in HOOKS.iter().filter(|h| wanted(h.tracepoint)) {
            attach_btf(&mut ebpf, &btf, hook.empty, hook.tracepoint)?;
        }
        // Like twtrace's own bind() hooks, only where tracefs has them.
        if tracefs::ensure_mounted().is_ok() {
            for &(_, event, empty) in BIND_HOOKS.iter().filter(|h| wanted(h.1)) {
                attach_syscall(&mut ebpf, empty, event)?;
            }
        }
        Ok(Self { _ebpf: ebpf })
    }
}

/// One line for the user; the verifier's log (often hundreds of lines) goes to the debug log.
fn attach_error(hook: &'static str, e: ProgramError) -> TracerError {
    let reason = match &e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            log::debug!("verifier log for {hook}:\n{verifier_log}");
            format!("load failed: {io_error}")
        }
        other => other.to_string(),
    };
    TracerError::Attach { hook, reason }
}

/// `bpf_prog_info.recursion_misses`, which aya does not expose.
fn recursion_misses(fd: i32) -> u64 {
    use aya_obj::generated::bpf_prog_info;
    let mut info: bpf_prog_info = unsafe { mem::zeroed() };
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let attr = InfoAttr {
        bpf_fd: fd as u32,
        info_len: mem::size_of::<bpf_prog_info>() as u32,
        info: &mut info as *mut _ as u64,
    };
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &attr as *const InfoAttr,
            mem::size_of::<InfoAttr>(),
        )
    };
    if rc < 0 { 0 } else { info.recursion_misses }
}

/// Forwards aya-log records from the kernel programs to the `log` crate.
fn start_logger(ebpf: &mut Ebpf) -> Option<tokio::task::JoinHandle<()>> {
    let logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(l) => l,
        Err(e) => {
            log::warn!("kernel-side logging unavailable: {e}");
            return None;
        }
    };
    // SAFETY: the logger owns its ring buffer's fd, open and unchanged until it is dropped.
    let mut fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    }
    .ok()?;
    Some(tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    }))
}
