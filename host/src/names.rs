//! Names that clients and operators choose and the host writes into logs, headers, grammars and
//! manifests: request ids, tool names, served model names.

/// Whether `s` is 1 to 64 characters of `A-Z a-z 0-9 _ - .` (safe in a header, a log line, a
/// Lark literal and a file name).
pub fn is_plain(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
}

/// Whether `s` can name a served model (a manifest's `name` and `plugin`): plain, beginning with
/// a letter or digit; it goes into URLs, cgroup and file names and log lines as it is.
pub fn is_model_name(s: &str) -> bool {
    is_plain(s) && s.starts_with(|c: char| c.is_ascii_alphanumeric())
}

/// What [`is_model_name`] wants, for messages.
pub const MODEL_NAME_RULE: &str =
    "1 to 64 letters, digits, `_`, `-` or `.`, beginning with a letter or digit";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names_are_short_and_of_a_safe_alphabet() {
        assert!(is_plain("get_weather") && is_plain("req-1.2") && is_plain(&"a".repeat(64)));
        assert!(!is_plain("") && !is_plain(&"a".repeat(65)));
        assert!(!is_plain("a b") && !is_plain("a/b") && !is_plain("é") && !is_plain("a\"b"));
        assert!(is_model_name("qwen3.5") && !is_model_name(".hidden") && !is_model_name("-x"));
    }
}
