//! Running plugins in worker processes: [`handle`] owns one worker's process, cgroup and
//! traffic.

pub mod handle;

pub use handle::{Event, Worker, WorkerError, WorkerSpec};
