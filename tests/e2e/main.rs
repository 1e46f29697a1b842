//! End-to-end tests against the real `pio` binary and real plugin libraries.

#![allow(clippy::unwrap_used)]

mod support;

mod backpressure;
mod bad_input;
mod batching;
mod daemon;
mod devices;
mod discovery;
mod faults;
mod glm;
mod hotplug;
mod hub;
mod medium;
mod page;
mod prompt_scores;
mod pull;
mod qwen3;
mod qwen3_vl;
mod reload;
mod remote_tokenizer;
mod serve;
mod service;
mod structured;
mod supervisor;
mod upper_tiers;
mod users;
mod worker;
