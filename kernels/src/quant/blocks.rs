//! The ggml block formats as GGUF files store them (byte for byte, so weights read from a file
//! or a quantization cache are used in place), their decoding to f32, and the 8-bit blocks the
//! activations are quantized into once per product.
//!
//! Byte layouts (little-endian, no padding):
//! - Q8_0, 32 values, 34 bytes: `d: f16`, `q: [i8; 32]`; value = d·q.
//! - Q4_0, 32 values, 18 bytes: `d: f16`, `q: [u8; 16]`; value i (< 16) is the low nibble of
//!   `q[i]`, value 16 + i its high nibble, each d·(nibble − 8).
//! - Q4_K, 256 values, 144 bytes: `d: f16`, `dmin: f16`, `scales: [u8; 12]` (eight 6-bit scales
//!   and eight 6-bit mins), `q: [u8; 128]`; in each 64-value chunk c, value l < 32 is the low
//!   nibble of `q[32c + l]` (sub-block 2c) and value 32 + l its high nibble (sub-block 2c + 1),
//!   each d·scale·nibble − dmin·min of its sub-block.
//! - Q6_K, 256 values, 210 bytes: `ql: [u8; 128]`, `qh: [u8; 64]`, `scales: [i8; 16]`, `d: f16`;
//!   6-bit values minus 32, a scale per 16 values (see [`q6k_values`]).

use half::f16;

/// A weight format's block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// 8-bit, blocks of 32 (~8.5 bits per weight).
    Q8_0,
    /// 4-bit, blocks of 32 (~4.5 bits per weight).
    Q4_0,
    /// 4-bit with 6-bit scales and mins, super-blocks of 256 (~4.5 bits per weight).
    Q4K,
    /// 6-bit with 8-bit scales, super-blocks of 256 (~6.6 bits per weight).
    Q6K,
}

impl Format {
    /// Values per block.
    pub const fn block_values(self) -> usize {
        match self {
            Self::Q8_0 | Self::Q4_0 => 32,
            Self::Q4K | Self::Q6K => 256,
        }
    }

    /// Bytes per block.
    pub const fn block_bytes(self) -> usize {
        match self {
            Self::Q8_0 => 34,
            Self::Q4_0 => 18,
            Self::Q4K => 144,
            Self::Q6K => 210,
        }
    }

    /// Bytes of a row `k` values wide; `None` when `k` is not a whole number of blocks.
    pub fn row_bytes(self, k: usize) -> Option<usize> {
        k.is_multiple_of(self.block_values())
            .then(|| k / self.block_values() * self.block_bytes())
    }

    /// ggml's name for it, as GGUF files and llama.cpp say it.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Q8_0 => "Q8_0",
            Self::Q4_0 => "Q4_0",
            Self::Q4K => "Q4_K",
            Self::Q6K => "Q6_K",
        }
    }
}

/// The f16 at `b[at..at + 2]`, as f32.
#[inline(always)]
pub(crate) fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Scale and min of Q4_K sub-block `j` from the 12 packed bytes: the first four sub-blocks keep
/// theirs in the low six bits of bytes j and j + 4; the last four split theirs between the
/// nibbles of bytes j + 4 and the top two bits of bytes j − 4 and j.
#[inline(always)]
pub(crate) fn q4k_scale_min(scales: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        (
            (scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4),
            (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
        )
    }
}

/// All eight (scale, min) pairs of a Q4_K block's packed bytes.
#[inline(always)]
pub(crate) fn q4k_scales_mins(scales: &[u8]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for j in 0..8 {
        (sc[j], mn[j]) = q4k_scale_min(scales, j);
    }
    (sc, mn)
}

/// The 256 six-bit values (0..64, before subtracting 32) of a Q6_K block: in each half h, value
/// l < 32 takes the low nibble of `ql[64h + l]`, 32 + l the low nibble of `ql[64h + 32 + l]`,
/// 64 + l and 96 + l their high nibbles; the top two bits come from `qh[32h + l]`, two bits
/// each in that order.
pub(crate) fn q6k_values(block: &[u8]) -> [u8; 256] {
    let (ql, qh) = (&block[..128], &block[128..192]);
    let mut v = [0u8; 256];
    for h in 0..2 {
        for l in 0..32 {
            let (a, b, hi) = (ql[64 * h + l], ql[64 * h + 32 + l], qh[32 * h + l]);
            let o = 128 * h + l;
            v[o] = (a & 0xF) | ((hi & 3) << 4);
            v[o + 32] = (b & 0xF) | (((hi >> 2) & 3) << 4);
            v[o + 64] = (a >> 4) | (((hi >> 4) & 3) << 4);
            v[o + 96] = (b >> 4) | (((hi >> 6) & 3) << 4);
        }
    }
    v
}

