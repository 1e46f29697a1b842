//! The frame protocol between the host and a worker process over their inherited Unix socket:
//! each frame is a 4-byte little-endian length and that many bytes of JSON. The first frame each
//! way is a handshake carrying [`PROTOCOL_VERSION`]; later additions are new optional fields or
//! new message kinds gated by the handshake's `features`.

use std::io::{Read, Write};

use pio_plugin_api::wire::{HostContext, InferOutcome, InferRequest, ModelConfig, ModelInfo};
use serde::{Deserialize, Serialize};

use crate::fault::Fault;
use crate::probe::LibraryReport;
use crate::sandbox::Plan;

/// Version of this protocol; both sides must speak the same.
pub const PROTOCOL_VERSION: u32 = 1;

/// The `Ready` feature of a worker whose plugin answers `stats_only` requests (plugin-api 1.7):
/// the host may send it [`ToWorker::Stats`].
pub const STATS: &str = "stats";

/// Frames larger than this are refused: a worker cannot make the host allocate without bound.
pub const MAX_FRAME: usize = 16 << 20;

/// An error crossing the socket: its kind and the message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    /// What kind of failure.
    pub kind: Fault,
    /// What happened and what to do.
    pub message: String,
}

impl WireError {
    /// An error of `kind`.
    pub fn new(kind: Fault, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

impl From<pio_plugin_api::PluginError> for WireError {
    fn from(e: pio_plugin_api::PluginError) -> Self {
        Self::new(e.kind.into(), e.message.into_string())
    }
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

/// One generated token on the wire.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TokenFrame {
    /// Vocabulary id.
    pub token_id: u32,
    /// Text (valid UTF-8, possibly empty).
    pub text: String,
    /// Log-probability, when requested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprob: Option<f32>,
    /// Top alternatives: (token id, text, logprob).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top_logprobs: Vec<(u32, String, f32)>,
}

impl TokenFrame {
    /// Bytes of text it carries, its alternatives' included.
    pub fn text_bytes(&self) -> usize {
        self.text.len() + self.top_logprobs.iter().map(|t| t.1.len()).sum::<usize>()
    }
}

/// The most bytes of text one token frame may carry ([`TokenFrame::text_bytes`]): a token is a
/// few bytes, twenty alternatives a few hundred. Frames wait in the daemon (64 read ahead, 33
/// per request) before any request's budget counts them, so a worker sending 16 MiB tokens
/// held gigabytes of the daemon's memory, outside every cgroup.
pub const MAX_TOKEN_BYTES: usize = 256 << 10;

impl From<pio_plugin_api::GeneratedToken> for TokenFrame {
    /// A plugin's token as text (no raw bytes).
    fn from(token: pio_plugin_api::GeneratedToken) -> Self {
        Self {
            token_id: token.token_id,
            text: token.text.into_string(),
            logprob: token.logprob.into_option().map(finite_logprob),
            top_logprobs: token
                .top_logprobs
                .into_iter()
                .map(|t| (t.token_id, t.text.into_string(), finite_logprob(t.logprob)))
                .collect(),
        }
    }
}

/// A log-probability JSON can carry: JSON has no NaN or infinity (serde writes `null`, which
/// then failed to read back as a number: the frame was malformed and the worker killed, with
/// every request it ran). -inf and NaN become -9999 (vLLM's floor), +inf 0.
pub fn finite_logprob(x: f32) -> f32 {
    match x {
        x if x.is_finite() => x,
        x if x == f32::INFINITY => 0.0,
        _ => pio_plugin_api::wire::LOGPROB_FLOOR,
    }
}

/// Host → worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToWorker {
    /// First frame: confine yourself by `plan`, then load `library`.
    Start {
        /// Must equal the worker's [`PROTOCOL_VERSION`].
        protocol: u32,
        /// The library to load once confined.
        library: std::path::PathBuf,
        /// How to confine.
        plan: Plan,
        /// Passed to the plugin's `initialize`.
        host_context: HostContext,
    },
    /// Load the model.
    Load {
        /// The model config.
        config: ModelConfig,
    },
    /// Run a request.
    Infer {
        /// Host-chosen id, unique per worker.
        id: u64,
        /// The request.
        request: InferRequest,
        /// Tokens the worker may send before the host grants more with [`ToWorker::Credit`]
        /// (`None`: no limit). The worker's sink blocks at the limit, so a request whose client
        /// stopped reading stops generating.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        window: Option<u32>,
    },
    /// The host took `tokens` more tokens of request `id`: the worker may send as many more.
    Credit {
        /// The request.
        id: u64,
        /// Tokens granted.
        tokens: u32,
    },
    /// Cancel a running request.
    Cancel {
        /// Its id.
        id: u64,
    },
    /// Are you alive and responsive?
    Ping {
        /// Echoed back.
        nonce: u64,
    },
    /// The engine's figures now (only to a worker whose `Ready` lists [`STATS`]).
    Stats {
        /// Echoed back.
        nonce: u64,
    },
    /// Release the model.
    Unload,
}

/// Worker → host.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromWorker {
    /// Reply to `Start`: confined, loaded, constructed and initialized.
    Ready {
        /// The worker's [`PROTOCOL_VERSION`].
        protocol: u32,
        /// What the library is.
        plugin: LibraryReport,
        /// Mechanisms the worker applied to itself, by name.
        applied: Vec<String>,
        /// Optional additions this worker understands.
        features: Vec<String>,
    },
    /// Starting failed; the worker exits after sending this.
    StartFailed {
        /// Why.
        error: WireError,
    },
    /// Model loading progress.
    Progress {
        /// What is being loaded.
        stage: String,
        /// Units done.
        done: u64,
        /// Units in all.
        total: u64,
    },
    /// The model is loaded.
    Loaded {
        /// What it reports.
        info: ModelInfo,
    },
    /// Loading failed.
    LoadFailed {
        /// Why.
        error: WireError,
    },
    /// A token of request `id`.
    Token {
        /// The request.
        id: u64,
        /// The token.
        token: TokenFrame,
    },
    /// Request `id` finished.
    Done {
        /// The request.
        id: u64,
        /// How it ended.
        outcome: InferOutcome,
    },
    /// Request `id` failed.
    Failed {
        /// The request.
        id: u64,
        /// Why.
        error: WireError,
    },
    /// Reply to `Ping`.
    Pong {
        /// The ping's nonce.
        nonce: u64,
    },
    /// Reply to `Stats`.
    Stats {
        /// The ask's nonce.
        nonce: u64,
        /// The figures (`None`: the plugin has no engine, or could not say).
        engine: Option<pio_plugin_api::wire::EngineStats>,
    },
    /// The model was released.
    Unloaded,
}

