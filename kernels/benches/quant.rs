//! The quantized products against the machine's memory bandwidth: decode (one activation row)
//! streams every weight byte once, so its figure is the weight bytes read per second beside a
//! plain streaming read of as many bytes; a few rows (batched decode) and many rows (prefill)
//! print GFLOP/s beside the f32 GEMM over the decoded weights, the path prefill could take
//! instead.
//!
//! Run: `cargo bench -p pio-kernels --bench quant` (`RAYON_NUM_THREADS` sets the threads).

use pio_kernels::{
    dequantize, keep_awake, matmul_rows, packed_matmul, quantized_matmul, Format, PackedMatrix,
    QuantMatrix, WeightRows,
};

mod common;
use common::{seconds, streaming_read, CYCLED};

/// Qwen3-0.6B's MLP projection shape.
const K: usize = 1024;
const N: usize = 3072;

/// Blocks the GEMM path decodes itself.
struct Decoded<'a>(Format, &'a [u8]);

impl WeightRows for Decoded<'_> {
    fn widen_rows(&self, rows: std::ops::Range<usize>, k: usize, out: &mut [f32]) {
        let row = self.0.row_bytes(k).unwrap_or(0);
        dequantize(self.0, &self.1[rows.start * row..rows.end * row], out);
    }
}

fn main() {
    let formats = [Format::Q8_0, Format::Q4_0, Format::Q4K, Format::Q6K];
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    let mut random = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    println!("{K} → {N}, {} threads", rayon::current_num_threads());
    for format in formats {
        let row = format.row_bytes(K).unwrap_or(0);
        let copies = CYCLED / (row * N);
        let mut bytes: Vec<u8> = (0..row * N * copies).map(|_| random() as u8).collect();
        // Small finite scales where the format keeps them.
        for b in bytes.chunks_exact_mut(format.block_bytes()) {
            let at = if format == Format::Q6K { 208 } else { 0 };
            b[at..at + 2].copy_from_slice(&half::f16::from_f32(0.01).to_le_bytes());
            if format == Format::Q4K {
                b[2..4].copy_from_slice(&half::f16::from_f32(0.01).to_le_bytes());
            }
        }
        let read = streaming_read(&bytes);
        let mats: Vec<QuantMatrix<'_>> = bytes
            .chunks_exact(row * N)
            .filter_map(|b| QuantMatrix::new(format, b, N, K).ok())
            .collect();
        let packed: Vec<PackedMatrix> = mats.iter().map(PackedMatrix::pack).collect();
        let x: Vec<f32> = (0..512 * K)
            .map(|i| ((i % 13) as f32 - 6.0) * 0.1)
            .collect();
        let mut out = vec![0f32; 512 * N];
        let mut next = 0;
        // As the engine runs a decode step: on a pool thread, the others kept awake between
        // products (asleep, every product would begin with a wake-up the engine does not pay).
        let decode = keep_awake(|| {
            seconds(copies, || {
                quantized_matmul(&x[..K], &mats[next % copies], 1, &mut out[..N]);
                next += 1;
            })
        });
        let gbs = (row * N) as f64 / decode / 1e9;
        print!(
            "{:>5} decode: {gbs:>5.1} GB/s of weights = {:>3.0}% of a streaming read ({read:.1} GB/s)",
            format.name(),
            100.0 * gbs / read
        );
        if let Some(first) = packed.first() {
            let tiled = keep_awake(|| {
                seconds(copies, || {
                    packed_matmul(&x[..K], &packed[next % copies], 1, &mut out[..N]);
                    next += 1;
                })
            });
            let gbs = first.size_in_bytes() as f64 / tiled / 1e9;
            print!("; tiles {gbs:>5.1} GB/s = {:>3.0}%", 100.0 * gbs / read);
        }
        println!();
        for m in [4, 16, 64, 512] {
            let flops = 2.0 * (m * K * N) as f64 / 1e9;
            let w = &mats[0];
            let q = seconds(3, || quantized_matmul(&x[..m * K], w, m, &mut out[..m * N]));
            let g = seconds(3, || {
                matmul_rows(
                    &x[..m * K],
                    &Decoded(format, &bytes[..row * N]),
                    m,
                    K,
                    N,
                    &mut out[..m * N],
                )
            });
            print!(
                "        m = {m:>3}: {:>6.1} GFLOP/s integer | {:>6.1} decoded f32 GEMM",
                flops / q,
                flops / g
            );
            if let Some(p) = packed.first() {
                let t = seconds(3, || packed_matmul(&x[..m * K], p, m, &mut out[..m * N]));
                print!(" | {:>6.1} tiles", flops / t);
            }
            println!();
        }
    }
}
