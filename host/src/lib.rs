//! The PIO host: discovers plugin manifests, checks plugin libraries (loading them only in child
//! processes), and — as the `pio` binary — lists, checks and serves them.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod config;
pub mod discovery;
pub mod elf;
pub mod fault;
pub mod hub;
pub mod launch;
pub mod manifest;
pub mod names;
pub mod probe;
pub mod protocol;
pub mod report;
pub mod sampling;
pub mod sandbox;
pub mod serve;
pub mod supervisor;
pub mod tomlfile;
pub mod units;
pub mod worker;
