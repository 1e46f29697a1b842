//! Weights repacked at load into tiles of 16 rows, so that one 512-bit integer multiply-add
//! (`vpdpbusd`) takes four values of 16 rows at once against four activation values broadcast:
//! no horizontal sums, and the per-block scales of 16 rows apply as one vector. The tiles replace
//! the ggml blocks they are made from (they are no larger), so nothing is kept twice.
//!
//! Layouts, per tile of 16 rows (rows past the matrix's end are zeros):
//! - Q8_0, per 32-value block (544 bytes, as 16 blocks): `d: [f16; 16]`, then for each group g
//!   of four values, 16 rows × 4 bytes `q + 128` (unsigned, what `vpdpbusd` multiplies; the
//!   128 comes back out through the activations' block sum).
//! - Q4_0, per 32-value block (288 bytes, as 16 blocks): `d: [f16; 16]`, then for each group p
//!   of eight values, 16 rows × 4 bytes: values 8p + 0..4 in the low nibbles, 8p + 4..8 in the
//!   high (the offset of 8 comes back out through the activations' block sum).
//! - Q4_K, per 256-value super-block (2368 bytes against 16 × 144): `d: [f16; 16]`,
//!   `dmin: [f16; 16]`, the 6-bit scales `[sub-block][row]` and mins likewise as bytes, then for
//!   each sub-block s and pair p of four-value groups, 16 rows × 4 bytes whose low nibbles are
//!   values 32s + 8p + 0..4 and high nibbles 32s + 8p + 4..8.
//! - Q6_K, per 256-value super-block (3360 bytes, as 16 blocks): `d: [f16; 16]`, the signed
//!   scales `[sub-block of 16][row]`, then the low four bits as Q4_K's (for each group p of eight
//!   values, 16 rows × 4 bytes: values 8p + 0..4 in the low nibbles, 8p + 4..8 in the high), then
//!   the top two bits, for each sub-block j, 16 rows × 4 bytes whose byte i holds those of values
//!   16j + i, + 4, + 8 and + 12, two bits each from the bottom.

use rayon::prelude::*;

use super::blocks::{dequantize, q4k_scales_mins, q6k_values, Act256, Act32, Format};
use super::QuantMatrix;

/// Rows per tile.
pub(crate) const ROWS: usize = 16;

/// Bytes of one tile's block column.
pub(crate) const fn tile_bytes(format: Format) -> usize {
    match format {
        Format::Q8_0 => 32 + 512,
        Format::Q4K => 64 + 256 + 2048,
        Format::Q6K => Q6K_HIGH + 1024,
        Format::Q4_0 => 32 + 256,
    }
}

/// Where a Q6_K tile column's scales, low nibbles and top bits start.
pub(crate) const Q6K_SCALES: usize = 32;
pub(crate) const Q6K_LOW: usize = Q6K_SCALES + 256;
pub(crate) const Q6K_HIGH: usize = Q6K_LOW + 2048;

/// A matrix of quantized weights in 16-row tiles (every format the kernels take).
#[derive(Debug, Clone)]
pub struct PackedMatrix {
    format: Format,
    rows: usize,
    cols: usize,
    bytes: Vec<u8>,
}

impl PackedMatrix {
    /// `m` repacked.
    pub fn pack(m: &QuantMatrix<'_>) -> Self {
        let format = m.format();
        let (rows, cols) = (m.rows(), m.cols());
        let blocks = cols / format.block_values();
        let tiles = rows.div_ceil(ROWS);
        let size = tile_bytes(format);
        let mut bytes = vec![0u8; tiles * blocks * size];
        // In parallel: a large model repacks gigabytes at load.
        bytes
            .par_chunks_exact_mut(blocks * size)
            .enumerate()
            .for_each(|(t, tile)| {
                for (b, out) in tile.chunks_exact_mut(size).enumerate() {
                    for r in 0..ROWS.min(rows - t * ROWS) {
                        let row = m.row(t * ROWS + r);
                        let block = &row[b * format.block_bytes()..(b + 1) * format.block_bytes()];
                        match format {
                            Format::Q8_0 => pack_q8_0(block, r, out),
                            Format::Q4_0 => pack_q4_0(block, r, out),
                            Format::Q6K => pack_q6k(block, r, out),
                            Format::Q4K => pack_q4k(block, r, out),
                        }
                    }
                }
            });
        Self {
            format,
            rows,
            cols,
            bytes,
        }
    }

    /// The block format the tiles hold.
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

    /// Bytes the tiles take.
    pub fn size_in_bytes(&self) -> usize {
        self.bytes.len()
    }