/// Decodes whole blocks of `format` in `bytes` into `out` (one value per slot).
///
/// # Panics
/// When `bytes` is not `out.len()` values' worth of whole blocks (a caller bug).
pub fn dequantize(format: Format, bytes: &[u8], out: &mut [f32]) {
    let (values, size) = (format.block_values(), format.block_bytes());
    assert_eq!(
        Some(bytes.len()),
        format.row_bytes(out.len()),
        "{} values of {} are not {} bytes",
        out.len(),
        format.name(),
        bytes.len()
    );
    for (b, y) in bytes.chunks_exact(size).zip(out.chunks_exact_mut(values)) {
        match format {
            Format::Q8_0 => {
                let d = f16_at(b, 0);
                for (y, &q) in y.iter_mut().zip(&b[2..34]) {
                    *y = d * f32::from(q as i8);
                }
            }
            Format::Q4_0 => {
                let d = f16_at(b, 0);
                for (i, &q) in b[2..18].iter().enumerate() {
                    y[i] = d * (f32::from(q & 0xF) - 8.0);
                    y[i + 16] = d * (f32::from(q >> 4) - 8.0);
                }
            }
            Format::Q4K => {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let (sc, mn) = q4k_scales_mins(&b[4..16]);
                for c in 0..4 {
                    let q = &b[16 + 32 * c..16 + 32 * (c + 1)];
                    let (d1, m1) = (d * f32::from(sc[2 * c]), dmin * f32::from(mn[2 * c]));
                    let (d2, m2) = (
                        d * f32::from(sc[2 * c + 1]),
                        dmin * f32::from(mn[2 * c + 1]),
                    );
                    for (l, &q) in q.iter().enumerate() {
                        y[64 * c + l] = d1 * f32::from(q & 0xF) - m1;
                        y[64 * c + 32 + l] = d2 * f32::from(q >> 4) - m2;
                    }
                }
            }
            Format::Q6K => {
                let d = f16_at(b, 208);
                for (i, &q) in q6k_values(b).iter().enumerate() {
                    let scale = f32::from(b[192 + i / 16] as i8);
                    y[i] = d * scale * (f32::from(q) - 32.0);
                }
            }
        }
    }
}

/// 32 activations as 8-bit integers: value ≈ d·q; `sum` = Σq (for Q4_0's offset of 8).
#[derive(Debug, Clone, Copy)]
#[repr(C, align(32))]
pub(crate) struct Act32 {
    pub(crate) qs: [i8; 32],
    pub(crate) d: f32,
    pub(crate) sum: i32,
}

/// 256 activations as 8-bit integers: value ≈ d·q; `sums[g]` = Σq over values 16g..16g + 16
/// (for Q4_K's mins and Q6_K's offset of 32).
#[derive(Debug, Clone, Copy)]
#[repr(C, align(32))]
pub(crate) struct Act256 {
    pub(crate) qs: [i8; 256],
    pub(crate) d: f32,
    pub(crate) sums: [i16; 16],
}

/// `x` as integers in −127..=127 with one scale (the largest magnitude maps to 127), and that
/// scale; all zeros for a zero block.
fn quantize_block(x: &[f32], qs: &mut [i8]) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    if !amax.is_finite() || x.iter().any(|v| v.is_nan()) {
        // A NaN or infinity must reach the output as one, not vanish into a rounded zero.
        qs.fill(0);
        return f32::NAN;
    }
    if amax == 0.0 {
        qs.fill(0);
        return 0.0;
    }
    let inv = 127.0 / amax;
    for (q, &v) in qs.iter_mut().zip(x) {
        *q = round_to_i8(v * inv);
    }
    if !inv.is_finite() {
        // A block too small for `127 / amax` saturates: -128 would break the kernels that
        // multiply by |q| and move the sign onto the weight (-(-128) wraps to -128).
        qs.iter_mut().for_each(|q| *q = (*q).max(-127));
    }
    amax / 127.0
}

/// `y.round() as i8` (half away from zero, saturating, NaN to 0) for any `y`, in operations that
/// vectorize on any x86-64 (`f32::round` is a libm call per value there: ~4% of a quantized
/// prefill). Truncation and the fraction it leaves are exact once `y` is clamped to i8's range
/// (an infinite `y`, from a block whose largest magnitude is too small for `127 / amax`, must
/// not overflow).
#[inline(always)]
pub(crate) fn round_to_i8(y: f32) -> i8 {
    let y = y.clamp(-128.0, 127.0);
    let t = y as i32;
    let fraction = y - t as f32;
    (t + i32::from(fraction >= 0.5) - i32::from(fraction <= -0.5)) as i8
}

/// A row of activations in 32-value blocks (Q8_0 and Q4_0 weights).
pub(crate) fn quantize_act32(x: &[f32], out: &mut Vec<Act32>) {
    out.clear();
    out.extend(x.chunks_exact(32).map(|x| {
        let mut a = Act32 {
            qs: [0; 32],
            d: 0.0,
            sum: 0,
        };
        a.d = quantize_block(x, &mut a.qs);
        a.sum = a.qs.iter().map(|&q| i32::from(q)).sum();
        a
    }));
}

/// A row of activations in 256-value blocks (Q4_K and Q6_K weights).
pub(crate) fn quantize_act256(x: &[f32], out: &mut Vec<Act256>) {
    out.clear();
    out.extend(x.chunks_exact(256).map(|x| {
        let mut a = Act256 {
            qs: [0; 256],
            d: 0.0,
            sums: [0; 16],
        };
        a.d = quantize_block(x, &mut a.qs);
        for (s, g) in a.sums.iter_mut().zip(a.qs.chunks_exact(16)) {
            *s = g.iter().map(|&q| i16::from(q)).sum();
        }
        a
    }));
}
