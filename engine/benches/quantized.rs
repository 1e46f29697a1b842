//! The engine's quantized linear layers against candle's own quantized product (`QMatMul`, which
//! on x86 repacks each weight into expanded tiles on first use), on the same blocks in the same
//! run: one activation row (decode, over enough matrices that none stays in a cache), four
//! (batched decode) and 512 (prefill), Qwen3-0.6B's MLP shape.
//!
//! Run: `cargo bench -p pio-engine --bench quantized` (`RAYON_NUM_THREADS` sets the threads).

use std::time::Instant;

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{Device, Module, Tensor};
use pio_engine::linear::Linear;

const K: usize = 1024;
const N: usize = 3072;
/// Bytes of weights cycled through in decode: far more than any cache (this machine's L3 is
/// 260 MB, shared).
const DECODE_BYTES: usize = 768 << 20;

/// Seconds per call of `f` over `reps` calls (after one to warm up).
fn seconds(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let t = Instant::now();
    for _ in 0..reps {
        f();
    }
    t.elapsed().as_secs_f64() / reps as f64
}

fn main() -> candle_core::Result<()> {
    let device = Device::Cpu;
    println!(
        "{K} → {N}, {} threads: tokens per second through one layer, PIO | candle (ratio)",
        rayon::current_num_threads()
    );
    for dtype in [
        GgmlDType::Q8_0,
        GgmlDType::Q4_0,
        GgmlDType::Q4K,
        GgmlDType::Q6K,
    ] {
        let w = Tensor::randn(0f32, 1.0, (N, K), &device)?;
        let blocks = QTensor::quantize(&w, dtype)?.data()?.into_owned();
        let copies = DECODE_BYTES / blocks.len();
        let copy = || {
            let storage = QStorage::from_data(Cow::Borrowed(&blocks), &device, dtype)?;
            QTensor::new(storage, (N, K))
        };
        let mut ours = Vec::new();
        let mut theirs = Vec::new();
        for _ in 0..copies {
            ours.push(Linear::from_qtensor(copy()?, None)?);
            theirs.push(QMatMul::QTensor(Arc::new(copy()?)));
        }
        for m in [1, 4, 512] {
            let x = Tensor::randn(0f32, 1.0, (1, m, K), &device)?;
            let (copies, reps) = if m == 512 { (1, 2) } else { (copies, copies) };
            // Phases of one side at a time, the other's threads given time to stop spinning
            // (candle runs its own pool beside rayon's), best of three each.
            let (mut a, mut b) = (f64::MAX, f64::MAX);
            let mut i = 0;
            for _ in 0..3 {
                std::thread::sleep(std::time::Duration::from_millis(200));
                a = a.min(seconds(reps, || {
                    let _ = ours[i % copies].forward(&x);
                    i += 1;
                }));
                std::thread::sleep(std::time::Duration::from_millis(200));
                b = b.min(seconds(reps, || {
                    let _ = theirs[i % copies].forward(&x);
                    i += 1;
                }));
            }
            let (a, b) = (m as f64 / a, m as f64 / b);
            println!("{dtype:?} m = {m:>3}: {a:>9.0} | {b:>9.0} ({:.2}×)", a / b);
        }
    }
    Ok(())
}
