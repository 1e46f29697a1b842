//! AVX-512 VNNI dot products of one weight row with R quantized activation rows: 64 values per
//! instruction, unsigned weight bytes × signed activation bytes summed four at a time into 32-bit
//! lanes (`vpdpbusd`), so two 32-value blocks or a quarter of a 256-value block per step. Every
//! function requires AVX-512F/BW/VNNI (and F16C): callers check [`super::has_vnni`].

use std::arch::x86_64::*;

use super::blocks::{q4k_scales_mins, Act256, Act32};

/// How far ahead of the bytes in use the kernels ask for weights.
const PREFETCH: usize = 4096;

/// The f16 at `p`, as f32.
#[inline(always)]
unsafe fn f16_at(p: *const u8) -> f32 {
    // SAFETY: the caller has F16C and two readable bytes at `p`.
    unsafe {
        let bits = p.cast::<u16>().read_unaligned();
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
    }
}

/// Two 32-byte halves as one vector.
#[inline(always)]
unsafe fn pair(lo: *const u8, hi: *const u8) -> __m512i {
    // SAFETY: the caller has AVX-512F and 32 readable bytes at each pointer.
    unsafe {
        let lo = _mm256_loadu_si256(lo.cast());
        _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), _mm256_loadu_si256(hi.cast()))
    }
}

/// `a` in the low eight lanes, `b` in the high eight.
#[inline(always)]
unsafe fn halves(a: f32, b: f32) -> __m512 {
    // SAFETY: the caller has AVX-512F.
    unsafe { _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(a), _mm512_set1_ps(b)) }
}

/// `a` in lane 0, `b` in lane 8, zeros elsewhere.
#[inline(always)]
unsafe fn lanes_0_8(a: i32, b: i32) -> __m512i {
    // SAFETY: the caller has AVX-512F.
    unsafe {
        let a = _mm512_castsi128_si512(_mm_cvtsi32_si128(a));
        _mm512_inserti32x4::<2>(a, _mm_cvtsi32_si128(b))
    }
}

/// Each row's activation blocks from `b` on.
fn tails<const R: usize>(x: [&[Act32]; R], b: usize) -> [&[Act32]; R] {
    x.map(|x| &x[b..])
}

/// Q8_0 weights · 32-value activation blocks, two blocks per step.
///
/// # Safety
/// AVX-512F/BW/VNNI and F16C; `w` is whole blocks and every `x[r]` has one activation block per
/// weight block.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c,avx2,fma")]
pub(crate) unsafe fn q8_0<const R: usize>(w: &[u8], x: [&[Act32]; R]) -> [f32; R] {
    let blocks = w.len() / 34;
    let mut acc = [_mm512_setzero_ps(); R];
    let p = w.as_ptr();
    let mut b = 0;
    while b + 2 <= blocks {
        // SAFETY: blocks b and b + 1 lie inside `w`; each activation row has them too.
        unsafe {
            let q = pair(p.add(34 * b + 2), p.add(34 * b + 36));
            let (d0, d1) = (f16_at(p.add(34 * b)), f16_at(p.add(34 * b + 34)));
            // |q| against x carrying q's sign: unsigned × signed, the product unchanged.
            let aq = _mm512_abs_epi8(q);
            let negative = _mm512_movepi8_mask(q);
            for r in 0..R {
                let (x0, x1) = (&x[r][b], &x[r][b + 1]);
                let xs = pair(x0.qs.as_ptr().cast(), x1.qs.as_ptr().cast());
                let xs = _mm512_mask_sub_epi8(xs, negative, _mm512_setzero_si512(), xs);
                let s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), aq, xs);
                let scale = halves(d0 * x0.d, d1 * x1.d);
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, acc[r]);
            }
        }
        b += 2;
    }
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = _mm512_reduce_add_ps(acc[r]);
    }
    if b < blocks {
        // SAFETY: AVX2 and F16C are part of this function's features.
        let tail = unsafe { super::avx2::q8_0(&w[34 * b..], tails(x, b)) };
        for (o, t) in out.iter_mut().zip(tail) {
            *o += t;
        }
    }
    out
}

