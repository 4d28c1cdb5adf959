//! One module per subcommand group.

pub mod agent;
pub mod balance;
pub mod ca;
pub mod checkpoint;
pub mod client;
pub mod cluster;
pub mod config;
pub mod controller;
pub mod cpu;
pub mod demo;
pub mod failover;
pub mod hanoi;
pub mod host;
pub mod image;
pub mod migrate;
pub mod out;
pub mod plan;
pub mod progress;
pub mod sim;
pub mod table;
pub mod up;
pub mod user;
pub mod vm;
pub mod walk;
