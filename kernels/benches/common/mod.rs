//! What the kernel benches share: best-of timing and the streaming read they measure against.

use std::time::Instant;

use rayon::prelude::*;

/// Bytes a bench cycles through to measure a read from memory: far more than any cache holds
/// (the 2-vCPU VMs' last-level cache is 260 MB, shared), so no step finds its bytes cached.
pub const CYCLED: usize = 768 << 20;

/// Seconds per call of `f`, best of a few runs.
pub fn seconds(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        for _ in 0..reps {
            f();
        }
        best = best.min(t.elapsed().as_secs_f64() / reps as f64);
    }
    best
}

/// GB/s of a streaming read over `bytes` split over the pool (the bandwidth limit).
pub fn streaming_read(bytes: &[u8]) -> f64 {
    let s = seconds(3, || {
        let sum: u64 = bytes
            .par_chunks(1 << 20)
            .map(|c| {
                // Eight independent sums, so the loop vectorizes and the read is the limit.
                let mut acc = [0u64; 8];
                for line in c.chunks_exact(64) {
                    for (a, w) in acc.iter_mut().zip(line.chunks_exact(8)) {
                        *a = a.wrapping_add(u64::from_le_bytes(w.try_into().unwrap_or_default()));
                    }
                }
                acc.iter().fold(0u64, |s, &a| s.wrapping_add(a))
            })
            .reduce(|| 0, u64::wrapping_add);
        std::hint::black_box(sum);
    });
    bytes.len() as f64 / s / 1e9
}
