//! Errors in the planner's input: malformed or inconsistent cases.

/// A case the planner refuses to plan, naming the thing and the cause.
///
/// These are mistakes in the input, not properties of the cluster: a case that is
/// well-formed but has no plan is an [`crate::Outcome::Impossible`], not an error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    /// The input is not valid JSON for this format.
    #[error("malformed input: {0}")]
    Json(String),
    /// Two hosts share a name.
    #[error("duplicate host name \"{0}\"")]
    DuplicateHost(String),
    /// Two VMs share a name.
    #[error("duplicate VM name \"{0}\"")]
    DuplicateVm(String),
    /// A host's reserved memory is more than its memory.
    #[error("host \"{host}\" reserves {reserved_mib} MiB but has only {memory_mib} MiB")]
    ReservedExceedsMemory {
        /// The host.
        host: String,
        /// Its reserved memory.
        reserved_mib: u64,
        /// Its memory.
        memory_mib: u64,
    },
    /// A placement names a VM that is not in `vms`.
    #[error("unknown VM \"{vm}\" in {placement}")]
    UnknownVm {
        /// The VM name.
        vm: String,
        /// `current` or `target`.
        placement: &'static str,
    },
    /// A placement puts a VM on a host that is not in `hosts`.
    #[error("unknown host \"{host}\" in {placement} of vm \"{vm}\"")]
    UnknownHost {
        /// The host name.
        host: String,
        /// The VM placed there.
        vm: String,
        /// `current` or `target`.
        placement: &'static str,
    },
    /// A VM is listed in `vms` but is neither running (`current`) nor wanted (`target`).
    #[error("vm \"{0}\" is missing from both current and target")]
    VmUnplaced(String),
    /// A placement (current or target) itself puts more on a host than it can hold.
    #[error("{placement} overfills host \"{host}\": needs {needs} {unit}, usable {usable}")]
    Overfilled {
        /// `current` or `target`.
        placement: &'static str,
        /// The host.
        host: String,
        /// What the placement puts there.
        needs: u64,
        /// What the host can hold.
        usable: u64,
        /// `MiB` or `vCPUs`.
        unit: &'static str,
    },
    /// `limits.max_parallel_per_host` is zero, so nothing could ever move.
    #[error("limits.max_parallel_per_host must be at least 1")]
    ZeroParallel,
    /// A memory size or vCPU count beyond [`crate::MAX_AMOUNT`]: no real host has it, and
    /// sums of such numbers would not fit in 64 bits.
    #[error("{what} is {value}, more than the largest accepted ({max})")]
    TooLarge {
        /// The field, e.g. `memory_mib of vm "a"`.
        what: String,
        /// Its value.
        value: u64,
        /// The largest accepted.
        max: u64,
    },
    /// A policy names a host that is not in `hosts`.
    #[error("unknown host \"{0}\" given to the policy")]
    UnknownPolicyHost(String),
    /// A group names a VM that is not in `vms`, or is empty.
    #[error("group \"{group}\": {cause}")]
    BadGroup {
        /// The group name.
        group: String,
        /// What is wrong with it.
        cause: String,
    },
}
