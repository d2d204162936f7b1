//! `twtrace completions SHELL` and `twtrace man DIR`: the shell completions and man pages a
//! package installs, generated from the same command-line definition that parses arguments
//! (`cargo xtask dist` calls both).

use std::{io::Write as _, os::unix::fs::PermissionsExt as _};

use anyhow::Context as _;
use clap::CommandFactory as _;
use twtrace::{
    cli::{Cli, CompletionsArgs, ManArgs},
    safe_file::{Existing, Target},
};

pub fn completions(args: &CompletionsArgs) -> anyhow::Result<()> {
    let mut out = Vec::new();
    clap_complete::generate(args.shell, &mut Cli::command(), "twtrace", &mut out);
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(&out).context("writing the completions")?;
    Ok(())
}

/// One page per command that is shown in `--help`: twtrace.1, twtrace-trace.1, ...
pub fn man(args: &ManArgs) -> anyhow::Result<()> {
    let mut cmd = Cli::command().disable_help_subcommand(true);
    // Gives each subcommand its display name ("twtrace-trace"), which names its page.
    cmd.build();
    let existing = if args.force {
        Existing::Replace
    } else {
        Existing::Refuse
    };
    let mut pages = Vec::new();
    collect(&cmd, &mut pages);
    for page in pages {
        let man = clap_mangen::Man::new(page);
        let path = args.dir.join(man.get_filename());
        let mut text = Vec::new();
        man.render(&mut text).context("rendering a man page")?;
        // Pages are for everyone to read: root's (no sudo owner), mode 0644 set on the fd.
        let mut file = Target::new(&path)?.create(existing, None)?;
        file.set_permissions(std::fs::Permissions::from_mode(0o644))
            .with_context(|| format!("chmod {}", path.display()))?;
        file.write_all(&text)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("{}", path.display());
    }
    Ok(())
}

fn collect(cmd: &clap::Command, out: &mut Vec<clap::Command>) {
    out.push(cmd.clone());
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        collect(sub, out);
    }
}
