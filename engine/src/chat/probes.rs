//! What a chat template writes, probed once when it is made, and messages adapted to it.
//!
//! A message's `content` may come as a list of parts (`[{"type": "text", "text": ...}]`), which
//! OpenAI's API allows for every role and clients send as a matter of course. Some templates
//! write such a list as they write the same text sent as a string (Qwen3-VL's); others write
//! nothing for it (Qwen3's), fail on it (Qwen3-Coder's), or write its Python form (GLM's, for a
//! tool result). For the roles a template does not write lists for, text parts are joined into
//! one string, as vLLM does for templates that take strings. And a `developer` message (OpenAI's
//! newer name for `system`) that a template would leave out goes to it as `system`.

use serde_json::{json, Map, Value as Json};

use super::ChatTemplate;

/// The roles a conversation is probed with.
const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// A conversation with each role once, its contents sent as strings or, for `listed`, as a list
/// of one text part.
fn probe(listed: Option<&str>) -> Vec<Json> {
    let content = |role: &str, text: &str| {
        if listed == Some(role) {
            json!([{"type": "text", "text": text}])
        } else {
            Json::String(text.into())
        }
    };
    let call = json!([{"id": "call_0", "type": "function",
        "function": {"name": "probe", "arguments": "{}"}}]);
    vec![
        json!({"role": "system", "content": content("system", "Be brief.")}),
        json!({"role": "user", "content": content("user", "Probe?")}),
        json!({"role": "assistant", "content": content("assistant", "Probing."), "tool_calls": call}),
        json!({"role": "tool", "tool_call_id": "call_0", "content": content("tool", "probed")}),
        json!({"role": "user", "content": "Thanks"}),
    ]
}

/// The roles for which `template` does not write a list of one text part as it writes the
/// same text as a string (or fails on the list): their lists are to be joined.
pub(super) fn roles_to_join(template: &ChatTemplate) -> Vec<&'static str> {
    let render = |messages: &[Json]| {
        template
            .render_as_sent(messages, None, true, &Map::new())
            .ok()
    };
    let Some(as_strings) = render(&probe(None)) else {
        // A template that refuses the probe itself: lists are joined for every role, the
        // canonical form, and the template's own error shows on the request.
        return ROLES.to_vec();
    };
    ROLES
        .into_iter()
        .filter(|role| render(&probe(Some(role))).as_ref() != Some(&as_strings))
        .collect()
}

/// Whether `template` leaves out a `developer` message's text (or fails on one), which then
/// goes to it as a `system` message.
pub(super) fn drops_developer(template: &ChatTemplate) -> bool {
    let messages = [
        json!({"role": "developer", "content": PROBE}),
        json!({"role": "user", "content": "Probe?"}),
    ];
    !template
        .render_as_sent(&messages, None, true, &Map::new())
        .is_ok_and(|text| text.contains(PROBE))
}

/// Text no chat would hold, to see whether a template writes a message.
const PROBE: &str = "pio-probe-8f3c1e";

/// `message` with a `content` list made only of text parts joined into one string, a line
/// between parts (vLLM's separator); anything else (a string, an image part) as it is.
pub(super) fn with_text_joined(message: &Json) -> Json {
    let Some(Json::Array(parts)) = message.get("content") else {
        return message.clone();
    };
    let texts: Option<Vec<&str>> = parts
        .iter()
        .map(|p| match p.get("type").and_then(Json::as_str) {
            Some("text") => p.get("text").and_then(Json::as_str),
            _ => None,
        })
        .collect();
    let Some(texts) = texts else {
        return message.clone();
    };
    let mut joined = message.clone();
    joined["content"] = Json::String(texts.join("\n"));
    joined
}

#[cfg(test)]
mod tests {
    use super::*;

    const STRINGS_ONLY: &str = "{% for m in messages %}{% if m.content is string %}\
        <{{ m.role }}>{{ m.content }}{% else %}<{{ m.role }}>{% endif %}{% endfor %}";
    const LISTS_TOO: &str = "{% for m in messages %}<{{ m.role }}>{% if m.content is string %}\
        {{ m.content }}{% else %}{% for p in m.content %}{{ p.text }}{% endfor %}{% endif %}\
        {% endfor %}";

    #[test]
    fn text_parts_reach_a_template_that_takes_strings_only_joined() {
        let messages = [
            json!({"role": "system", "content": [{"type": "text", "text": "Be brief."}]}),
            json!({"role": "user", "content": [
                {"type": "text", "text": "Hello"},
                {"type": "text", "text": "there"},
            ]}),
        ];
        let render = |source: &str| {
            ChatTemplate::new(source, None, None)
                .render(&messages, None, false, &Map::new())
                .unwrap()
        };
        assert_eq!(render(STRINGS_ONLY), "<system>Be brief.<user>Hello\nthere");
        // A template that writes lists gets them as sent.
        assert_eq!(render(LISTS_TOO), "<system>Be brief.<user>Hellothere");
    }

    #[test]
    fn only_lists_of_text_are_joined() {
        let image = json!({"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "data:,"}},
        ]});
        assert_eq!(with_text_joined(&image), image);
        let text = json!({"role": "user", "content": "hi"});
        assert_eq!(with_text_joined(&text), text);
        let failing = ChatTemplate::new("{{ messages[0].content + '!' }}", None, None);
        assert_eq!(
            failing.joins,
            ["system"],
            "it fails on a list of the first message's"
        );
    }

    #[test]
    fn a_developer_message_a_template_leaves_out_goes_to_it_as_system() {
        let messages = [
            json!({"role": "developer", "content": "Be brief."}),
            json!({"role": "user", "content": "Hi"}),
        ];
        let render = |source: &str| {
            ChatTemplate::new(source, None, None)
                .render(&messages, None, false, &Map::new())
                .unwrap()
        };
        let knows_system = "{% for m in messages %}{% if m.role in ['system', 'user'] %}\
            <{{ m.role }}>{{ m.content }}{% endif %}{% endfor %}";
        assert_eq!(render(knows_system), "<system>Be brief.<user>Hi");
        let knows_developer = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}";
        assert_eq!(render(knows_developer), "<developer>Be brief.<user>Hi");
    }
}
