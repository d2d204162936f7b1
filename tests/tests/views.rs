//! Root tests of the terminal views, driven through tmux: the live view against `ss`, and a
//! replay. A test binary of their own, which cargo runs after the others rather than beside
//! them: this kernel runs no tracing program while the VM's agent (PID 1) is the current task,
//! even for softirq work on top of it, and with the whole suite loading the CPUs more of that
//! work lands there, so a TIME_WAIT of these tests was occasionally invisible to every tracer
//! (see the README's limits).

use std::time::Duration;

use twtrace_integration::{Netns, can_run, tmp_trace};

fn tmux(args: &[&str]) -> String {
    let out = std::process::Command::new("tmux")
        .args(args)
        .output()
        .expect("tmux");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A detached tmux session running `cmd` (160x45 unless sized), killed when dropped.
struct Tmux(String);

impl Tmux {
    fn start(tag: &str, cmd: &str) -> Self {
        Self::sized(tag, cmd, 160, 45)
    }

    fn sized(tag: &str, cmd: &str, width: u16, height: u16) -> Self {
        let name = format!("twt-{tag}-{}", std::process::id());
        tmux(&[
            "new-session",
            "-d",
            "-s",
            &name,
            "-x",
            &width.to_string(),
            "-y",
            &height.to_string(),
            cmd,
        ]);
        Self(name)
    }

    fn keys(&self, keys: &str) {
        tmux(&["send-keys", "-t", &self.0, keys]);
    }

    /// The screen once `pred` holds (15 s at most). One capture may catch a redraw half done,
    /// so this waits for one that shows it all.
    fn wait(&self, what: &str, pred: &dyn Fn(&str) -> bool) -> String {
        let until = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            let s = tmux(&["capture-pane", "-p", "-t", &self.0]);
            if pred(&s) {
                return s;
            }
            assert!(
                std::time::Instant::now() < until,
                "waiting for {what}:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        tmux(&["kill-session", "-t", &self.0]);
    }
}

#[test]
fn live_view_in_tmux_matches_ss_and_quits_cleanly() {
    if !can_run() {
        return;
    }
    let ns = Netns::new("live");
    let cmd = format!(
        "{} --netns {} --interval 0.5; echo EXIT=$?; sleep 60",
        twtrace_integration::twtrace_bin().display(),
        ns.name
    );
    let term = Tmux::start("live", &cmd);
    term.wait("the view", &|s| s.contains("TIME_WAIT alive 0"));
    ns.twload(&["fill", "127.0.0.1:8080", "12"]);
    let by_ss = twtrace_integration::count_time_waits(&ns, 8080);
    assert_eq!(by_ss, 12);
    let netns = format!("netns {}", ns.inode);
    term.wait("the TIME_WAITs", &|s| {
        s.contains(&format!("TIME_WAIT alive {by_ss} "))
            && s.contains("twload")
            && s.contains(&netns)
    });
    // The destination table shows where the ports went.
    term.keys("Tab");
    term.wait("the destination table", &|s| {
        s.contains("127.0.0.1:8080") && s.contains("PRESSURE")
    });
    term.keys("q");
    let s = term.wait("exit", &|s| s.contains("EXIT="));
    assert!(s.contains("EXIT=0"), "{s}");
    // The alternate screen is gone: the view's text no longer shows.
    assert!(
        !s.contains("TIME_WAIT alive"),
        "terminal not restored:\n{s}"
    );
}

/// At 80x24 (an SSH window at 3 a.m.) the key figures are on screen and whole; Esc closes
/// the help without quitting, and only a second Esc quits.
#[test]
fn live_view_fits_80x24_and_esc_closes_help_before_quitting() {
    if !can_run() {
        return;
    }
    let ns = Netns::new("small");
    let cmd = format!(
        "{} --netns {} --interval 0.5; echo EXIT=$?; sleep 60",
        twtrace_integration::twtrace_bin().display(),
        ns.name
    );
    let term = Tmux::sized("small", &cmd, 80, 24);
    term.wait("the view", &|s| s.contains("TIME_WAIT alive 0"));
    ns.twload(&["fill", "127.0.0.1:8080", "5"]);
    let s = term.wait("the TIME_WAITs at 80x24", &|s| {
        s.contains("TIME_WAIT alive 5 ")
            && s.contains("entered")
            && s.contains("lost:")
            && s.lines()
                .any(|l| l.contains(" twload ") && l.contains(" 5 "))
    });
    assert!(s.lines().all(|l| l.chars().count() <= 80), "{s}");
    assert!(
        s.contains("ip_local_port_range="),
        "settings shown when calm:\n{s}"
    );
    term.keys("?");
    term.wait("the help", &|s| s.contains("Esc close this help"));
    term.keys("Escape");
    term.wait("the help closed, the view still up", &|s| {
        !s.contains("Esc close this help") && s.contains("TIME_WAIT alive 5 ")
    });
    term.keys("Escape");
    let s = term.wait("exit", &|s| s.contains("EXIT="));
    assert!(s.contains("EXIT=0"), "{s}");
}

#[test]
fn replay_drives_the_live_view_from_a_recording() {
    if !can_run() {
        return;
    }
    let ns = Netns::new("replay");
    let file = tmp_trace("replay");
    let mut rec = twtrace_integration::Recording::start(&ns, &file);
    ns.twload(&["fill", "127.0.0.1:8080", "7"]);
    std::thread::sleep(Duration::from_millis(300));
    rec.stop();
    let cmd = format!(
        "{} replay {file} --speed 20; echo EXIT=$?; sleep 60",
        twtrace_integration::twtrace_bin().display()
    );
    let term = Tmux::start("replay", &cmd);
    term.wait("the replayed TIME_WAITs", &|s| {
        s.contains("REPLAY") && s.contains("TIME_WAIT alive 7 ") && s.contains("twload")
    });
    term.keys("q");
    let s = term.wait("exit", &|s| s.contains("EXIT="));
    assert!(s.contains("EXIT=0"), "{s}");
    let _ = std::fs::remove_file(&file);
}

/// A hang-up (the SSH session dropped) ends the live view like `q`: the terminal is given
/// back (the alternate screen left, the cursor shown) and twtrace exits 0.
#[test]
fn sighup_ends_the_live_view_and_restores_the_terminal() {
    if !can_run() {
        return;
    }
    let ns = Netns::new("hup");
    let cmd = format!(
        "{} --netns {} --interval 0.5; echo EXIT=$?; sleep 60",
        twtrace_integration::twtrace_bin().display(),
        ns.name
    );
    let term = Tmux::start("hup", &cmd);
    term.wait("the view", &|s| s.contains("TIME_WAIT alive 0"));
    assert_eq!(
        tmux(&["display", "-p", "-t", &term.0, "#{alternate_on}"]).trim(),
        "1"
    );
    // The pane runs a shell; twtrace is its only child.
    let shell = tmux(&["list-panes", "-t", &term.0, "-F", "#{pane_pid}"]);
    let shell = shell.trim();
    let children = std::fs::read_to_string(format!("/proc/{shell}/task/{shell}/children")).unwrap();
    let pid: i32 = children
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no twtrace under the pane's shell {shell}: {children:?}"));
    assert!(
        std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .unwrap()
            .starts_with("twtrace")
    );
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let s = term.wait("exit", &|s| s.contains("EXIT="));
    assert!(s.contains("EXIT=0"), "{s}");
    assert!(
        !s.contains("TIME_WAIT alive"),
        "terminal not restored:\n{s}"
    );
    assert_eq!(
        tmux(&["display", "-p", "-t", &term.0, "#{alternate_on}"]).trim(),
        "0"
    );
    assert_eq!(
        tmux(&["display", "-p", "-t", &term.0, "#{cursor_flag}"]).trim(),
        "1"
    );
}
