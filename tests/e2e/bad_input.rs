//! The daemon against bad input on every route: malformed JSON, wrong types and out-of-range
//! values for every field, invalid UTF-8, deep nesting, oversized and lying bodies, unknown
//! routes and methods, missing and wrong keys, slow and idle connections. Each gets a prompt 4xx
//! in OpenAI's error shape (a connection that never sends a request is closed), and the daemon
//! keeps serving.

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::daemon::*;
use crate::support::{pio, read_through_signals};
use crate::worker::confinement_available;

const CONFIG: &str = "[server]\napi_keys = [\"user\"]\nadmin_keys = [\"admin\"]\n\
    max_body_size = \"64KiB\"\nheader_timeout_secs = 2\nbody_timeout_secs = 2\n";

/// One raw HTTP exchange: the status and body of the first response (`None`: the connection
/// closed without one).
fn raw(d: &Daemon, request: &[u8], linger: Duration) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(d.addr()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).expect("send");
    std::thread::sleep(linger);
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match read_through_signals(&mut s, &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if response_complete(&out) {
                    break;
                }
            }
        }
    }
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    // Only the first response: leftover bytes of a lying request may draw a second one.
    let body = match content_length(head) {
        Some(n) => body.get(..n).unwrap_or(body),
        None => body,
    };
    Some((status, body.to_string()))
}

fn content_length(head: &str) -> Option<usize> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse::<usize>().ok())?
    })
}

fn response_complete(bytes: &[u8]) -> bool {
    let text = String::from_utf8_lossy(bytes);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    content_length(head).is_some_and(|n| body.len() >= n)
}

fn post(path: &str, body: &[u8], extra: &str) -> Vec<u8> {
    let mut r = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer user\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// A 4xx in OpenAI's error shape.
fn assert_openai_4xx(what: &str, status: u16, body: &Value) {
    assert!((400..500).contains(&status), "{what}: got {status}: {body}");
    let e = &body["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()) && e["type"].is_string(),
        "{what}: not OpenAI's error shape: {body}"
    );
    assert!(
        e.get("param").is_some() && e.get("code").is_some(),
        "{what}: {body}"
    );
}

/// Every field of both inference routes, set to values of the wrong type or out of range.
fn bad_fields() -> Vec<(&'static str, &'static str, Value)> {
    let common: Vec<(&str, Value)> = vec![
        ("model", json!(5)),
        // (`null` is the model left out: the only one served, as vLLM takes it.)
        ("model", json!("")),
        ("model", json!("no-such-model")),
        ("model", json!("m".repeat(5000))),
        ("stream", json!("yes")),
        ("stream_options", json!("x")),
        ("stream_options", json!({"include_usage": "yes"})),
        ("max_tokens", json!(-1)),
        ("max_tokens", json!(0)),
        ("max_tokens", json!(1.5)),
        ("max_tokens", json!("2")),
        ("max_tokens", json!(1_u64 << 40)),
        ("temperature", json!(-0.1)),
        ("temperature", json!(2.5)),
        ("temperature", json!("hot")),
        ("top_p", json!(0)),
        ("top_p", json!(1.5)),
        ("top_k", json!(-5)),
        ("top_k", json!("k")),
        ("min_p", json!(2)),
        ("seed", json!("s")),
        ("seed", json!(1.5)),
        ("stop", json!(5)),
        ("stop", json!([1])),
        ("stop", json!([""])),
        ("presence_penalty", json!(3)),
        ("frequency_penalty", json!(-9)),
        ("repetition_penalty", json!(0)),
        ("n", json!(0)),
        ("n", json!(129)),
        ("n", json!(-1)),
        ("logit_bias", json!({"1": 5})),
        ("logit_bias", json!("x")),
        ("logit_bias", json!({"x": 5})),
        ("logit_bias", json!({"1": 500})),
    ];
    let chat: Vec<(&str, Value)> = vec![
        ("messages", json!([])),
        ("messages", json!("hi")),
        ("messages", json!([1])),
        ("messages", json!([{"role": "wizard", "content": "x"}])),
        ("messages", json!([{"content": "x"}])),
        ("messages", json!([{"role": "user", "content": 5}])),
        (
            "messages",
            json!([{"role": "user", "content": [{"type": "video"}]}]),
        ),
        (
            "messages",
            json!([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}]),
        ),
        ("max_completion_tokens", json!(-1)),
        ("logprobs", json!("yes")),
        ("top_logprobs", json!(50)),
        ("top_logprobs", json!(-1)),
        ("tools", json!("x")),
        ("tools", json!([5])),
        ("tool_choice", json!("sometimes")),
        ("tool_choice", json!(5)),
        ("chat_template_kwargs", json!(5)),
    ];
    let completions: Vec<(&str, Value)> = vec![
        ("prompt", json!(5)),
        ("prompt", json!({})),
        ("prompt", Value::Null),
        ("prompt", json!([[]])),
        ("logprobs", json!(6)),
        ("logprobs", json!(-1)),
        ("logprobs", json!("x")),
        ("echo", json!("x")),
        ("suffix", json!(5)),
        ("best_of", json!(2)),
    ];
    let mut all = Vec::new();
    for (f, v) in common {
        all.push(("/v1/chat/completions", f, v.clone()));
        all.push(("/v1/completions", f, v));
    }
    all.extend(
        chat.into_iter()
            .map(|(f, v)| ("/v1/chat/completions", f, v)),
    );
    all.extend(
        completions
            .into_iter()
            .map(|(f, v)| ("/v1/completions", f, v)),
    );
    all
}

