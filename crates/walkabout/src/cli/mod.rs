//! One module per subcommand group.

pub mod agent;
pub mod image;
pub mod plan;
pub mod vm;
