use rand::{Rng, SeedableRng};

use super::blocks::{quantize_act256, quantize_act32, Act256, Act32};
use super::*;
use crate::test_data::data;

const FORMATS: [Format; 4] = [Format::Q8_0, Format::Q4_0, Format::Q4K, Format::Q6K];

/// `rows × cols` of random blocks: any bit pattern is a valid block once its scales are finite,
/// so every nibble, 6-bit scale and sign combination gets exercised.
fn random_blocks(format: Format, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut bytes: Vec<u8> = (0..format.row_bytes(cols).expect("whole blocks") * rows)
        .map(|_| rng.random())
        .collect();
    let scale_at: &[usize] = match format {
        Format::Q8_0 | Format::Q4_0 => &[0],
        Format::Q4K => &[0, 2],
        Format::Q6K => &[208],
    };
    for block in bytes.chunks_exact_mut(format.block_bytes()) {
        for &at in scale_at {
            let d = half::f16::from_f32(rng.random_range(0.001f32..0.05));
            block[at..at + 2].copy_from_slice(&d.to_le_bytes());
        }
    }
    bytes
}

/// The activations exactly as the kernels see them (after their 8-bit rounding), as f64.
fn rounded_activations(format: Format, x: &[f32]) -> Vec<f64> {
    match format {
        Format::Q8_0 | Format::Q4_0 => {
            let mut a: Vec<Act32> = Vec::new();
            quantize_act32(x, &mut a);
            a.iter()
                .flat_map(|b| b.qs.map(|q| f64::from(b.d) * f64::from(q)))
                .collect()
        }
        _ => {
            let mut a: Vec<Act256> = Vec::new();
            quantize_act256(x, &mut a);
            a.iter()
                .flat_map(|b| b.qs.map(|q| f64::from(b.d) * f64::from(q)))
                .collect()
        }
    }
}

/// The product in f64 over the decoded weights and `act(x)` of each row, and beside each output
/// the sum of its terms' magnitudes (what f32 rounding is relative to).
fn reference(
    w: &QuantMatrix<'_>,
    x: &[f32],
    m: usize,
    act: impl Fn(&[f32]) -> Vec<f64>,
) -> Vec<(f64, f64)> {
    let (n, k) = (w.rows(), w.cols());
    let mut decoded = vec![0f32; n * k];
    dequantize(w.format(), w.bytes, &mut decoded);
    let mut out = vec![(0f64, 0f64); m * n];
    for (r, x) in x.chunks_exact(k).enumerate() {
        let x = act(x);
        for (j, wr) in decoded.chunks_exact(k).enumerate() {
            let terms = wr.iter().zip(&x).map(|(&w, &x)| f64::from(w) * x);
            out[r * n + j] = terms.fold((0.0, 0.0), |(s, a), t| (s + t, a + t.abs()));
        }
    }
    out
}

/// Shapes with one block and several, one row and many, and activation rows that leave every
/// remainder of four.
fn shapes(format: Format) -> Vec<(usize, usize, usize)> {
    let b = format.block_values();
    let mut s = Vec::new();
    for k in [b, 3 * b, if b == 32 { 800 } else { 1280 }] {
        for n in [1, 7, 37] {
            for m in [1, 2, 3, 4, 5, 9] {
                s.push((m, k, n));
            }
        }
    }
    s
}

fn assert_close(got: &[f32], want: &[(f64, f64)], what: &str) {
    for (i, (&g, &(w, magnitude))) in got.iter().zip(want).enumerate() {
        // Exact integer sums per block, scaled and added in f32: a few ulps of the terms'
        // magnitude (random weights cancel, so the result itself can be far smaller).
        assert!(
            (f64::from(g) - w).abs() <= 1e-6 * magnitude.max(1e-3),
            "{what}: output {i} is {g}, expected {w}"
        );
    }
}