fn base(path: &str) -> Value {
    if path == "/v1/chat/completions" {
        json!({"model": "echo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    } else {
        json!({"model": "echo", "prompt": "hi", "max_tokens": 2})
    }
}

#[test]
fn every_bad_input_gets_a_prompt_openai_4xx_and_the_daemon_keeps_serving() {
    if !confinement_available() {
        return;
    }
    let d = Daemon::start(echo_dir(""), CONFIG);
    d.wait_ready();
    let ok = |d: &Daemon| {
        let body = base("/v1/chat/completions").to_string();
        d.post_raw("/v1/chat/completions", &body, Some("user")).0 == 200
    };
    assert!(ok(&d));

    for (path, field, value) in bad_fields() {
        let mut body = base(path);
        body[field] = value.clone();
        if field == "top_logprobs" {
            body["logprobs"] = json!(true);
        }
        let started = Instant::now();
        let (status, r) = d.post_raw(path, &body.to_string(), Some("user"));
        let what = format!("{path} {field} = {value}");
        assert_openai_4xx(&what, status, &r);
        assert!(started.elapsed() < Duration::from_secs(2), "{what}: slow");
    }

    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("not JSON", post("/v1/completions", b"{\"model\": ", ""), 400),
        ("a JSON string", post("/v1/completions", b"\"hi\"", ""), 400),
        ("invalid UTF-8", post("/v1/completions", b"{\"model\":\"echo\",\"prompt\":\"\xff\xfe\"}", ""), 400),
        ("deep nesting", post("/v1/chat/completions", deep.as_bytes(), ""), 413),
        ("deep nesting within the limit", post("/v1/chat/completions", "[".repeat(30_000).as_bytes(), ""), 400),
        ("over the body limit", post("/v1/completions", &vec![b' '; 70 << 10], ""), 413),
        ("unknown route", b"GET /v2/anything HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer user\r\n\r\n".to_vec(), 404),
        ("wrong method", b"GET /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer user\r\n\r\n".to_vec(), 405),
        ("wrong method on models", b"DELETE /v1/models HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer user\r\n\r\n".to_vec(), 405),
        ("no key", b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec(), 401),
        ("wrong key", b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer nope\r\n\r\n".to_vec(), 401),
        ("a user key on an admin route", b"GET /v1/plugins HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer user\r\n\r\n".to_vec(), 403),
        ("a user key on an admin action", b"POST /v1/plugins/echo/unload HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer user\r\nContent-Length: 0\r\n\r\n".to_vec(), 403),
        ("an admin action on no plugin", b"POST /v1/plugins/nothing/unload HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer admin\r\nContent-Length: 0\r\n\r\n".to_vec(), 404),
        ("an unknown admin action", b"POST /v1/plugins/echo/explode HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer admin\r\nContent-Length: 0\r\n\r\n".to_vec(), 404),
        ("a body longer than announced", b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer user\r\nContent-Length: 5\r\n\r\n{\"model\": \"echo\", \"prompt\": \"x\"}".to_vec(), 400),
        ("a body in a coding not read", post("/v1/completions", b"{}", "Content-Encoding: br\r\n"), 415),
        ("gzip that is not gzip", post("/v1/completions", b"{\"model\": \"echo\"}", "Content-Encoding: gzip\r\n"), 400),
        ("gzip past the limit once inflated", post("/v1/completions", &gzip(&vec![b' '; 1 << 20]), "Content-Encoding: gzip\r\n"), 413),
        ("bad chunked framing", b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer user\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n".to_vec(), 400),
    ];
    for (what, request, expected) in cases {
        let started = Instant::now();
        let (status, body) = raw(&d, &request, Duration::ZERO)
            .unwrap_or_else(|| panic!("{what}: the connection closed without an answer"));
        let body: Value = serde_json::from_str(&body)
            .unwrap_or_else(|_| panic!("{what}: {status} with a body that is not JSON: {body:?}"));
        assert_eq!(status, expected, "{what}: {body}");
        assert_openai_4xx(what, status, &body);
        assert!(started.elapsed() < Duration::from_secs(2), "{what}: slow");
    }

    // A compressed body is read as what it decodes to.
    let body = base("/v1/completions").to_string();
    let (status, answer) = raw(
        &d,
        &post(
            "/v1/completions",
            &gzip(body.as_bytes()),
            "Content-Encoding: gzip\r\n",
        ),
        Duration::ZERO,
    )
    .expect("an answer to a gzip body");
    assert_eq!(status, 200, "{answer}");

    // A body announced and never sent: a 408 once server.body_timeout_secs passes.
    let (status, body) = raw(
        &d,
        b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer user\r\nContent-Length: 100\r\n\r\n{\"model\"",
        Duration::ZERO,
    )
    .expect("an answer to a body that never came");
    assert_openai_4xx(
        "a body that never came",
        status,
        &serde_json::from_str(&body).unwrap(),
    );
    assert_eq!(status, 408);

    // A body announced past the limit is refused at once: neither read nor waited for.
    let started = Instant::now();
    let (status, body) = raw(
        &d,
        b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer user\r\nContent-Length: 20000000\r\n\r\n{\"model\"",
        Duration::ZERO,
    )
    .expect("an answer to a body announced past the limit");
    assert_eq!(status, 413, "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );

    // One that waits for `100 Continue` has sent nothing to drain: its 413 is the first line it
    // reads, and the connection closes behind it at once rather than waiting out the body
    // timeout for a body that will not come.
    let mut s = TcpStream::connect(d.addr()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer user\r\nExpect: 100-continue\r\nContent-Length: 20000000\r\n\r\n")
        .unwrap();
    let started = Instant::now();
    let answer = read_until_closed(&mut s).unwrap_or_else(|(_, got)| got);
    let answer = String::from_utf8_lossy(&answer).to_string();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer:?}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "held open for {:?}",
        started.elapsed()
    );

    // Idle connections and half-sent heads hold nothing: others are served meanwhile, and the
    // daemon closes them after server.header_timeout_secs.
    let mut idle: Vec<TcpStream> = (0..40)
        .map(|_| TcpStream::connect(d.addr()).unwrap())
        .collect();
    for s in idle.iter_mut().step_by(2) {
        s.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\n")
            .unwrap();
    }
    // And one that made a request and then idles (keep-alive).
    let mut kept = TcpStream::connect(d.addr()).unwrap();
    kept.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    kept.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 1024];
    assert!(
        read_through_signals(&mut kept, &mut buf).unwrap() > 0,
        "the first request is answered"
    );
    idle.push(kept);
    // HTTP/2 cleartext: a preface cut after its first byte, and a whole preface with its
    // SETTINGS and then nothing; hyper's HTTP/1 head timeout covers neither.
    let mut h2: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(d.addr()).unwrap())
        .collect();
    h2[0].write_all(b"P").unwrap();
    h2[1]
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .unwrap();
    let started = Instant::now();
    assert!(ok(&d), "served beside idle connections");
    assert!(started.elapsed() < Duration::from_secs(2));
    std::thread::sleep(Duration::from_secs(3));
    for (i, s) in idle.iter_mut().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 1024];
        let read = read_through_signals(s, &mut buf);
        let closed = match &read {
            Ok(0) => true,
            Ok(n) => String::from_utf8_lossy(&buf[..*n]).starts_with("HTTP/1.1 408"),
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        };
        assert!(closed, "idle connection {i} was not closed: {read:?}");
    }
    for (i, s) in h2.iter_mut().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let read = read_until_closed(s);
        let closed = match &read {
            Ok(_) => true,
            Err((e, _)) => e.kind() == std::io::ErrorKind::ConnectionReset,
        };
        assert!(
            closed,
            "idle HTTP/2 connection {i} was not closed: {read:?}"
        );
    }
    assert!(ok(&d), "still serving");
}

#[test]
fn pio_run_refuses_what_the_api_refuses_in_the_same_words() {
    if !confinement_available() {
        return;
    }
    let d = Daemon::start(echo_dir(""), "");
    d.wait_ready();
    let dir = echo_dir("");
    let cases: [(&[&str], Value); 6] = [
        (
            &["--prompt", "hi", "--temperature", "3"],
            json!({"prompt": "hi", "temperature": 3.0}),
        ),
        (
            &["--prompt", "hi", "--temperature", "-1"],
            json!({"prompt": "hi", "temperature": -1.0}),
        ),
        (
            &["--prompt", "hi", "--max-tokens", "0"],
            json!({"prompt": "hi", "max_tokens": 0}),
        ),
        (
            &["--prompt", "hi", "--stop", ""],
            json!({"prompt": "hi", "stop": [""]}),
        ),
        (
            &["--prompt", "hi", "--json", "--logprobs", "9"],
            json!({"prompt": "hi", "logprobs": 9}),
        ),
        (
            &["--messages", r#"[{"role": "wizard", "content": "x"}]"#],
            json!({"messages": [{"role": "wizard", "content": "x"}]}),
        ),
    ];
    for (flags, mut body) in cases {
        body["model"] = json!("echo");
        let path = if body.get("messages").is_some() {
            "/v1/chat/completions"
        } else {
            "/v1/completions"
        };
        let (status, r) = d.post(path, &body);
        assert_eq!(status, 400, "{body}: {r}");
        let message = r["error"]["message"].as_str().unwrap();
        let mut args = vec!["run", "echo", "--plugins", "."];
        args.extend_from_slice(flags);
        let out = pio(dir.path(), &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flags:?} ran");
        assert!(
            stderr.contains(message),
            "{flags:?}: the API says {message:?}, pio run: {stderr}"
        );
    }
    // What only the command line can get wrong is named as such.
    for (flags, says) in [
        (&["--messages", "{}"][..], "--messages must be a JSON array"),
        (&["--prompt", "hi", "--logprobs", "2"][..], "--json"),
        // JSON has no NaN: it would arrive as null, the model's default.
        (&["--prompt", "hi", "--temperature", "nan"][..], "finite"),
        (&["--prompt", "hi", "--top-p", "inf"][..], "finite"),
        (
            &["--prompt", "hi", "--repetition-penalty", "NaN"][..],
            "finite",
        ),
    ] {
        let mut args = vec!["run", "echo", "--plugins", "."];
        args.extend_from_slice(flags);
        let out = pio(dir.path(), &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(says),
            "{flags:?}: {stderr}"
        );
    }
}

/// Writes all of `request` before reading, as Python's `requests` does, and returns what came
/// back: the write must finish (the daemon reads the body it refuses) and the answer must arrive
/// whole, not lost to a reset.
fn send_all_then_read(d: &Daemon, request: &[u8]) -> String {
    let mut s = TcpStream::connect(d.addr()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request)
        .expect("the daemon stopped reading a refused body: the client's write broke");
    let out = read_until_closed(&mut s).unwrap_or_else(|(e, out)| {
        panic!(
            "the answer was lost: {e} after {:?}",
            String::from_utf8_lossy(&out)
        )
    });
    String::from_utf8_lossy(&out).to_string()
}

/// What `s` reads until the daemon closes it; or the error that stopped the reading (a read
/// timeout, a reset), with what came before it.
fn read_until_closed(s: &mut TcpStream) -> Result<Vec<u8>, (std::io::Error, Vec<u8>)> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match read_through_signals(s, &mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => return Err((e, out)),
        }
    }
}

