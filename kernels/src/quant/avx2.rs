//! AVX2 dot products of one weight row with R quantized activation rows: each block's values are
//! unpacked to bytes once and multiplied with every activation row's bytes (`vpmaddubsw`:
//! unsigned × signed byte pairs into 16-bit sums; `vpmaddwd` then folds in the block's scale or
//! widens to 32 bits). Integer sums stay exact within a block; the float scale is applied once
//! per block. Every function requires AVX2, FMA and F16C: callers check
//! [`crate::simd::has_avx2`] (which includes F16C).

use std::arch::x86_64::*;

use super::blocks::{q4k_scales_mins, Act256, Act32};

/// The sum of the eight lanes.
#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    // SAFETY: the caller has AVX2 (see the module's contract).
    unsafe {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }
}

/// The f16 at `block + at` (F16C: `half`'s conversion would check the CPU on every call).
#[inline(always)]
unsafe fn f16_at(block: &[u8], at: usize) -> f32 {
    debug_assert!(at + 2 <= block.len());
    // SAFETY: the caller has F16C and `at + 2` lies inside the block.
    unsafe {
        let bits = block.as_ptr().add(at).cast::<u16>().read_unaligned();
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
    }
}

/// `acc + scale · (8 lanes of i32)`.
#[inline(always)]
unsafe fn fold(acc: __m256, sums: __m256i, scale: f32) -> __m256 {
    // SAFETY: the caller has AVX2 and FMA.
    unsafe { _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(scale), acc) }
}

/// Unsigned bytes `u` · signed bytes at `x`, pairs summed to 16 bits, then pairs of those times
/// `weights` (16-bit lanes) summed to 32 bits.
#[inline(always)]
unsafe fn madd(u: __m256i, x: *const i8, weights: __m256i) -> __m256i {
    // SAFETY: the caller has AVX2 and `x` points to 32 readable bytes.
    unsafe {
        let x = _mm256_loadu_si256(x.cast());
        _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), weights)
    }
}

/// Q8_0 weights · 32-value activation blocks.
///
/// # Safety
/// AVX2 and FMA; `w` is whole blocks and every `x[r]` has one activation block per weight block.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn q8_0<const R: usize>(w: &[u8], x: [&[Act32]; R]) -> [f32; R] {
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); R];
    let mut odd = acc;
    for (b, block) in w.chunks_exact(34).enumerate() {
        // SAFETY: F16C, as this function requires; the scale leads the block.
        let d = unsafe { f16_at(block, 0) };
        // SAFETY: the block holds 32 value bytes after its scale.
        let q = unsafe { _mm256_loadu_si256(block.as_ptr().add(2).cast()) };
        // |q| as unsigned bytes against x carrying q's sign: the product unchanged, and the
        // unsigned × signed form vpmaddubsw takes.
        let aq = _mm256_sign_epi8(q, q);
        for (acc, x) in acc.iter_mut().zip(x) {
            let xb = &x[b];
            // SAFETY: an activation block holds 32 bytes.
            let xq = unsafe { _mm256_loadu_si256(xb.qs.as_ptr().cast()) };
            let p = _mm256_madd_epi16(_mm256_maddubs_epi16(aq, _mm256_sign_epi8(xq, q)), ones);
            // SAFETY: AVX2 and FMA, as this function requires.
            *acc = unsafe { fold(*acc, p, d * xb.d) };
        }
        // Two chains of additions, so a block's product need not wait for the previous one's.
        std::mem::swap(&mut acc, &mut odd);
    }
    // SAFETY: AVX2, as this function requires.
    std::array::from_fn(|r| unsafe { hsum(_mm256_add_ps(acc[r], odd[r])) })
}

/// Q4_0 weights · 32-value activation blocks.
///
/// # Safety
/// As [`q8_0`].
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn q4_0<const R: usize>(w: &[u8], x: [&[Act32]; R]) -> [f32; R] {
    let ones = _mm256_set1_epi16(1);
    let low = _mm_set1_epi8(0xF);
    let mut acc = [_mm256_setzero_ps(); R];
    let mut odd = acc;
    for (b, block) in w.chunks_exact(18).enumerate() {
        // SAFETY: F16C, as this function requires; the scale leads the block.
        let d = unsafe { f16_at(block, 0) };
        // SAFETY: the block holds 16 value bytes after its scale.
        let raw = unsafe { _mm_loadu_si128(block.as_ptr().add(2).cast()) };
        let lo = _mm_and_si128(raw, low);
        let hi = _mm_and_si128(_mm_srli_epi16::<4>(raw), low);
        let q = _mm256_set_m128i(hi, lo);
        for r in 0..R {
            let xb = &x[r][b];
            // SAFETY: an activation block holds 32 bytes; AVX2 as required.
            let p = unsafe { madd(q, xb.qs.as_ptr(), ones) };
            // The offset of 8 cancels in integers (see `q6k`).
            let exact = _mm256_sub_epi32(p, _mm256_setr_epi32(8 * xb.sum, 0, 0, 0, 0, 0, 0, 0));
            // SAFETY: AVX2 and FMA as required.
            acc[r] = unsafe { fold(acc[r], exact, d * xb.d) };
        }
        // Two chains of additions (see `q8_0`).
        std::mem::swap(&mut acc, &mut odd);
    }
    // SAFETY: AVX2, as this function requires.
    std::array::from_fn(|r| unsafe { hsum(_mm256_add_ps(acc[r], odd[r])) })
}

