//! The testbed: local clusters on one machine for `walkabout up`, `walkabout demo`, the
//! end-to-end tests and the benchmarks, as processes (never linked in): agents and a
//! controller (or etcd and several controllers) on loopback or in network namespaces, the
//! files they announce their URLs in (written atomically, read whole), temporary
//! directories, kill and liveness helpers.
//!
//! It knows the `walkabout` command line only as far as starting daemons goes; the
//! binary to run is always a parameter (the tests' `CARGO_BIN_EXE_walkabout`, the CLI's
//! own `current_exe()`, the benchmark's copied release build).

pub mod daemons;
pub mod disk_guest;
pub mod error;
pub mod etcd;
pub mod files;
pub mod local;
pub mod net;
pub mod process;
pub mod sites;
pub mod trust;
pub mod up;

pub use daemons::{walkabout_command, Agent, AgentSpec, Controller, ControllerSpec};
pub use disk_guest::{listening, DiskGuest};
pub use error::{Result, TestbedError};
pub use etcd::Etcd;
pub use files::{read_url, session_root, write_atomic, TempDir};
pub use local::{LocalCluster, LocalOptions};
pub use net::{enter_netns, BridgeNet, GuestNet, NetPair};
pub use process::{
    alive, free_ports, kill9, kill_qemus, pause, processes_mentioning, qemu_pids, resume, stopped, wait_gone, Daemon, KillOnDrop,
};
pub use sites::TwoSites;
pub use trust::TestCa;
pub use up::UpSession;
