//! The self-verifying page pattern.
//!
//! Every 4 KiB page of the dirty region is 512 little 64-bit words:
//!
//! | word   | content                                                       |
//! |--------|---------------------------------------------------------------|
//! | 0      | the page's index in the region                                |
//! | 1      | its generation (how many times it was written; starts at 1)   |
//! | 2      | a checksum of every other word of the page                    |
//! | 3..512 | a body derived cheaply from (index, generation)              |
//!
//! A page can thus be checked on its own (checksum), and against what the program
//! expects of it (index, and the generation kept in a side table): a flipped bit, a page
//! moved to the wrong place, a stale copy of an older generation and a zeroed page are
//! all caught.
//!
//! The words are atomics (relaxed loads and stores, plain moves on x86) because the
//! verification sweep reads pages while the writer thread rewrites others; the sweep
//! discards a read that raced with a write (see [`crate::region`]).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Size of a page of the pattern, in bytes.
pub const PAGE_SIZE: usize = 4096;

/// Size of a page of the pattern, in 64-bit words.
pub const PAGE_WORDS: usize = PAGE_SIZE / 8;

/// The generation a page gets when first written; 0 is never valid, so a page that was
/// zeroed is never mistaken for a fresh one.
pub const FIRST_GENERATION: u64 = 1;

const INDEX_WORD: usize = 0;
const GEN_WORD: usize = 1;
const SUM_WORD: usize = 2;
const BODY_START: usize = 3;

/// Odd constants from SplitMix64 / the golden ratio.
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
const MIX1: u64 = 0xBF58_476D_1CE4_E5B9;
const MIX2: u64 = 0x94D0_49BB_1331_11EB;
/// Non-zero start of the checksum, so an all-zero page does not check out.
const SUM_SEED: u64 = 0x5741_4C4B_4142_4F55; // "WALKABOU"

/// SplitMix64's finaliser: a cheap bijective mix of 64 bits.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(MIX1);
    x = (x ^ (x >> 27)).wrapping_mul(MIX2);
    x ^ (x >> 31)
}

/// The seed of the body of page `index` at `generation`.
fn body_seed(index: u64, generation: u64) -> u64 {
    mix(index.wrapping_mul(GOLDEN) ^ mix(generation ^ SUM_SEED))
}

/// Word `word` (3..512) of the body of a page whose seed is `seed`.
fn body_word(seed: u64, word: usize) -> u64 {
    seed ^ (word as u64).wrapping_mul(GOLDEN)
}

/// A running checksum over words 0, 1, 3..512 in order (Fletcher-style sums, mixed).
#[derive(Clone, Copy)]
struct Checksum {
    a: u64,
    b: u64,
}

impl Checksum {
    fn new() -> Self {
        Checksum { a: SUM_SEED, b: 0 }
    }

    fn add(&mut self, word: u64) {
        self.a = self.a.wrapping_add(word);
        self.b = self.b.wrapping_add(self.a);
    }

    fn finish(self) -> u64 {
        mix(self.a ^ mix(self.b))
    }
}

/// What a page held instead of what was expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mismatch {
    /// The index stored in the page.
    pub found_index: u64,
    /// The generation stored in the page.
    pub found_gen: u64,
    /// Whether the page's stored checksum matches its content.
    pub checksum_ok: bool,
}

/// One page of the dirty region, page-aligned.
#[repr(C, align(4096))]
pub struct Page {
    words: [AtomicU64; PAGE_WORDS],
}

impl Default for Page {
    fn default() -> Self {
        Self::zeroed()
    }
}

impl Page {
    /// A page of zeros (which does not verify as any index or generation).
    pub const fn zeroed() -> Self {
        Page { words: [const { AtomicU64::new(0) }; PAGE_WORDS] }
    }

    /// Writes the pattern of page `index` at `generation` into the page.
    pub fn write(&self, index: u64, generation: u64) {
        let seed = body_seed(index, generation);
        let mut sum = Checksum::new();
        sum.add(index);
        sum.add(generation);
        self.words[INDEX_WORD].store(index, Relaxed);
        self.words[GEN_WORD].store(generation, Relaxed);
        for (i, w) in self.words.iter().enumerate().skip(BODY_START) {
            let v = body_word(seed, i);
            sum.add(v);
            w.store(v, Relaxed);
        }
        self.words[SUM_WORD].store(sum.finish(), Relaxed);
    }