#[test]
fn every_kernel_path_matches_the_decoded_product_on_odd_shapes() {
    for format in FORMATS {
        for (seed, (m, k, n)) in shapes(format).into_iter().enumerate() {
            let bytes = random_blocks(format, n, k, seed as u64);
            let w = QuantMatrix::new(format, &bytes, n, k).expect("a valid shape");
            let x = data(m * k, 1000 + seed as u64);
            let want = reference(&w, &x, m, |x| rounded_activations(format, x));
            let what = format!("{} m={m} k={k} n={n}", format.name());

            let mut got = vec![0f32; m * n];
            quantized_matmul(&x, &w, m, &mut got);
            assert_close(
                &got,
                &want,
                &format!("{what} at {:?}", crate::Level::current()),
            );

            for path in paths() {
                let got = row_by_row(&w, &x, m, path);
                assert_close(&got, &want, &format!("{what} on {path:?}"));
            }
        }
    }
}

/// Every kernel path this machine can run, whatever `PIO_KERNELS` caps the dispatch at
/// (`Avx512` stands for the AVX-512 VNNI path; `AvxVnni` has tile kernels only, its rows run as
/// AVX2's).
fn paths() -> Vec<crate::Level> {
    let mut p = vec![crate::Level::Portable];
    if crate::Level::detected() >= crate::Level::Avx2 {
        p.push(crate::Level::Avx2);
    }
    #[cfg(target_arch = "x86_64")]
    if crate::Level::detected() >= crate::Level::Avx2 && is_x86_feature_detected!("avxvnni") {
        p.push(crate::Level::AvxVnni);
    }
    #[cfg(target_arch = "x86_64")]
    if crate::Level::detected() >= crate::Level::Avx512
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vnni")
    {
        p.push(crate::Level::Avx512);
    }
    p
}

/// The product through one path's single-row kernels.
fn row_by_row(w: &QuantMatrix<'_>, x: &[f32], m: usize, path: crate::Level) -> Vec<f32> {
    let (n, k) = (w.rows(), w.cols());
    let mut out = vec![0f32; m * n];
    for (r, x) in x.chunks_exact(k).enumerate() {
        let mut a32 = Vec::new();
        let mut a256 = Vec::new();
        quantize_act32(x, &mut a32);
        quantize_act256(x, &mut a256);
        for j in 0..n {
            let row = w.row(j);
            out[r * n + j] = dot(w.format(), row, &a32, &a256, path);
        }
    }
    out
}

fn dot(format: Format, row: &[u8], a32: &[Act32], a256: &[Act256], path: crate::Level) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if path == crate::Level::Avx512 {
        // SAFETY: `paths` only offers it where the CPU has AVX-512 VNNI.
        return unsafe {
            match format {
                Format::Q8_0 => avx512::q8_0(row, [a32])[0],
                Format::Q4_0 => avx512::q4_0(row, [a32])[0],
                Format::Q4K => avx512::q4k(row, [a256])[0],
                Format::Q6K => avx512::q6k(row, [a256])[0],
            }
        };
    }
    #[cfg(target_arch = "x86_64")]
    if path >= crate::Level::Avx2 {
        // SAFETY: `paths` only offers AVX2 where the CPU has it.
        return unsafe {
            match format {
                Format::Q8_0 => avx2::q8_0(row, [a32])[0],
                Format::Q4_0 => avx2::q4_0(row, [a32])[0],
                Format::Q4K => avx2::q4k(row, [a256])[0],
                Format::Q6K => avx2::q6k(row, [a256])[0],
            }
        };
    }
    let _ = path;
    match format {
        Format::Q8_0 => portable::q8_0(row, [a32])[0],
        Format::Q4_0 => portable::q4_0(row, [a32])[0],
        Format::Q4K => portable::q4k(row, [a256])[0],
        Format::Q6K => portable::q6k(row, [a256])[0],
    }
}

#[test]
fn activation_rounding_costs_under_a_percent_of_the_product() {
    // Against the unrounded activations: 8-bit activations with a scale per 32 or 256 values
    // round each to within half a step of 1/254 of the block's largest; on Gaussian-like data the
    // product's relative error stays well under 1%.
    for format in FORMATS {
        let (m, k, n) = (3, 1024, 64);
        let bytes = random_blocks(format, n, k, 7);
        let w = QuantMatrix::new(format, &bytes, n, k).expect("a valid shape");
        let x = data(m * k, 8);
        let exact = reference(&w, &x, m, |x| x.iter().map(|&v| f64::from(v)).collect());
        let mut got = vec![0f32; m * n];
        quantized_matmul(&x, &w, m, &mut got);
        let err: f64 = got
            .iter()
            .zip(&exact)
            .map(|(&g, &(e, _))| (f64::from(g) - e).powi(2))
            .sum();
        let norm: f64 = exact.iter().map(|(e, _)| e * e).sum();
        let rel = (err / norm).sqrt();
        assert!(rel < 0.01, "{}: relative error {rel}", format.name());
    }
}

