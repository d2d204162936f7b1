//! Kernel symbol addresses from /proc/kallsyms.
//!
//! TIME_WAIT sockets are recognised by their timer's callback, `tw_timer_handler`, a static
//! function: its address is only published here, and only to CAP_SYSLOG when kernel.kptr_restrict=1 or
//! kernel.perf_event_paranoid >= 2 (see `super::privilege`).

use std::{collections::HashMap, fs, io};

use super::privilege::{Cap, Effective, KallsymsSettings};

#[derive(Debug, thiserror::Error)]
pub enum KallsymsError {
    #[error("cannot read /proc/kallsyms: {0}")]
    Read(#[from] io::Error),
    #[error("kernel symbol {0} not found in /proc/kallsyms")]
    Missing(&'static str),
    /// `why`: the setting that hides them and what to do.
    #[error("/proc/kallsyms hides kernel addresses from twtrace: {why}")]
    Hidden { why: String },
}

/// Looks up `names` (exact, text symbols) in kallsyms-formatted `text`.
pub fn parse(
    text: &str,
    names: &[&'static str],
) -> Result<HashMap<&'static str, u64>, KallsymsError> {
    let mut found = HashMap::new();
    for line in text.lines() {
        let mut it = line.split_ascii_whitespace();
        let (Some(addr), Some(_kind), Some(name)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        if let Some(&n) = names.iter().find(|&&n| n == name)
            && !found.contains_key(n)
        {
            let addr = u64::from_str_radix(addr, 16).unwrap_or(0);
            if addr == 0 {
                return Err(KallsymsError::Hidden {
                    why: "they read as 0".into(),
                });
            }
            found.insert(n, addr);
        }
    }
    for n in names {
        if !found.contains_key(n) {
            return Err(KallsymsError::Missing(n));
        }
    }
    Ok(found)
}

/// Looks up `names` in /proc/kallsyms; hidden addresses are explained by the settings and
/// capabilities that hide them.
pub fn lookup(names: &[&'static str]) -> Result<HashMap<&'static str, u64>, KallsymsError> {
    parse(&fs::read_to_string("/proc/kallsyms")?, names).map_err(|e| match e {
        KallsymsError::Hidden { .. } => KallsymsError::Hidden {
            why: KallsymsSettings::read().why_hidden(Effective::current().has(Cap::Syslog)),
        },
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "ffffffff82006870 t tw_timer_handler\n\
                          ffffffff82008db0 t reqsk_timer_handler\n\
                          ffffffff82008db0 t reqsk_timer_handler.cold\n";

    #[test]
    fn finds_exact_names() {
        let m = parse(SAMPLE, &["tw_timer_handler", "reqsk_timer_handler"]).unwrap();
        assert_eq!(m["tw_timer_handler"], 0xffffffff82006870);
        assert_eq!(m["reqsk_timer_handler"], 0xffffffff82008db0);
    }

    #[test]
    fn missing_and_hidden() {
        assert!(matches!(
            parse(SAMPLE, &["nope"]),
            Err(KallsymsError::Missing("nope"))
        ));
        let hidden = "0000000000000000 t tw_timer_handler\n";
        assert!(matches!(
            parse(hidden, &["tw_timer_handler"]),
            Err(KallsymsError::Hidden { .. })
        ));
    }
}
