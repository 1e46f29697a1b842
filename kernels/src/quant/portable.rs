//! Portable dot products of one weight row (whole blocks, as stored) with R quantized activation
//! rows: the fallback on any CPU, and the reference the SIMD versions are tested against. Sums
//! are exact integers per block, scaled once per block, as the SIMD versions do.

use super::blocks::{f16_at, q4k_scales_mins, q6k_values, Act256, Act32};

/// Σ q·x over paired integer slices.
#[inline(always)]
fn idot<A: Copy + Into<i32>>(a: &[A], x: &[i8]) -> i32 {
    a.iter()
        .zip(x)
        .map(|(&a, &x)| a.into() * i32::from(x))
        .sum()
}

/// Q8_0 weights · 32-value activation blocks.
pub(crate) fn q8_0<const R: usize>(w: &[u8], x: [&[Act32]; R]) -> [f32; R] {
    let mut acc = [0f32; R];
    for (b, block) in w.chunks_exact(34).enumerate() {
        let d = f16_at(block, 0);
        let q: &[i8; 32] = bytemuck_i8(&block[2..34]);
        for (acc, x) in acc.iter_mut().zip(x) {
            *acc += d * x[b].d * idot(q, &x[b].qs) as f32;
        }
    }
    acc
}

/// Q4_0 weights · 32-value activation blocks.
pub(crate) fn q4_0<const R: usize>(w: &[u8], x: [&[Act32]; R]) -> [f32; R] {
    let mut acc = [0f32; R];
    for (b, block) in w.chunks_exact(18).enumerate() {
        let d = f16_at(block, 0);
        let mut q = [0u8; 32];
        for (i, &v) in block[2..18].iter().enumerate() {
            (q[i], q[i + 16]) = (v & 0xF, v >> 4);
        }
        for (acc, x) in acc.iter_mut().zip(x) {
            let s = idot(&q, &x[b].qs) - 8 * x[b].sum;
            *acc += d * x[b].d * s as f32;
        }
    }
    acc
}

/// Q4_K weights · 256-value activation blocks.
pub(crate) fn q4k<const R: usize>(w: &[u8], x: [&[Act256]; R]) -> [f32; R] {
    let mut acc = [0f32; R];
    for (b, block) in w.chunks_exact(144).enumerate() {
        let (d, dmin) = (f16_at(block, 0), f16_at(block, 2));
        let (sc, mn) = q4k_scales_mins(&block[4..16]);
        let mut q = [0u8; 256];
        for c in 0..4 {
            for (l, &v) in block[16 + 32 * c..48 + 32 * c].iter().enumerate() {
                (q[64 * c + l], q[64 * c + 32 + l]) = (v & 0xF, v >> 4);
            }
        }
        for (acc, x) in acc.iter_mut().zip(x) {
            let x = &x[b];
            let (mut isum, mut msum) = (0i32, 0i32);
            for j in 0..8 {
                let s = idot(&q[32 * j..32 * (j + 1)], &x.qs[32 * j..32 * (j + 1)]);
                isum += i32::from(sc[j]) * s;
                msum +=
                    i32::from(mn[j]) * (i32::from(x.sums[2 * j]) + i32::from(x.sums[2 * j + 1]));
            }
            *acc += x.d * (d * isum as f32 - dmin * msum as f32);
        }
    }
    acc
}

/// Q6_K weights · 256-value activation blocks.
pub(crate) fn q6k<const R: usize>(w: &[u8], x: [&[Act256]; R]) -> [f32; R] {
    let mut acc = [0f32; R];
    for (b, block) in w.chunks_exact(210).enumerate() {
        let d = f16_at(block, 208);
        let q = q6k_values(block);
        for (acc, x) in acc.iter_mut().zip(x) {
            let x = &x[b];
            let mut isum = 0i32;
            for g in 0..16 {
                let s = idot(&q[16 * g..16 * (g + 1)], &x.qs[16 * g..16 * (g + 1)]);
                let scale = i32::from(block[192 + g] as i8);
                isum += scale * (s - 32 * i32::from(x.sums[g]));
            }
            *acc += d * x.d * isum as f32;
        }
    }
    acc
}

/// 32 bytes seen as the i8 values they store.
fn bytemuck_i8(b: &[u8]) -> &[i8; 32] {
    let b: &[u8; 32] = b.try_into().expect("a Q8_0 block holds 32 values");
    // SAFETY: u8 and i8 have the same size and alignment, and every bit pattern is valid in both.
    unsafe { &*(b as *const [u8; 32] as *const [i8; 32]) }
}