    /// `self`'s rows followed by `other`'s as one matrix, so that one product computes both (a
    /// gate and an up projection over the same activations); `None` unless both have the same
    /// format and width and `self`'s rows fill whole tiles.
    pub fn stacked(&self, other: &Self) -> Option<Self> {
        let fits = self.format == other.format
            && self.cols == other.cols
            && self.rows.is_multiple_of(ROWS);
        fits.then(|| Self {
            format: self.format,
            rows: self.rows + other.rows,
            cols: self.cols,
            bytes: [&self.bytes[..], &other.bytes[..]].concat(),
        })
    }

    /// Block columns per row.
    fn blocks(&self) -> usize {
        self.cols / self.format.block_values()
    }

    /// Tile `t`'s bytes, its block columns one after the other.
    pub(crate) fn tile(&self, t: usize) -> &[u8] {
        let size = self.blocks() * tile_bytes(self.format);
        &self.bytes[t * size..(t + 1) * size]
    }

    /// Rows `rows` decoded to f32 (`rows.len() × cols`), for the f32 GEMM and for checks.
    pub fn dequantize_rows(&self, rows: std::ops::Range<usize>, out: &mut [f32]) {
        let (format, k) = (self.format, self.cols);
        let mut block = vec![0u8; format.block_bytes()];
        for (i, j) in rows.enumerate() {
            let tile = self.tile(j / ROWS);
            for b in 0..self.blocks() {
                let column = &tile[b * tile_bytes(format)..(b + 1) * tile_bytes(format)];
                match format {
                    Format::Q8_0 => unpack_q8_0(column, j % ROWS, &mut block),
                    Format::Q4_0 => unpack_q4_0(column, j % ROWS, &mut block),
                    Format::Q6K => unpack_q6k(column, j % ROWS, &mut block),
                    Format::Q4K => unpack_q4k(column, j % ROWS, &mut block),
                }
                let values = format.block_values();
                dequantize(format, &block, &mut out[i * k + b * values..][..values]);
            }
        }
    }
}

fn pack_q8_0(block: &[u8], r: usize, out: &mut [u8]) {
    out[2 * r..2 * r + 2].copy_from_slice(&block[..2]);
    for (i, &q) in block[2..34].iter().enumerate() {
        out[32 + (i / 4) * 64 + r * 4 + i % 4] = q ^ 0x80;
    }
}

fn unpack_q8_0(column: &[u8], r: usize, block: &mut [u8]) {
    block[..2].copy_from_slice(&column[2 * r..2 * r + 2]);
    for i in 0..32 {
        block[2 + i] = column[32 + (i / 4) * 64 + r * 4 + i % 4] ^ 0x80;
    }
}

/// Where value `v` (0..32) of row `r` sits in a Q4_0 tile column, and whether in the high nibble.
fn q4_0_slot(v: usize, r: usize) -> (usize, bool) {
    (32 + (v / 8) * 64 + r * 4 + v % 4, v % 8 >= 4)
}

/// Value `v` of ggml Q4_0 block `block`: its low nibbles hold values 0..16, high ones 16..32.
fn q4_0_value(block: &[u8], v: usize) -> u8 {
    let q = block[2 + v % 16];
    if v < 16 {
        q & 0xF
    } else {
        q >> 4
    }
}

fn pack_q4_0(block: &[u8], r: usize, out: &mut [u8]) {
    out[2 * r..2 * r + 2].copy_from_slice(&block[..2]);
    for v in 0..32 {
        let (at, high) = q4_0_slot(v, r);
        let q = q4_0_value(block, v);
        out[at] |= if high { q << 4 } else { q };
    }
}

fn unpack_q4_0(column: &[u8], r: usize, block: &mut [u8]) {
    block[..2].copy_from_slice(&column[2 * r..2 * r + 2]);
    let value = |v: usize| {
        let (at, high) = q4_0_slot(v, r);
        if high {
            column[at] >> 4
        } else {
            column[at] & 0xF
        }
    };
    for i in 0..16 {
        block[2 + i] = value(i) | (value(i + 16) << 4);
    }
}

/// Where value `v` (0..256) of row `r` sits in a Q4_K tile column, and whether in the high nibble.
fn q4k_slot(v: usize, r: usize) -> (usize, bool) {
    let (s, within) = (v / 32, v % 32);
    let (p, high, j) = (within / 8, within % 8 >= 4, within % 4);
    (320 + s * 256 + p * 64 + r * 4 + j, high)
}

