//! Chat messages as clients send them: roles and content parts checked (the failing one named),
//! images accepted for vision models only, as `data:` URLs or files under the configured root.

use std::path::Path;

use base64::Engine;
use serde_json::Value;

use super::error::ApiError;

const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

/// Checks `messages`; returns them with image files (under `image_root`, a canonical path)
/// inlined as `data:` URLs, an assistant's absent or null content as `""` and text-like parts
/// as text, as vLLM hands them to templates (a template would write null as `None`).
pub fn check(
    messages: Vec<Value>,
    vision: bool,
    image_root: Option<&Path>,
) -> Result<Vec<Value>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad_field(
            "messages",
            "`messages` must hold at least one message",
        ));
    }
    let mut out = Vec::with_capacity(messages.len());
    // The request crosses to the worker as one frame: images past it could not be sent, and
    // files inlined without a total made a small body gigabytes in the daemon.
    let mut room = crate::protocol::MAX_FRAME;
    for (i, mut m) in messages.into_iter().enumerate() {
        let at = format!("messages[{i}]");
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if !ROLES.contains(&role.as_str()) {
            return Err(ApiError::bad_field(
                format!("{at}.role"),
                format!(
                    "`{at}.role` must be one of {}, found {}",
                    ROLES.join(", "),
                    m.get("role").map_or("nothing".into(), Value::to_string)
                ),
            ));
        }
        match m.get_mut("content") {
            None | Some(Value::Null) if role == "assistant" => {
                m["content"] = Value::String(String::new());
            }
            Some(Value::String(_)) => {}
            Some(Value::Array(parts)) => {
                for (j, part) in parts.iter_mut().enumerate() {
                    let at = format!("{at}.content[{j}]");
                    check_part(part, &at, vision, image_root, &mut room)?;
                }
            }
            _ => {
                return Err(ApiError::bad_field(
                    format!("{at}.content"),
                    format!("`{at}.content` must be a string or an array of content parts"),
                ))
            }
        }
        check_tool_calls(&mut m, &at)?;
        out.push(m);
    }
    Ok(out)
}

/// An assistant message's earlier tool calls: each call's `arguments`, JSON text as OpenAI's API
/// carries it, must hold an object — templates iterate over it (GLM's `.items()`), and vLLM
/// parses it before rendering too; a bad one is named here, not by the template's error.
fn check_tool_calls(message: &mut Value, at: &str) -> Result<(), ApiError> {
    let Some(Value::Array(calls)) = message.get_mut("tool_calls") else {
        return Ok(());
    };
    for (j, call) in calls.iter_mut().enumerate() {
        let (arguments, field) = match call.get("function") {
            Some(_) => (
                call["function"].get_mut("arguments"),
                format!("{at}.tool_calls[{j}].function.arguments"),
            ),
            None => (
                call.get_mut("arguments"),
                format!("{at}.tool_calls[{j}].arguments"),
            ),
        };
        let Some(arguments) = arguments else {
            continue;
        };
        let object = match arguments {
            // A call without arguments, written "" or null (some clients do): none, as vLLM
            // reads it.
            Value::Null => {
                *arguments = Value::String("{}".into());
                true
            }
            Value::String(text) if text.trim().is_empty() => {
                *arguments = Value::String("{}".into());
                true
            }
            Value::String(text) => serde_json::from_str::<Value>(text).is_ok_and(|v| v.is_object()),
            Value::Object(_) => true,
            _ => false,
        };
        if !object {
            return Err(ApiError::bad_field(
                field.clone(),
                format!("`{field}` must be a JSON object, as text: the `arguments` string of the call the model wrote"),
            ));
        }
    }
    Ok(())
}