/// Q4_0 weights · 32-value activation blocks, two blocks per step.
///
/// # Safety
/// As [`q8_0`].
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c,avx2,fma")]
pub(crate) unsafe fn q4_0<const R: usize>(w: &[u8], x: [&[Act32]; R]) -> [f32; R] {
    let blocks = w.len() / 18;
    let low = _mm256_set1_epi8(0xF);
    let mut acc = [_mm512_setzero_ps(); R];
    let p = w.as_ptr();
    let mut b = 0;
    while b + 2 <= blocks {
        // SAFETY: blocks b and b + 1 lie inside `w`; each activation row has them too.
        unsafe {
            // Ask for the weights 4 KiB on (see `super::packed_x86`); a hint, harmless past
            // the end.
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(18 * b + PREFETCH).cast());
            let raw = _mm256_loadu2_m128i(p.add(18 * b + 20).cast(), p.add(18 * b + 2).cast());
            let lo = _mm256_and_si256(raw, low);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), low);
            // [lo₀ lo₁ hi₀ hi₁] in 128-bit lanes → [lo₀ hi₀ lo₁ hi₁]: each block's 32 values in
            // order, as the activations are.
            let q = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
            let q = _mm512_shuffle_i64x2::<0b11_01_10_00>(q, q);
            let (d0, d1) = (f16_at(p.add(18 * b)), f16_at(p.add(18 * b + 18)));
            for r in 0..R {
                let (x0, x1) = (&x[r][b], &x[r][b + 1]);
                let xs = pair(x0.qs.as_ptr().cast(), x1.qs.as_ptr().cast());
                let s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, xs);
                // The offset of 8 cancels in integers (see the AVX2 version).
                let s = _mm512_sub_epi32(s, lanes_0_8(8 * x0.sum, 8 * x1.sum));
                let scale = halves(d0 * x0.d, d1 * x1.d);
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, acc[r]);
            }
        }
        b += 2;
    }
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = _mm512_reduce_add_ps(acc[r]);
    }
    if b < blocks {
        // SAFETY: AVX2 and F16C are part of this function's features.
        let tail = unsafe { super::avx2::q4_0(&w[18 * b..], tails(x, b)) };
        for (o, t) in out.iter_mut().zip(tail) {
            *o += t;
        }
    }
    out
}

/// Q4_K weights · 256-value activation blocks, 64 values per step.
///
/// # Safety
/// As [`q8_0`].
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c,avx2,fma")]
pub(crate) unsafe fn q4k<const R: usize>(w: &[u8], x: [&[Act256]; R]) -> [f32; R] {
    let low = _mm512_set1_epi8(0xF);
    let mut acc = [_mm512_setzero_ps(); R];
    let mut mins = [0f32; R];
    for (b, block) in w.chunks_exact(144).enumerate() {
        let p = block.as_ptr();
        // SAFETY: the block's scales lead it.
        let (d, dmin) = unsafe { (f16_at(p), f16_at(p.add(2))) };
        let (sc, mn) = q4k_scales_mins(&block[4..16]);
        let mut sums = [_mm512_setzero_si512(); R];
        for c in 0..4 {
            // SAFETY: chunk c's 32 bytes lie inside the block.
            let raw = unsafe { _mm256_loadu_si256(p.add(16 + 32 * c).cast()) };
            // Low nibbles are values 64c..64c + 32, high ones the next 32: in order.
            let both =
                _mm512_inserti64x4::<1>(_mm512_castsi256_si512(raw), _mm256_srli_epi16::<4>(raw));
            let q = _mm512_and_si512(both, low);
            let scale = _mm512_mask_blend_epi32(
                0xFF00,
                _mm512_set1_epi32(i32::from(sc[2 * c])),
                _mm512_set1_epi32(i32::from(sc[2 * c + 1])),
            );
            for r in 0..R {
                // SAFETY: an activation block holds 256 bytes.
                let xs = unsafe { _mm512_loadu_si512(x[r][b].qs.as_ptr().add(64 * c).cast()) };
                let s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, xs);
                sums[r] = _mm512_add_epi32(sums[r], _mm512_mullo_epi32(s, scale));
            }
        }
        for r in 0..R {
            let xb = &x[r][b];
            acc[r] = _mm512_fmadd_ps(
                _mm512_cvtepi32_ps(sums[r]),
                _mm512_set1_ps(d * xb.d),
                acc[r],
            );
            let m: i32 = (0..8)
                .map(|j| {
                    i32::from(mn[j]) * (i32::from(xb.sums[2 * j]) + i32::from(xb.sums[2 * j + 1]))
                })
                .sum();
            mins[r] += dmin * xb.d * m as f32;
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = _mm512_reduce_add_ps(acc[r]) - mins[r];
    }
    out
}

