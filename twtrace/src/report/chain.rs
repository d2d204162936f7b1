//! The files given to one report, checked against their places in a rotation (the header's
//! `chain`): out of order is refused with the order to type, a missing file is said.
//! Recordings without a `chain` (older ones) are checked by their first events' times as the
//! report reaches each ([`older_in_order`]), one file read ahead at a time.

use super::ReportError;
use crate::record::Frames;

/// What the files' order says.
#[derive(Debug, Default, PartialEq)]
pub struct Order {
    /// One sentence per missing stretch.
    pub warnings: Vec<String>,
    /// Indexes of the files a gap comes before.
    pub gaps_before: Vec<usize>,
}

pub fn check<F: Frames>(traces: &[(String, F)]) -> Result<Order, ReportError> {
    let mut order = Order::default();
    for (i, pair) in traces.windows(2).enumerate() {
        let ((a_name, a), (b_name, b)) = (&pair[0], &pair[1]);
        let (Some(ca), Some(cb)) = (&a.header().chain, &b.header().chain) else {
            continue;
        };
        if ca.recording != cb.recording {
            continue;
        }
        if cb.sequence <= ca.sequence {
            return Err(ReportError::OutOfOrder {
                earlier: b_name.clone(),
                later: a_name.clone(),
                same: cb.sequence == ca.sequence,
                order: suggested(traces),
            });
        }
        let missing = cb.sequence - ca.sequence - 1;
        if missing > 0 {
            order.gaps_before.push(i + 1);
            order.warnings.push(format!(
                "{} of this recording {} missing between {a_name} and {b_name} (rotation parts {} and {}): what began or ended in {} is not counted, and the TIME_WAITs alive after the gap are taken from the top of {b_name}",
                crate::text::count(missing, "file"),
                if missing == 1 { "is" } else { "are" },
                ca.sequence,
                cb.sequence,
                if missing == 1 { "it" } else { "them" },
            ));
        }
    }
    Ok(order)
}

/// The files oldest first, when they all belong to one recording; else how to name them.
fn suggested<F: Frames>(traces: &[(String, F)]) -> String {
    let mut seqs: Vec<(u64, &str)> = Vec::new();
    let mut id = None;
    for (name, t) in traces {
        match &t.header().chain {
            Some(c) if id.is_none_or(|i| i == &c.recording) => {
                id = Some(&c.recording);
                seqs.push((c.sequence, name));
            }
            _ => return "the files of a rotation oldest first (FILE.N ... FILE.1 FILE)".into(),
        }
    }
    seqs.sort();
    seqs.dedup_by_key(|s| s.0);
    let names: Vec<&str> = seqs.iter().map(|s| s.1).collect();
    format!("twtrace report {}", names.join(" "))
}

/// For two files without a `chain` of one boot of one host, `b` given after `a`: in order
/// when `b` starts no earlier than `a` did.
pub fn older_in_order<F: Frames>(
    (a_name, a, a_first): (&str, &F, u64),
    (b_name, b): (&str, &mut F),
) -> Result<(), ReportError> {
    let (ha, hb) = (a.header(), b.header());
    if ha.chain.is_some()
        || hb.chain.is_some()
        || ha.hostname != hb.hostname
        || ha.boot_time != hb.boot_time
    {
        return Ok(());
    }
    match b.first_ts_ns()? {
        Some(b_first) if b_first < a_first => Err(ReportError::OutOfOrder {
            earlier: b_name.to_string(),
            later: a_name.to_string(),
            same: false,
            order: format!("{b_name} before {a_name}"),
        }),
        _ => Ok(()),
    }
}
