//! Every kind of failure the host reports about a worker or a request, as one closed enum: the
//! plugin-api kinds a plugin returns plus the host's own. It crosses the worker protocol typed (its
//! snake_case name on the wire, so old frames read the same) and decides the HTTP status in one
//! table (`serve::error`), so no code matches kinds by string.

use std::fmt;

use pio_plugin_api::ErrorKind;
use serde::{Deserialize, Serialize};

/// What went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// plugin-api: a configuration was malformed or out of range.
    InvalidConfig,
    /// plugin-api: the request was malformed or impossible.
    InvalidInput,
    /// plugin-api: model files missing, unreadable, corrupt or of the wrong shape.
    ModelFiles,
    /// plugin-api: memory ran out or a budget was reached.
    OutOfMemory,
    /// plugin-api: the plugin does not support what was asked.
    Unsupported,
    /// plugin-api: the host cancelled the operation.
    Cancelled,
    /// plugin-api: a bug or unexpected state inside the plugin (or a kind this host does not know).
    Internal,
    /// plugin-api: a call came in the wrong order (e.g. a request before the model loaded).
    NotReady,
    /// plugin-api: a deadline passed.
    Timeout,
    /// plugin-api: the plugin panicked; its worker is restarted, since its state is suspect.
    Panicked,
    /// plugin-api: the input does not fit the model's context.
    ContextLength,
    /// plugin-api: the request's output constraint cannot be used.
    Constraint,
    /// Host: the sandbox could not be prepared (cgroup, runtime folder, socket).
    Sandbox,
    /// Host: the worker process could not be started.
    Spawn,
    /// Host: the worker broke the frame protocol or its handshake.
    Protocol,
    /// Worker: confining itself failed.
    Confine,
    /// Worker: the plugin library could not be loaded or checked.
    Load,
    /// Worker: the plugin's constructor failed.
    Construct,
    /// Worker: the plugin's `initialize` failed.
    Initialize,
    /// Worker: a resource limit (threads, memory for a request) was reached.
    OutOfResources,
    /// Host: the worker exited or stopped answering.
    WorkerDied,
    /// Host: the worker did not answer a health check in time.
    Unresponsive,
    /// Host: the plugin is restarting after a failure.
    Restarting,
    /// Host: the plugin failed too often and is not restarted.
    Quarantined,
    /// Host: the plugin was stopped (unloaded, removed, or the daemon is draining).
    Stopped,
}

impl Fault {
    /// The stable, machine-readable name (the wire form).
    pub fn name(self) -> &'static str {
        use Fault::*;
        match self {
            InvalidConfig => "invalid_config",
            InvalidInput => "invalid_input",
            ModelFiles => "model_files",
            OutOfMemory => "out_of_memory",
            Unsupported => "unsupported",
            Cancelled => "cancelled",
            Internal => "internal",
            NotReady => "not_ready",
            Timeout => "timeout",
            Panicked => "panicked",
            ContextLength => "context_length",
            Constraint => "constraint",
            Sandbox => "sandbox",
            Spawn => "spawn",
            Protocol => "protocol",
            Confine => "confine",
            Load => "load",
            Construct => "construct",
            Initialize => "initialize",
            OutOfResources => "out_of_resources",
            WorkerDied => "worker_died",
            Unresponsive => "unresponsive",
            Restarting => "restarting",
            Quarantined => "quarantined",
            Stopped => "stopped",
        }
    }
}

impl From<ErrorKind> for Fault {
    /// A plugin's kind; one from a newer plugin-api minor that this host does not know is
    /// internal, as plugin-api documents.
    fn from(kind: ErrorKind) -> Self {
        match kind {
            ErrorKind::INVALID_CONFIG => Self::InvalidConfig,
            ErrorKind::INVALID_INPUT => Self::InvalidInput,
            ErrorKind::MODEL_FILES => Self::ModelFiles,
            ErrorKind::OUT_OF_MEMORY => Self::OutOfMemory,
            ErrorKind::UNSUPPORTED => Self::Unsupported,
            ErrorKind::CANCELLED => Self::Cancelled,
            ErrorKind::NOT_READY => Self::NotReady,
            ErrorKind::TIMEOUT => Self::Timeout,
            ErrorKind::PANICKED => Self::Panicked,
            ErrorKind::CONTEXT_LENGTH => Self::ContextLength,
            ErrorKind::CONSTRAINT => Self::Constraint,
            _ => Self::Internal,
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Fault; 25] = [
        Fault::InvalidConfig,
        Fault::InvalidInput,
        Fault::ModelFiles,
        Fault::OutOfMemory,
        Fault::Unsupported,
        Fault::Cancelled,
        Fault::Internal,
        Fault::NotReady,
        Fault::Timeout,
        Fault::Panicked,
        Fault::ContextLength,
        Fault::Constraint,
        Fault::Sandbox,
        Fault::Spawn,
        Fault::Protocol,
        Fault::Confine,
        Fault::Load,
        Fault::Construct,
        Fault::Initialize,
        Fault::OutOfResources,
        Fault::WorkerDied,
        Fault::Unresponsive,
        Fault::Restarting,
        Fault::Quarantined,
        Fault::Stopped,
    ];

    #[test]
    fn the_wire_name_is_the_display_name_and_round_trips() {
        for fault in ALL {
            let json = serde_json::to_string(&fault).unwrap();
            assert_eq!(json, format!("\"{}\"", fault.name()));
            assert_eq!(serde_json::from_str::<Fault>(&json).unwrap(), fault);
        }
    }

    #[test]
    fn plugin_kinds_keep_their_names_and_unknown_ones_are_internal() {
        for n in 1..=11 {
            let kind = ErrorKind(n);
            assert_eq!(Fault::from(kind).name(), kind.name());
        }
        assert_eq!(Fault::from(ErrorKind(4242)), Fault::Internal);
    }
}