fn pack_q4k(block: &[u8], r: usize, out: &mut [u8]) {
    out[2 * r..2 * r + 2].copy_from_slice(&block[..2]);
    out[32 + 2 * r..32 + 2 * r + 2].copy_from_slice(&block[2..4]);
    let (sc, mn) = q4k_scales_mins(&block[4..16]);
    for s in 0..8 {
        out[64 + s * ROWS + r] = sc[s];
        out[192 + s * ROWS + r] = mn[s];
    }
    let mut q = [0u8; 256];
    for c in 0..4 {
        for (l, &v) in block[16 + 32 * c..48 + 32 * c].iter().enumerate() {
            (q[64 * c + l], q[64 * c + 32 + l]) = (v & 0xF, v >> 4);
        }
    }
    for s in 0..8 {
        for p in 0..4 {
            let (at, v) = (320 + s * 256 + p * 64 + r * 4, 32 * s + 8 * p);
            for j in 0..4 {
                out[at + j] = q[v + j] | (q[v + 4 + j] << 4);
            }
        }
    }
}

/// Row `r` of a Q4_K tile column back as a ggml block (the 6-bit scales repacked as ggml packs
/// them).
fn unpack_q4k(column: &[u8], r: usize, block: &mut [u8]) {
    block[..2].copy_from_slice(&column[2 * r..2 * r + 2]);
    block[2..4].copy_from_slice(&column[32 + 2 * r..32 + 2 * r + 2]);
    let sc: [u8; 8] = std::array::from_fn(|s| column[64 + s * ROWS + r]);
    let mn: [u8; 8] = std::array::from_fn(|s| column[192 + s * ROWS + r]);
    let scales = &mut block[4..16];
    for j in 0..4 {
        scales[j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6);
        scales[j + 4] = (mn[j] & 63) | ((mn[j + 4] >> 4) << 6);
        scales[j + 8] = (sc[j + 4] & 0xF) | ((mn[j + 4] & 0xF) << 4);
    }
    for c in 0..4 {
        for l in 0..32 {
            let nibble = |v: usize| {
                let (at, high) = q4k_slot(v, r);
                if high {
                    column[at] >> 4
                } else {
                    column[at] & 0xF
                }
            };
            block[16 + 32 * c + l] = nibble(64 * c + l) | (nibble(64 * c + 32 + l) << 4);
        }
    }
}

/// Where value `v` (0..256) of row `r` keeps its low nibble in a Q6_K tile column (and whether in
/// the high nibble of that byte), and its top two bits (byte, shift).
fn q6k_slots(v: usize, r: usize) -> ((usize, bool), (usize, u32)) {
    let (p, high, i) = (v / 8, v % 8 >= 4, v % 4);
    let (j, k) = (v / 16, (v % 16) / 4);
    (
        (Q6K_LOW + p * 64 + r * 4 + i, high),
        (Q6K_HIGH + j * 64 + r * 4 + i, 2 * k as u32),
    )
}

/// The six-bit value `v` of row `r` in a Q6_K tile column.
fn q6k_tile_value(column: &[u8], v: usize, r: usize) -> u8 {
    let ((at, high), (top, shift)) = q6k_slots(v, r);
    let low = if high {
        column[at] >> 4
    } else {
        column[at] & 0xF
    };
    low | (((column[top] >> shift) & 3) << 4)
}

fn pack_q6k(block: &[u8], r: usize, out: &mut [u8]) {
    out[2 * r..2 * r + 2].copy_from_slice(&block[208..210]);
    for j in 0..16 {
        out[Q6K_SCALES + j * ROWS + r] = block[192 + j];
    }
    for (v, q) in q6k_values(block).into_iter().enumerate() {
        let ((at, high), (top, shift)) = q6k_slots(v, r);
        out[at] |= if high { (q & 0xF) << 4 } else { q & 0xF };
        out[top] |= (q >> 4) << shift;
    }
}

/// Row `r` of a Q6_K tile column back as a ggml block (see [`q6k_values`] for its bit order).
fn unpack_q6k(column: &[u8], r: usize, block: &mut [u8]) {
    block[208..210].copy_from_slice(&column[2 * r..2 * r + 2]);
    for j in 0..16 {
        block[192 + j] = column[Q6K_SCALES + j * ROWS + r];
    }
    let v: [u8; 256] = std::array::from_fn(|v| q6k_tile_value(column, v, r));
    for h in 0..2 {
        for l in 0..32 {
            let o = 128 * h + l;
            block[64 * h + l] = (v[o] & 0xF) | ((v[o + 64] & 0xF) << 4);
            block[64 * h + 32 + l] = (v[o + 32] & 0xF) | ((v[o + 96] & 0xF) << 4);
            block[128 + 32 * h + l] = (v[o] >> 4)
                | ((v[o + 32] >> 4) << 2)
                | ((v[o + 64] >> 4) << 4)
                | ((v[o + 96] >> 4) << 6);
        }
    }
}