fn check_part(
    part: &mut Value,
    at: &str,
    vision: bool,
    image_root: Option<&Path>,
    room: &mut usize,
) -> Result<(), ApiError> {
    // The SDK's other text parts: an assistant's refusal, the Responses API's input and output
    // text (vLLM reads each as text).
    let field = match part.get("type").and_then(Value::as_str) {
        Some("refusal") => Some("refusal"),
        Some("input_text" | "output_text") => Some("text"),
        _ => None,
    };
    if let Some(field) = field {
        let Some(text) = part.get(field).and_then(Value::as_str) else {
            return Err(ApiError::bad_field(
                format!("{at}.{field}"),
                format!("`{at}.{field}` must be a string"),
            ));
        };
        *part = serde_json::json!({"type": "text", "text": text});
    }
    match part.get("type").and_then(Value::as_str) {
        Some("text") if part.get("text").is_some_and(Value::is_string) => {
            // Only what a text part is: the templates take a part holding an `image_url` key
            // for an image, which the worker, going by `type`, would not count.
            *part = serde_json::json!({"type": "text", "text": part["text"].take()});
            Ok(())
        }
        Some("text") => Err(ApiError::bad_field(
            format!("{at}.text"),
            format!("`{at}.text` must be a string"),
        )),
        Some("image_url") => {
            if !vision {
                return Err(ApiError::bad_field(
                    at,
                    format!("`{at}` is an image, but this model does not accept images"),
                ));
            }
            let url = match part.get("image_url") {
                Some(Value::String(u)) => Some(u.clone()),
                Some(v) => v.get("url").and_then(Value::as_str).map(str::to_string),
                None => None,
            };
            let Some(url) = url.filter(|u| !u.is_empty()) else {
                return Err(ApiError::bad_field(
                    format!("{at}.image_url.url"),
                    format!("`{at}.image_url.url` is required: a data: URL (or a file under server.image_root)"),
                ));
            };
            let at = format!("{at}.image_url.url");
            let data = image_data_url(&url, &at, image_root, *room)?;
            *room = room.checked_sub(data.len()).ok_or_else(|| too_many_images(&at))?;
            part["image_url"] = serde_json::json!({"url": data});
            Ok(())
        }
        other => Err(ApiError::bad_field(
            format!("{at}.type"),
            format!(
                "`{at}.type` must be \"text\" (or \"refusal\", \"input_text\", \"output_text\") or \"image_url\", found {}",
                other.map_or("nothing".into(), |t| format!("\"{t}\""))
            ),
        )),
    }
}

/// The refusal of the image at `at`, past what one request may carry.
fn too_many_images(at: &str) -> ApiError {
    ApiError::bad_field(
        at,
        format!(
            "`{at}`: the request's images come to more than {} MiB as data URLs, the most one request carries to the model; send fewer or smaller images",
            crate::protocol::MAX_FRAME >> 20
        ),
    )
}