#[test]
fn zero_and_non_finite_activations_are_not_hidden() {
    let format = Format::Q8_0;
    let bytes = random_blocks(format, 4, 64, 1);
    let w = QuantMatrix::new(format, &bytes, 4, 64).expect("a valid shape");
    let mut out = vec![1f32; 4];
    quantized_matmul(&[0.0; 64], &w, 1, &mut out);
    assert_eq!(out, [0.0; 4]);
    let mut x = vec![0.5f32; 64];
    x[3] = f32::NAN;
    quantized_matmul(&x, &w, 1, &mut out);
    assert!(out.iter().all(|v| v.is_nan()), "{out:?}");
}

#[test]
fn shapes_that_are_not_whole_blocks_are_refused_with_the_numbers() {
    let e = QuantMatrix::new(Format::Q4K, &[0; 144], 1, 200).expect_err("200 is not whole blocks");
    assert!(
        e.to_string().contains("200") && e.to_string().contains("Q4_K"),
        "{e}"
    );
    let e = QuantMatrix::new(Format::Q8_0, &[0; 34], 2, 32).expect_err("two rows need 68 bytes");
    assert!(e.to_string().contains("68 bytes, found 34"), "{e}");
}

#[test]
fn tiles_decode_to_the_blocks_they_were_packed_from() {
    for format in FORMATS {
        for n in [1, 7, 16, 37] {
            let k = 2 * format.block_values();
            let bytes = random_blocks(format, n, k, n as u64);
            let w = QuantMatrix::new(format, &bytes, n, k).expect("a valid shape");
            let packed = PackedMatrix::pack(&w);
            assert!(packed.size_in_bytes() <= n.div_ceil(16) * 16 * bytes.len() / n * 105 / 100);
            let mut want = vec![0f32; n * k];
            dequantize(format, &bytes, &mut want);
            let mut got = vec![0f32; n * k];
            packed.dequantize_rows(0..n, &mut got);
            assert_eq!(got, want, "{} n={n}", format.name());
        }
    }
}

/// Two matrices stacked multiply as both: the first's rows, then the second's (a 37-row second
/// leaves a part tile at the end); stacking refuses mismatched formats, widths, and a first
/// matrix whose rows end inside a tile.
#[test]
fn stacked_tiles_multiply_as_both_matrices() {
    for format in FORMATS {
        let k = 2 * format.block_values();
        let (a, b) = (
            random_blocks(format, 32, k, 1),
            random_blocks(format, 37, k, 2),
        );
        let pa = PackedMatrix::pack(&QuantMatrix::new(format, &a, 32, k).expect("shape"));
        let pb = PackedMatrix::pack(&QuantMatrix::new(format, &b, 37, k).expect("shape"));
        let both = pa.stacked(&pb).expect("the first fills whole tiles");
        assert_eq!((both.rows(), both.cols()), (69, k));
        let x = data(3 * k, 5);
        let (mut y, mut ya, mut yb) = (vec![0f32; 3 * 69], vec![0f32; 3 * 32], vec![0f32; 3 * 37]);
        packed_matmul(&x, &both, 3, &mut y);
        packed_matmul(&x, &pa, 3, &mut ya);
        packed_matmul(&x, &pb, 3, &mut yb);
        for r in 0..3 {
            assert_eq!(
                y[r * 69..r * 69 + 32],
                ya[r * 32..(r + 1) * 32],
                "{}",
                format.name()
            );
            assert_eq!(
                y[r * 69 + 32..(r + 1) * 69],
                yb[r * 37..(r + 1) * 37],
                "{}",
                format.name()
            );
        }
        assert!(pb.stacked(&pa).is_none(), "37 rows end inside a tile");
    }
    let q8 = PackedMatrix::pack(
        &QuantMatrix::new(
            Format::Q8_0,
            &random_blocks(Format::Q8_0, 16, 64, 3),
            16,
            64,
        )
        .expect("shape"),
    );
    let q4 = PackedMatrix::pack(
        &QuantMatrix::new(
            Format::Q4_0,
            &random_blocks(Format::Q4_0, 16, 64, 3),
            16,
            64,
        )
        .expect("shape"),
    );
    let wide = PackedMatrix::pack(
        &QuantMatrix::new(
            Format::Q8_0,
            &random_blocks(Format::Q8_0, 16, 96, 3),
            16,
            96,
        )
        .expect("shape"),
    );
    assert!(q8.stacked(&q4).is_none() && q8.stacked(&wide).is_none());
}

