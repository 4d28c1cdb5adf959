//! The dirty region: pages in the self-verifying pattern plus a side table of the
//! generation each page is expected to hold.
//!
//! Two kinds of access run at once:
//!
//! - **One writer** ([`Region::rewrite`], from a single thread) verifies a page against
//!   the side table and rewrites it with the next generation.
//! - **Any number of checkers** ([`Region::check`]) verify pages without writing them.
//!
//! Each side-table entry is a sequence lock for its page: the writer marks the entry
//! `WRITING` before touching the page and publishes the new generation after; a checker
//! reads the entry, the page, and the entry again, and throws its result away if the
//! entry moved (the writer verifies that page itself before rewriting it anyway).
//!
//! A corrupt page is counted once: the first access to find it sets the entry's
//! `CORRUPT` bit (atomically, so the writer and a checker finding it together count it
//! once); the next rewrite of the page restores the pattern and clears the bit.

use std::collections::TryReserveError;
use std::fmt;
use std::sync::atomic::{fence, AtomicU64, Ordering};

use crate::pattern::{Mismatch, Page, FIRST_GENERATION};

/// Side-table bit: the writer is rewriting the page.
const WRITING: u64 = 1;
/// Side-table bit: the page was found corrupt (and counted) since its last rewrite.
const CORRUPT: u64 = 2;
/// The generation sits above the two flag bits.
const GEN_SHIFT: u32 = 2;

/// A corrupt page, as found and counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Corruption {
    /// The page's index in the region.
    pub page: usize,
    /// The page's address in the guest program.
    pub addr: usize,
    /// The generation the side table expected.
    pub expected_gen: u64,
    /// What the page held instead.
    pub found: Mismatch,
}

impl fmt::Display for Corruption {
    /// The loud console line: `CORRUPT page=<i> addr=0x<hex> expected_gen=<g>
    /// found_index=<i> found_gen=<g> checksum_ok=<bool>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CORRUPT page={} addr={:#x} expected_gen={} found_index={} found_gen={} checksum_ok={}",
            self.page, self.addr, self.expected_gen, self.found.found_index, self.found.found_gen, self.found.checksum_ok
        )
    }
}

/// The dirty region.
pub struct Region {
    pages: Vec<Page>,
    /// Per page: `generation << GEN_SHIFT | CORRUPT? | WRITING?`.
    table: Vec<AtomicU64>,
    corrupt: AtomicU64,
}

impl Region {
    /// Allocates `pages` pages and writes every one of them (so all are resident) with
    /// the first generation of the pattern.
    pub fn new(pages: usize) -> Result<Region, TryReserveError> {
        let mut page_vec = Vec::new();
        page_vec.try_reserve_exact(pages)?;
        let mut table = Vec::new();
        table.try_reserve_exact(pages)?;
        for index in 0..pages {
            let page = Page::zeroed();
            page.write(index as u64, FIRST_GENERATION);
            page_vec.push(page);
            table.push(AtomicU64::new(FIRST_GENERATION << GEN_SHIFT));
        }
        Ok(Region { pages: page_vec, table, corrupt: AtomicU64::new(0) })
    }

    /// Number of pages.
    pub fn len(&self) -> usize {
        self.pages.len()
    }

    /// Whether the region has no pages.
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// Corrupt pages found so far (each counted once per corruption).
    pub fn corrupt_pages(&self) -> u64 {
        self.corrupt.load(Ordering::Relaxed)
    }

    /// Page `index`, for fault injection (see [`Page::flip_bits`]).
    pub fn page(&self, index: usize) -> Option<&Page> {
        self.pages.get(index)
    }

    /// Verifies page `index` against the side table, then rewrites it with the next
    /// generation. Returns the corruption found, if it is new. Out-of-range indices are
    /// ignored.
    ///
    /// Call from one thread only: the side table assumes a single writer.
    pub fn rewrite(&self, index: usize) -> Option<Corruption> {
        let (page, entry) = (self.pages.get(index)?, self.table.get(index)?);
        let state = entry.load(Ordering::Relaxed);
        let generation = state >> GEN_SHIFT;
        let found = match page.verify(index as u64, generation) {
            Ok(()) => None,
            Err(mismatch) => {
                let before = entry.fetch_or(CORRUPT, Ordering::Relaxed);
                self.count_if_new(before, index, page, generation, mismatch)
            }
        };
        // Sequence-lock write: announce, write the page, publish.
        entry.store((generation << GEN_SHIFT) | WRITING, Ordering::Relaxed);
        fence(Ordering::Release);
        page.write(index as u64, generation + 1);
        entry.store((generation + 1) << GEN_SHIFT, Ordering::Release);
        found
    }

