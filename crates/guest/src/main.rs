//! `walkabout-guest`: the program the initramfs `/init` execs inside every Walkabout
//! guest (see the library's documentation for the console protocol).
//!
//! In a guest it takes its workload from `walkabout.workload=` on `/proc/cmdline` and
//! runs forever. On a host it can be tried out directly:
//!
//! ```text
//! walkabout-guest --workload dirty:8:16 --seconds 2
//! ```
//!
//! Threads: the main thread prints the heartbeat; with the dirty workload a writer
//! thread rewrites pages at the requested rate and a low-priority checker thread sweeps
//! the whole region, verifying every page.

use std::fs::File;
use std::io::Write;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use walkabout_guest::cmdline::workload_from_cmdline;
use walkabout_guest::disk::{DiskStats, DiskWorkload};
use walkabout_guest::pacing::{mib_per_sec, Pacer, Step};
use walkabout_guest::pattern::PAGE_SIZE;
use walkabout_guest::protocol::{ConsoleLine, Heartbeat, Ready, HEARTBEAT_INTERVAL_NS};
use walkabout_guest::region::Region;
use walkabout_guest::sysinfo::{count_cpu_list, meminfo_mib};
use walkabout_guest::workload::Workload;

const USAGE: &str = "usage: walkabout-guest [--workload idle|dirty:<MiB>:<MiB/s>[,disk:<MiB>:<MiB/s>]] \
                     [--disk DEVICE-OR-FILE] [--seconds N] [--corrupt-page INDEX]";

/// How often the writer reports its achieved rate.
const RATE_REPORT_NS: u64 = 10_000_000_000;
/// Pages the checker verifies between two rests (2 MiB: few wake-ups, which cost a
/// TCG guest more than the verifying).
const CHECK_CHUNK: usize = 512;
/// The checker rests this many times as long as it worked (25% of a CPU at most).
const CHECK_REST_FACTOR: u32 = 3;
/// A sweep of the whole region starts at most this often: a region swept faster waits,
/// so a small region costs little, and every page is still verified this often.
const CHECK_PERIOD: Duration = Duration::from_secs(2);
/// Memory the dirty region must leave available to the rest of the guest, in MiB.
const MEM_RESERVE_MIB: u64 = 16;

mod clock {
    /// `struct timespec` on x86_64 Linux (glibc and musl alike).
    #[repr(C)]
    struct Timespec {
        tv_sec: i64,
        tv_nsec: i64,
    }

    const CLOCK_MONOTONIC: i32 = 1;

    extern "C" {
        fn clock_gettime(clock_id: i32, tp: *mut Timespec) -> i32;
        fn nice(inc: i32) -> i32;
    }

    /// CLOCK_MONOTONIC, in nanoseconds.
    pub fn monotonic_ns() -> u64 {
        let mut ts = Timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: `ts` is a valid, writable `struct timespec` (same layout as the C
        // type on x86_64 Linux) that outlives the call; CLOCK_MONOTONIC always exists,
        // so the call cannot fail and only writes `ts`.
        let rc = unsafe { clock_gettime(CLOCK_MONOTONIC, &mut ts) };
        debug_assert_eq!(rc, 0);
        let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
        let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
        secs.saturating_mul(1_000_000_000).saturating_add(nanos)
    }

    /// Lowers the calling thread's scheduling priority to the lowest (nice 19). On
    /// Linux the nice value is per thread, so only the calling thread is affected.
    pub fn lowest_priority() {
        // SAFETY: nice(3) takes an int and touches no memory of ours; failure (which
        // cannot happen when lowering priority) only leaves the priority unchanged.
        unsafe { nice(19) };
    }
}

/// The serial console: one `write(2)` per line, shared by all threads.
struct Console {
    out: Mutex<File>,
}

impl Console {
    /// A console on a duplicate of stdout, written without Rust's line buffering so
    /// that each line reaches the serial port in a single write.
    fn stdout() -> std::io::Result<Console> {
        use std::os::fd::AsFd;
        let fd = std::io::stdout().as_fd().try_clone_to_owned()?;
        Ok(Console { out: Mutex::new(File::from(fd)) })
    }