/// Q4_K weights · 256-value activation blocks.
///
/// # Safety
/// As [`q8_0`].
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn q4k<const R: usize>(w: &[u8], x: [&[Act256]; R]) -> [f32; R] {
    let low = _mm256_set1_epi8(0xF);
    let mut acc = [_mm256_setzero_ps(); R];
    let mut mins = [0f32; R];
    for (b, block) in w.chunks_exact(144).enumerate() {
        // SAFETY: F16C, as this function requires; the scales lead the block.
        let (d, dmin) = unsafe { (f16_at(block, 0), f16_at(block, 2)) };
        let (sc, mn) = q4k_scales_mins(&block[4..16]);
        let mut sums = [_mm256_setzero_si256(); R];
        for c in 0..4 {
            // SAFETY: the block's 128 value bytes start at 16.
            let raw = unsafe { _mm256_loadu_si256(block.as_ptr().add(16 + 32 * c).cast()) };
            let lo = _mm256_and_si256(raw, low);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), low);
            let s_lo = _mm256_set1_epi16(i16::from(sc[2 * c]));
            let s_hi = _mm256_set1_epi16(i16::from(sc[2 * c + 1]));
            for r in 0..R {
                let xq = x[r][b].qs.as_ptr();
                // SAFETY: an activation block holds 256 bytes; AVX2 as required.
                unsafe {
                    let p = _mm256_add_epi32(
                        madd(lo, xq.add(64 * c), s_lo),
                        madd(hi, xq.add(64 * c + 32), s_hi),
                    );
                    sums[r] = _mm256_add_epi32(sums[r], p);
                }
            }
        }
        for r in 0..R {
            let xb = &x[r][b];
            // SAFETY: AVX2 and FMA as required.
            acc[r] = unsafe { fold(acc[r], sums[r], d * xb.d) };
            let m: i32 = (0..8)
                .map(|j| {
                    i32::from(mn[j]) * (i32::from(xb.sums[2 * j]) + i32::from(xb.sums[2 * j + 1]))
                })
                .sum();
            mins[r] += dmin * xb.d * m as f32;
        }
    }
    // SAFETY: AVX2, as this function requires.
    std::array::from_fn(|r| unsafe { hsum(acc[r]) } - mins[r])
}

/// Q6_K weights · 256-value activation blocks.
///
/// # Safety
/// As [`q8_0`].
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn q6k<const R: usize>(w: &[u8], x: [&[Act256]; R]) -> [f32; R] {
    let low = _mm256_set1_epi8(0xF);
    let two = _mm256_set1_epi8(3);
    let mut acc = [_mm256_setzero_ps(); R];
    for (b, block) in w.chunks_exact(210).enumerate() {
        // SAFETY: F16C, as this function requires; the scale ends the block.
        let d = unsafe { f16_at(block, 208) };
        let scales: [i16; 16] = std::array::from_fn(|g| i16::from(block[192 + g] as i8));
        let mut sums = [_mm256_setzero_si256(); R];
        for h in 0..2 {
            // SAFETY: ql is the block's first 128 bytes, qh the next 64.
            let (ql0, ql1, qh) = unsafe {
                let p = block.as_ptr();
                (
                    _mm256_loadu_si256(p.add(64 * h).cast()),
                    _mm256_loadu_si256(p.add(64 * h + 32).cast()),
                    _mm256_loadu_si256(p.add(128 + 32 * h).cast()),
                )
            };
            // Bits 4..6 of each value: two bits of qh at 0, 2, 4 or 6, moved up by four.
            let top0 = _mm256_slli_epi16::<4>(_mm256_and_si256(qh, two));
            let top1 = _mm256_slli_epi16::<2>(_mm256_and_si256(qh, _mm256_set1_epi8(0xC)));
            let top2 = _mm256_and_si256(qh, _mm256_set1_epi8(0x30));
            let top3 = _mm256_and_si256(_mm256_srli_epi16::<2>(qh), _mm256_set1_epi8(0x30));
            let quarters = [
                _mm256_or_si256(_mm256_and_si256(ql0, low), top0),
                _mm256_or_si256(_mm256_and_si256(ql1, low), top1),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(ql0), low), top2),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(ql1), low), top3),
            ];
            for (i, q) in quarters.into_iter().enumerate() {
                // Values 0..16 of the quarter in the low 128-bit lane, 16..32 in the high one:
                // each lane's 16-bit sums take its group's scale.
                let g = 8 * h + 2 * i;
                let s = _mm256_set_m128i(_mm_set1_epi16(scales[g + 1]), _mm_set1_epi16(scales[g]));
                for r in 0..R {
                    // SAFETY: an activation block holds 256 bytes; AVX2 as required.
                    let p = unsafe { madd(q, x[r][b].qs.as_ptr().add(128 * h + 32 * i), s) };
                    sums[r] = _mm256_add_epi32(sums[r], p);
                }
            }
        }
        for r in 0..R {
            let xb = &x[r][b];
            // The offset of 32 leaves the integers, where it cancels exactly (in floats it
            // would cancel most of the block's sum and its precision with it).
            let o: i32 = (0..16)
                .map(|g| i32::from(scales[g]) * i32::from(xb.sums[g]))
                .sum();
            let exact = _mm256_sub_epi32(sums[r], _mm256_setr_epi32(32 * o, 0, 0, 0, 0, 0, 0, 0));
            // SAFETY: AVX2 and FMA as required.
            acc[r] = unsafe { fold(acc[r], exact, d * xb.d) };
        }
    }
    // SAFETY: AVX2, as this function requires.
    acc.map(|a| unsafe { hsum(a) })
}
