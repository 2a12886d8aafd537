//! A small deterministic generator, so a failing run can be repeated exactly.

/// SplitMix64: a seed in, the same sequence out, every time.
#[derive(Debug, Clone)]
pub struct SplitMix(pub u64);

impl SplitMix {
    /// The next number of the sequence.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..bound`.
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound
    }

    /// A number in `low..high`.
    pub fn between(&mut self, low: i64, high: i64) -> i64 {
        low + self.below(high.abs_diff(low)) as i64
    }

    /// A multiple of 1/4 in [-50, 50): exact in binary, and so are sums of a few
    /// thousand of them.
    pub fn quarter(&mut self) -> f64 {
        (self.below(400) as f64 - 200.0) / 4.0
    }

    /// Shuffles `items` in place (Fisher-Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for index in (1..items.len()).rev() {
            let other = self.below(index as u64 + 1) as usize;
            items.swap(index, other);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::SplitMix;

    #[test]
    fn one_seed_gives_one_sequence() {
        let (mut one, mut other) = (SplitMix(7), SplitMix(7));
        let first: Vec<u64> = (0..4).map(|_| one.next_u64()).collect();
        assert_eq!(first, (0..4).map(|_| other.next_u64()).collect::<Vec<_>>());
        assert_ne!(first[0], first[1]);
    }

    #[test]
    fn draws_stay_in_their_ranges() {
        let mut random = SplitMix(11);
        for _ in 0..1_000 {
            assert!((-3..5).contains(&random.between(-3, 5)));
            let quarter = random.quarter();
            assert!((-50.0..50.0).contains(&quarter));
            assert_eq!((quarter * 4.0).fract(), 0.0);
        }
    }

    #[test]
    fn a_shuffle_keeps_every_item() {
        let mut items: Vec<u32> = (0..50).collect();
        SplitMix(3).shuffle(&mut items);
        assert_ne!(items, (0..50).collect::<Vec<_>>());
        items.sort_unstable();
        assert_eq!(items, (0..50).collect::<Vec<_>>());
    }
}
