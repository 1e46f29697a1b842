//! `y = x Wᵀ` for block-quantized weights (the ggml formats GGUF files hold, in place) and f32
//! activations.
//!
//! The activations are quantized once per product to 8-bit blocks of the weights' block size;
//! each weight row is then read once, its blocks unpacked to bytes in registers and multiplied
//! with up to four activation rows at a time by integer dot products, the block's scales applied
//! once per block. Decode (one row) is then bound by reading the weights; a batch of decode rows
//! reads them once for all. Rows are split over rayon's pool.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod blocks;
mod packed;
#[cfg(target_arch = "x86_64")]
mod packed_x86;
mod portable;
mod rows;
#[cfg(test)]
mod tests;

use std::cell::Cell;

use rayon::prelude::*;

pub use blocks::{dequantize, Format};
use blocks::{quantize_act256, Act256};
pub(crate) use blocks::{quantize_act32, Act32};
pub use packed::PackedMatrix;
pub use rows::{QuantizedRows, RmsNormSpec};

use crate::parallel::{ranges, SharedMut};

/// A weight matrix in a block format: `rows` rows of `cols` values, row-major, each row whole
/// blocks.
#[derive(Debug, Clone, Copy)]
pub struct QuantMatrix<'a> {
    format: Format,
    bytes: &'a [u8],
    rows: usize,
    cols: usize,
}

/// Why bytes are not a matrix of the format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeError(String);

impl std::fmt::Display for ShapeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ShapeError {}

impl<'a> QuantMatrix<'a> {
    /// `bytes` as `rows × cols` values of `format`.
    pub fn new(
        format: Format,
        bytes: &'a [u8],
        rows: usize,
        cols: usize,
    ) -> Result<Self, ShapeError> {
        // No value in a row: packing split the rows into chunks of none (a panic), and the
        // products divided by the width.
        if cols == 0 {
            return Err(ShapeError(format!(
                "rows of 0 values: a {} matrix needs at least one block per row",
                format.name()
            )));
        }
        let Some(row) = format.row_bytes(cols) else {
            return Err(ShapeError(format!(
                "rows of {cols} values are not whole {} blocks of {}",
                format.name(),
                format.block_values()
            )));
        };
        if Some(bytes.len()) != row.checked_mul(rows) {
            return Err(ShapeError(format!(
                "{rows} × {cols} {} needs {} bytes, found {}",
                format.name(),
                row.saturating_mul(rows),
                bytes.len()
            )));
        }
        Ok(Self {
            format,
            bytes,
            rows,
            cols,
        })
    }

    /// The block format.
    pub fn format(&self) -> Format {
        self.format
    }

    /// Output rows (`n`).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Values per row (`k`).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Row `j`'s blocks.
    pub(crate) fn row(&self, j: usize) -> &'a [u8] {
        let size = self.bytes.len() / self.rows.max(1);
        &self.bytes[j * size..(j + 1) * size]
    }
}

thread_local! {
    /// The calling thread's quantized activations, kept between calls. Taken out for the length
    /// of a product rather than borrowed: while a product waits for its parallel parts, rayon may
    /// run another job on the same thread (another caller's whole step, under
    /// [`keep_awake`](crate::keep_awake)), and that job's product must find a buffer, not a
    /// borrowed cell.
    static ACT32: Cell<Vec<Act32>> = const { Cell::new(Vec::new()) };
    static ACT256: Cell<Vec<Act256>> = const { Cell::new(Vec::new()) };
}

/// Runs `f` on the calling thread's buffer in `key`, taken out meanwhile (see `ACT32`).
fn with_buffer<A: 'static, R>(
    key: &'static std::thread::LocalKey<Cell<Vec<A>>>,
    f: impl FnOnce(&mut Vec<A>) -> R,
) -> R {
    let mut buffer = key.take();
    let result = f(&mut buffer);
    key.set(buffer);
    result
}

/// `out[m × n] = x[m × k] · Wᵀ` for `W` of `n × k` quantized values.
///
/// # Panics
/// When `x` is not `m × k` or `out` not `m × n` (a caller bug).
pub fn quantized_matmul(x: &[f32], w: &QuantMatrix<'_>, m: usize, out: &mut [f32]) {
    let (k, n) = (w.cols, w.rows);
    assert_eq!(x.len(), m * k, "activations are not {m} × {k}");
    assert_eq!(out.len(), m * n, "output is not {m} × {n}");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out.fill(0.0);
        return;
    }
    match w.format {
        Format::Q8_0 | Format::Q4_0 => with_buffer(&ACT32, |acts| {
            quantize_rows(x, k, acts, quantize_act32);
            products(w, &acts.chunks_exact(k / 32).collect::<Vec<_>>(), out)
        }),
        Format::Q4K | Format::Q6K => with_buffer(&ACT256, |acts| {
            quantize_rows(x, k, acts, quantize_act256);
            products(w, &acts.chunks_exact(k / 256).collect::<Vec<_>>(), out)
        }),
    }
}