#[test]
fn every_tile_path_matches_the_decoded_product_on_odd_shapes() {
    for format in FORMATS {
        for (seed, (m, k, n)) in shapes(format).into_iter().enumerate() {
            let bytes = random_blocks(format, n, k, 500 + seed as u64);
            let w = QuantMatrix::new(format, &bytes, n, k).expect("a valid shape");
            let packed = PackedMatrix::pack(&w);
            let x = data(m * k, 2000 + seed as u64);
            let want = reference(&w, &x, m, |x| rounded_activations(format, x));
            let what = format!("{} tiles m={m} k={k} n={n}", format.name());
            let mut got = vec![0f32; m * n];
            packed_matmul(&x, &packed, m, &mut got);
            assert_close(
                &got,
                &want,
                &format!("{what} at {:?}", crate::Level::current()),
            );
            for path in paths() {
                let got = tile_by_tile(&packed, &x, m, path);
                assert_close(&got, &want, &format!("{what} on {path:?}"));
            }
        }
    }
}

/// The tiled product through one path's kernels, three activation rows at a time (so the
/// multi-row forms run on every path, whatever `PIO_KERNELS` caps the dispatch at).
fn tile_by_tile(w: &PackedMatrix, x: &[f32], m: usize, path: crate::Level) -> Vec<f32> {
    let (n, k) = (w.rows(), w.cols());
    let mut a32 = Vec::new();
    let mut a256 = Vec::new();
    let mut rows32: Vec<Vec<Act32>> = Vec::new();
    let mut rows256: Vec<Vec<Act256>> = Vec::new();
    for x in x.chunks_exact(k) {
        quantize_act32(x, &mut a32);
        quantize_act256(x, &mut a256);
        rows32.push(a32.clone());
        rows256.push(a256.clone());
    }
    let mut out = vec![0f32; m * n];
    for t in 0..n.div_ceil(16) {
        let tile = w.tile(t);
        for r0 in (0..m).step_by(3) {
            let pick = |i: usize| (r0 + i).min(m - 1);
            let sums = match w.format() {
                format @ (Format::Q8_0 | Format::Q4_0) => {
                    let x = [0, 1, 2].map(|i| rows32[pick(i)].as_slice());
                    tile_32(format, tile, x, path)
                }
                format => {
                    let x = [0, 1, 2].map(|i| rows256[pick(i)].as_slice());
                    tile_256(format, tile, x, path)
                }
            };
            for (i, row) in sums.iter().enumerate().take(m - r0) {
                for (c, &v) in row.iter().enumerate().take(n - 16 * t) {
                    out[(r0 + i) * n + 16 * t + c] = v;
                }
            }
        }
    }
    out
}

fn tile_32(format: Format, tile: &[u8], x: [&[Act32]; 3], path: crate::Level) -> [[f32; 16]; 3] {
    let q4 = format == Format::Q4_0;
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `paths` only offers what the CPU has.
        if path == crate::Level::Avx512 {
            return unsafe {
                match q4 {
                    true => super::packed_x86::q4_0_vnni(tile, x),
                    false => super::packed_x86::q8_0_vnni(tile, x),
                }
            };
        }
        if path == crate::Level::AvxVnni {
            // SAFETY: as above.
            return unsafe {
                match q4 {
                    true => super::packed_x86::q4_0_avx_vnni(tile, x),
                    false => super::packed_x86::q8_0_avx_vnni(tile, x),
                }
            };
        }
        if path == crate::Level::Avx2 {
            // SAFETY: as above.
            return unsafe {
                match q4 {
                    true => super::packed_x86::q4_0_avx2(tile, x),
                    false => super::packed_x86::q8_0_avx2(tile, x),
                }
            };
        }
    }
    let _ = path;
    match q4 {
        true => super::packed::portable::q4_0(tile, x),
        false => super::packed::portable::q8_0(tile, x),
    }
}

