//! Per-partition offset tracking: records are handed out in offset order, complete in any
//! order, and the committable position is the lowest offset not yet complete (or, with none
//! outstanding, the offset after the last handed-out record). So a commit never passes a record
//! whose result is not safely written.

use std::collections::VecDeque;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Handed out, being worked on.
    Pending,
    Done,
    /// Given up (e.g. on shutdown): blocks commits past it, but nobody waits for it.
    Abandoned,
}

#[derive(Debug, Default)]
pub struct PartitionOffsets {
    /// Handed-out offsets in order, with their state.
    outstanding: VecDeque<(i64, State)>,
    /// Offset after the last handed-out record (the next one to fetch).
    next: i64,
    /// Last position committed (or read from the group at assignment).
    committed: Option<i64>,
    /// How many of `outstanding` are Pending (kept so completions stay O(log n)).
    pending: usize,
}

impl PartitionOffsets {
    /// Starts at `position`: the first offset that will be handed out.
    pub fn new(position: i64, committed: Option<i64>) -> Self {
        Self {
            outstanding: VecDeque::new(),
            next: position,
            committed,
            pending: 0,
        }
    }

    /// Records that `offset` was handed out. Offsets must increase; gaps (compaction, control
    /// batches) are fine.
    pub fn handed_out(&mut self, offset: i64) {
        debug_assert!(offset >= self.next, "offsets handed out in order");
        self.outstanding.push_back((offset, State::Pending));
        self.pending += 1;
        self.next = offset + 1;
    }

    /// Moves the next position to `next` when offsets up to it were skipped (transaction
    /// markers, aborted records): with nothing outstanding, commits may pass them.
    pub fn advance_to(&mut self, next: i64) {
        self.next = self.next.max(next);
    }

    /// Marks `offset` complete. Unknown offsets (already drained, or from before a reset) are
    /// ignored and reported as false.
    pub fn complete(&mut self, offset: i64) -> bool {
        let Ok(i) = self.outstanding.binary_search_by_key(&offset, |(o, _)| *o) else {
            return false;
        };
        match self.outstanding[i].1 {
            State::Done => return true,
            State::Pending => self.pending -= 1,
            State::Abandoned => {}
        }
        self.outstanding[i].1 = State::Done;
        while matches!(self.outstanding.front(), Some((_, State::Done))) {
            self.outstanding.pop_front();
        }
        true
    }

    /// Gives `offset` up: it will not complete, so commits stop before it (the next owner
    /// redoes it) and a drain does not wait for it.
    pub fn abandon(&mut self, offset: i64) -> bool {
        match self.outstanding.binary_search_by_key(&offset, |(o, _)| *o) {
            Ok(i) if self.outstanding[i].1 == State::Pending => {
                self.outstanding[i].1 = State::Abandoned;
                self.pending -= 1;
                true
            }
            _ => false,
        }
    }

    /// The position that may be committed now.
    pub fn committable(&self) -> i64 {
        self.outstanding.front().map_or(self.next, |(o, _)| *o)
    }

    /// The committable position, if it moved past what was last committed.
    pub fn to_commit(&self) -> Option<i64> {
        let c = self.committable();
        (self.committed != Some(c) && self.committed.is_none_or(|old| c > old)).then_some(c)
    }

    pub fn mark_committed(&mut self, position: i64) {
        self.committed = Some(self.committed.map_or(position, |c| c.max(position)));
    }

    pub fn committed(&self) -> Option<i64> {
        self.committed
    }

    /// Records handed out and still being worked on.
    pub fn in_flight(&self) -> usize {
        self.pending
    }

    /// Nothing is being worked on (abandoned records do not count).
    pub fn is_drained(&self) -> bool {
        self.in_flight() == 0
    }

    /// The next offset to fetch.
    pub fn next_fetch(&self) -> i64 {
        self.next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_only_lowest_contiguous() {
        let mut t = PartitionOffsets::new(10, None);
        for o in [10, 11, 12, 15] {
            t.handed_out(o);
        }
        assert_eq!(t.committable(), 10);
        assert!(t.complete(11));
        assert!(t.complete(15));
        assert_eq!(t.committable(), 10, "10 still outstanding");
        assert!(t.complete(10));
        assert_eq!(t.committable(), 12);
        assert!(t.complete(12));
        assert_eq!(t.committable(), 16, "gap 13-14 skipped, next after 15");
        assert!(t.is_drained());
        assert!(!t.complete(99));
    }

    #[test]
    fn to_commit_only_when_moved_forward() {
        let mut t = PartitionOffsets::new(5, Some(5));
        assert_eq!(t.to_commit(), None);
        t.handed_out(5);
        assert_eq!(t.to_commit(), None);
        t.complete(5);
        assert_eq!(t.to_commit(), Some(6));
        t.mark_committed(6);
        assert_eq!(t.to_commit(), None);
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn abandoned_records_block_commits_but_not_drains() {
        let mut t = PartitionOffsets::new(0, None);
        for o in 0..4 {
            t.handed_out(o);
        }
        t.complete(0);
        assert!(t.abandon(1));
        t.complete(2);
        assert_eq!(t.in_flight(), 1);
        t.complete(3);
        assert!(t.is_drained());
        assert_eq!(t.committable(), 1, "commit stops at the abandoned record");
        assert!(!t.abandon(3), "a done record cannot be abandoned");
        assert!(
            t.complete(1),
            "a late completion of an abandoned record still counts"
        );
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn in_flight_counter_matches_a_recount() {
        let mut t = PartitionOffsets::new(0, None);
        let recount = |t: &PartitionOffsets| {
            t.outstanding
                .iter()
                .filter(|(_, s)| *s == State::Pending)
                .count()
        };
        for o in 0..50 {
            t.handed_out(o * 2);
        }
        for o in (0..100).step_by(6) {
            t.complete(o);
            t.abandon(o + 2);
            t.complete(o + 2);
            t.abandon(o + 4);
            assert_eq!(t.in_flight(), recount(&t));
        }
        assert!(!t.complete(1), "never handed out");
        assert_eq!(t.in_flight(), recount(&t));
    }

    #[test]
    fn skipped_offsets_are_committed_past_only_once_nothing_before_them_is_outstanding() {
        let mut t = PartitionOffsets::new(0, None);
        t.handed_out(0);
        t.handed_out(1);
        t.advance_to(4); // offsets 2 and 3: a commit marker and an aborted record
        assert_eq!(t.committable(), 0);
        t.complete(1);
        assert_eq!(t.committable(), 0, "0 is still outstanding");
        t.complete(0);
        assert_eq!(t.committable(), 4, "past the skipped offsets");
        t.advance_to(2);
        assert_eq!(t.next_fetch(), 4, "never backwards");
    }

    #[test]
    fn fresh_partition_commits_its_start() {
        let t = PartitionOffsets::new(0, None);
        assert_eq!(t.to_commit(), Some(0));
    }
}
