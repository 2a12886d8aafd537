//! Where a claim starts: an outbox id below which every row is published.
//!
//! A claim walks the partial index of unpublished rows in id order. A row the relay
//! marks published leaves its entry in that index until a vacuum, so a claim from the
//! index's start reads past the entry of every row marked since the last vacuum: 384
//! index pages and 3.1 ms per claim after ~1M marks (measured 2026-12-01), at hundreds
//! of claims a second. The relay vacuums the outbox only when a fifth of it is dead
//! (a vacuum of a 4M-row outbox took 7 s), so the claims start at a floor instead.
//!
//! The floor must never pass a row that is unpublished, nor one that is still being
//! inserted and will become visible later with a lower id than rows already published
//! (ingest's commits run side by side). Each round takes a probe before its claim
//! (which starts at the floor as it stood), in one statement and so one snapshot S: the
//! lowest unpublished id at or above the floor (or, if there is none, the highest id
//! plus one), the `bound`, and S's `xmin`. Every row below `bound` that S sees is
//! published. One it does not see was inserted by a transaction that took its id
//! before S, so it had its transaction id before S too (ingest's statement inserts the
//! idempotency key, which assigns the transaction id, before it draws an outbox id;
//! outbox ids come from a sequence without a cache, so they are handed out in order).
//!
//! The round's claim locks rows after S, which gives the round's own transaction an
//! id: the `horizon`, above that of every transaction that held one at S. (S's `xmax`
//! is not: it is one past the latest transaction *completed*, and a transaction that
//! took a later id and is still running is below neither it nor S's `xmin`.) Once a
//! later probe's `xmin` is at or past the horizon, all those transactions have ended,
//! so every row below `bound` is visible to it, and the ones below its own `bound` are
//! published: the floor moves to the lower of the two bounds. A round that claims
//! nothing has no transaction id and proposes no bound. The probe does not skip locked
//! rows, so rows another round or another relay holds, or a failed round handed back,
//! keep the floor below them.
//!
//! Only the stream check makes a published row unpublished again (after a stream lost
//! messages). Each stream check therefore resets the floor to 0 — every
//! `stream_check_interval_ms` and after each reconnect — and a probe taken before a
//! reset is ignored. The reset also bounds what could still slip below the floor: a row
//! inserted by a plain `INSERT INTO outbox` takes its id a moment before its
//! transaction id, and is then found by the first claim after the next reset.

/// The probe each round takes before it claims; `PROBE` fills it, and `HORIZON` after
/// the claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Probe {
    /// `pg_snapshot_xmin` of the probe's snapshot: every older transaction has ended.
    pub xmin: i64,
    /// The round's own transaction id, taken by its claim after the probe (none when it
    /// claimed nothing): every transaction that held one at the probe is older.
    pub horizon: Option<i64>,
    /// The lowest unpublished id at or above the floor the probe was taken from, or
    /// one more than the highest id when there is none.
    pub bound: i64,
    /// The reset count when the probe was taken ([`ClaimFloor::current`]).
    pub epoch: u64,
}

/// A bound whose transactions may not all have ended yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Candidate {
    horizon: i64,
    bound: i64,
}

/// The floor shared by the relay's lanes.
#[derive(Debug, Default)]
pub(crate) struct ClaimFloor {
    floor: i64,
    candidate: Option<Candidate>,
    epoch: u64,
}

impl ClaimFloor {
    /// The floor a probe starts from, and the epoch to hand back with it.
    pub fn current(&self) -> (i64, u64) {
        (self.floor, self.epoch)
    }

    /// Takes a probe into account; returns the floor the next claims start from.
    pub fn observe(&mut self, probe: Probe) -> i64 {
        if probe.epoch != self.epoch {
            return self.floor; // taken before a reset: its bound may pass repaired rows
        }
        let latest = probe.horizon.map(|horizon| Candidate {
            horizon,
            bound: probe.bound,
        });
        match self.candidate {
            Some(candidate) if probe.xmin >= candidate.horizon => {
                self.floor = self.floor.max(candidate.bound.min(probe.bound));
                self.candidate = latest;
            }
            // Its transactions are still running: keep it (replacing it by newer ones
            // under a steady load would let none of them ever mature).
            Some(_) => {}
            None => self.candidate = latest,
        }
        self.floor
    }

