//! `twtrace check`: whether this kernel and these privileges run twtrace, what it can show
//! here (each capability available, degraded or missing, and why) and which program variants
//! it chose. Loads and attaches the programs for real, then detaches. The privileges come
//! first, so that what is missing is shown even when nothing can load.

use serde_json::json;
use twtrace::{
    cli::CheckArgs,
    kernel::{
        capability::{self, Status},
        found_hz, netns,
        privilege::{self, Need, Privilege},
        sock_diag,
        tracer::{self, BTF_PATH, Tracer, TracerOptions},
    },
};

use super::read_proc;

pub fn run(args: &CheckArgs) -> anyhow::Result<()> {
    let kernel = read_proc("/proc/sys/kernel/osrelease");
    let cx = privilege::Context::current();
    let privileges = privilege::privileges(&cx);
    let settings = privilege::settings(&cx);
    let settings_json: serde_json::Map<String, serde_json::Value> = settings
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone().into()))
        .collect();
    let setup = tracer::preflight().and_then(|()| tracer::kernel_config(&TracerOptions::default()));
    let setup = match setup {
        Ok(s) => s,
        Err(e) => {
            if args.json {
                let doc = json!({"kernel": kernel, "privileges": privileges, "settings": settings_json, "error": e.to_string()});
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                println!("kernel       {kernel}");
                print_privileges(&privileges, &settings);
            }
            return Err(e.into());
        }
    };
    // What the tracing commands use (kernel::hz).
    let hz = found_hz();
    let reachable = netns::joinable().len();
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
            "config_hz": hz.map(|h| h.0),
            "config_hz_source": hz.map(|h| h.1),
            "namespaces_reachable": reachable,
            "privileges": privileges,
            "settings": settings_json,
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
        print_privileges(&privileges, &settings);
        println!("BTF          {BTF_PATH}");
        match hz {
            Some((hz, how)) => println!("CONFIG_HZ    {hz} ({how})"),
            None => println!("CONFIG_HZ    unknown: neither in the kernel's config nor measurable"),
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

/// The privilege table: each capability, whether this process has it, and what it changes here.
fn print_privileges(privileges: &[Privilege], settings: &[(&str, String)]) {
    for (name, value) in settings {
        println!("{name:12} {value}");
    }
    println!();
    let width = privileges.iter().map(|p| p.name.len()).max().unwrap_or(0);
    println!(
        "{:width$}  HAS  NEEDED   WHAT IT GIVES / WITHOUT IT",
        "PRIVILEGE"
    );
    for p in privileges {
        let need = match p.need {
            Need::Required => "required",
            Need::Degrades => "degrades",
            Need::NotNeeded => "no",
        };
        let has = if p.present { "yes" } else { "NO" };
        let mut what = p.used_for.clone();
        if (p.lacking() || p.need == Need::NotNeeded) && !p.without.is_empty() {
            what = format!("{what}; without it: {}", p.without);
        }
        println!("{:width$}  {has:3}  {need:8} {what}", p.name);
    }
    println!();
}
