//! What this host offers: memory, vCPUs, CPU model, accelerator and QEMU version.

pub use walkabout_api::HostInfo;

/// Reads a `/proc/meminfo` field in MiB.
pub fn meminfo_mib(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kib| kib / 1024)
}

/// The CPU model name of this host.
pub fn cpu_model_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| t.lines().find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())))
        .unwrap_or_else(|| "unknown".into())
}

/// Online CPUs.
pub fn cpus() -> u32 {
    std::thread::available_parallelism().map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX)).unwrap_or(1)
}

/// This host's name.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "localhost".into())
}

/// CPU time (user + system) process `pid` has used, ms, from `/proc/PID/stat`.
pub fn process_cpu_ms(pid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: fields are counted after its closing ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let (utime, stime): (u64, u64) = (fields.get(11)?.parse().ok()?, fields.get(12)?.parse().ok()?);
    // SAFETY: sysconf reads a constant of the system and touches no memory of ours.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let tck = u64::try_from(tck).ok().filter(|t| *t > 0)?;
    Some((utime + stime) * 1000 / tck)
}

/// The 1-minute load average, in thousandths, from `/proc/loadavg`.
pub fn load_milli() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let load: f64 = text.split_whitespace().next()?.parse().ok()?;
    // Truncation intended: thousandths are precise enough.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Some((load * 1000.0).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_hosts_memory_and_cpus() {
        assert!(meminfo_mib("MemTotal").unwrap_or(0) > 0);
        assert!(cpus() >= 1);
        assert!(!cpu_model_name().is_empty());
        assert!(load_milli().is_some());
        assert!(process_cpu_ms(i32::try_from(std::process::id()).unwrap_or(1)).is_some());
    }
}
