//! The guest's workload, as written on the kernel command line
//! (`walkabout.workload=idle`, `dirty:<MiB>:<MiB/s>`, `disk:<MiB>:<MiB/s>`, or both parts
//! separated by a comma: `dirty:64:32,disk:256:16`).
//!
//! [`Workload`] parses with [`FromStr`] and prints with [`Display`] in the same syntax,
//! so `w.to_string().parse() == Ok(w)` for every workload.

use std::fmt;
use std::str::FromStr;

/// The largest region the `dirty` workload accepts, in MiB (1 TiB).
///
/// Far above any guest Walkabout runs; it keeps every size computation (`MiB * 2^20`
/// bytes, `MiB * 256` pages) well inside `u64` and `usize`.
pub const MAX_DIRTY_MIB: u32 = 1 << 20;

/// The highest dirty rate the `dirty` workload accepts, in MiB/s (1 TiB/s).
pub const MAX_DIRTY_RATE_MIB_S: u32 = 1 << 20;

/// One part of a workload: how much to keep in a self-verifying pattern and how fast to
/// rewrite it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Load {
    /// Size of the area, in MiB (at least 1).
    pub mib: u32,
    /// Requested rewrite rate, in MiB/s (at least 1; as fast as the guest can if it
    /// cannot keep up).
    pub rate_mib_s: u32,
}

/// What the guest program does besides its heartbeat: any of a memory part and a disk
/// part (neither: idle).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Workload {
    /// `dirty:<MiB>:<MiB/s>`: a memory region rewritten at a rate and verified.
    pub dirty: Option<Load>,
    /// `disk:<MiB>:<MiB/s>`: blocks of a disk rewritten at a rate (O_DIRECT) and read
    /// back and verified (see [`crate::disk`]).
    pub disk: Option<Load>,
}

impl Workload {
    /// Nothing but heartbeats.
    pub const IDLE: Workload = Workload { dirty: None, disk: None };

    /// A memory workload only: `dirty:<mib>:<rate_mib_s>`.
    pub const fn dirty(mib: u32, rate_mib_s: u32) -> Workload {
        Workload { dirty: Some(Load { mib, rate_mib_s }), disk: None }
    }

    /// A disk workload only: `disk:<mib>:<rate_mib_s>`.
    pub const fn disk(mib: u32, rate_mib_s: u32) -> Workload {
        Workload { dirty: None, disk: Some(Load { mib, rate_mib_s }) }
    }

    /// True when the guest only beats.
    pub fn is_idle(&self) -> bool {
        self.dirty.is_none() && self.disk.is_none()
    }

    /// The memory region's size in bytes (0 without a `dirty` part).
    pub fn region_bytes(&self) -> u64 {
        self.dirty.map_or(0, |l| u64::from(l.mib) << 20)
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.dirty, self.disk) {
            (None, None) => f.write_str("idle"),
            (Some(d), None) => write!(f, "dirty:{}:{}", d.mib, d.rate_mib_s),
            (None, Some(k)) => write!(f, "disk:{}:{}", k.mib, k.rate_mib_s),
            (Some(d), Some(k)) => write!(f, "dirty:{}:{},disk:{}:{}", d.mib, d.rate_mib_s, k.mib, k.rate_mib_s),
        }
    }
}

/// Why a workload string was refused. The message names the offending text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseWorkloadError {
    /// A part's kind (text before its first `:`) is not `idle`, `dirty` or `disk`.
    UnknownKind {
        /// The whole workload text.
        text: String,
    },
    /// `dirty`/`disk` without exactly two `:`-separated numbers, `idle` with arguments
    /// or beside another part, or one kind given twice.
    WrongArity {
        /// The whole workload text.
        text: String,
    },
    /// A field is not a decimal number that fits.
    NotANumber {
        /// The whole workload text.
        text: String,
        /// Which field (`size` or `rate`).
        field: &'static str,
        /// The field's text.
        value: String,
    },
    /// A field is zero or above its maximum.
    OutOfRange {
        /// The whole workload text.
        text: String,
        /// Which field (`size` or `rate`).
        field: &'static str,
        /// The value given.
        value: u64,
        /// The largest value accepted.
        max: u32,
    },
}

const SYNTAX: &str = "expected idle, dirty:<MiB>:<MiB/s>, disk:<MiB>:<MiB/s>, or dirty:...,disk:...";

impl fmt::Display for ParseWorkloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseWorkloadError::UnknownKind { text } => {
                write!(f, "unknown workload '{text}': {SYNTAX}")
            }
            ParseWorkloadError::WrongArity { text } => {
                write!(f, "malformed workload '{text}': {SYNTAX}")
            }
            ParseWorkloadError::NotANumber { text, field, value } => {
                write!(f, "malformed workload '{text}': {field} '{value}' is not a whole number; {SYNTAX}")
            }
            ParseWorkloadError::OutOfRange { text, field, value, max } => {
                write!(f, "malformed workload '{text}': {field} {value} is out of range (1..={max})")
            }
        }
    }
}

impl std::error::Error for ParseWorkloadError {}