/// A frame that could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The socket failed or closed.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    /// The peer announced a frame over [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    /// The frame is not a valid message.
    #[error("malformed frame: {0}")]
    Malformed(#[from] serde_json::Error),
}

/// Encodes `message` as one frame.
pub fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, FrameError> {
    let json = serde_json::to_vec(message)?;
    if json.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(json.len()));
    }
    let mut frame = Vec::with_capacity(4 + json.len());
    frame.extend_from_slice(&(json.len() as u32).to_le_bytes());
    frame.extend_from_slice(&json);
    Ok(frame)
}

/// Writes one frame (blocking).
pub fn write_frame<T: Serialize>(w: &mut impl Write, message: &T) -> Result<(), FrameError> {
    w.write_all(&encode(message)?)?;
    w.flush()?;
    Ok(())
}

/// The body length a frame header announces: `Ok(None)` when the stream ended cleanly before it.
fn body_len(header: std::io::Result<()>, len: [u8; 4]) -> Result<Option<usize>, FrameError> {
    match header {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    Ok(Some(len))
}

/// Reads one frame (blocking); `Ok(None)` at a clean end of stream.
pub fn read_frame<T: for<'de> Deserialize<'de>>(
    r: &mut impl Read,
) -> Result<Option<T>, FrameError> {
    let mut len = [0u8; 4];
    let header = r.read_exact(&mut len);
    let Some(len) = body_len(header, len)? else {
        return Ok(None);
    };
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(Some(serde_json::from_slice(&body)?))
}

/// Reads one frame from an async stream; `Ok(None)` at a clean end of stream.
pub async fn read_frame_async<T: for<'de> Deserialize<'de>>(
    r: &mut (impl tokio::io::AsyncRead + Unpin),
) -> Result<Option<T>, FrameError> {
    use tokio::io::AsyncReadExt;
    let mut len = [0u8; 4];
    let header = r.read_exact(&mut len).await.map(|_| ());
    let Some(len) = body_len(header, len)? else {
        return Ok(None);
    };
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Ok(Some(serde_json::from_slice(&body)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plugin's NaN or infinite log-probabilities travel as numbers (as `null` they made the
    /// frame malformed, and the worker was killed).
    #[test]
    fn non_finite_logprobs_cross_as_numbers() {
        use pio_plugin_api::{GeneratedToken, TopLogprob};
        let token = GeneratedToken {
            token_id: 1,
            text: "a".into(),
            logprob: Some(f32::NAN).into(),
            top_logprobs: vec![
                TopLogprob {
                    token_id: 2,
                    text: "b".into(),
                    logprob: f32::NEG_INFINITY,
                },
                TopLogprob {
                    token_id: 3,
                    text: "c".into(),
                    logprob: f32::INFINITY,
                },
            ]
            .into(),
        };
        let frame = FromWorker::Token {
            id: 9,
            token: TokenFrame::from(token),
        };
        let mut buf = Vec::new();
        write_frame(&mut buf, &frame).unwrap();
        let Some(FromWorker::Token { token, .. }) = read_frame(&mut buf.as_slice()).unwrap() else {
            panic!("not a token");
        };
        assert_eq!(token.logprob, Some(-9999.0));
        assert_eq!(
            (token.top_logprobs[0].2, token.top_logprobs[1].2),
            (-9999.0, 0.0)
        );
        // An outcome crosses from the plugin as its own JSON, where a NaN score is `null`.
        let json = r#"{"prompt_logprobs": [{"token_id": 1, "logprob": null, "rank": 1, "top": [[1, null], [2, -0.5]]}]}"#;
        let outcome: pio_plugin_api::wire::InferOutcome = serde_json::from_str(json).unwrap();
        let score = &outcome.prompt_logprobs.unwrap()[0];
        assert_eq!(
            (score.logprob, score.top.clone()),
            (-9999.0, vec![(1, -9999.0), (2, -0.5)])
        );
    }

    #[test]
    fn frames_round_trip() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &ToWorker::Ping { nonce: 7 }).unwrap();
        write_frame(&mut buf, &ToWorker::Cancel { id: 3 }).unwrap();
        let mut r = buf.as_slice();
        assert!(matches!(
            read_frame(&mut r).unwrap(),
            Some(ToWorker::Ping { nonce: 7 })
        ));
        assert!(matches!(
            read_frame(&mut r).unwrap(),
            Some(ToWorker::Cancel { id: 3 })
        ));
        assert!(read_frame::<ToWorker>(&mut r).unwrap().is_none());
    }

    #[test]
    fn oversized_frames_are_refused_before_allocation() {
        let mut buf = ((MAX_FRAME + 1) as u32).to_le_bytes().to_vec();
        buf.extend_from_slice(b"{}");
        let e = read_frame::<ToWorker>(&mut buf.as_slice()).unwrap_err();
        assert!(matches!(e, FrameError::TooLarge(_)), "{e}");
    }

    #[test]
    fn garbage_is_a_malformed_frame() {
        let mut buf = 5u32.to_le_bytes().to_vec();
        buf.extend_from_slice(b"hello");
        let e = read_frame::<ToWorker>(&mut buf.as_slice()).unwrap_err();
        assert!(matches!(e, FrameError::Malformed(_)), "{e}");
    }
}
