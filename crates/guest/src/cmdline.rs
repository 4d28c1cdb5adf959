//! Finding the workload on the kernel command line (`/proc/cmdline`).

use crate::workload::{ParseWorkloadError, Workload};

/// The kernel command line parameter that selects the workload.
pub const WORKLOAD_PARAM: &str = "walkabout.workload";

/// The text of the last `walkabout.workload=...` parameter on `cmdline`, if any.
///
/// The last occurrence wins, as for the kernel's own parameters, so a caller can append
/// an override to a default command line.
pub fn workload_param(cmdline: &str) -> Option<&str> {
    cmdline.split_ascii_whitespace().filter_map(|word| word.strip_prefix(WORKLOAD_PARAM)?.strip_prefix('=')).next_back()
}

/// The workload selected by `cmdline`: [`Workload::IDLE`] when the parameter is absent,
/// an error naming the text when it is present but malformed.
pub fn workload_from_cmdline(cmdline: &str) -> Result<Workload, ParseWorkloadError> {
    workload_param(cmdline).map_or(Ok(Workload::IDLE), str::parse)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_parameter_means_idle() {
        let w = workload_from_cmdline("console=ttyS0 quiet panic=-1\n");
        assert_eq!(w, Ok(Workload::IDLE));
    }

    #[test]
    fn parameter_is_found_among_others() {
        let w = workload_from_cmdline("console=ttyS0 walkabout.workload=dirty:16:32 quiet\n");
        assert_eq!(w, Ok(Workload::dirty(16, 32)));
    }

    #[test]
    fn last_occurrence_wins() {
        let p = workload_param("walkabout.workload=idle walkabout.workload=dirty:1:1");
        assert_eq!(p, Some("dirty:1:1"));
    }

    #[test]
    fn similar_parameter_names_are_ignored() {
        let p = workload_param("walkabout.workloads=x walkabout.workload2=y");
        assert_eq!(p, None);
    }

    #[test]
    fn bogus_workload_is_an_error() {
        let err = workload_from_cmdline("walkabout.workload=bogus").expect_err("must be refused");
        assert_eq!(err, ParseWorkloadError::UnknownKind { text: "bogus".into() });
    }
}
