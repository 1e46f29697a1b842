use super::*;
use crate::serve::link::small_buffered_connection;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn chunk() -> Value {
    serde_json::json!({"x": 1})
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_after_the_stall_timeout() {
    let (outlet, body) = Outlet::open(2, Duration::from_millis(200), None);
    let mut body = Box::pin(body);
    // The buffer takes two chunks; the third waits for a reader that never comes.
    assert!(outlet.send(&chunk()).await.is_ok());
    assert!(outlet.send(&chunk()).await.is_ok());
    let started = Instant::now();
    assert_eq!(outlet.send(&chunk()).await, Err(Ended::Stalled));
    assert!(started.elapsed() >= Duration::from_millis(150));
    // A read frees room: sending works again; a client gone fails at once.
    assert!(body.next().await.is_some());
    assert!(outlet.send(&chunk()).await.is_ok());
    drop(body);
    assert_eq!(outlet.send(&chunk()).await, Err(Ended::Left));
}

/// A stream quiet for longer than the stall timeout (a long prefill, a tool call held back)
/// gave its client nothing to read: its next chunks go out, and the timeout counts from when
/// the buffer filled.
#[tokio::test]
async fn a_stream_quiet_past_the_stall_timeout_is_not_cut_off() {
    let (outlet, _body) = Outlet::open(2, Duration::from_millis(100), None);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(outlet.send(&chunk()).await, Ok(()));
    assert_eq!(outlet.send(&chunk()).await, Ok(()));
    let started = Instant::now();
    assert_eq!(outlet.send(&chunk()).await, Err(Ended::Stalled));
    assert!(started.elapsed() >= Duration::from_millis(80));
}

/// A client that takes chunks steadily but slower than they come keeps the buffer full for far
/// longer than the stall timeout, and is not cut off.
#[tokio::test]
async fn a_slow_but_steady_reader_is_not_cut_off() {
    let (outlet, body) = Outlet::open(2, Duration::from_millis(300), None);
    let reader = tokio::spawn(async move {
        let mut body = Box::pin(body);
        let mut taken = 0;
        // One chunk every 100 ms: a third of the stall timeout.
        while body.next().await.is_some() {
            taken += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        taken
    });
    let started = Instant::now();
    for _ in 0..15 {
        assert_eq!(outlet.send(&chunk()).await, Ok(()));
    }
    // The buffer was full for over a second: four stall timeouts.
    assert!(started.elapsed() >= Duration::from_millis(1200));
    drop(outlet);
    assert_eq!(reader.await.unwrap(), 15);
}

/// Over a real connection whose writer (as hyper's) wakes only when a good part of the socket
/// buffer has drained, a client acknowledging bytes is reading though no chunk leaves the
/// buffer for longer than the stall timeout; once it stops, it is cut off.
#[tokio::test]
async fn a_client_acknowledging_bytes_is_reading() {
    let (mut linked, link, mut client) = small_buffered_connection().await;
    let writer = tokio::spawn(async move {
        let block = [7u8; 4096];
        while linked.write_all(&block).await.is_ok() {}
    });
    let reading = Duration::from_millis(1500);
    let reader = tokio::spawn(async move {
        let (started, mut buf) = (Instant::now(), [0u8; 512]);
        while started.elapsed() < reading {
            client.read_exact(&mut buf).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Stops reading, the connection still open.
        client
    });
    let (outlet, _body) = Outlet::open(1, Duration::from_millis(600), Some(link));
    outlet.send(&chunk()).await.unwrap();
    let started = Instant::now();
    assert_eq!(outlet.send(&chunk()).await, Err(Ended::Stalled));
    let cut_after = started.elapsed();
    assert!(
        cut_after >= reading,
        "cut off after {cut_after:?}, while the client read"
    );
    assert!(
        cut_after < reading + Duration::from_secs(2),
        "{cut_after:?}"
    );
    writer.abort();
    drop(reader.await.unwrap());
}

/// A body cut off ends in an error (the connection is aborted); a whole one ends cleanly.
#[tokio::test]
async fn a_cut_off_body_ends_in_an_error() {
    for cut in [false, true] {
        let (outlet, body) = Outlet::open(4, Duration::from_secs(1), None);
        outlet.send(&chunk()).await.unwrap();
        if cut {
            outlet.cut_off();
        }
        drop(outlet);
        let items: Vec<Chunk> = body.collect().await;
        assert_eq!(items.len(), if cut { 2 } else { 1 });
        assert!(items[0].is_ok());
        assert_eq!(items.last().unwrap().is_err(), cut);
    }
}