impl FromStr for Workload {
    type Err = ParseWorkloadError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text == "idle" {
            return Ok(Workload::IDLE);
        }
        let mut workload = Workload::IDLE;
        for part in text.split(',') {
            let mut fields = part.split(':');
            let kind = fields.next().unwrap_or_default();
            let args: Vec<&str> = fields.collect();
            let slot = match kind {
                "dirty" => &mut workload.dirty,
                "disk" => &mut workload.disk,
                "idle" => return Err(ParseWorkloadError::WrongArity { text: text.to_owned() }),
                _ => return Err(ParseWorkloadError::UnknownKind { text: text.to_owned() }),
            };
            if args.len() != 2 || slot.is_some() {
                return Err(ParseWorkloadError::WrongArity { text: text.to_owned() });
            }
            *slot = Some(Load {
                mib: parse_field(text, "size", args[0], MAX_DIRTY_MIB)?,
                rate_mib_s: parse_field(text, "rate", args[1], MAX_DIRTY_RATE_MIB_S)?,
            });
        }
        Ok(workload)
    }
}

fn parse_field(text: &str, field: &'static str, value: &str, max: u32) -> Result<u32, ParseWorkloadError> {
    let digits_only = !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit());
    let not_a_number = || ParseWorkloadError::NotANumber { text: text.to_owned(), field, value: value.to_owned() };
    if !digits_only {
        return Err(not_a_number());
    }
    let out_of_range = |n: u64| ParseWorkloadError::OutOfRange { text: text.to_owned(), field, value: n, max };
    // More digits than u64 holds is still a number, just far out of range.
    let n = value.parse::<u64>().map_err(|_| out_of_range(u64::MAX))?;
    match u32::try_from(n) {
        Ok(v) if (1..=max).contains(&v) => Ok(v),
        _ => Err(out_of_range(n)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_parses() {
        assert_eq!("idle".parse::<Workload>(), Ok(Workload::IDLE));
    }

    #[test]
    fn dirty_parses_size_and_rate() {
        assert_eq!("dirty:64:32".parse::<Workload>(), Ok(Workload::dirty(64, 32)));
    }

    #[test]
    fn display_round_trips() {
        let w = Workload::dirty(512, 128);
        assert_eq!(w.to_string().parse::<Workload>(), Ok(w));
        assert_eq!(Workload::IDLE.to_string().parse::<Workload>(), Ok(Workload::IDLE));
    }

    #[test]
    fn unknown_kind_names_the_text_and_the_syntax() {
        let err = "foo".parse::<Workload>().expect_err("must be refused");
        assert_eq!(err.to_string(), format!("unknown workload 'foo': {SYNTAX}"));
    }

    #[test]
    fn empty_text_is_an_unknown_workload() {
        let err = "".parse::<Workload>().expect_err("must be refused");
        assert_eq!(err, ParseWorkloadError::UnknownKind { text: String::new() });
    }

    #[test]
    fn dirty_with_one_field_is_malformed() {
        let err = "dirty:64".parse::<Workload>().expect_err("must be refused");
        assert_eq!(err, ParseWorkloadError::WrongArity { text: "dirty:64".into() });
    }

    #[test]
    fn idle_with_arguments_is_malformed() {
        let err = "idle:3".parse::<Workload>().expect_err("must be refused");
        assert_eq!(err, ParseWorkloadError::WrongArity { text: "idle:3".into() });
    }

    #[test]
    fn zero_size_is_rejected() {
        let err = "dirty:0:32".parse::<Workload>().expect_err("must be refused");
        assert_eq!(err.to_string(), "malformed workload 'dirty:0:32': size 0 is out of range (1..=1048576)");
    }

    #[test]
    fn zero_rate_is_rejected() {
        let err = "dirty:64:0".parse::<Workload>().expect_err("must be refused");
        assert!(matches!(err, ParseWorkloadError::OutOfRange { field: "rate", value: 0, .. }));
    }

    #[test]
    fn overflowing_size_is_rejected() {
        let err = "dirty:99999999999999999999999:1".parse::<Workload>().expect_err("must be refused");
        assert!(matches!(err, ParseWorkloadError::OutOfRange { field: "size", .. }));
    }

    #[test]
    fn size_above_maximum_is_rejected() {
        let err = "dirty:1048577:1".parse::<Workload>().expect_err("must be refused");
        assert!(matches!(err, ParseWorkloadError::OutOfRange { value: 1_048_577, .. }));
    }

    #[test]
    fn signs_and_spaces_are_not_numbers() {
        let err = "dirty:+64: 32".parse::<Workload>().expect_err("must be refused");
        assert!(matches!(err, ParseWorkloadError::NotANumber { field: "size", .. }));
    }

    #[test]
    fn fractional_rate_is_not_a_number() {
        let err = "dirty:64:1.5".parse::<Workload>().expect_err("must be refused");
        assert_eq!(err.to_string(), format!("malformed workload 'dirty:64:1.5': rate '1.5' is not a whole number; {SYNTAX}"));
    }

    #[test]
    fn dirty_and_disk_combine_and_round_trip() {
        let w = "dirty:64:32,disk:256:16".parse::<Workload>();
        assert_eq!(w, Ok(Workload { dirty: Some(Load { mib: 64, rate_mib_s: 32 }), disk: Some(Load { mib: 256, rate_mib_s: 16 }) }));
        assert_eq!(w.map(|w| w.to_string()).as_deref(), Ok("dirty:64:32,disk:256:16"));
        assert_eq!("disk:8:4".parse::<Workload>(), Ok(Workload::disk(8, 4)));
    }

    #[test]
    fn a_kind_given_twice_or_idle_beside_a_part_is_malformed() {
        for text in ["disk:1:1,disk:2:2", "idle,disk:1:1", "dirty:1:1,"] {
            assert!(text.parse::<Workload>().is_err(), "{text}");
        }
    }

    #[test]
    fn region_bytes_is_mib_times_two_to_the_twenty() {
        let w = Workload::dirty(3, 1);
        assert_eq!(w.region_bytes(), 3 * 1024 * 1024);
    }
}
