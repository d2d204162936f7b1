//! `twtrace check`: what this kernel offers, what twtrace resolved, and whether it attaches.

use std::path::Path;

use twtrace::kernel::{
    btf::KernelBtf,
    config_hz, netns,
    tracer::{self, BTF_PATH, Tracer, TracerOptions},
};

pub fn run() -> anyhow::Result<()> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!("kernel        {}", release.trim());
    tracer::preflight()?;
    println!("privileges    ok");
    let btf = KernelBtf::load(Path::new(BTF_PATH))?;
    let off = btf.offsets()?;
    println!("BTF           ok ({BTF_PATH})");
    println!("offsets       {off:?}");
    let cfg = tracer::kernel_config(&TracerOptions::default())?;
    println!(
        "symbols       tw_timer_handler={:#x} reqsk_timer_handler={:#x}",
        cfg.tw_timer_handler, cfg.reqsk_timer_handler
    );
    match config_hz() {
        Some(hz) => println!("CONFIG_HZ     {hz}"),
        None => println!("CONFIG_HZ     unknown (timer lengths assume 250)"),
    }
    println!("netns         {} reachable", netns::enumerate().len());
    let (tracer, _ring) = Tracer::start(&TracerOptions::default())?;
    println!(
        "attach        ok (tp_btf: inet_sock_set_state x2, tcp_send_reset, tcp_receive_reset, timer_start, timer_cancel, timer_expire_entry)"
    );
    drop(tracer);
    Ok(())
}
