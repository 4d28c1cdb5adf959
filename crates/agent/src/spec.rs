//! What a VM is (its spec) and what it is doing (its record): plain versioned structs of
//! the wire contract (`walkabout-api`), stored and served by the agent.

pub use walkabout_api::vm::{VmRecord, VmSpec, VmState, DEFAULT_CPU_MODEL, RECORD_VERSION};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_spec_gets_defaults() {
        let s: VmSpec = serde_json::from_str(r#"{"name":"a","memory_mib":256}"#).expect("parses");
        assert_eq!(s.vcpus, 1);
        assert_eq!(s.workload, "idle");
        assert_eq!(s.cpu_model(), DEFAULT_CPU_MODEL);
    }
}