#[test]
fn a_client_that_sends_a_whole_large_body_before_reading_gets_the_413() {
    if !confinement_available() {
        return;
    }
    let d = Daemon::start(echo_dir(""), CONFIG);
    d.wait_ready();
    // Far more than the kernel's socket buffers hold on either side.
    let big = vec![b' '; 32 << 20];
    let announced = post("/v1/completions", &big, "");
    let mut chunked = b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer user\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for piece in big.chunks(1 << 20) {
        chunked.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        chunked.extend_from_slice(piece);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    for (what, request) in [("announced", announced), ("chunked", chunked)] {
        let text = send_all_then_read(&d, &request);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("{what}: no answer: {text:?}"));
        assert!(head.starts_with("HTTP/1.1 413"), "{what}: {head}");
        assert!(
            head.to_ascii_lowercase().contains("connection: close"),
            "{what}: {head}"
        );
        let body: Value = serde_json::from_str(body).unwrap();
        assert_openai_4xx(what, 413, &body);
    }
    assert_eq!(
        d.post_raw(
            "/v1/completions",
            &base("/v1/completions").to_string(),
            Some("user")
        )
        .0,
        200
    );
}

/// A refused body's drain ends when its client pauses (5 s without a byte, as nginx's
/// `lingering_timeout`), not only at `server.body_timeout_secs`: a client that announced a large
/// body and then stopped holds no connection for the whole body timeout.
#[test]
fn a_refused_body_that_stops_coming_frees_its_connection() {
    if !confinement_available() {
        return;
    }
    let config = "[server]\nmax_body_size = \"64KiB\"\nbody_timeout_secs = 60\n";
    let d = Daemon::start(echo_dir(""), config);
    d.wait_ready();
    let mut s = TcpStream::connect(d.addr()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(
        b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: 20000000\r\n\r\n",
    )
    .unwrap();
    s.write_all(&[b' '; 4096]).unwrap();
    let started = Instant::now();
    let answer = read_until_closed(&mut s).unwrap_or_else(|(e, _)| {
        panic!(
            "the connection stayed open: {e} after {:?}",
            started.elapsed()
        )
    });
    let answer = String::from_utf8_lossy(&answer).to_string();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer:?}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "held open for {:?} with no bytes coming",
        started.elapsed()
    );
}