/// Q6_K weights · 256-value activation blocks, 64 values per step.
///
/// # Safety
/// As [`q8_0`].
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c,avx2,fma")]
pub(crate) unsafe fn q6k<const R: usize>(w: &[u8], x: [&[Act256]; R]) -> [f32; R] {
    let low = _mm512_set1_epi8(0xF);
    let top = _mm512_set1_epi8(0x30);
    // The second 32 values of each pair take qh's bits two places further up.
    let up = _mm512_inserti64x4::<1>(_mm512_set1_epi16(4), _mm256_set1_epi16(2));
    let down = _mm512_inserti64x4::<1>(_mm512_setzero_si512(), _mm256_set1_epi16(2));
    let mut acc = [_mm512_setzero_ps(); R];
    for (b, block) in w.chunks_exact(210).enumerate() {
        let p = block.as_ptr();
        for line in (0..210).step_by(64) {
            // See `q4_0`.
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(line + PREFETCH).cast());
        }
        // SAFETY: the scale ends the block; its 16 group scales precede it.
        let (d, scales) = unsafe {
            (
                f16_at(p.add(208)),
                _mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(192).cast())),
            )
        };
        let mut sums = [_mm512_setzero_si512(); R];
        for h in 0..2 {
            // SAFETY: ql is the block's first 128 bytes, qh the next 64.
            let (ql, qh) = unsafe {
                (
                    _mm512_loadu_si512(p.add(64 * h).cast()),
                    _mm512_broadcast_i64x4(_mm256_loadu_si256(p.add(128 + 32 * h).cast())),
                )
            };
            // Values 0..64 of the half: low nibbles with qh bits 0-1 (then 2-3) on top; values
            // 64..128: high nibbles with bits 4-5 (then 6-7).
            let first = _mm512_or_si512(
                _mm512_and_si512(ql, low),
                _mm512_and_si512(_mm512_sllv_epi16(qh, up), top),
            );
            let second = _mm512_or_si512(
                _mm512_and_si512(_mm512_srli_epi16::<4>(ql), low),
                _mm512_and_si512(_mm512_srlv_epi16(qh, down), top),
            );
            for (i, q) in [first, second].into_iter().enumerate() {
                // Four 32-bit lanes hold one 16-value group: each takes its group's scale.
                let g = 8 * h + 4 * i;
                let idx = _mm512_set_epi32(
                    g as i32 + 3,
                    g as i32 + 3,
                    g as i32 + 3,
                    g as i32 + 3,
                    g as i32 + 2,
                    g as i32 + 2,
                    g as i32 + 2,
                    g as i32 + 2,
                    g as i32 + 1,
                    g as i32 + 1,
                    g as i32 + 1,
                    g as i32 + 1,
                    g as i32,
                    g as i32,
                    g as i32,
                    g as i32,
                );
                let scale = _mm512_permutexvar_epi32(idx, scales);
                for r in 0..R {
                    // SAFETY: an activation block holds 256 bytes.
                    let xs = unsafe {
                        _mm512_loadu_si512(x[r][b].qs.as_ptr().add(128 * h + 64 * i).cast())
                    };
                    let s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, xs);
                    sums[r] = _mm512_add_epi32(sums[r], _mm512_mullo_epi32(s, scale));
                }
            }
        }
        for r in 0..R {
            let xb = &x[r][b];
            // The offset of 32 cancels in integers (see the AVX2 version).
            // SAFETY: the block's 16 group sums are 32 bytes.
            let gsums = unsafe { _mm256_loadu_si256(xb.sums.as_ptr().cast()) };
            let gsums = _mm512_cvtepi16_epi32(gsums);
            let offset = _mm512_slli_epi32::<5>(_mm512_mullo_epi32(gsums, scales));
            let exact = _mm512_sub_epi32(sums[r], offset);
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact), _mm512_set1_ps(d * xb.d), acc[r]);
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = _mm512_reduce_add_ps(acc[r]);
    }
    out
}