/// A `data:` URL for the image at `url`, which is one already or names a file under the root
/// (read only if its data URL fits in `room` bytes).
fn image_data_url(
    url: &str,
    at: &str,
    image_root: Option<&Path>,
    room: usize,
) -> Result<String, ApiError> {
    if let Some(rest) = url.strip_prefix("data:") {
        // MIME-style base64 (Python's `encodebytes`) breaks lines; decoders after this one
        // take the plain form.
        let rest: String = rest.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        checked_data_url(&rest, at)?;
        return Ok(format!("data:{rest}"));
    }
    if url.starts_with("http://") || url.starts_with("https://") {
        return Err(ApiError::bad_field(
            at,
            format!(
                "`{at}`: this server does not fetch remote images; send the image as a data: URL"
            ),
        ));
    }
    let path = Path::new(url.strip_prefix("file://").unwrap_or(url));
    let Some(root) = image_root else {
        return Err(ApiError::bad_field(at, format!("`{at}`: image files are not allowed (no server.image_root is configured); send a data: URL")));
    };
    // The operator's mistake, said as such (not as the client's file being outside it).
    if let Some(problem) = crate::config::folder_problem(root) {
        return Err(ApiError::bad_field(
            at,
            format!(
                "`{at}`: the server's image_root {} cannot be used ({problem}), so no image file can be read; send a data: URL, or ask the server's operator to fix server.image_root",
                root.display()
            ),
        ));
    }
    let file = match std::fs::canonicalize(path) {
        Ok(file) if file.starts_with(root) => file,
        // Said as it is where the file's folder is under the root ("not under the root" for a
        // file that is not there misled); elsewhere, through `..` or a link out of the root,
        // it says nothing of what exists there.
        Err(e) if folder_under(path, root) => {
            return Err(ApiError::bad_field(
                at,
                format!("`{at}`: cannot open {}: {e}", path.display()),
            ))
        }
        _ => {
            return Err(ApiError::bad_field(
                at,
                format!(
                    "`{at}`: {} is not a file under the image root {}",
                    path.display(),
                    root.display()
                ),
            ))
        }
    };
    let cannot = |e: &dyn std::fmt::Display| {
        ApiError::bad_field(at, format!("`{at}`: cannot read {}: {e}", file.display()))
    };
    // A FIFO or device would block (or never end); a file too large is refused unread.
    let meta = std::fs::metadata(&file).map_err(|e| cannot(&e))?;
    if !meta.is_file() {
        return Err(cannot(&"not a regular file"));
    }
    if (meta.len() as usize).div_ceil(3) * 4 > room {
        return Err(too_many_images(at));
    }
    let bytes = std::fs::read(&file).map_err(|e| cannot(&e))?;
    let mime = image_mime(&file, at)?;
    Ok(format!(
        "data:{mime};base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    ))
}

/// Whether `path`'s folder, links resolved, lies under `root`.
fn folder_under(path: &Path, root: &Path) -> bool {
    path.parent()
        .and_then(|folder| std::fs::canonicalize(folder).ok())
        .is_some_and(|folder| folder.starts_with(root))
}

/// Checks the part of a `data:` URL after the scheme: an image type and valid base64.
fn checked_data_url(rest: &str, at: &str) -> Result<(), ApiError> {
    let (meta, payload) = rest.split_once(',').unwrap_or((rest, ""));
    if !meta.starts_with("image/") || !meta.ends_with(";base64") {
        return Err(ApiError::bad_field(
            at,
            format!("`{at}` must be a base64 image data URL (data:image/png;base64,...)"),
        ));
    }
    base64::engine::general_purpose::STANDARD
        .decode(payload)
        .map_err(|e| ApiError::bad_field(at, format!("`{at}`: the base64 data is invalid: {e}")))?;
    Ok(())
}

/// The MIME type of an image file, by its extension (the decoder checks the content).
fn image_mime(file: &Path, at: &str) -> Result<&'static str, ApiError> {
    match file
        .extension()
        .and_then(|x| x.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("png") => Ok("image/png"),
        Some("jpg" | "jpeg") => Ok("image/jpeg"),
        Some("gif") => Ok("image/gif"),
        Some("webp") => Ok("image/webp"),
        _ => Err(ApiError::bad_field(
            at,
            format!(
                "`{at}`: {} is not a PNG, JPEG, GIF or WebP file",
                file.display()
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// An earlier call's `arguments` must hold a JSON object (as text, or as an object); one
    /// that does not is named, not left to the chat template's error.
    #[test]
    fn a_calls_arguments_must_hold_an_object() {
        let history = |arguments: Value| {
            vec![
                json!({"role": "user", "content": "weather?"}),
                json!({"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                    {"id": "call_2", "type": "function", "function": {"name": "f", "arguments": arguments}},
                ]}),
            ]
        };
        for good in [json!("{\"city\": \"Paris\"}"), json!({"city": "Paris"})] {
            assert!(check(history(good), false, None).is_ok());
        }
        // None written as "" or null: `{}`, which every template can iterate.
        for none in [json!(""), Value::Null] {
            let checked = check(history(none), false, None).unwrap();
            assert_eq!(checked[1]["tool_calls"][1]["function"]["arguments"], "{}");
        }
        for bad in [json!("not json"), json!("[1, 2]"), json!(5)] {
            let e = check(history(bad.clone()), false, None).unwrap_err();
            let at = "messages[1].tool_calls[1].function.arguments";
            assert_eq!(e.param.as_deref(), Some(at), "{bad}: {}", e.message);
        }
    }

    #[test]
    fn bad_roles_and_parts_are_named() {
        let e = check(
            vec![
                json!({"role": "user", "content": "hi"}),
                json!({"role": "robot", "content": "x"}),
            ],
            false,
            None,
        )
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[1].role"));
        let e = check(vec![json!({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]})], false, None).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].content[0]"));
        assert!(
            e.message.contains("does not accept images"),
            "{}",
            e.message
        );
        let e = check(vec![json!({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]})], true, None).unwrap_err();
        assert!(e.message.contains("remote images"), "{}", e.message);
        let e = check(vec![json!({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}]})], true, None).unwrap_err();
        assert_eq!(
            e.param.as_deref(),
            Some("messages[0].content[0].image_url.url")
        );
        assert!(check(Vec::new(), false, None).is_err());
        let e = check(
            vec![json!({"role": "user", "content": [{"type": "image_url"}]})],
            true,
            None,
        )
        .unwrap_err();
        assert_eq!(
            e.param.as_deref(),
            Some("messages[0].content[0].image_url.url")
        );
        assert!(e.message.contains("is required"), "{}", e.message);
    }

    #[test]
    fn valid_messages_pass_through() {
        let m = vec![
            json!({"role": "system", "content": "be brief"}),
            json!({"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}),
            json!({"role": "assistant", "content": "", "tool_calls": []}),
        ];
        assert_eq!(check(m.clone(), true, None).unwrap(), m);
    }

    /// What vLLM hands templates: an assistant's null or absent content as "", a refusal and
    /// the Responses API's text parts as text, base64 with line breaks joined.
    #[test]
    fn null_content_text_like_parts_and_broken_base64_are_normalised() {
        let m = vec![
            json!({"role": "user", "content": [{"type": "input_text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA\nAA\n"}}]}),
            json!({"role": "assistant", "content": null, "tool_calls": []}),
            json!({"role": "assistant"}),
            json!({"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}, {"type": "output_text", "text": "ok"}]}),
        ];
        let out = check(m, true, None).unwrap();
        assert_eq!(out[0]["content"][0], json!({"type": "text", "text": "hi"}));
        assert_eq!(
            out[0]["content"][1]["image_url"]["url"],
            "data:image/png;base64,AAAA"
        );
        assert_eq!(out[1]["content"], "");
        assert_eq!(out[2]["content"], "");
        assert_eq!(
            out[3]["content"],
            json!([{"type": "text", "text": "no"}, {"type": "text", "text": "ok"}])
        );
        let e = check(
            vec![json!({"role": "assistant", "content": [{"type": "refusal"}]})],
            false,
            None,
        )
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].content[0].refusal"));
    }

    /// One file named many times is read only while the request's data URLs fit the frame
    /// that carries them to the worker; a FIFO under the root is refused unread; a text part
    /// keeps only its text (a stray `image_url` key made the template place an image).
    #[test]
    fn inlined_images_are_held_to_one_frame() {
        let root = tempfile::tempdir().unwrap();
        let canonical = std::fs::canonicalize(root.path()).unwrap();
        let big = canonical.join("big.png");
        std::fs::write(&big, vec![0u8; 5 << 20]).unwrap();
        let url = format!("file://{}", big.display());
        let part = json!({"type": "image_url", "image_url": {"url": url}});
        let parts = |n| vec![json!({"role": "user", "content": vec![part.clone(); n]})];
        assert!(check(parts(2), true, Some(&canonical)).is_ok());
        let e = check(parts(3), true, Some(&canonical)).unwrap_err();
        assert_eq!(
            e.param.as_deref(),
            Some("messages[0].content[2].image_url.url")
        );
        assert!(
            e.message.contains("fewer or smaller images"),
            "{}",
            e.message
        );
        let fifo = canonical.join("pipe.png");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        let url = format!("file://{}", fifo.display());
        let piped = vec![
            json!({"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}),
        ];
        let e = check(piped, true, Some(&canonical)).unwrap_err();
        assert!(e.message.contains("not a regular file"), "{}", e.message);
        let stray = vec![
            json!({"role": "user", "content": [{"type": "text", "text": "hi", "image_url": {"url": "x"}}]}),
        ];
        let out = check(stray, true, None).unwrap();
        assert_eq!(out[0]["content"][0], json!({"type": "text", "text": "hi"}));
    }

    #[test]
    fn image_files_only_under_the_root() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("a.png"), b"\x89PNG").unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("b.png"), b"\x89PNG").unwrap();
        let canonical = std::fs::canonicalize(root.path()).unwrap();
        let part = |p: &Path| {
            let url = format!("file://{}", p.display());
            vec![
                json!({"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}),
            ]
        };
        let ok = check(part(&root.path().join("a.png")), true, Some(&canonical)).unwrap();
        let url = ok[0]["content"][0]["image_url"]["url"].as_str().unwrap();
        assert_eq!(url, "data:image/png;base64,iVBORw==");
        let e = check(part(&outside.path().join("b.png")), true, Some(&canonical)).unwrap_err();
        assert!(
            e.message.contains("not a file under the image root"),
            "{}",
            e.message
        );
        let e = check(part(&root.path().join("a.png")), true, None).unwrap_err();
        assert!(e.message.contains("no server.image_root"), "{}", e.message);
        // A root that is not there (a typo in the config) is named as the server's problem.
        let missing = canonical.join("no-such-root");
        let e = check(part(&root.path().join("a.png")), true, Some(&missing)).unwrap_err();
        assert!(
            e.message.contains("image_root")
                && e.message.contains("no-such-root")
                && e.message.contains("operator"),
            "{}",
            e.message
        );
        // A missing file under the root is said to be missing; elsewhere, through `..` too,
        // nothing tells a client what exists.
        let e = check(part(&canonical.join("gone.png")), true, Some(&canonical)).unwrap_err();
        assert!(
            e.message.contains("cannot open") && e.message.contains("gone.png"),
            "{}",
            e.message
        );
        std::os::unix::fs::symlink(outside.path(), root.path().join("out")).unwrap();
        for around in [
            canonical.join("../nothing-here.png"),
            canonical.join("out/nothing-here.png"),
        ] {
            let e = check(part(&around), true, Some(&canonical)).unwrap_err();
            assert!(
                e.message.contains("not a file under the image root"),
                "{}",
                e.message
            );
        }
    }
}
