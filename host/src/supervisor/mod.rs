//! Running plugins in worker processes: [`handle`] owns one worker's process, cgroup and
//! traffic; [`supervised`] keeps a plugin alive across worker deaths.

pub mod engine_counts;
mod forward;
pub mod handle;
mod routing;
mod spawn;
pub mod supervised;
mod traffic;

pub use engine_counts::EngineCounts;
pub use handle::{Event, Worker, WorkerError, WorkerSpec};
pub use routing::{death_reason, Events, WINDOW};
pub use supervised::{RestartPolicy, State, Status, Supervised};