/// Portable tile products: the fallback and the reference for the SIMD versions.
pub(crate) mod portable {
    use super::*;
    use crate::quant::blocks::f16_at;

    /// 16 rows of Q8_0 tiles · R activation rows.
    pub(crate) fn q8_0<const R: usize>(tile: &[u8], x: [&[Act32]; R]) -> [[f32; ROWS]; R] {
        let mut out = [[0f32; ROWS]; R];
        for (b, column) in tile.chunks_exact(tile_bytes(Format::Q8_0)).enumerate() {
            for (out, x) in out.iter_mut().zip(x) {
                let xb = &x[b];
                for (row, o) in out.iter_mut().enumerate() {
                    let mut s = 0i32;
                    for i in 0..32 {
                        let q = i32::from(column[32 + (i / 4) * 64 + row * 4 + i % 4]) - 128;
                        s += q * i32::from(xb.qs[i]);
                    }
                    *o += f16_at(column, 2 * row) * xb.d * s as f32;
                }
            }
        }
        out
    }

    /// 16 rows of Q4_0 tiles · R activation rows.
    pub(crate) fn q4_0<const R: usize>(tile: &[u8], x: [&[Act32]; R]) -> [[f32; ROWS]; R] {
        let mut out = [[0f32; ROWS]; R];
        for (b, column) in tile.chunks_exact(tile_bytes(Format::Q4_0)).enumerate() {
            for (out, x) in out.iter_mut().zip(x) {
                let xb = &x[b];
                for (row, o) in out.iter_mut().enumerate() {
                    let mut s = 0i32;
                    for (v, &a) in xb.qs.iter().enumerate() {
                        let (at, high) = q4_0_slot(v, row);
                        let q = if high {
                            column[at] >> 4
                        } else {
                            column[at] & 0xF
                        };
                        s += i32::from(q) * i32::from(a);
                    }
                    *o += f16_at(column, 2 * row) * xb.d * (s - 8 * xb.sum) as f32;
                }
            }
        }
        out
    }

    /// 16 rows of Q4_K tiles · R activation rows.
    pub(crate) fn q4k<const R: usize>(tile: &[u8], x: [&[Act256]; R]) -> [[f32; ROWS]; R] {
        let mut out = [[0f32; ROWS]; R];
        for (b, column) in tile.chunks_exact(tile_bytes(Format::Q4K)).enumerate() {
            for (out, x) in out.iter_mut().zip(x) {
                let xb = &x[b];
                for (row, o) in out.iter_mut().enumerate() {
                    let (mut isum, mut imin) = (0i32, 0i32);
                    for s in 0..8 {
                        let mut sub = 0i32;
                        for v in 32 * s..32 * (s + 1) {
                            let (at, high) = q4k_slot(v, row);
                            let q = if high {
                                column[at] >> 4
                            } else {
                                column[at] & 0xF
                            };
                            sub += i32::from(q) * i32::from(xb.qs[v]);
                        }
                        isum += sub * i32::from(column[64 + s * ROWS + row]);
                        let bsum = i32::from(xb.sums[2 * s]) + i32::from(xb.sums[2 * s + 1]);
                        imin += bsum * i32::from(column[192 + s * ROWS + row]);
                    }
                    let (d, dmin) = (f16_at(column, 2 * row), f16_at(column, 32 + 2 * row));
                    *o += xb.d * (d * isum as f32 - dmin * imin as f32);
                }
            }
        }
        out
    }

    /// 16 rows of Q6_K tiles · R activation rows.
    pub(crate) fn q6k<const R: usize>(tile: &[u8], x: [&[Act256]; R]) -> [[f32; ROWS]; R] {
        let mut out = [[0f32; ROWS]; R];
        for (b, column) in tile.chunks_exact(tile_bytes(Format::Q6K)).enumerate() {
            for (out, x) in out.iter_mut().zip(x) {
                let xb = &x[b];
                for (row, o) in out.iter_mut().enumerate() {
                    let mut total = 0i32;
                    for j in 0..16 {
                        let mut sub = 0i32;
                        for v in 16 * j..16 * (j + 1) {
                            let q = i32::from(q6k_tile_value(column, v, row));
                            sub += q * i32::from(xb.qs[v]);
                        }
                        // The values' offset of 32 leaves through the block sums.
                        let scale = i32::from(column[Q6K_SCALES + j * ROWS + row] as i8);
                        total += scale * (sub - 32 * i32::from(xb.sums[j]));
                    }
                    *o += f16_at(column, 2 * row) * xb.d * total as f32;
                }
            }
        }
        out
    }
}
