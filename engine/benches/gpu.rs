//! The GPU's memory bandwidth (device-to-device copies of 2 GiB, read plus write) and the
//! single-stream decode limit it sets for a checkpoint: its weight bytes are read once per token.
//! `cargo bench -p pio-engine --features cuda --bench gpu -- CHECKPOINT_DIR` (tests/gpu/run.sh).

use std::time::Instant;

use pio_engine::candle_core::{DType, Device, Tensor};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    let device = match Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => {
            println!("no CUDA device ({e}): nothing to measure");
            return Ok(());
        }
    };
    let bytes = 2usize << 30;
    let src = Tensor::zeros(bytes / 2, DType::BF16, &device)?;
    drop(src.copy()?);
    device.synchronize()?;
    let rounds = 10;
    let start = Instant::now();
    for _ in 0..rounds {
        drop(src.copy()?);
    }
    device.synchronize()?;
    let gb_per_s = (2 * bytes * rounds) as f64 / start.elapsed().as_secs_f64() / 1e9;
    println!("device memory bandwidth: {gb_per_s:.0} GB/s (copies, read + write)");
    if let Some(dir) = dir {
        let weights: u64 = std::fs::read_dir(&dir)?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
            .map(|e| e.metadata().map_or(0, |m| m.len()))
            .sum();
        let gb = weights as f64 / 1e9;
        println!(
            "{dir}: {gb:.2} GB of weights; single-stream decode limit {:.0} tokens/s",
            gb_per_s / gb
        );
    }
    Ok(())
}
