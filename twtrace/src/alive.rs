//! The TIME_WAITs alive now, by key. A busy host holds hundreds of thousands (the default
//! tcp_max_tw_buckets is 131072 per netns), so they are kept dense: the records in one vector,
//! grown by a quarter at a time rather than doubled, and a hash index of 16-byte slots.

use crate::{FastMap, aggregate::AliveTw, event::TwKey};

/// Below this, growth and shrinking are left to the vector.
const SMALL: usize = 4096;

#[derive(Default)]
pub struct AliveSet {
    index: FastMap<u64, u32>,
    tws: Vec<AliveTw>,
}

/// Cookies count up from 1 and kernel addresses sit in the top half of the address space, so
/// the two kinds of key never meet in one u64.
fn slot_key(k: &TwKey) -> u64 {
    match *k {
        TwKey::Cookie(c) => c,
        TwKey::Addr(a) => a,
    }
}

impl AliveSet {
    pub fn len(&self) -> usize {
        self.tws.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tws.is_empty()
    }

    pub fn iter(&self) -> std::slice::Iter<'_, AliveTw> {
        self.tws.iter()
    }

    pub fn contains_key(&self, key: &TwKey) -> bool {
        self.get(key).is_some()
    }

    pub fn get(&self, key: &TwKey) -> Option<&AliveTw> {
        let i = *self.index.get(&slot_key(key))? as usize;
        Some(&self.tws[i]).filter(|tw| tw.key == *key)
    }

    pub fn get_mut(&mut self, key: &TwKey) -> Option<&mut AliveTw> {
        let i = *self.index.get(&slot_key(key))? as usize;
        Some(&mut self.tws[i]).filter(|tw| tw.key == *key)
    }

    /// Inserts `tw`, returning the one it replaces under the same key.
    pub fn insert(&mut self, tw: AliveTw) -> Option<AliveTw> {
        let k = slot_key(&tw.key);
        if let Some(&i) = self.index.get(&k) {
            return Some(std::mem::replace(&mut self.tws[i as usize], tw));
        }
        if self.tws.len() == self.tws.capacity() && self.tws.len() >= SMALL {
            self.tws.reserve_exact(self.tws.len() / 4);
        }
        self.index.insert(k, self.tws.len() as u32);
        self.tws.push(tw);
        None
    }

    pub fn remove(&mut self, key: &TwKey) -> Option<AliveTw> {
        let i = self.index.remove(&slot_key(key))? as usize;
        let tw = self.tws.swap_remove(i);
        if let Some(moved) = self.tws.get(i) {
            self.index.insert(slot_key(&moved.key), i as u32);
        }
        self.shrink();
        Some(tw)
    }

    /// Removes and returns every TIME_WAIT for which `f` is true.
    pub fn extract_if(&mut self, mut f: impl FnMut(&AliveTw) -> bool) -> Vec<AliveTw> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < self.tws.len() {
            if f(&self.tws[i]) {
                let key = self.tws[i].key;
                out.extend(self.remove(&key));
            } else {
                i += 1;
            }
        }
        out
    }

    /// Gives memory back after a burst: a quarter full or less halves the allocations.
    fn shrink(&mut self) {
        let cap = self.tws.capacity();
        if cap > SMALL && self.tws.len() < cap / 4 {
            self.tws.shrink_to(cap / 2);
            self.index.shrink_to(cap / 2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::tests::alive_tw;

    #[test]
    fn removal_keeps_every_other_entry_reachable() {
        let mut set = AliveSet::default();
        for c in 1..=10_000u64 {
            assert!(set.insert(alive_tw(TwKey::Cookie(c))).is_none());
        }
        for c in (1..=10_000u64).step_by(3) {
            assert_eq!(
                set.remove(&TwKey::Cookie(c)).map(|t| t.key),
                Some(TwKey::Cookie(c))
            );
        }
        for c in 1..=10_000u64 {
            let present = (c - 1) % 3 != 0;
            assert_eq!(set.contains_key(&TwKey::Cookie(c)), present, "cookie {c}");
            if present {
                assert_eq!(set.get(&TwKey::Cookie(c)).unwrap().key, TwKey::Cookie(c));
            }
        }
        assert_eq!(set.len(), 10_000 - 3334);
        assert_eq!(set.iter().count(), set.len());
    }

    #[test]
    fn insert_replaces_and_returns_the_old_entry() {
        let mut set = AliveSet::default();
        let mut tw = alive_tw(TwKey::Addr(0xffff_8880_0000_1000));
        set.insert(tw.clone());
        tw.rescheduled = 3;
        let old = set.insert(tw).expect("replaced");
        assert_eq!(old.rescheduled, 0);
        assert_eq!(set.len(), 1);
        assert_eq!(
            set.get(&TwKey::Addr(0xffff_8880_0000_1000))
                .unwrap()
                .rescheduled,
            3
        );
        assert!(!set.contains_key(&TwKey::Cookie(0xffff_8880_0000_1000 + 1)));
    }

    #[test]
    fn extract_if_takes_exactly_the_matching_ones_and_memory_shrinks() {
        let mut set = AliveSet::default();
        for c in 1..=50_000u64 {
            set.insert(alive_tw(TwKey::Cookie(c)));
        }
        let big = set.tws.capacity();
        let gone = set.extract_if(|tw| matches!(tw.key, TwKey::Cookie(c) if c > 100));
        assert_eq!(gone.len(), 49_900);
        assert_eq!(set.len(), 100);
        assert!((1..=100).all(|c| set.contains_key(&TwKey::Cookie(c))));
        assert!(
            set.tws.capacity() < big / 4,
            "{} of {big}",
            set.tws.capacity()
        );
    }

    #[test]
    fn growth_past_the_small_size_adds_a_quarter() {
        let mut set = AliveSet::default();
        for c in 1..=131_076u64 {
            set.insert(alive_tw(TwKey::Cookie(c)));
        }
        // Doubling would have left room for 262144.
        assert!(
            set.tws.capacity() < 131_076 * 5 / 4 + 2,
            "{}",
            set.tws.capacity()
        );
    }
}
