//! `twtrace check`: whether this kernel and these privileges run twtrace, what it can show
//! here (each capability available, degraded or missing, and why) and which program variants
//! it chose. Loads and attaches the programs for real, then detaches.

use serde_json::json;
use twtrace::{
    cli::CheckArgs,
    kernel::{
        capability::{self, Status},
        config_hz, netns, sock_diag,
        tracer::{self, BTF_PATH, Tracer, TracerOptions},
    },
};

use super::read_proc;

pub fn run(args: &CheckArgs) -> anyhow::Result<()> {
    let kernel = read_proc("/proc/sys/kernel/osrelease");
    tracer::preflight()?;
    let setup = tracer::kernel_config(&TracerOptions::default())?;
    let hz = config_hz();
    let reachable = netns::enumerate().len();
    let attach = Tracer::start(&TracerOptions::default()).map(drop);
    let sock_diag = sock_diag::probe().err().map(|e| e.to_string());
    let caps = capability::capabilities(
        &setup.resolved,
        setup.bind_missing.as_deref(),
        sock_diag.as_deref(),
    );
    let variants = capability::variants(&setup.resolved);
    if args.json {
        let doc = json!({
            "kernel": kernel,
            "btf": BTF_PATH,
            "config_hz": hz,
            "namespaces_reachable": reachable,
            "attached": attach.is_ok(),
            "attach_error": attach.as_ref().err().map(|e| e.to_string()),
            "capabilities": caps,
            "variants": variants
                .iter()
                .map(|(choice, variant)| json!({"choice": choice, "variant": variant}))
                .collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        println!("kernel       {kernel}");
        println!("privileges   ok");
        println!("BTF          {BTF_PATH}");
        match hz {
            Some(hz) => println!("CONFIG_HZ    {hz}"),
            None => println!("CONFIG_HZ    unknown (measured from jiffies at start)"),
        }
        println!("namespaces   {reachable} reachable");
        match &attach {
            Ok(()) => println!("programs     loaded and attached"),
            Err(e) => println!("programs     REFUSED: {e}"),
        }
        println!();
        let width = caps.iter().map(|c| c.name.len()).max().unwrap_or(0);
        println!("{:width$}  STATUS", "CAPABILITY");
        for c in &caps {
            let status = match &c.status {
                Status::Available => "available".to_string(),
                Status::Degraded(w) => format!("degraded: {w}"),
                Status::Missing(w) => format!("missing: {w}"),
            };
            println!("{:width$}  {status}", c.name);
        }
        println!();
        let width = variants.iter().map(|v| v.0.len()).max().unwrap_or(0);
        println!("{:width$}  CHOSEN", "PROGRAM VARIANT");
        for (choice, variant) in &variants {
            println!("{choice:width$}  {variant}");
        }
    }
    attach?;
    Ok(())
}
