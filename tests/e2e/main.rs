//! End-to-end tests against the real `pio` binary and real plugin libraries.

#![allow(clippy::unwrap_used)]

mod support;

mod discovery;
mod medium;
mod qwen3;
mod supervisor;
mod upper_tiers;
mod worker;