fn tile_256(format: Format, tile: &[u8], x: [&[Act256]; 3], path: crate::Level) -> [[f32; 16]; 3] {
    let q6k = format == Format::Q6K;
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `paths` only offers what the CPU has.
        if path == crate::Level::Avx512 {
            return unsafe {
                match q6k {
                    true => super::packed_x86::q6k_vnni(tile, x),
                    false => super::packed_x86::q4k_vnni(tile, x),
                }
            };
        }
        if path == crate::Level::AvxVnni {
            // SAFETY: as above.
            return unsafe {
                match q6k {
                    true => super::packed_x86::q6k_avx_vnni(tile, x),
                    false => super::packed_x86::q4k_avx_vnni(tile, x),
                }
            };
        }
        if path == crate::Level::Avx2 {
            // SAFETY: as above.
            return unsafe {
                match q6k {
                    true => super::packed_x86::q6k_avx2(tile, x),
                    false => super::packed_x86::q4k_avx2(tile, x),
                }
            };
        }
    }
    let _ = path;
    match q6k {
        true => super::packed::portable::q6k(tile, x),
        false => super::packed::portable::q4k(tile, x),
    }
}

/// The activations' rounding is `f32::round` then a saturating cast (half away from zero, as
/// ggml's reference quantizer) on every magnitude it meets, ties and the floats next to them
/// included, and beyond (an infinity where `127 / amax` overflows, NaN).
#[test]
fn activation_rounding_is_round_half_away_from_zero() {
    let mut values: Vec<f32> = (-254..=254).map(|i| i as f32 / 2.0).collect();
    for v in values.clone() {
        values.extend([v.next_up(), v.next_down()]);
    }
    values.extend(data(10_000, 9).iter().map(|v| v * 127.0));
    values.extend([
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        1e30,
        -1e30,
        127.4,
        -127.6,
    ]);
    for y in values {
        assert_eq!(
            super::blocks::round_to_i8(y),
            y.round() as i8,
            "{y} ({:#x})",
            y.to_bits()
        );
    }
}

#[test]
fn products_nested_on_one_thread_each_get_their_own_activations() {
    // Callers share a two-thread pool, each step kept awake: a thread whose product waits for
    // its parallel parts may run another caller's whole step meanwhile, whose product needs the
    // thread's activation buffer too (it was a borrowed cell: a panic on a pool thread).
    let (n, k, m) = (64, 512, 9);
    let bytes = random_blocks(Format::Q4K, n, k, 5);
    let w = PackedMatrix::pack(&QuantMatrix::new(Format::Q4K, &bytes, n, k).expect("blocks"));
    let x = data(m * k, 6);
    let mut want = vec![0f32; m * n];
    packed_matmul(&x, &w, m, &mut want);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("pool");
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..50 {
                    let got = pool.install(|| {
                        crate::keep_awake(|| {
                            let mut out = vec![0f32; m * n];
                            for _ in 0..4 {
                                packed_matmul(&x, &w, m, &mut out);
                            }
                            out
                        })
                    });
                    assert_eq!(got, want);
                }
            });
        }
    });
}

/// Rows quantized once give every tiled product what quantizing per product gives, for one row
/// and a prompt's (quantized in parallel); the rows refuse the other family's weights.
#[test]
fn rows_quantized_once_multiply_as_each_product_would() {
    for format in FORMATS {
        let (k, n) = (3 * 256, 37);
        let bytes = random_blocks(format, n, k, 71);
        let w = PackedMatrix::pack(&QuantMatrix::new(format, &bytes, n, k).expect("a shape"));
        for m in [1, 9] {
            let x = data(m * k, 72);
            let (mut once, mut each) = (vec![0f32; m * n], vec![0f32; m * n]);
            let rows = QuantizedRows::new(&x, k, format);
            assert_eq!(rows.rows(), m);
            rows.matmul(&w, &mut once);
            packed_matmul(&x, &w, m, &mut each);
            assert_eq!(once, each, "{} m={m}", format.name());
            let other = if format.block_values() == 32 {
                Format::Q4K
            } else {
                Format::Q8_0
            };
            assert!(rows.fits(format, k) && !rows.fits(other, k) && !rows.fits(format, 2 * k));
        }
    }
}