    fn say(&self, line: impl std::fmt::Display) {
        let text = format!("{line}\n");
        let mut out = match self.out.lock() {
            Ok(out) => out,
            Err(poisoned) => poisoned.into_inner(),
        };
        // Nothing sensible to do if the console is gone; keep running.
        let _ = out.write_all(text.as_bytes());
    }
}

/// Command line options (host use; a guest passes none).
#[derive(Debug, Default)]
struct Options {
    workload: Option<String>,
    seconds: Option<u64>,
    corrupt_page: Option<usize>,
    disk: Option<std::path::PathBuf>,
}

fn parse_options(args: impl Iterator<Item = String>) -> Result<Options, String> {
    let mut options = Options::default();
    let mut args = args.peekable();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--workload" => options.workload = Some(value("--workload")?),
            "--disk" => options.disk = Some(value("--disk")?.into()),
            "--seconds" => {
                let v = value("--seconds")?;
                options.seconds = Some(v.parse().map_err(|_| format!("--seconds '{v}' is not a number"))?);
            }
            "--corrupt-page" => {
                let v = value("--corrupt-page")?;
                options.corrupt_page = Some(v.parse().map_err(|_| format!("--corrupt-page '{v}' is not a number"))?);
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument '{other}'")),
        }
    }
    Ok(options)
}

/// The workload asked for: `--workload` if given, else the kernel command line.
fn requested_workload(options: &Options) -> Result<Workload, String> {
    match &options.workload {
        Some(text) => text.parse().map_err(|e| format!("{e}")),
        None => {
            let cmdline = std::fs::read_to_string("/proc/cmdline").map_err(|e| format!("cannot read /proc/cmdline: {e}"))?;
            workload_from_cmdline(&cmdline).map_err(|e| format!("{e}"))
        }
    }
}

fn online_cpus() -> usize {
    std::fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .and_then(|list| count_cpu_list(&list))
        .or_else(|| thread::available_parallelism().ok().map(usize::from))
        .unwrap_or(1)
}

fn meminfo(field: &str) -> Option<u64> {
    meminfo_mib(&std::fs::read_to_string("/proc/meminfo").ok()?, field)
}

/// Allocates and fills the dirty region, or explains why it cannot.
fn allocate_region(workload: Workload) -> Result<Option<Region>, String> {
    let Some(walkabout_guest::workload::Load { mib, .. }) = workload.dirty else {
        return Ok(None);
    };
    if let Some(available) = meminfo("MemAvailable") {
        if u64::from(mib) + MEM_RESERVE_MIB > available {
            return Err(format!(
                "workload {workload} needs {mib} MiB but the guest has only {available} MiB \
                 available ({MEM_RESERVE_MIB} MiB must stay free)"
            ));
        }
    }
    let pages = usize::try_from(workload.region_bytes() / PAGE_SIZE as u64)
        .map_err(|_| format!("workload {workload}: region too large for this machine"))?;
    Region::new(pages).map(Some).map_err(|e| format!("workload {workload}: cannot allocate {mib} MiB: {e}"))
}

/// The writer: rewrites pages in order at `rate_mib_s`, verifying each before.
fn run_writer(region: &Region, rate_mib_s: u32, console: &Console) {
    let mut pacer = Pacer::new(rate_mib_s, clock::monotonic_ns());
    let mut index = 0usize;
    let (mut window_start, mut window_pages) = (clock::monotonic_ns(), 0u64);
    loop {
        let now = clock::monotonic_ns();
        match pacer.next(now) {
            Step::Write(pages) => {
                for _ in 0..pages {
                    if let Some(corruption) = region.rewrite(index) {
                        console.say(corruption);
                    }
                    index = (index + 1) % region.len();
                }
                pacer.wrote(pages);
                window_pages += pages;
            }
            Step::Sleep(pause) => thread::sleep(pause),
        }
        let elapsed = now.saturating_sub(window_start);
        if elapsed >= RATE_REPORT_NS {
            let achieved_mib_s = mib_per_sec(window_pages, elapsed);
            console.say(ConsoleLine::Rate { achieved_mib_s, requested_mib_s: rate_mib_s });
            (window_start, window_pages) = (now, 0);
        }
    }
}

