//! One module per subcommand group.

pub mod agent;
pub mod client;
pub mod cpu;
pub mod demo;
pub mod host;
pub mod image;
pub mod local;
pub mod migrate;
pub mod plan;
pub mod vm;