/// `out[m × n] = x[m × k] · Wᵀ` for `W` of `n × k` values in 16-row tiles.
///
/// # Panics
/// When `x` is not `m × k` or `out` not `m × n` (a caller bug).
pub fn packed_matmul(x: &[f32], w: &PackedMatrix, m: usize, out: &mut [f32]) {
    let (k, n) = (w.cols(), w.rows());
    assert_eq!(x.len(), m * k, "activations are not {m} × {k}");
    assert_eq!(out.len(), m * n, "output is not {m} × {n}");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out.fill(0.0);
        return;
    }
    match w.format() {
        Format::Q8_0 | Format::Q4_0 => with_buffer(&ACT32, |acts| {
            quantize_rows(x, k, acts, quantize_act32);
            tiles(w, &acts.chunks_exact(k / 32).collect::<Vec<_>>(), out)
        }),
        _ => with_buffer(&ACT256, |acts| {
            quantize_rows(x, k, acts, quantize_act256);
            tiles(w, &acts.chunks_exact(k / 256).collect::<Vec<_>>(), out)
        }),
    }
}

/// Every row of `x` (`k` wide) quantized into `acts`, one after the other; a prompt's rows in
/// parallel (on one thread a 512-row prompt spent ~20% of a Q4_K product here: the quant bench).
fn quantize_rows<A: Send>(
    x: &[f32],
    k: usize,
    acts: &mut Vec<A>,
    quantize: fn(&[f32], &mut Vec<A>),
) {
    acts.clear();
    if x.len() / k < PARALLEL_ROWS {
        let mut row = Vec::new();
        for x in x.chunks_exact(k) {
            quantize(x, &mut row);
            acts.append(&mut row);
        }
        return;
    }
    // Rayon's collect keeps the rows in order.
    acts.par_extend(x.par_chunks_exact(k).flat_map_iter(|x| {
        let mut row = Vec::new();
        quantize(x, &mut row);
        row
    }));
}

/// Rows from which activations are quantized in parallel.
const PARALLEL_ROWS: usize = 8;

/// Activation blocks that weight rows of some formats dot with.
trait Activations: Sync + Sized {
    /// The dot products of weight row `w` (`format`) with R activation rows.
    fn dots<const R: usize>(format: Format, w: &[u8], x: [&[Self]; R]) -> [f32; R];
    /// The products of a 16-row tile of `format` with R activation rows.
    fn tile<const R: usize>(
        format: Format,
        tile: &[u8],
        x: [&[Self]; R],
    ) -> [[f32; packed::ROWS]; R];
}

impl Activations for Act32 {
    #[inline]
    fn dots<const R: usize>(format: Format, w: &[u8], x: [&[Self]; R]) -> [f32; R] {
        #[cfg(target_arch = "x86_64")]
        if crate::simd::has_vnni() {
            // SAFETY: AVX-512 VNNI is present; the caller pairs whole blocks with activations.
            return unsafe {
                match format {
                    Format::Q4_0 => avx512::q4_0(w, x),
                    _ => avx512::q8_0(w, x),
                }
            };
        }
        #[cfg(target_arch = "x86_64")]
        if crate::simd::has_avx2() {
            // SAFETY: AVX2 and FMA are present; the caller pairs whole blocks with activations.
            return unsafe {
                match format {
                    Format::Q4_0 => avx2::q4_0(w, x),
                    _ => avx2::q8_0(w, x),
                }
            };
        }
        match format {
            Format::Q4_0 => portable::q4_0(w, x),
            _ => portable::q8_0(w, x),
        }
    }

    #[inline]
    fn tile<const R: usize>(
        format: Format,
        tile: &[u8],
        x: [&[Self]; R],
    ) -> [[f32; packed::ROWS]; R] {
        let q4 = format == Format::Q4_0;
        #[cfg(target_arch = "x86_64")]
        {
            if crate::simd::has_vnni() {
                // SAFETY: AVX-512 VNNI is present; the caller pairs tiles with activations.
                return unsafe {
                    match q4 {
                        true => packed_x86::q4_0_vnni(tile, x),
                        false => packed_x86::q8_0_vnni(tile, x),
                    }
                };
            }
            if crate::simd::has_avx_vnni() {
                // SAFETY: AVX2, FMA, F16C and AVX-VNNI are present; as above.
                return unsafe {
                    match q4 {
                        true => packed_x86::q4_0_avx_vnni(tile, x),
                        false => packed_x86::q8_0_avx_vnni(tile, x),
                    }
                };
            }
            if crate::simd::has_avx2() {
                // SAFETY: AVX2, FMA and F16C are present; as above.
                return unsafe {
                    match q4 {
                        true => packed_x86::q4_0_avx2(tile, x),
                        false => packed_x86::q8_0_avx2(tile, x),
                    }
                };
            }
        }
        match q4 {
            true => packed::portable::q4_0(tile, x),
            false => packed::portable::q8_0(tile, x),
        }
    }
}