/// A request whose body the server takes (a raised `max_body_size`) but that is too large for
/// the frame it crosses to the worker in is the client's to shrink, a 400 saying so, not the
/// protocol's 500; the worker serves on.
#[test]
fn a_request_too_large_for_the_worker_is_a_400() {
    if !confinement_available() {
        return;
    }
    let d = Daemon::start(echo_dir(""), "[server]\nmax_body_size = \"64MiB\"\n");
    let prompt = "a".repeat(17 << 20);
    let (status, body) = d.post(
        "/v1/completions",
        &json!({"model": "echo", "prompt": prompt, "max_tokens": 1}),
    );
    assert_eq!(status, 400, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("shorter prompt"), "{body}");
    let (status, body) = d.post(
        "/v1/completions",
        &json!({"model": "echo", "prompt": "still here", "max_tokens": 2}),
    );
    assert_eq!(status, 200, "{body}");
}

/// A daemon on loopback with no keys is not the web's: a page whose name was made to resolve to
/// 127.0.0.1 (DNS rebinding) gets a 403 naming the host, and a cross-site POST (a form on some
/// page unloading a model) a 403 too, the model left serving. A request with a key, its own
/// page's (same origin) and a proxy's name in `allowed_hosts` go through.
#[test]
fn a_web_page_elsewhere_cannot_drive_a_local_daemon() {
    if !confinement_available() {
        return;
    }
    let d = Daemon::start(
        echo_dir(""),
        "[server]\nallowed_hosts = [\"chat.example.org\"]\n",
    );
    d.wait_ready();
    let ask = |request: String| raw(&d, request.as_bytes(), Duration::ZERO).expect("an answer");
    let rebound = ask(
        "GET /v1/plugins HTTP/1.1\r\nHost: evil.example:8080\r\nConnection: close\r\n\r\n".into(),
    );
    assert_eq!(rebound.0, 403, "{}", rebound.1);
    assert!(rebound.1.contains("DNS rebinding"), "{}", rebound.1);
    // A page rebound to the daemon may send any header: a key the server does not know opens
    // nothing.
    let faked = ask("GET /v1/plugins HTTP/1.1\r\nHost: evil.example\r\nAuthorization: Bearer x\r\nConnection: close\r\n\r\n".into());
    assert_eq!(faked.0, 403, "{}", faked.1);
    let health =
        ask("GET /health HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n".into());
    assert_eq!(health.0, 200, "{}", health.1);
    let unload = |origin: &str| {
        ask(format!(
            "POST /v1/plugins/echo/unload HTTP/1.1\r\nHost: {}\r\nOrigin: {origin}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            d.addr()
        ))
    };
    let forged = unload("http://evil.example");
    assert_eq!(forged.0, 403, "{}", forged.1);
    assert!(forged.1.contains("cross-site"), "{}", forged.1);
    assert_eq!(d.plugin("echo")["state"], "ready");
    let proxied = ask(
        "GET /v1/plugins HTTP/1.1\r\nHost: chat.example.org\r\nConnection: close\r\n\r\n".into(),
    );
    assert_eq!(proxied.0, 200, "{}", proxied.1);
    let own = unload(&format!("http://{}", d.addr()));
    assert_eq!(own.0, 200, "{}", own.1);
}

/// A client that sends a whole large body with a wrong key before it reads gets its 401, not a
/// reset: the refused body is read and dropped behind the answer, as a 413's is.
#[test]
fn a_wrong_key_with_a_large_body_gets_the_401() {
    if !confinement_available() {
        return;
    }
    let d = Daemon::start(echo_dir(""), "[server]\napi_keys = [\"user\"]\n");
    d.wait_ready();
    let big = vec![b' '; 12 << 20];
    let request = with_bearer(post("/v1/completions", &big, ""), "guess");
    let text = send_all_then_read(&d, &request);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no answer: {text:?}"));
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    let body: Value = serde_json::from_str(body).unwrap();
    assert_openai_4xx("wrong key", 401, &body);
}

/// `request` with its bearer key replaced by `key`.
fn with_bearer(request: Vec<u8>, key: &str) -> Vec<u8> {
    let at = (request.windows(13))
        .position(|w| w == b"Bearer user\r\n")
        .expect("a bearer key");
    let mut out = request[..at].to_vec();
    out.extend_from_slice(format!("Bearer {key}\r\n").as_bytes());
    out.extend_from_slice(&request[at + 13..]);
    out
}
