//! A recording fed through the aggregator as it is written: when a file rotates, the new one
//! restates what the aggregator holds (the TIME_WAITs alive, the running counts), so the
//! aggregator stays the one source of truth of what each file carries over.

use super::{Carried, RecordError, Recorder};
use crate::{
    aggregate::{Aggregator, Clock, Record},
    event::Event,
};

pub struct Session<C: Clock> {
    pub rec: Recorder,
    pub agg: Aggregator<C>,
    sink: Vec<Record>,
}

impl<C: Clock> Session<C> {
    pub fn new(rec: Recorder, agg: Aggregator<C>) -> Self {
        Self {
            rec,
            agg,
            sink: Vec::new(),
        }
    }

    /// Writes `ev` and feeds it to the aggregator. A full file is rotated first, so a new
    /// file is begun only for an event to put in it.
    pub fn push(&mut self, ev: Event) -> Result<(), RecordError> {
        if self.rec.rotation_due() {
            self.rotate()?;
        }
        self.rec.push(&ev)?;
        self.agg.ingest(ev, &mut self.sink);
        self.sink.clear();
        Ok(())
    }

    /// Writes the frame built since the last call: call once a second.
    pub fn flush(&mut self) -> Result<(), RecordError> {
        self.rec.flush()
    }

    /// Begins the next file, restating the aggregator's state at its top: every event so far
    /// is in the files before it, and the aggregator has seen each one.
    fn rotate(&mut self) -> Result<(), RecordError> {
        let now = self.agg.now_ns();
        let alive: Vec<_> = self.agg.alive().map(|tw| tw.restate(now)).collect();
        let mut passive_closes: Vec<(u32, u64)> = self
            .agg
            .passive_closes_total()
            .iter()
            .map(|(&ns, &n)| (ns, n))
            .collect();
        passive_closes.sort_unstable();
        let carried = Carried {
            ts_ns: now,
            alive: alive.len() as u64,
            totals: self.agg.totals().clone(),
            passive_closes,
            loss: self.agg.loss_total().clone(),
        };
        self.rec.rotate(carried, alive)
    }
}
