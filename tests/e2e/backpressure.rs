//! Backpressure through the real daemon and worker: a client that stops reading a long stream
//! pauses its generation (the worker's window fills and its sink waits), the daemon's memory stays
//! where it was, and the generation stops for good when the client leaves.

use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use socket2::{Domain, Socket, Type};

use crate::daemon::*;
use crate::support::read_through_signals;
use crate::worker::confinement_available;

/// The daemon's resident memory, from /proc.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("daemon status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS");
    kib << 10
}

/// A connection whose receive buffer is a few KiB, so the kernel cannot absorb the stream for
/// the client (a loopback socket's would otherwise grow to megabytes).
fn small_window_connection(addr: &str) -> Socket {
    let addr: SocketAddr = addr.parse().expect("daemon address");
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    socket.connect(&addr.into()).expect("connect");
    socket
}

#[test]
fn a_client_that_stops_reading_pauses_its_generation_and_the_daemon_holds_nothing() {
    if !confinement_available() {
        return;
    }
    // 4000 tokens at 1 ms each: four seconds if nothing held the stream back, ~1.2 MB of
    // chunks: more than the daemon's small socket buffer and hyper's ~400 KB hold.
    let d = Daemon::start(
        echo_dir("[model.options]\ndelay_ms = 1\n"),
        "[server]\nstall_timeout_secs = 60\nsend_buffer = \"16KiB\"\n",
    );
    d.wait_ready();
    let forwarded = "pio_inter_token_latency_seconds_count{model=\"echo\"}";
    let warm = json!({"model": "echo", "prompt": "warm up", "max_tokens": 4});
    assert_eq!(d.post("/v1/completions", &warm).0, 200);
    let before = rss_bytes(d.pid());
    let base = d.metric(forwarded).unwrap_or(0.0);

    let client = long_stream(&d, 4000);
    std::thread::sleep(Duration::from_secs(5));
    let early = d.metric(forwarded).unwrap_or(0.0) - base;
    std::thread::sleep(Duration::from_secs(10));
    let late = d.metric(forwarded).unwrap_or(0.0) - base;
    let after = rss_bytes(d.pid());
    assert!(
        early > 0.0 && early < 1000.0,
        "the stream started and then held back: {early} tokens forwarded of 4000"
    );
    eprintln!("forwarded {early} then {late} tokens of 4000; daemon RSS {before} -> {after} bytes");
    assert_eq!(
        early, late,
        "generation paused while the client read nothing"
    );
    // Unpaused, echo would have finished in four seconds and left the worker's books.
    assert_eq!(
        d.plugin("echo")["requests_in_flight"],
        1,
        "the worker holds the paused request unfinished: {}",
        d.plugin("echo")
    );
    assert!(
        after < before + (4 << 20),
        "the daemon's memory stayed put: {before} -> {after} bytes"
    );

    drop(client);
    let gone = "pio_requests_total{model=\"echo\",endpoint=\"chat\",status=\"499\"}";
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.metric(gone).is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        d.metric(gone),
        Some(1.0),
        "the abandoned stream was recorded"
    );
    let idle = || d.plugin("echo")["requests_in_flight"] == 0;
    while !idle() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        idle(),
        "the worker stopped the generation: {}",
        d.plugin("echo")
    );
    assert_eq!(
        d.metric(forwarded).unwrap_or(0.0) - base,
        late,
        "nothing was generated after the client left"
    );
}

/// Sends a completion `body` to `d` over a raw connection and waits (at most 10 s, the deadline
/// returned) until echo's worker runs it; the connection, to drop, and a check of that.
fn completion_in_the_worker<'a>(
    d: &'a Daemon,
    body: &Value,
) -> (std::net::TcpStream, impl Fn() -> bool + 'a, Instant) {
    let body = body.to_string();
    let mut client = std::net::TcpStream::connect(d.addr()).expect("connect");
    send(&mut client, "/v1/completions", &body);
    let busy = move || d.plugin("echo")["requests_in_flight"] == 1;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !busy() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(busy(), "the request reached the worker");
    (client, busy, deadline)
}

