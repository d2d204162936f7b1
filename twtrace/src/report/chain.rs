//! The files given to one report, checked against their places in a rotation (the header's
//! `chain`): out of order is refused with the order to type, a missing file is said.
//! Recordings without a `chain` (older ones) are taken as given.

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