impl Activations for Act256 {
    #[inline]
    fn dots<const R: usize>(format: Format, w: &[u8], x: [&[Self]; R]) -> [f32; R] {
        #[cfg(target_arch = "x86_64")]
        if crate::simd::has_vnni() {
            // SAFETY: as for `Act32`.
            return unsafe {
                match format {
                    Format::Q6K => avx512::q6k(w, x),
                    _ => avx512::q4k(w, x),
                }
            };
        }
        #[cfg(target_arch = "x86_64")]
        if crate::simd::has_avx2() {
            // SAFETY: as for `Act32`.
            return unsafe {
                match format {
                    Format::Q6K => avx2::q6k(w, x),
                    _ => avx2::q4k(w, x),
                }
            };
        }
        match format {
            Format::Q6K => portable::q6k(w, x),
            _ => portable::q4k(w, x),
        }
    }

    #[inline]
    fn tile<const R: usize>(
        format: Format,
        tile: &[u8],
        x: [&[Self]; R],
    ) -> [[f32; packed::ROWS]; R] {
        let q6k = format == Format::Q6K;
        #[cfg(target_arch = "x86_64")]
        {
            if crate::simd::has_vnni() {
                // SAFETY: as for `Act32`.
                return unsafe {
                    match q6k {
                        true => packed_x86::q6k_vnni(tile, x),
                        false => packed_x86::q4k_vnni(tile, x),
                    }
                };
            }
            if crate::simd::has_avx_vnni() {
                // SAFETY: as for `Act32`.
                return unsafe {
                    match q6k {
                        true => packed_x86::q6k_avx_vnni(tile, x),
                        false => packed_x86::q4k_avx_vnni(tile, x),
                    }
                };
            }
            if crate::simd::has_avx2() {
                // SAFETY: as for `Act32`.
                return unsafe {
                    match q6k {
                        true => packed_x86::q6k_avx2(tile, x),
                        false => packed_x86::q4k_avx2(tile, x),
                    }
                };
            }
        }
        match q6k {
            true => packed::portable::q6k(tile, x),
            false => packed::portable::q4k(tile, x),
        }
    }
}

/// Each weight row against every activation row, the weight rows split over threads.
fn products<A: Activations>(w: &QuantMatrix<'_>, xs: &[&[A]], out: &mut [f32]) {
    let n = w.rows;
    let parts = ranges(n, rayon::current_num_threads() * 4, 16, 4);
    let y = SharedMut::new(out);
    let run = |cols: std::ops::Range<usize>| {
        for j in cols {
            let row = w.row(j);
            let mut quads = xs.chunks_exact(4);
            let mut r = 0;
            let store = |r: usize, sums: &[f32]| {
                for (i, &v) in sums.iter().enumerate() {
                    // SAFETY: (r + i, j) lies inside the m × n output and only this task
                    // writes column j.
                    unsafe { *y.at((r + i) * n + j) = v };
                }
            };
            for q in quads.by_ref() {
                store(r, &A::dots(w.format, row, [q[0], q[1], q[2], q[3]]));
                r += 4;
            }
            match quads.remainder() {
                [a, b, c] => store(r, &A::dots(w.format, row, [*a, *b, *c])),
                [a, b] => store(r, &A::dots(w.format, row, [*a, *b])),
                [a] => store(r, &A::dots(w.format, row, [*a])),
                _ => {}
            }
        }
    };
    if parts.len() > 1 {
        parts.into_par_iter().for_each(run);
    } else {
        parts.into_iter().for_each(run);
    }
}

/// Each 16-row tile against every activation row (four at a time, the tile's columns staying in
/// the cache meanwhile), the tiles split over threads.
fn tiles<A: Activations>(w: &PackedMatrix, xs: &[&[A]], out: &mut [f32]) {
    let (n, format) = (w.rows(), w.format());
    let parts = ranges(
        n.div_ceil(packed::ROWS),
        rayon::current_num_threads() * 4,
        1,
        1,
    );
    let y = SharedMut::new(out);
    let run = |tiles: std::ops::Range<usize>| {
        for t in tiles {
            let tile = w.tile(t);
            let valid = packed::ROWS.min(n - t * packed::ROWS);
            let store = |r: usize, sums: &[[f32; packed::ROWS]]| {
                for (i, row) in sums.iter().enumerate() {
                    for (c, &v) in row[..valid].iter().enumerate() {
                        // SAFETY: (r + i, 16t + c) lies inside the m × n output and only this
                        // task writes tile t's columns.
                        unsafe { *y.at((r + i) * n + t * packed::ROWS + c) = v };
                    }
                }
            };
            let mut quads = xs.chunks_exact(4);
            let mut r = 0;
            for q in quads.by_ref() {
                store(r, &A::tile(format, tile, [q[0], q[1], q[2], q[3]]));
                r += 4;
            }
            match quads.remainder() {
                [a, b, c] => store(r, &A::tile(format, tile, [*a, *b, *c])),
                [a, b] => store(r, &A::tile(format, tile, [*a, *b])),
                [a] => store(r, &A::tile(format, tile, [*a])),
                _ => {}
            }
        }
    };
    if parts.len() > 1 {
        parts.into_par_iter().for_each(run);
    } else {
        parts.into_iter().for_each(run);
    }
}