    /// Checks that the page holds the pattern of page `index` at `expected_gen`.
    pub fn verify(&self, index: u64, expected_gen: u64) -> Result<(), Mismatch> {
        let found_index = self.words[INDEX_WORD].load(Relaxed);
        let found_gen = self.words[GEN_WORD].load(Relaxed);
        let stored_sum = self.words[SUM_WORD].load(Relaxed);
        let mut sum = Checksum::new();
        sum.add(found_index);
        sum.add(found_gen);
        for w in &self.words[BODY_START..] {
            sum.add(w.load(Relaxed));
        }
        let checksum_ok = sum.finish() == stored_sum;
        if checksum_ok && found_index == index && found_gen == expected_gen {
            Ok(())
        } else {
            Err(Mismatch { found_index, found_gen, checksum_ok })
        }
    }

    /// Flips the bits of `mask` in byte `byte` (0..4096) of the page, as a memory fault
    /// would. For tests and fault injection. Bytes past the page are ignored.
    pub fn flip_bits(&self, byte: usize, mask: u8) {
        if let Some(word) = self.words.get(byte / 8) {
            word.fetch_xor(u64::from(mask) << ((byte % 8) * 8), Relaxed);
        }
    }

    /// The page's address in this process, as printed in `CORRUPT ... addr=0x...`.
    pub fn address(&self) -> usize {
        std::ptr::from_ref(self) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(index: u64, generation: u64) -> Box<Page> {
        let page = Box::new(Page::zeroed());
        page.write(index, generation);
        page
    }

    #[test]
    fn written_page_verifies() {
        let page = written(7, 3);
        assert_eq!(page.verify(7, 3), Ok(()));
    }

    #[test]
    fn page_is_4_kib_and_aligned() {
        let page = written(0, 1);
        assert_eq!(std::mem::size_of::<Page>(), PAGE_SIZE);
        assert_eq!(page.address() % PAGE_SIZE, 0);
    }

    #[test]
    fn flipped_body_byte_breaks_the_checksum() {
        let page = written(7, 3);
        page.flip_bits(1000, 0x10);
        assert_eq!(page.verify(7, 3), Err(Mismatch { found_index: 7, found_gen: 3, checksum_ok: false }));
    }

    #[test]
    fn flipped_checksum_byte_is_detected() {
        let page = written(7, 3);
        page.flip_bits(SUM_WORD * 8 + 5, 0x01);
        assert_eq!(page.verify(7, 3).map_err(|m| m.checksum_ok), Err(false));
    }

    #[test]
    fn flipped_last_byte_is_detected() {
        let page = written(7, 3);
        page.flip_bits(PAGE_SIZE - 1, 0x80);
        assert_eq!(page.verify(7, 3).map_err(|m| m.checksum_ok), Err(false));
    }

    #[test]
    fn stale_generation_is_detected_with_a_good_checksum() {
        let page = written(7, 3);
        assert_eq!(page.verify(7, 4), Err(Mismatch { found_index: 7, found_gen: 3, checksum_ok: true }));
    }

    #[test]
    fn page_at_the_wrong_index_is_detected() {
        let page = written(8, 3);
        assert_eq!(page.verify(7, 3), Err(Mismatch { found_index: 8, found_gen: 3, checksum_ok: true }));
    }

    #[test]
    fn zeroed_page_never_verifies() {
        let page = Page::zeroed();
        assert_eq!(page.verify(0, FIRST_GENERATION), Err(Mismatch { found_index: 0, found_gen: 0, checksum_ok: false }));
    }

    #[test]
    fn rewriting_with_the_next_generation_verifies() {
        let page = written(7, 3);
        page.write(7, 4);
        assert_eq!(page.verify(7, 4), Ok(()));
    }

    #[test]
    fn bodies_differ_between_generations() {
        assert_ne!(body_seed(7, 3), body_seed(7, 4));
        assert_ne!(body_seed(7, 3), body_seed(8, 3));
    }
}