/// The checker: verifies the whole region over and over, a sweep every
/// [`CHECK_PERIOD`] at most, at the lowest priority and resting between chunks so it
/// uses at most a quarter of a CPU.
fn run_checker(region: &Region, console: &Console) {
    clock::lowest_priority();
    loop {
        let sweep_began = clock::monotonic_ns();
        for start in (0..region.len()).step_by(CHECK_CHUNK) {
            let began = clock::monotonic_ns();
            for index in start..(start + CHECK_CHUNK).min(region.len()) {
                if let Some(corruption) = region.check(index) {
                    console.say(corruption);
                }
            }
            let worked = clock::monotonic_ns().saturating_sub(began);
            let rest = Duration::from_nanos(worked.max(250_000)) * CHECK_REST_FACTOR;
            thread::sleep(rest);
        }
        let swept = Duration::from_nanos(clock::monotonic_ns().saturating_sub(sweep_began));
        if let Some(wait) = CHECK_PERIOD.checked_sub(swept) {
            thread::sleep(wait);
        }
    }
}

/// Prints heartbeats every 100 ms, for `seconds` if given, else forever. A heartbeat
/// that comes late (the VM was paused) is not followed by a burst of catch-up ones.
fn run_heartbeat(console: &Console, region: Option<&Region>, disk: Option<&DiskStats>, seconds: Option<u64>) {
    let start = clock::monotonic_ns();
    let deadline = seconds.map(|s| start.saturating_add(s.saturating_mul(1_000_000_000)));
    let (mut seq, mut next) = (0u64, start);
    loop {
        let now = clock::monotonic_ns();
        if deadline.is_some_and(|d| now >= d) {
            return;
        }
        if now < next {
            thread::sleep(Duration::from_nanos(next - now));
            continue;
        }
        let corrupt_pages = region.map_or(0, Region::corrupt_pages);
        let corrupt_blocks = disk.map(DiskStats::corrupt_blocks);
        console.say(Heartbeat { seq, monotonic_ns: now, corrupt_pages, corrupt_blocks });
        seq += 1;
        next += HEARTBEAT_INTERVAL_NS;
        if next <= now {
            next = now + HEARTBEAT_INTERVAL_NS;
        }
    }
}

/// Opens the disk workload's device (`--disk`, else chosen from the kernel command line
/// and /sys/block) and starts its thread, which first reads the area once (adopting an
/// earlier run's blocks) and then writes and verifies forever.
fn start_disk(workload: Workload, options: &Options, console: &Arc<Console>) -> Result<Option<Arc<DiskStats>>, String> {
    let Some(load) = workload.disk else {
        return Ok(None);
    };
    let device = match &options.disk {
        Some(d) => d.clone(),
        None => {
            let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
            let devices: Vec<String> = std::fs::read_dir("/sys/block")
                .map(|d| d.filter_map(Result::ok).filter_map(|e| e.file_name().into_string().ok()).collect())
                .unwrap_or_default();
            walkabout_guest::disk::choose_device(&cmdline, &devices).ok_or_else(|| {
                format!("workload {workload}: no disk for the disk workload (attach one, or name it with walkabout.disk=)")
            })?
        }
    };
    let mut disk = DiskWorkload::open(&device, load).map_err(|e| format!("workload {workload}: {e}"))?;
    let stats = Arc::clone(&disk.stats);
    let c = Arc::clone(console);
    thread::spawn(move || {
        let say = |line: String| c.say(line);
        match disk.adopt(&say) {
            Ok(adopted) => {
                c.say(ConsoleLine::Disk { device: disk.device.display().to_string(), blocks: disk.blocks(), adopted });
                let device = disk.device.display().to_string();
                let e = disk.run(&say, &clock::monotonic_ns);
                c.say(ConsoleLine::Error(format!("disk workload on {device} stopped: {e}")));
            }
            Err(e) => c.say(ConsoleLine::Error(format!("disk workload cannot read {}: {e}", disk.device.display()))),
        }
    });
    Ok(Some(stats))
}

