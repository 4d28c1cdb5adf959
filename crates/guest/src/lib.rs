//! The program that runs inside every Walkabout guest, as a library.
//!
//! The guest binary (`src/main.rs`) is started by the initramfs `/init`. It reads its
//! workload from the kernel command line (`walkabout.workload=...`), prints
//! `WALKABOUT READY ...` once and then a heartbeat line every 100 ms on the serial
//! console. With the `dirty` workload it keeps a memory region in a self-verifying
//! pattern and reports every corrupt page it finds. Its output is the oracle of every
//! test that moves a guest.
//!
//! This library is std-only so that the image build can compile it with a bare `rustc`
//! (static) and so that host-side crates can depend on it to validate workloads.
//!
//! Serial console protocol (one line per `write(2)`):
//!
//! ```text
//! WALKABOUT ERROR <message>                      (only for a bad workload; then idle)
//! WALKABOUT READY cpus=<n> workload=<workload> mem_mib=<MemTotal MiB>
//! hb <seq> <monotonic_ns> <corrupt_pages> [<corrupt_blocks>]   (every 100 ms, seq from 0;
//!                                               the 4th number with a disk workload)
//! disk dev=<device> blocks=<n> adopted=<n>      (disk workload: area read, running)
//! disk-pass <n> dev=<device>                    (disk workload: whole area written n times)
//! rate <achieved MiB/s> requested=<MiB/s>       (dirty workload, every 10 s)
//! CORRUPT page=<i> addr=0x<hex> expected_gen=<g> found_index=<i> found_gen=<g> checksum_ok=<b>
//! CORRUPT block=<i> dev=<device> <what it holds instead>
//! net <dev> <address> echo <port>                (with walkabout.ip=; `net error <why>` if not)
//! WALKABOUT WILL ask: walk <where>               (with walkabout.will=; see [`will`])
//! WALKABOUT WILL answer: <the controller's answer>
//! ```

pub mod cmdline;
pub mod disk;
pub mod net;
pub mod pacing;
pub mod pattern;
pub mod protocol;
pub mod region;
pub mod sysinfo;
pub mod will;
pub mod workload;