    /// Verifies page `index` without writing it. Returns the corruption found, if it is
    /// new; a read that raced with the writer is discarded. Out-of-range indices are
    /// ignored. Safe to call from any thread, alongside [`Region::rewrite`].
    pub fn check(&self, index: usize) -> Option<Corruption> {
        let (page, entry) = (self.pages.get(index)?, self.table.get(index)?);
        let before = entry.load(Ordering::Acquire);
        if before & (WRITING | CORRUPT) != 0 {
            return None;
        }
        let generation = before >> GEN_SHIFT;
        let result = page.verify(index as u64, generation);
        fence(Ordering::Acquire);
        if entry.load(Ordering::Relaxed) != before {
            return None;
        }
        let mismatch = result.err()?;
        // Only if nobody changed the entry since: flag the page as counted.
        entry
            .compare_exchange(before, before | CORRUPT, Ordering::Relaxed, Ordering::Relaxed)
            .ok()
            .and_then(|prev| self.count_if_new(prev, index, page, generation, mismatch))
    }

    fn count_if_new(&self, previous_state: u64, index: usize, page: &Page, expected_gen: u64, found: Mismatch) -> Option<Corruption> {
        if previous_state & CORRUPT != 0 {
            return None;
        }
        self.corrupt.fetch_add(1, Ordering::Relaxed);
        Some(Corruption { page: index, addr: page.address(), expected_gen, found })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_region_checks_clean() {
        let region = Region::new(4).expect("4 pages");
        assert_eq!((0..4).filter_map(|i| region.check(i)).count(), 0);
    }

    #[test]
    fn rewritten_region_checks_clean() {
        let region = Region::new(4).expect("4 pages");
        let found: Vec<_> = (0..8).filter_map(|i| region.rewrite(i % 4)).collect();
        assert_eq!((found.len(), (0..4).filter_map(|i| region.check(i)).count()), (0, 0));
    }

    #[test]
    fn check_reports_a_flipped_byte_with_the_page_address() {
        let region = Region::new(4).expect("4 pages");
        let page = region.page(2).expect("page 2");
        page.flip_bits(100, 1);
        assert_eq!(
            region.check(2),
            Some(Corruption {
                page: 2,
                addr: page.address(),
                expected_gen: FIRST_GENERATION,
                found: Mismatch { found_index: 2, found_gen: 1, checksum_ok: false },
            })
        );
    }

    #[test]
    fn corruption_is_counted_once_by_checker_and_writer() {
        let region = Region::new(4).expect("4 pages");
        region.page(1).expect("page 1").flip_bits(100, 1);
        let _ = region.check(1);
        let _ = region.check(1);
        let _ = region.rewrite(1);
        assert_eq!(region.corrupt_pages(), 1);
    }

    #[test]
    fn writer_reports_corruption_before_rewriting() {
        let region = Region::new(4).expect("4 pages");
        region.page(3).expect("page 3").flip_bits(4095, 0x80);
        let found = region.rewrite(3).map(|c| (c.page, c.found.checksum_ok));
        assert_eq!(found, Some((3, false)));
    }

    #[test]
    fn rewrite_restores_a_corrupt_page() {
        let region = Region::new(4).expect("4 pages");
        region.page(3).expect("page 3").flip_bits(64, 0xff);
        let _ = region.rewrite(3);
        assert_eq!(region.check(3), None);
    }

    #[test]
    fn corrupt_line_has_the_documented_format() {
        let c = Corruption {
            page: 5,
            addr: 0x7f00_0000_5000,
            expected_gen: 9,
            found: Mismatch { found_index: 5, found_gen: 8, checksum_ok: true },
        };
        assert_eq!(
            c.to_string(),
            "CORRUPT page=5 addr=0x7f0000005000 expected_gen=9 found_index=5 found_gen=8 \
             checksum_ok=true"
        );
    }

    #[test]
    fn out_of_range_pages_are_ignored() {
        let region = Region::new(1).expect("1 page");
        assert_eq!((region.check(1), region.rewrite(1)), (None, None));
    }

    #[test]
    fn concurrent_writer_and_checker_find_no_corruption() {
        let region = Region::new(8).expect("8 pages");
        let stop = std::sync::atomic::AtomicBool::new(false);
        let checked = std::thread::scope(|s| {
            let checker = s.spawn(|| {
                let mut found = 0;
                while !stop.load(Ordering::Relaxed) {
                    found += (0..8).filter_map(|i| region.check(i)).count();
                }
                found
            });
            let written: usize = (0..20_000).filter_map(|i| region.rewrite(i % 8)).count();
            stop.store(true, Ordering::Relaxed);
            (written, checker.join().expect("checker thread"))
        });
        assert_eq!((checked, region.corrupt_pages()), ((0, 0), 0));
    }
}