/// In a guest: takes the address from the kernel command line, configures the first
/// network interface and serves the echo (nothing without `walkabout.ip=`).
fn run_network(console: &Console) {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let cidr = match walkabout_guest::net::ip_from_cmdline(&cmdline) {
        None => return,
        Some(Ok(cidr)) => cidr,
        Some(Err(e)) => return console.say(format_args!("net error {e}")),
    };
    let dev = match walkabout_guest::net::configure(cidr) {
        Ok(dev) => dev,
        Err(e) => return console.say(format_args!("net error {e}")),
    };
    let port = walkabout_guest::net::ECHO_PORT;
    match std::net::TcpListener::bind(("0.0.0.0", port)) {
        Ok(listener) => {
            console.say(format_args!("net {dev} {cidr} echo {port}"));
            walkabout_guest::net::serve_echo(listener);
        }
        Err(e) => console.say(format_args!("net error cannot listen on port {port}: {e}")),
    }
}

/// Free will: asks to move as `walkabout.will=` says, and plays Mr X when the
/// controller asks (see `walkabout_guest::will`), if the VM has the port.
fn run_will(console: Arc<Console>) {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let plan = walkabout_guest::will::plan_from_cmdline(&cmdline);
    // The port appears once virtio_console has probed it.
    let mut device = None;
    for _ in 0..100 {
        device = walkabout_guest::will::find_port(std::path::Path::new("/sys"));
        if device.is_some() {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    let Some(device) = device else {
        if plan.is_some() {
            console.say(format_args!("WALKABOUT WILL no port {} (is free will on?)", walkabout_guest::will::PORT_NAME));
        }
        return;
    };
    let c = console.clone();
    let say: std::sync::Arc<dyn Fn(String) + Send + Sync> = std::sync::Arc::new(move |line: String| c.say(line));
    if let Err(e) = walkabout_guest::will::run(plan.as_ref(), &device, say) {
        console.say(format_args!("WALKABOUT WILL cannot open {}: {e}", device.display()));
    }
}

fn main() -> ExitCode {
    let options = match parse_options(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(message) => {
            if !message.is_empty() {
                eprintln!("walkabout-guest: {message}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let console = match Console::stdout() {
        Ok(console) => Arc::new(console),
        Err(e) => {
            eprintln!("walkabout-guest: cannot open the console (stdout): {e}");
            return ExitCode::from(2);
        }
    };

    let requested = requested_workload(&options).unwrap_or_else(|message| {
        console.say(ConsoleLine::Error(message));
        Workload::IDLE
    });
    let (workload, region) = match allocate_region(requested) {
        Ok(region) => (requested, region.map(Arc::new)),
        Err(message) => {
            console.say(ConsoleLine::Error(message));
            (Workload { dirty: None, ..requested }, None)
        }
    };
    let (workload, disk) = match start_disk(workload, &options, &console) {
        Ok(disk) => (workload, disk),
        Err(message) => {
            console.say(ConsoleLine::Error(message));
            (Workload { disk: None, ..workload }, None)
        }
    };
    if let (Some(region), Some(walkabout_guest::workload::Load { rate_mib_s, .. })) = (&region, workload.dirty) {
        let (r, c) = (Arc::clone(region), Arc::clone(&console));
        thread::spawn(move || run_writer(&r, rate_mib_s, &c));
        let (r, c) = (Arc::clone(region), Arc::clone(&console));
        thread::spawn(move || run_checker(&r, &c));
    }

    if options.workload.is_none() {
        let c = Arc::clone(&console);
        thread::spawn(move || run_network(&c));
        let c = Arc::clone(&console);
        thread::spawn(move || run_will(c));
    }
    let mem_mib = meminfo("MemTotal").unwrap_or(0);
    console.say(Ready { cpus: online_cpus(), workload, mem_mib });
    if let Some(page) = options.corrupt_page.and_then(|i| region.as_deref()?.page(i)) {
        page.flip_bits(PAGE_SIZE / 2, 0x01);
    }

    run_heartbeat(&console, region.as_deref(), disk.as_deref(), options.seconds);
    let corrupt = region.as_deref().map_or(0, Region::corrupt_pages) + disk.as_deref().map_or(0, DiskStats::corrupt_blocks);
    if corrupt == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
