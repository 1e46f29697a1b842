//! The error a plugin returns across the boundary: a kind the host can act on, and a message for people.

use std::fmt;

use abi_stable::{std_types::RString, StableAbi};

/// What went wrong, as a number that stays stable across plugin-api versions.
///
/// An open set: a plugin built against a newer minor may send a kind this host does not know;
/// [`ErrorKind::name`] then reports it as `unknown(N)` and the host treats it as internal.
#[repr(transparent)]
#[derive(StableAbi, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ErrorKind(pub u32);

impl ErrorKind {
    /// A configuration (host, model or request defaults) was malformed or out of range.
    pub const INVALID_CONFIG: Self = Self(1);
    /// A request was malformed or asked for something impossible (a prompt longer than the
    /// context is [`Self::CONTEXT_LENGTH`] since 1.6).
    pub const INVALID_INPUT: Self = Self(2);
    /// Model files are missing, unreadable, corrupt or of the wrong shape.
    pub const MODEL_FILES: Self = Self(3);
    /// Memory (host or device) ran out or a configured budget was reached.
    pub const OUT_OF_MEMORY: Self = Self(4);
    /// The plugin does not support what was asked (a dtype, a device, a capability).
    pub const UNSUPPORTED: Self = Self(5);
    /// The host cancelled the operation.
    pub const CANCELLED: Self = Self(6);
    /// A bug or an unexpected state inside the plugin (a caught panic is [`Self::PANICKED`]
    /// since 1.5).
    pub const INTERNAL: Self = Self(7);
    /// A call came in the wrong order (e.g. `infer` before `load_model`).
    pub const NOT_READY: Self = Self(8);
    /// An operation ran past a deadline the plugin enforces itself (added in plugin-api 1.1).
    pub const TIMEOUT: Self = Self(9);
    /// The plugin panicked (caught at the boundary): its state can no longer be trusted, so every
    /// later call fails the same way until the host restarts its worker (added in plugin-api 1.5).
    pub const PANICKED: Self = Self(10);
    /// The input does not fit the model's context (or its KV cache): the client has to shorten
    /// it, and OpenAI clients recognize the host's answer as such (added in plugin-api 1.6).
    pub const CONTEXT_LENGTH: Self = Self(11);
    /// The request's output constraint (a JSON schema, regex or grammar) cannot be used: the
    /// client has to fix it, and the host names the field it came from (added in 1.8).
    pub const CONSTRAINT: Self = Self(12);

    /// The kind's stable, machine-readable name (`invalid_config`, `model_files`, ...).
    pub fn name(self) -> std::borrow::Cow<'static, str> {
        let known = match self {
            Self::INVALID_CONFIG => "invalid_config",
            Self::INVALID_INPUT => "invalid_input",
            Self::MODEL_FILES => "model_files",
            Self::OUT_OF_MEMORY => "out_of_memory",
            Self::UNSUPPORTED => "unsupported",
            Self::CANCELLED => "cancelled",
            Self::INTERNAL => "internal",
            Self::NOT_READY => "not_ready",
            Self::TIMEOUT => "timeout",
            Self::PANICKED => "panicked",
            Self::CONTEXT_LENGTH => "context_length",
            Self::CONSTRAINT => "constraint",
            Self(other) => return format!("unknown({other})").into(),
        };
        known.into()
    }
}

impl fmt::Debug for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// An error crossing the plugin boundary.
#[repr(C)]
#[derive(StableAbi, Clone, PartialEq, Eq)]
pub struct PluginError {
    /// What kind of failure this is.
    pub kind: ErrorKind,
    /// A sentence for the operator: what failed, and what to do about it.
    pub message: RString,
}

impl PluginError {
    /// An error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: RString::from(message.into()),
        }
    }

    /// An [`ErrorKind::INVALID_CONFIG`] error.
    pub fn invalid_config(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::INVALID_CONFIG, message)
    }

    /// An [`ErrorKind::INVALID_INPUT`] error.
    pub fn invalid_input(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::INVALID_INPUT, message)
    }

    /// An [`ErrorKind::CONTEXT_LENGTH`] error.
    pub fn context_length(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::CONTEXT_LENGTH, message)
    }

    /// An [`ErrorKind::CONSTRAINT`] error.
    pub fn constraint(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::CONSTRAINT, message)
    }

    /// An [`ErrorKind::MODEL_FILES`] error.
    pub fn model_files(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::MODEL_FILES, message)
    }

    /// An [`ErrorKind::UNSUPPORTED`] error.
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::UNSUPPORTED, message)
    }

    /// An [`ErrorKind::CANCELLED`] error.
    pub fn cancelled(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::CANCELLED, message)
    }

    /// An [`ErrorKind::INTERNAL`] error.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::INTERNAL, message)
    }

    /// An [`ErrorKind::NOT_READY`] error.
    pub fn not_ready(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NOT_READY, message)
    }
}

impl fmt::Debug for PluginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PluginError({}: {})", self.kind, self.message)
    }
}

impl fmt::Display for PluginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl std::error::Error for PluginError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_kinds_are_named_not_lost() {
        assert_eq!(ErrorKind(4242).name(), "unknown(4242)");
        assert_eq!(ErrorKind::MODEL_FILES.name(), "model_files");
    }

    #[test]
    fn display_carries_kind_and_message() {
        let e = PluginError::model_files("config.json: missing field `hidden_size`");
        assert_eq!(
            e.to_string(),
            "model_files: config.json: missing field `hidden_size`"
        );
    }
}
