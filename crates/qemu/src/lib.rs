//! QEMU underneath Walkabout: a typed async QMP client, the QEMU process of one VM, the
//! version gate and the accelerator choice.
//!
//! This crate knows nothing of clusters or agents: it starts, watches and talks to one
//! QEMU at a time.

pub mod accel;
pub mod cpu;
pub mod error;
pub mod img;
pub mod process;
pub mod qmp;
pub mod version;

pub use accel::{Accel, AccelChoice, AccelRequest};
pub use error::{QemuError, QmpError};
pub use img::{ImageError, ImageInfo, QemuImg};
pub use process::{QemuConfig, QemuDisk, QemuNic, QemuProcess};
pub use qmp::{Event, Qmp};
pub use version::QemuVersion;
