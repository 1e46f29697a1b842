//! What can go wrong loading or running a model, each error naming the file, field or tensor and
//! what was expected.

use std::path::PathBuf;

/// An engine failure.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A file the snapshot needs is not there.
    #[error("{path}: not found; {hint}")]
    MissingFile {
        /// The file.
        path: PathBuf,
        /// What to do.
        hint: &'static str,
    },
    /// A file exists but cannot be read or parsed.
    #[error("{path}: {reason}")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A config field has a value this engine cannot use.
    #[error("{path}: `{field}`: {reason}")]
    BadField {
        /// The file.
        path: PathBuf,
        /// The field.
        field: String,
        /// What was expected.
        reason: String,
    },
    /// Weights are missing, misshapen or unreadable (the message names the tensor).
    #[error("{dir}: {reason}")]
    Weights {
        /// The snapshot folder.
        dir: PathBuf,
        /// Which tensor, and expected versus found.
        reason: String,
    },
    /// A request the model cannot serve (an empty prompt, an image it cannot read).
    #[error("{0}")]
    InvalidInput(String),
    /// The request's image `index` (in the order its messages hold them) that the model's
    /// processor cannot take; the plugin side names the message part it came in.
    #[error("image {}: {error}", index + 1)]
    Image {
        /// Its place among the request's images.
        index: usize,
        /// Why.
        error: crate::images::ImageError,
    },
    /// A prompt that does not fit the context or the KV cache: the client has to shorten it.
    #[error("{0}")]
    ContextLength(String),
    /// An output constraint (schema, regex, grammar) the guide cannot compile or follow.
    #[error("{0}")]
    Constraint(String),
    /// Something the engine does not support yet.
    #[error("{0}")]
    Unsupported(String),
    /// The client went away before the work was done (plugin-api's `CANCELLED`).
    #[error("{0}")]
    Cancelled(String),
    /// A failure inside the tensor library while running the model.
    #[error("model computation failed: {0}")]
    Compute(#[from] candle_core::Error),
    /// The engine itself failed (a bug or a panic inside a forward pass).
    #[error("{0}")]
    Internal(String),
    /// The engine's thread ended on a panic outside a forward pass: nothing runs again until the
    /// model is loaded anew, which the host does by restarting the worker (plugin-api's
    /// `PANICKED`).
    #[error("{0}")]
    Stopped(String),
}

impl EngineError {
    /// The same error for another sequence of a failed batch (each gets its own copy; what was
    /// a tensor-library error keeps only its message).
    pub fn duplicate(&self) -> Self {
        match self {
            Self::InvalidInput(m) => Self::InvalidInput(m.clone()),
            Self::ContextLength(m) => Self::ContextLength(m.clone()),
            Self::Constraint(m) => Self::Constraint(m.clone()),
            Self::Unsupported(m) => Self::Unsupported(m.clone()),
            Self::Cancelled(m) => Self::Cancelled(m.clone()),
            Self::Stopped(m) => Self::Stopped(m.clone()),
            other => Self::Internal(other.to_string()),
        }
    }
}

/// Shorthand.
pub type Result<T> = std::result::Result<T, EngineError>;

#[cfg(test)]
mod tests {
    use super::*;
    use pio_plugin_api::ErrorKind;

    /// A stopped engine thread reaches the host as a panic, which restarts the worker; a
    /// failure the engine survives stays internal, and each sequence of a failed batch gets the
    /// same kind.
    #[test]
    fn a_stopped_engine_is_a_panic_to_the_host() {
        let stopped = EngineError::Stopped("the engine failed (boom); reload the model".into());
        let kind = |e: EngineError| crate::runtime::plugin_error(e).kind;
        assert_eq!(kind(stopped.duplicate()), ErrorKind::PANICKED);
        assert_eq!(kind(EngineError::Internal("x".into())), ErrorKind::INTERNAL);
        assert!(matches!(stopped.duplicate(), EngineError::Stopped(m) if m.contains("boom")));
    }

    /// A prompt past the context keeps its own kind through a failed batch, so the host can
    /// answer OpenAI's `context_length_exceeded`.
    #[test]
    fn a_prompt_past_the_context_keeps_its_kind() {
        let long = EngineError::ContextLength("the prompt is 300 tokens".into());
        let failed = crate::runtime::plugin_error(long.duplicate());
        assert_eq!(failed.kind, ErrorKind::CONTEXT_LENGTH);
        assert!(failed.message.contains("300 tokens"));
    }
}