#[test]
fn a_whole_answer_whose_client_leaves_is_counted_and_its_generation_stopped() {
    if !confinement_available() {
        return;
    }
    // 200 tokens at 20 ms: four seconds, unless the client's leaving stops it.
    let d = Daemon::start(echo_dir("[model.options]\ndelay_ms = 20\n"), "");
    d.wait_ready();
    let body = json!({"model": "echo", "prompt": "z".repeat(200), "max_tokens": 200});
    let (client, busy, deadline) = completion_in_the_worker(&d, &body);
    let left = Instant::now();
    drop(client);
    let gone = "pio_requests_total{model=\"echo\",endpoint=\"completions\",status=\"499\"}";
    while (d.metric(gone).is_none() || busy()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(d.metric(gone), Some(1.0), "counted as a client gone");
    assert!(!busy(), "the worker stopped the generation");
    assert!(
        left.elapsed() < Duration::from_secs(3),
        "stopped when the client left, not at the end: {:?}",
        left.elapsed()
    );
    // The worker's log line says the request ended, not that it failed.
    d.wait_for(5, "the worker's line", |d| d.logs().contains("cancelled"));
    let logs = d.logs();
    let line = logs.lines().find(|l| l.contains("cancelled")).unwrap();
    assert!(line.contains("ended") && !line.contains("failed"), "{line}");
}

/// A client that leaves a request of `n` choices stops every choice in the worker, streamed or
/// not; `n` takes as many places of the queue, so one past `queue_depth` is refused.
#[test]
fn every_choice_stops_when_the_client_leaves() {
    if !confinement_available() {
        return;
    }
    let d = Daemon::start(
        echo_dir("[model.options]\ndelay_ms = 20\n"),
        "[server]\nqueue_depth = 4\n",
    );
    d.wait_ready();
    let in_flight = || d.plugin("echo")["requests_in_flight"].as_u64().unwrap_or(0);
    for stream in [false, true] {
        let body = json!({"model": "echo", "prompt": "z".repeat(200), "max_tokens": 200,
            "n": 3, "stream": stream})
        .to_string();
        let mut client = std::net::TcpStream::connect(d.addr()).expect("connect");
        send(&mut client, "/v1/completions", &body);
        let deadline = Instant::now() + Duration::from_secs(10);
        while in_flight() < 3 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(in_flight(), 3, "stream {stream}: every choice runs");
        let left = Instant::now();
        drop(client);
        while in_flight() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(in_flight(), 0, "stream {stream}: every choice stopped");
        assert!(
            left.elapsed() < Duration::from_secs(3),
            "{:?}",
            left.elapsed()
        );
    }
    let (status, e) = d.post(
        "/v1/completions",
        &json!({"model": "echo", "prompt": "hi", "n": 5}),
    );
    assert_eq!(status, 400, "{e}");
    assert_eq!(e["error"]["param"], "n");
}

/// A stream whose client leaves before its first token is counted as gone too (its handler
/// was dropped before the stream's own task, which records, existed).
#[test]
fn a_stream_left_before_its_first_token_is_counted() {
    if !confinement_available() {
        return;
    }
    let d = Daemon::start(echo_dir("[model.options]\ndelay_ms = 3000\n"), "");
    d.wait_ready();
    let body = json!({"model": "echo", "prompt": "zz", "max_tokens": 2, "stream": true});
    let (client, _, deadline) = completion_in_the_worker(&d, &body);
    drop(client);
    let gone = "pio_requests_total{model=\"echo\",endpoint=\"completions\",status=\"499\"}";
    while d.metric(gone).is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(d.metric(gone), Some(1.0), "{}", d.get_text("/metrics"));
}

/// More requests at once than the worker's pids limit has threads for wait for a thread instead
/// of failing: every one is answered.
#[test]
fn requests_past_the_workers_thread_limit_wait_for_a_thread() {
    if !confinement_available() {
        return;
    }
    let extra = "[limits]\npids = 12\n[model.options]\ndelay_ms = 20\n";
    let d = std::sync::Arc::new(Daemon::start(echo_dir(extra), ""));
    d.wait_ready();
    let clients: Vec<_> = (0..30)
        .map(|i| {
            let d = d.clone();
            std::thread::spawn(move || {
                let body = json!({"model": "echo", "messages": [
                    {"role": "user", "content": format!("request {i}")}]});
                d.post("/v1/chat/completions", &body)
            })
        })
        .collect();
    for client in clients {
        let (status, r) = client.join().unwrap();
        assert_eq!(status, 200, "{r}");
    }
}

/// Writes a POST of `body` to `path` on a raw connection.
fn send(client: &mut impl Write, path: &str, body: &str) {
    write!(
        client,
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send the request");
}

/// Opens a chat stream of `tokens` tokens (with logprobs: a few hundred bytes each) over a
/// connection with a small receive window.
fn long_stream(d: &Daemon, tokens: usize) -> Socket {
    let body = json!({"model": "echo", "max_tokens": tokens, "stream": true, "logprobs": true,
                      "messages": [{"role": "user", "content": "x".repeat(tokens)}]})
    .to_string();
    let mut client = small_window_connection(d.addr());
    send(&mut client, "/v1/chat/completions", &body);
    client
}

/// The stall timeout counts from the client's last read as the kernel sees it: a client that
/// reads 2 KB a second keeps its stream, while one that reads nothing is cut off and its
/// generation stopped. With a small `send_buffer` the daemon's writes wake only when half its
/// 32 KB socket buffer has drained (some 8 s apart at that pace, twice the stall timeout); with
/// the kernel's own (autotuned to megabytes) the daemon bounds the unsent bytes, without which
/// the stalled client was never cut off.
#[test]
fn a_slow_reader_keeps_its_stream_and_a_stalled_one_is_cut_off() {
    for buffer in ["send_buffer = \"16KiB\"\n", ""] {
        slow_and_stalled(buffer);
    }
}

fn slow_and_stalled(buffer: &str) {
    if !confinement_available() {
        return;
    }
    let d = Daemon::start(
        echo_dir("[model.options]\ndelay_ms = 1\n"),
        &format!("[server]\nstall_timeout_secs = 4\n{buffer}"),
    );
    d.wait_ready();
    let stalled = long_stream(&d, 4000);
    let slow = long_stream(&d, 4000);
    let reading = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let reader = std::thread::spawn({
        let reading = reading.clone();
        move || {
            let mut slow = std::net::TcpStream::from(slow);
            let mut taken = 0;
            let mut buf = [0u8; 256];
            while reading.load(std::sync::atomic::Ordering::Relaxed) {
                match crate::support::read_through_signals(&mut slow, &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => taken += n,
                }
                std::thread::sleep(Duration::from_millis(125));
            }
            (slow, taken)
        }
    });
    // Four stall timeouts.
    std::thread::sleep(Duration::from_secs(16));
    let gone = "pio_requests_total{model=\"echo\",endpoint=\"chat\",status=\"499\"}";
    let cut = d.metric(gone);
    let in_flight = d.plugin("echo")["requests_in_flight"].clone();
    reading.store(false, std::sync::atomic::Ordering::Relaxed);
    let (slow, taken) = reader.join().unwrap();
    eprintln!("the slow client read {taken} bytes");
    assert_eq!(
        cut,
        Some(1.0),
        "{buffer}: only the stalled stream was cut off"
    );
    assert_eq!(
        in_flight, 1,
        "{buffer}: the slow reader's generation goes on"
    );
    assert!(
        taken > 16 << 10,
        "the slow client read all along: {taken} bytes"
    );
    drop((slow, stalled));
}

/// A client that leaves while its request prefills (no token yet, nothing to fail to send)
/// stops the request in the worker at once, streaming or not: a long prompt's prefill is not
/// run to its end for nobody.
#[test]
fn a_client_gone_during_the_prefill_stops_it_in_the_worker() {
    if !confinement_available() {
        return;
    }
    let d = Daemon::start(echo_dir("[model.options]\nprefill_ms = 8000\n"), "");
    d.wait_ready();
    for stream in [false, true] {
        let body = json!({"model": "echo", "prompt": "zz", "max_tokens": 2, "stream": stream});
        let (client, busy, _) = completion_in_the_worker(&d, &body);
        let left = Instant::now();
        drop(client);
        while busy() && left.elapsed() < Duration::from_secs(6) {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            !busy(),
            "stream {stream}: the worker stopped the prefill when the client left: {}",
            d.plugin("echo")
        );
        assert!(
            left.elapsed() < Duration::from_secs(3),
            "stream {stream}: stopped at once, not at the prefill's end: {:?}",
            left.elapsed()
        );
    }
}

/// A stream's headers do not wait for its first token: during a long prefill the client (and
/// any proxy's idle timeout) has its 200 and `text/event-stream` within a second or so, and
/// the tokens follow when they come.
#[test]
fn a_streams_headers_come_before_a_long_prefill_ends() {
    if !confinement_available() {
        return;
    }
    let d = Daemon::start(echo_dir("[model.options]\nprefill_ms = 4000\n"), "");
    d.wait_ready();
    let body =
        json!({"model": "echo", "prompt": "abc", "max_tokens": 3, "stream": true}).to_string();
    let mut client = std::net::TcpStream::connect(d.addr()).expect("connect");
    let asked = Instant::now();
    send(&mut client, "/v1/completions", &body);
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let mut headers_at = None;
    while !String::from_utf8_lossy(&got).contains("[DONE]") {
        let n = read_through_signals(&mut client, &mut buf).expect("read the stream");
        assert!(
            n > 0,
            "the stream ended early: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
        if headers_at.is_none() && got.windows(4).any(|w| w == b"\r\n\r\n") {
            headers_at = Some(asked.elapsed());
        }
    }
    let text = String::from_utf8_lossy(&got);
    let headers_at = headers_at.unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("text/event-stream"), "{text}");
    assert!(
        headers_at < Duration::from_millis(2500),
        "headers after {headers_at:?}, before the 4 s prefill ended"
    );
    assert!(
        asked.elapsed() >= Duration::from_secs(4),
        "the tokens came after the prefill"
    );
    assert!(text.contains("\"text\":\"a\""), "{text}");
}

/// A model that waits for room under `max_loaded_models` (the one loaded is busy) is not said to
/// be loading: the 503 names the cap, and the load goes through once the other is idle.
#[test]
fn a_load_waiting_for_room_says_so() {
    if !confinement_available() {
        return;
    }
    let dir = echo_and_hostile_dir();
    let config =
        "[server]\npreload = []\nmax_loaded_models = 1\nload_wait_secs = 2\nwarmup = false\n";
    let d = std::sync::Arc::new(Daemon::start(dir, config));
    let busy = {
        let d = d.clone();
        std::thread::spawn(move || {
            d.post(
                "/v1/completions",
                &json!({"model": "hostile", "prompt": "spin 5"}),
            )
        })
    };
    d.wait_for(15, "hostile busy", |d| {
        d.plugin("hostile")["state"] == "ready"
    });
    let hi = json!({"model": "echo", "messages": [{"role": "user", "content": "hi"}]});
    let waiting = {
        let (d, hi) = (d.clone(), hi.clone());
        std::thread::spawn(move || d.post("/v1/chat/completions", &hi))
    };
    // Meanwhile /v1/plugins says what the load waits for.
    d.wait_for(5, "the load waiting for room", |d| {
        d.plugin("echo")["waiting_for_room"] == json!(true)
    });
    assert_eq!(d.plugin("echo")["state"], "loading");
    let (status, e) = waiting.join().unwrap();
    assert_eq!(status, 503, "{e}");
    let message = e["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("waits for room") && message.contains("max_loaded_models (1)"),
        "{e}"
    );
    assert_eq!(busy.join().unwrap().0, 200);
    let (status, r) = d.post("/v1/chat/completions", &hi);
    assert_eq!(status, 200, "{r}");
}
