//! What the guest reports about itself in its READY line: online CPUs and memory.
//!
//! Pure parsers of the kernel's text files, so they are tested without a guest.

/// The number of CPUs in a kernel CPU list such as `/sys/devices/system/cpu/online`
/// (`"0-3,6,8-9\n"` has 7). `None` if the text is not a CPU list.
pub fn count_cpu_list(list: &str) -> Option<usize> {
    let list = list.trim();
    if list.is_empty() {
        return None;
    }
    list.split(',').try_fold(0usize, |total, range| {
        let (first, last) = match range.split_once('-') {
            Some((a, b)) => (a.trim().parse::<usize>().ok()?, b.trim().parse::<usize>().ok()?),
            None => {
                let n = range.trim().parse::<usize>().ok()?;
                (n, n)
            }
        };
        total.checked_add(last.checked_sub(first)?.checked_add(1)?)
    })
}

/// A field of `/proc/meminfo` (e.g. `MemTotal`), converted from kB to MiB (rounded down).
pub fn meminfo_mib(meminfo: &str, field: &str) -> Option<u64> {
    meminfo.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        let kb = rest.split_whitespace().next()?.parse::<u64>().ok()?;
        Some(kb / 1024)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_cpu_list_counts_one() {
        assert_eq!(count_cpu_list("0\n"), Some(1));
    }

    #[test]
    fn ranges_and_singles_are_summed() {
        assert_eq!(count_cpu_list("0-3,6,8-9\n"), Some(7));
    }

    #[test]
    fn garbage_is_not_a_cpu_list() {
        assert_eq!(count_cpu_list("zero"), None);
    }

    #[test]
    fn reversed_range_is_not_a_cpu_list() {
        assert_eq!(count_cpu_list("3-1"), None);
    }

    #[test]
    fn mem_total_is_converted_to_mib() {
        let meminfo = "MemTotal:         246836 kB\nMemFree:          200000 kB\n";
        assert_eq!(meminfo_mib(meminfo, "MemTotal"), Some(241));
    }

    #[test]
    fn missing_field_is_none() {
        assert_eq!(meminfo_mib("MemFree: 1 kB\n", "MemAvailable"), None);
    }
}
