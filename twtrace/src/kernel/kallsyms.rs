//! Kernel symbol addresses from /proc/kallsyms.
//!
//! TIME_WAIT sockets are recognised by their timer's callback, `tw_timer_handler`, a static
//! function: its address is only published here (and only to root, under kptr_restrict).

use std::{collections::HashMap, fs, io};

#[derive(Debug, thiserror::Error)]
pub enum KallsymsError {
    #[error("cannot read /proc/kallsyms: {0}")]
    Read(#[from] io::Error),
    #[error("kernel symbol {0} not found in /proc/kallsyms")]
    Missing(&'static str),
    #[error("/proc/kallsyms hides addresses (kptr_restrict): run twtrace as root")]
    Hidden,
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
                return Err(KallsymsError::Hidden);
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

pub fn lookup(names: &[&'static str]) -> Result<HashMap<&'static str, u64>, KallsymsError> {
    parse(&fs::read_to_string("/proc/kallsyms")?, names)
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
            Err(KallsymsError::Hidden)
        ));
    }
}