/// The normalized rows, as a model in f32 or bf16 computes them (candle's RMSNorm: the mean
/// square summed in f32, the root and each step rounded to the dtype).
fn rms_reference(x: &[f32], w: &[f32], eps: f32, bf16: bool) -> Vec<f32> {
    let round = |v: f32| match bf16 {
        true => half::bf16::from_f32(v).to_f32(),
        false => v,
    };
    let k = w.len();
    x.chunks_exact(k)
        .flat_map(|row| {
            let sum2: f32 = row.iter().map(|v| v * v).sum();
            let m = round((sum2 / k as f32 + eps).sqrt());
            row.iter()
                .zip(w)
                .map(move |(&v, &w)| round(round(v / m) * w))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The fused norm gives exactly the products of quantizing the normalized rows, in f32 and in
/// bf16 arithmetic, for both activation layouts, one row and a prompt's.
#[test]
fn rms_normed_rows_equal_the_normalized_rows_quantized() {
    let bf16 = |v: f32| half::bf16::from_f32(v).to_f32();
    for format in [Format::Q8_0, Format::Q6K] {
        let (k, n) = (512, 21);
        let bytes = random_blocks(format, n, k, 81);
        let w = PackedMatrix::pack(&QuantMatrix::new(format, &bytes, n, k).expect("a shape"));
        for (m, in_bf16) in [(1, false), (1, true), (10, false), (10, true)] {
            let round: fn(f32) -> f32 = if in_bf16 { bf16 } else { |v| v };
            let x: Vec<f32> = data(m * k, 82).into_iter().map(round).collect();
            let weight: Vec<f32> = data(k, 83).into_iter().map(|v| round(1.0 + v)).collect();
            let spec = RmsNormSpec {
                weight: &weight,
                eps: 1e-6,
                round,
            };
            let (mut fused, mut apart) = (vec![0f32; m * n], vec![0f32; m * n]);
            QuantizedRows::rms_normed(&x, k, &spec, format).matmul(&w, &mut fused);
            let normed = rms_reference(&x, &weight, 1e-6, in_bf16);
            QuantizedRows::new(&normed, k, format).matmul(&w, &mut apart);
            assert_eq!(fused, apart, "{} m={m} bf16={in_bf16}", format.name());
        }
    }
}

#[test]
#[should_panic(expected = "quantized for another format")]
fn rows_for_one_family_refuse_the_other() {
    let bytes = random_blocks(Format::Q4K, 16, 256, 91);
    let w = PackedMatrix::pack(&QuantMatrix::new(Format::Q4K, &bytes, 16, 256).expect("a shape"));
    let mut out = vec![0f32; 16];
    QuantizedRows::new(&data(256, 92), 256, Format::Q8_0).matmul(&w, &mut out);
}

/// A matrix of rows with no value (a GGUF tensor of shape `[n, 0]`) is refused, not packed
/// into a panic.
#[test]
fn rows_of_no_value_are_refused() {
    let e = QuantMatrix::new(Format::Q8_0, &[], 4, 0).expect_err("no block per row");
    assert!(e.to_string().contains("rows of 0 values"), "{e}");
}

/// A block too small for `127 / amax` saturates within -127..=127: -128 would flip a product's
/// sign in the kernels that take |q| and move the sign onto the weight.
#[test]
fn a_tiny_block_never_rounds_to_minus_128() {
    let mut x = vec![0f32; 32];
    x[0] = -1e-38;
    x[1] = 2e-38;
    let mut out = Vec::new();
    quantize_act32(&x, &mut out);
    assert!(out[0].qs.iter().all(|&q| q >= -127), "{:?}", out[0].qs);
}