    /// Back to the index's start (after a stream check).
    pub fn reset(&mut self) {
        *self = Self {
            floor: 0,
            candidate: None,
            epoch: self.epoch.wrapping_add(1),
        };
    }
}

/// The probe: one statement, one snapshot. `$1` is the floor it starts from.
pub(crate) const PROBE: &str = "
SELECT pg_snapshot_xmin(s)::text::bigint,
       coalesce((SELECT min(id) FROM outbox WHERE published_at IS NULL AND id >= $1),
                greatest((SELECT max(id) + 1 FROM outbox), $1))
FROM pg_current_snapshot() AS s";

/// The round's transaction id after its claim: NULL when the claim locked no row.
pub(crate) const HORIZON: &str = "SELECT pg_current_xact_id_if_assigned()::text::bigint";

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(floor: &ClaimFloor, xmin: i64, horizon: i64, bound: i64) -> Probe {
        Probe {
            xmin,
            horizon: Some(horizon),
            bound,
            epoch: floor.current().1,
        }
    }

    #[test]
    fn a_bound_counts_only_once_every_transaction_running_at_its_probe_has_ended() {
        let mut floor = ClaimFloor::default();
        let first = probe(&floor, 100, 105, 50);
        assert_eq!(floor.observe(first), 0, "a first probe only proposes");
        // Transaction 104 still runs: it may hold an id below 50.
        let second = probe(&floor, 104, 110, 60);
        assert_eq!(floor.observe(second), 0);
        // Every transaction below 105 ended; rows below 60 seen then were published.
        let third = probe(&floor, 105, 112, 60);
        assert_eq!(floor.observe(third), 50, "the lower of the two bounds");
        let fourth = probe(&floor, 112, 115, 70);
        assert_eq!(floor.observe(fourth), 60);
    }

    #[test]
    fn an_unpublished_row_below_a_matured_bound_holds_the_floor_below_it() {
        let mut floor = ClaimFloor::default();
        floor.observe(probe(&floor, 10, 20, 500));
        // A straggler with id 300 committed meanwhile and is not published yet.
        assert_eq!(floor.observe(probe(&floor, 20, 25, 300)), 300);
    }

    #[test]
    fn a_round_that_claimed_nothing_proposes_no_bound_but_matures_one() {
        let mut floor = ClaimFloor::default();
        let idle = |floor: &ClaimFloor, xmin, bound| Probe {
            horizon: None,
            ..probe(floor, xmin, 0, bound)
        };
        assert_eq!(floor.observe(idle(&floor, 10, 500)), 0, "nothing proposed");
        assert_eq!(floor.observe(idle(&floor, 30, 600)), 0, "still nothing");
        floor.observe(probe(&floor, 30, 40, 600));
        assert_eq!(floor.observe(idle(&floor, 40, 700)), 600);
        assert_eq!(
            floor.observe(idle(&floor, 50, 800)),
            600,
            "its bound was taken; none came after it"
        );
    }

    #[test]
    fn the_floor_never_moves_back_but_for_a_reset() {
        let mut floor = ClaimFloor::default();
        floor.observe(probe(&floor, 10, 20, 500));
        assert_eq!(floor.observe(probe(&floor, 20, 30, 600)), 500);
        // A bound below the floor (it cannot be, the probe starts at the floor) is no step back.
        assert_eq!(floor.observe(probe(&floor, 30, 40, 400)), 500);
        floor.reset();
        assert_eq!(floor.current().0, 0);
    }

    #[test]
    fn a_probe_taken_before_a_reset_is_ignored() {
        let mut floor = ClaimFloor::default();
        floor.observe(probe(&floor, 10, 20, 500));
        let stale = probe(&floor, 20, 30, 600);
        floor.reset(); // a stream check made rows below 500 unpublished again
        assert_eq!(floor.observe(stale), 0);
        assert_eq!(
            floor.observe(probe(&floor, 30, 40, 100)),
            0,
            "a new first probe"
        );
        assert_eq!(floor.observe(probe(&floor, 40, 45, 120)), 100);
    }
}
