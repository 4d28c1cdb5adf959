//! The guest's workload, as written on the kernel command line
//! (`walkabout.workload=idle` or `walkabout.workload=dirty:<MiB>:<MiB/s>`).
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

/// What the guest program does besides its heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Workload {
    /// Nothing: heartbeats only.
    #[default]
    Idle,
    /// Keep `mib` MiB in a self-verifying pattern, rewriting `rate_mib_s` MiB of it per
    /// second (as fast as the CPU allows if it cannot keep up).
    Dirty {
        /// Size of the region, in MiB (at least 1).
        mib: u32,
        /// Requested rewrite rate, in MiB/s (at least 1).
        rate_mib_s: u32,
    },
}

impl Workload {
    /// The region size in bytes (0 for [`Workload::Idle`]).
    pub fn region_bytes(&self) -> u64 {
        match self {
            Workload::Idle => 0,
            Workload::Dirty { mib, .. } => u64::from(*mib) << 20,
        }
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Workload::Idle => f.write_str("idle"),
            Workload::Dirty { mib, rate_mib_s } => write!(f, "dirty:{mib}:{rate_mib_s}"),
        }
    }
}

/// Why a workload string was refused. The message names the offending text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseWorkloadError {
    /// The kind (text before the first `:`) is not `idle` or `dirty`.
    UnknownKind {
        /// The whole workload text.
        text: String,
    },
    /// `dirty` without exactly two `:`-separated numbers, or `idle` with arguments.
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

const SYNTAX: &str = "expected idle or dirty:<MiB>:<MiB/s>";

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
        let mut parts = text.split(':');
        let kind = parts.next().unwrap_or_default();
        let args: Vec<&str> = parts.collect();
        match kind {
            "idle" if args.is_empty() => Ok(Workload::Idle),
            "dirty" if args.len() == 2 => Ok(Workload::Dirty {
                mib: parse_field(text, "size", args[0], MAX_DIRTY_MIB)?,
                rate_mib_s: parse_field(text, "rate", args[1], MAX_DIRTY_RATE_MIB_S)?,
            }),
            "idle" | "dirty" => Err(ParseWorkloadError::WrongArity { text: text.to_owned() }),
            _ => Err(ParseWorkloadError::UnknownKind { text: text.to_owned() }),
        }
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
        assert_eq!("idle".parse::<Workload>(), Ok(Workload::Idle));
    }

    #[test]
    fn dirty_parses_size_and_rate() {
        assert_eq!("dirty:64:32".parse::<Workload>(), Ok(Workload::Dirty { mib: 64, rate_mib_s: 32 }));
    }

    #[test]
    fn display_round_trips() {
        let w = Workload::Dirty { mib: 512, rate_mib_s: 128 };
        assert_eq!(w.to_string().parse::<Workload>(), Ok(w));
        assert_eq!(Workload::Idle.to_string().parse::<Workload>(), Ok(Workload::Idle));
    }

    #[test]
    fn unknown_kind_names_the_text_and_the_syntax() {
        let err = "foo".parse::<Workload>().expect_err("must be refused");
        assert_eq!(err.to_string(), "unknown workload 'foo': expected idle or dirty:<MiB>:<MiB/s>");
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
        assert_eq!(
            err.to_string(),
            "malformed workload 'dirty:64:1.5': rate '1.5' is not a whole number; \
             expected idle or dirty:<MiB>:<MiB/s>"
        );
    }

    #[test]
    fn region_bytes_is_mib_times_two_to_the_twenty() {
        let w = Workload::Dirty { mib: 3, rate_mib_s: 1 };
        assert_eq!(w.region_bytes(), 3 * 1024 * 1024);
    }
}
