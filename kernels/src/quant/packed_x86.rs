//! The tile products (see [`super::packed`]) on x86: AVX-512 VNNI takes a whole 16-row group of
//! four values per `vpdpbusd`; AVX2 takes it as two 8-row halves with `vpmaddubsw` (which needs
//! signed weights against unsigned activations' magnitudes, so Q8_0's offset is undone and the
//! activations carry the weights' signs).

// The kernels index several register arrays (per activation row, per half) by the same counters;
// iterator chains over them would hide which lanes meet.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::blocks::{Act256, Act32, Format};
use super::packed::{tile_bytes, Q6K_HIGH, Q6K_LOW, Q6K_SCALES, ROWS};

/// How far ahead of the bytes in use the kernels ask for weights.
const PREFETCH: usize = 4096;

/// Asks memory for part `part` of `parts` of the `bytes` that start `PREFETCH` bytes past the
/// tile column at `p`: called once per part as a column is read, it requests every line of the
/// columns that follow once — their scales included — a few lines per call. The hardware
/// prefetcher alone leaves a core waiting on memory; a hint, harmless past the end.
#[inline(always)]
unsafe fn ahead(p: *const u8, bytes: usize, part: usize, parts: usize) {
    // One line more: a column need not start on a line.
    let lines = bytes.div_ceil(64) + 1;
    for l in lines * part / parts..lines * (part + 1) / parts {
        // SAFETY: a prefetch never faults.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH + 64 * l).cast()) };
    }
}

/// Four activation bytes at `p` broadcast to every 32-bit lane.
#[inline(always)]
unsafe fn quad(p: *const i8) -> i32 {
    // SAFETY: the caller hands four readable bytes.
    unsafe { p.cast::<i32>().read_unaligned() }
}

/// 16 f16 scales at `p` as f32.
#[inline(always)]
unsafe fn scales16(p: *const u8) -> __m512 {
    // SAFETY: the caller has AVX-512F and F16C and 32 readable bytes at `p`.
    unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
}

/// 16 bytes at `p` widened to 32-bit lanes.
#[inline(always)]
unsafe fn bytes16(p: *const u8) -> __m512i {
    // SAFETY: the caller has AVX-512F and 16 readable bytes at `p`.
    unsafe { _mm512_cvtepu8_epi32(_mm_loadu_si128(p.cast())) }
}

/// 16 rows of Q8_0 tiles · R activation rows.
///
/// # Safety
/// AVX-512F/BW/VNNI and F16C; `tile` is whole tile columns and every `x[r]` has one activation
/// block per column.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
pub(crate) unsafe fn q8_0_vnni<const R: usize>(tile: &[u8], x: [&[Act32]; R]) -> [[f32; ROWS]; R] {
    let mut acc = [_mm512_setzero_ps(); R];
    for (b, column) in tile.chunks_exact(tile_bytes(Format::Q8_0)).enumerate() {
        let p = column.as_ptr();
        // Two chains of multiply-adds, so each need not wait for the one before.
        let mut even = [_mm512_setzero_si512(); R];
        let mut odd = [_mm512_setzero_si512(); R];
        for g in (0..8).step_by(2) {
            // SAFETY: groups g and g + 1 lie inside the column; an activation block holds 32.
            unsafe {
                // See `q4k_vnni`.
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(32 + 64 * g + PREFETCH).cast());
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(96 + 64 * g + PREFETCH).cast());
                let w0 = _mm512_loadu_si512(p.add(32 + 64 * g).cast());
                let w1 = _mm512_loadu_si512(p.add(96 + 64 * g).cast());
                for r in 0..R {
                    let xp = x[r][b].qs.as_ptr().add(4 * g);
                    even[r] = _mm512_dpbusd_epi32(even[r], w0, _mm512_set1_epi32(quad(xp)));
                    odd[r] = _mm512_dpbusd_epi32(odd[r], w1, _mm512_set1_epi32(quad(xp.add(4))));
                }
            }
        }
        let sums: [__m512i; R] = std::array::from_fn(|r| _mm512_add_epi32(even[r], odd[r]));
        // SAFETY: the column starts with 16 f16 scales.
        let d = unsafe { scales16(p) };
        for r in 0..R {
            let xb = &x[r][b];
            // The weights' +128 added 128·Σx to every row.
            let exact = _mm512_sub_epi32(sums[r], _mm512_set1_epi32(128 * xb.sum));
            let scale = _mm512_mul_ps(d, _mm512_set1_ps(xb.d));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact), scale, acc[r]);
        }
    }
    let mut out = [[0f32; ROWS]; R];
    for r in 0..R {
        // SAFETY: 16 writable floats.
        unsafe { _mm512_storeu_ps(out[r].as_mut_ptr(), acc[r]) };
    }
    out
}

/// 16 rows of Q4_0 tiles · R activation rows.
///
/// # Safety
/// As [`q8_0_vnni`].
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
pub(crate) unsafe fn q4_0_vnni<const R: usize>(tile: &[u8], x: [&[Act32]; R]) -> [[f32; ROWS]; R] {
    let low = _mm512_set1_epi8(0xF);
    let mut acc = [_mm512_setzero_ps(); R];
    for (b, column) in tile.chunks_exact(tile_bytes(Format::Q4_0)).enumerate() {
        let p = column.as_ptr();
        // The high nibbles' chain apart from the low ones' (see `q8_0_vnni`).
        let mut sums = [_mm512_setzero_si512(); R];
        let mut highs = [_mm512_setzero_si512(); R];
        for g in 0..4 {
            // SAFETY: group g's 64 bytes lie inside the column; an activation block holds 32.
            unsafe {
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(32 + 64 * g + PREFETCH).cast());
                let raw = _mm512_loadu_si512(p.add(32 + 64 * g).cast());
                let lo = _mm512_and_si512(raw, low);
                let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), low);
                for r in 0..R {
                    let xp = x[r][b].qs.as_ptr().add(8 * g);
                    sums[r] = _mm512_dpbusd_epi32(sums[r], lo, _mm512_set1_epi32(quad(xp)));
                    highs[r] =
                        _mm512_dpbusd_epi32(highs[r], hi, _mm512_set1_epi32(quad(xp.add(4))));
                }
            }
        }
        // SAFETY: the column starts with 16 f16 scales.
        let d = unsafe { scales16(p) };
        for r in 0..R {
            let xb = &x[r][b];
            // The values' offset of 8 leaves through the block sum.
            let exact = _mm512_sub_epi32(
                _mm512_add_epi32(sums[r], highs[r]),
                _mm512_set1_epi32(8 * xb.sum),
            );
            let scale = _mm512_mul_ps(d, _mm512_set1_ps(xb.d));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact), scale, acc[r]);
        }
    }
    let mut out = [[0f32; ROWS]; R];
    for r in 0..R {
        // SAFETY: 16 writable floats.
        unsafe { _mm512_storeu_ps(out[r].as_mut_ptr(), acc[r]) };
    }
    out
}

/// 16 rows of Q4_K tiles · R activation rows.
///
/// # Safety
/// As [`q8_0_vnni`].
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
pub(crate) unsafe fn q4k_vnni<const R: usize>(tile: &[u8], x: [&[Act256]; R]) -> [[f32; ROWS]; R] {
    let low = _mm512_set1_epi8(0xF);
    let mut acc = [_mm512_setzero_ps(); R];
    for (b, column) in tile.chunks_exact(tile_bytes(Format::Q4K)).enumerate() {
        let p = column.as_ptr();
        let mut isum = [_mm512_setzero_si512(); R];
        for s in 0..8 {
            let mut sub = [_mm512_setzero_si512(); R];
            // The high nibbles' chain apart from the low ones' (see `q8_0_vnni`).
            let mut high = [_mm512_setzero_si512(); R];
            for pair in 0..4 {
                // SAFETY: the pair's 64 bytes lie inside the column; an activation block
                // holds 256 bytes.
                unsafe {
                    let at = 320 + 256 * s + 64 * pair;
                    // The hardware prefetcher alone leaves a core waiting on memory: ask for
                    // what comes 4 KiB on (the next tile columns; a hint, harmless past the end).
                    // Only the lines this loop reads: covering the scales too (`ahead`) measured
                    // ~5-10% slower here.
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(at + PREFETCH).cast());
                    let raw = _mm512_loadu_si512(p.add(at).cast());
                    let lo = _mm512_and_si512(raw, low);
                    let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), low);
                    for r in 0..R {
                        let xp = x[r][b].qs.as_ptr().add(32 * s + 8 * pair);
                        sub[r] = _mm512_dpbusd_epi32(sub[r], lo, _mm512_set1_epi32(quad(xp)));
                        high[r] =
                            _mm512_dpbusd_epi32(high[r], hi, _mm512_set1_epi32(quad(xp.add(4))));
                    }
                }
            }
            // SAFETY: the scales of sub-block s are 16 bytes of the column.
            let sc = unsafe { bytes16(p.add(64 + 16 * s)) };
            for r in 0..R {
                let sum = _mm512_add_epi32(sub[r], high[r]);
                isum[r] = _mm512_add_epi32(isum[r], _mm512_mullo_epi32(sum, sc));
            }
        }
        // Σ min · Σx over the 8 sub-blocks, two at a time: each lane holds a row's two mins as
        // 16-bit halves, multiplied by the activations' two sums and added by one `vpdpwssd`
        // (the same exact integers as a multiply per sub-block, a quarter of the instructions).
        let mut mins = [_mm512_setzero_si512(); 4];
        for (q, m) in mins.iter_mut().enumerate() {
            // SAFETY: the mins are 8 × 16 bytes of the column.
            let (even, odd) =
                unsafe { (bytes16(p.add(192 + 32 * q)), bytes16(p.add(208 + 32 * q))) };
            *m = _mm512_or_si512(even, _mm512_slli_epi32::<16>(odd));
        }
        // SAFETY: the column starts with 16 f16 scales, then 16 f16 mins.
        let (d, dmin) = unsafe { (scales16(p), scales16(p.add(32))) };
        for r in 0..R {
            let xb = &x[r][b];
            let sum = |s: usize| i32::from(xb.sums[2 * s]) + i32::from(xb.sums[2 * s + 1]);
            let mut imin = _mm512_setzero_si512();
            for (q, &m) in mins.iter().enumerate() {
                let both = (sum(2 * q) & 0xFFFF) | (sum(2 * q + 1) << 16);
                imin = _mm512_dpwssd_epi32(imin, m, _mm512_set1_epi32(both));
            }
            let dx = _mm512_set1_ps(xb.d);
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[r]), _mm512_mul_ps(d, dx), acc[r]);
            acc[r] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(imin), _mm512_mul_ps(dmin, dx), acc[r]);
        }
    }
    let mut out = [[0f32; ROWS]; R];
    for r in 0..R {
        // SAFETY: 16 writable floats.
        unsafe { _mm512_storeu_ps(out[r].as_mut_ptr(), acc[r]) };
    }
    out
}

/// 16 rows of Q6_K tiles · R activation rows: per sub-block of 16 values, the low nibbles of two
/// four-value groups and the top bits of all four are joined into four 64-byte vectors of
/// values 0..64.
///
/// # Safety
/// As [`q8_0_vnni`].
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
pub(crate) unsafe fn q6k_vnni<const R: usize>(tile: &[u8], x: [&[Act256]; R]) -> [[f32; ROWS]; R] {
    let (low, top) = (_mm512_set1_epi8(0xF), _mm512_set1_epi8(0x30));
    let mut acc = [_mm512_setzero_ps(); R];
    for (b, column) in tile.chunks_exact(tile_bytes(Format::Q6K)).enumerate() {
        let p = column.as_ptr();
        let mut total = [_mm512_setzero_si512(); R];
        for j in 0..16 {
            // SAFETY: sub-block j's low nibbles (two groups of 64 bytes) and top bits (64 bytes)
            // lie inside the column; an activation block holds 256 bytes.
            let w = unsafe {
                let (lo, hi) = (Q6K_LOW + 128 * j, Q6K_HIGH + 64 * j);
                ahead(p, tile_bytes(Format::Q6K), j, 16);
                let (a, c) = (
                    _mm512_loadu_si512(p.add(lo).cast()),
                    _mm512_loadu_si512(p.add(lo + 64).cast()),
                );
                let h = _mm512_loadu_si512(p.add(hi).cast());
                // Each top-bit pair moved to bits 4..6 of its byte; what a 16-bit shift
                // carries across bytes lands in bits the mask drops.
                [
                    _mm512_or_si512(
                        _mm512_and_si512(a, low),
                        _mm512_and_si512(_mm512_slli_epi16::<4>(h), top),
                    ),
                    _mm512_or_si512(
                        _mm512_and_si512(_mm512_srli_epi16::<4>(a), low),
                        _mm512_and_si512(_mm512_slli_epi16::<2>(h), top),
                    ),
                    _mm512_or_si512(_mm512_and_si512(c, low), _mm512_and_si512(h, top)),
                    _mm512_or_si512(
                        _mm512_and_si512(_mm512_srli_epi16::<4>(c), low),
                        _mm512_and_si512(_mm512_srli_epi16::<2>(h), top),
                    ),
                ]
            };
            // SAFETY: sub-block j's 16 scales are bytes of the column.
            let sc =
                unsafe { _mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(Q6K_SCALES + 16 * j).cast())) };
            for r in 0..R {
                let xp = x[r][b].qs.as_ptr();
                // SAFETY: values 16j..16j + 16 of the activation block.
                let (e, o) = unsafe {
                    let q = |i: usize| _mm512_set1_epi32(quad(xp.add(16 * j + 4 * i)));
                    let e = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[0], q(0));
                    let o = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[1], q(1));
                    (
                        _mm512_dpbusd_epi32(e, w[2], q(2)),
                        _mm512_dpbusd_epi32(o, w[3], q(3)),
                    )
                };
                let sub = _mm512_add_epi32(e, o);
                total[r] = _mm512_add_epi32(total[r], _mm512_mullo_epi32(sub, sc));
            }
        }
        // The values' offset of 32 leaves through `Σ_j scale_j · Σx_j`, two sub-blocks at a
        // time: each lane holds a row's two signed scales as 16-bit halves, multiplied by the
        // activations' two sums and added by one `vpdpwssd` (exact: |scale · sum| ≤ 2^18).
        let mut pairs = [_mm512_setzero_si512(); 8];
        for (q, pair) in pairs.iter_mut().enumerate() {
            // SAFETY: sub-blocks 2q and 2q + 1's 16 scales each are bytes of the column.
            let (even, odd) = unsafe {
                let at = p.add(Q6K_SCALES + 32 * q);
                (
                    _mm512_cvtepi8_epi32(_mm_loadu_si128(at.cast())),
                    _mm512_cvtepi8_epi32(_mm_loadu_si128(at.add(16).cast())),
                )
            };
            *pair = _mm512_or_si512(
                _mm512_and_si512(even, _mm512_set1_epi32(0xFFFF)),
                _mm512_slli_epi32::<16>(odd),
            );
        }
        // SAFETY: the column starts with 16 f16 scales.
        let d = unsafe { scales16(p) };
        for r in 0..R {
            let sums = &x[r][b].sums;
            let mut offset = _mm512_setzero_si512();
            for (q, &pair) in pairs.iter().enumerate() {
                let both = (i32::from(sums[2 * q]) & 0xFFFF) | (i32::from(sums[2 * q + 1]) << 16);
                offset = _mm512_dpwssd_epi32(offset, pair, _mm512_set1_epi32(both));
            }
            let exact = _mm512_sub_epi32(total[r], _mm512_slli_epi32::<5>(offset));
            let scale = _mm512_mul_ps(d, _mm512_set1_ps(x[r][b].d));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact), scale, acc[r]);
        }
    }
    let mut out = [[0f32; ROWS]; R];
    for r in 0..R {
        // SAFETY: 16 writable floats.
        unsafe { _mm512_storeu_ps(out[r].as_mut_ptr(), acc[r]) };
    }
    out
}

/// Eight f16 scales at `p` as f32.
#[inline(always)]
unsafe fn scales8(p: *const u8) -> __m256 {
    // SAFETY: the caller has F16C and 16 readable bytes at `p`.
    unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
}

/// Eight bytes at `p` widened to 32-bit lanes.
#[inline(always)]
unsafe fn bytes8(p: *const u8) -> __m256i {
    // SAFETY: the caller has AVX2 and 8 readable bytes at `p`.
    unsafe { _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.cast())) }
}

/// Unsigned bytes · signed bytes summed four at a time into 32-bit lanes, on 256 bits.
pub(crate) trait Dot4 {
    /// `u · s`, four byte products per 32-bit lane.
    unsafe fn dot4(u: __m256i, s: __m256i) -> __m256i;
}

/// AVX2: `vpmaddubsw` then `vpmaddwd` (the pairs' 16-bit sums never saturate here: every caller
/// keeps one factor's magnitude within 127 or 128 and the other's within 127 or 63).
pub(crate) struct Avx2;

/// AVX-VNNI: `vpdpbusd` on 256 bits, one instruction.
pub(crate) struct AvxVnni;

impl Dot4 for Avx2 {
    #[inline(always)]
    unsafe fn dot4(u: __m256i, s: __m256i) -> __m256i {
        // SAFETY: the caller has AVX2.
        unsafe { _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)) }
    }
}

impl Dot4 for AvxVnni {
    #[inline(always)]
    unsafe fn dot4(u: __m256i, s: __m256i) -> __m256i {
        // SAFETY: the caller has AVX-VNNI.
        unsafe { _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s) }
    }
}

/// The AVX2 and AVX-VNNI entry points of a 256-bit tile kernel written once over [`Dot4`].
macro_rules! entry_points {
    ($body:ident, $act:ty, $avx2:ident, $vnni:ident) => {
        /// The AVX2 instance.
        ///
        /// # Safety
        /// AVX2, FMA and F16C; the tile and activations as for the VNNI kernels.
        #[target_feature(enable = "avx2,fma,f16c")]
        pub(crate) unsafe fn $avx2<const R: usize>(
            tile: &[u8],
            x: [&[$act]; R],
        ) -> [[f32; ROWS]; R] {
            // SAFETY: as the caller promised.
            unsafe { $body::<Avx2, R>(tile, x) }
        }

        /// The AVX-VNNI instance.
        ///
        /// # Safety
        /// As the AVX2 instance, and AVX-VNNI.
        #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
        pub(crate) unsafe fn $vnni<const R: usize>(
            tile: &[u8],
            x: [&[$act]; R],
        ) -> [[f32; ROWS]; R] {
            // SAFETY: as the caller promised.
            unsafe { $body::<AvxVnni, R>(tile, x) }
        }
    };
}

entry_points!(q8_0_256, Act32, q8_0_avx2, q8_0_avx_vnni);
entry_points!(q4_0_256, Act32, q4_0_avx2, q4_0_avx_vnni);
entry_points!(q4k_256, Act256, q4k_avx2, q4k_avx_vnni);
entry_points!(q6k_256, Act256, q6k_avx2, q6k_avx_vnni);

/// 16 rows of Q8_0 tiles · R activation rows, as two halves of eight rows.
///
/// # Safety
/// AVX2, FMA and F16C; the tile and activations as for [`q8_0_vnni`].
// The inner blocks keep their own SAFETY notes; the outer one covers the intrinsics, whose
// features the entry points enable.
#[allow(unused_unsafe)]
#[inline(always)]
unsafe fn q8_0_256<D: Dot4, const R: usize>(tile: &[u8], x: [&[Act32]; R]) -> [[f32; ROWS]; R] {
    // SAFETY: called only from the entry points, which enable AVX2, FMA and F16C (and AVX-VNNI
    // for its instance).
    unsafe {
        let flip = _mm256_set1_epi8(-128);
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for (b, column) in tile.chunks_exact(tile_bytes(Format::Q8_0)).enumerate() {
            let p = column.as_ptr();
            let mut sums = [[_mm256_setzero_si256(); 2]; R];
            for g in 0..8 {
                for h in 0..2 {
                    // SAFETY: half h of group g is 32 bytes inside the column.
                    unsafe {
                        if h == 0 {
                            ahead(p, tile_bytes(Format::Q8_0), g, 8);
                        }
                        let w = _mm256_xor_si256(
                            _mm256_loadu_si256(p.add(32 + 64 * g + 32 * h).cast()),
                            flip,
                        );
                        let aw = _mm256_sign_epi8(w, w);
                        for r in 0..R {
                            let xs = _mm256_set1_epi32(quad(x[r][b].qs.as_ptr().add(4 * g)));
                            let d = D::dot4(aw, _mm256_sign_epi8(xs, w));
                            sums[r][h] = _mm256_add_epi32(sums[r][h], d);
                        }
                    }
                }
            }
            for h in 0..2 {
                // SAFETY: the column starts with 16 f16 scales.
                let d = unsafe { scales8(p.add(16 * h)) };
                for r in 0..R {
                    let scale = _mm256_mul_ps(d, _mm256_set1_ps(x[r][b].d));
                    acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[r][h]), scale, acc[r][h]);
                }
            }
        }
        store8(acc)
    }
}

/// 16 rows of Q4_0 tiles · R activation rows, as two halves of eight rows.
///
/// # Safety
/// As [`q8_0_256`].
// The inner blocks keep their own SAFETY notes; the outer one covers the intrinsics, whose
// features the entry points enable.
#[allow(unused_unsafe)]
#[inline(always)]
unsafe fn q4_0_256<D: Dot4, const R: usize>(tile: &[u8], x: [&[Act32]; R]) -> [[f32; ROWS]; R] {
    // SAFETY: called only from the entry points, which enable AVX2, FMA and F16C (and AVX-VNNI
    // for its instance).
    unsafe {
        let low = _mm256_set1_epi8(0xF);
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for (b, column) in tile.chunks_exact(tile_bytes(Format::Q4_0)).enumerate() {
            let p = column.as_ptr();
            let mut sums = [[_mm256_setzero_si256(); 2]; R];
            for g in 0..4 {
                for h in 0..2 {
                    // SAFETY: half h of group g is 32 bytes inside the column.
                    unsafe {
                        if h == 0 {
                            ahead(p, tile_bytes(Format::Q4_0), g, 4);
                        }
                        let raw = _mm256_loadu_si256(p.add(32 + 64 * g + 32 * h).cast());
                        let lo = _mm256_and_si256(raw, low);
                        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), low);
                        for r in 0..R {
                            let xp = x[r][b].qs.as_ptr().add(8 * g);
                            let a = D::dot4(lo, _mm256_set1_epi32(quad(xp)));
                            let c = D::dot4(hi, _mm256_set1_epi32(quad(xp.add(4))));
                            sums[r][h] = _mm256_add_epi32(sums[r][h], _mm256_add_epi32(a, c));
                        }
                    }
                }
            }
            for h in 0..2 {
                // SAFETY: the column starts with 16 f16 scales.
                let d = unsafe { scales8(p.add(16 * h)) };
                for r in 0..R {
                    let xb = &x[r][b];
                    let exact = _mm256_sub_epi32(sums[r][h], _mm256_set1_epi32(8 * xb.sum));
                    let scale = _mm256_mul_ps(d, _mm256_set1_ps(xb.d));
                    acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(exact), scale, acc[r][h]);
                }
            }
        }
        store8(acc)
    }
}

/// 16 rows of Q4_K tiles · R activation rows, as two halves of eight rows.
///
/// # Safety
/// As [`q8_0_256`].
// The inner blocks keep their own SAFETY notes; the outer one covers the intrinsics, whose
// features the entry points enable.
#[allow(unused_unsafe)]
#[inline(always)]
unsafe fn q4k_256<D: Dot4, const R: usize>(tile: &[u8], x: [&[Act256]; R]) -> [[f32; ROWS]; R] {
    // SAFETY: called only from the entry points, which enable AVX2, FMA and F16C (and AVX-VNNI
    // for its instance).
    unsafe {
        let low = _mm256_set1_epi8(0xF);
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for (b, column) in tile.chunks_exact(tile_bytes(Format::Q4K)).enumerate() {
            let p = column.as_ptr();
            for h in 0..2 {
                let mut isum = [_mm256_setzero_si256(); R];
                for s in 0..8 {
                    let mut sub = [_mm256_setzero_si256(); R];
                    for pair in 0..4 {
                        // SAFETY: as in `q4k_vnni`, for one half.
                        unsafe {
                            if h == 0 {
                                ahead(p, tile_bytes(Format::Q4K), 4 * s + pair, 32);
                            }
                            let raw = _mm256_loadu_si256(
                                p.add(320 + 256 * s + 64 * pair + 32 * h).cast(),
                            );
                            let lo = _mm256_and_si256(raw, low);
                            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), low);
                            for r in 0..R {
                                let xp = x[r][b].qs.as_ptr().add(32 * s + 8 * pair);
                                let a = D::dot4(lo, _mm256_set1_epi32(quad(xp)));
                                let c = D::dot4(hi, _mm256_set1_epi32(quad(xp.add(4))));
                                sub[r] = _mm256_add_epi32(sub[r], _mm256_add_epi32(a, c));
                            }
                        }
                    }
                    // SAFETY: this half's scales of sub-block s are 8 bytes.
                    let sc = unsafe { bytes8(p.add(64 + 16 * s + 8 * h)) };
                    for r in 0..R {
                        isum[r] = _mm256_add_epi32(isum[r], _mm256_mullo_epi32(sub[r], sc));
                    }
                }
                // Σ min · Σx, two sub-blocks per `vpmaddwd` (see `q4k_vnni`).
                let mins: [__m256i; 4] = std::array::from_fn(|q| {
                    // SAFETY: this half's mins of sub-blocks 2q and 2q + 1 are 8 bytes each.
                    let (even, odd) = unsafe {
                        (
                            bytes8(p.add(192 + 32 * q + 8 * h)),
                            bytes8(p.add(208 + 32 * q + 8 * h)),
                        )
                    };
                    halves(even, odd)
                });
                // SAFETY: the column starts with 16 f16 scales, then 16 f16 mins.
                let (d, dmin) = unsafe { (scales8(p.add(16 * h)), scales8(p.add(32 + 16 * h))) };
                for r in 0..R {
                    let sums = &x[r][b].sums;
                    let sum = |s: usize| sums[2 * s] + sums[2 * s + 1];
                    let imin = pair_dots(&mins, |q| (sum(2 * q), sum(2 * q + 1)));
                    let dx = _mm256_set1_ps(x[r][b].d);
                    let a = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(isum[r]),
                        _mm256_mul_ps(d, dx),
                        acc[r][h],
                    );
                    acc[r][h] =
                        _mm256_fnmadd_ps(_mm256_cvtepi32_ps(imin), _mm256_mul_ps(dmin, dx), a);
                }
            }
        }
        store8(acc)
    }
}

/// 16 rows of Q6_K tiles · R activation rows, as two halves of eight rows (see [`q6k_vnni`]).
///
/// # Safety
/// As [`q8_0_256`].
// The inner blocks keep their own SAFETY notes; the outer one covers the intrinsics, whose
// features the entry points enable.
#[allow(unused_unsafe)]
#[inline(always)]
unsafe fn q6k_256<D: Dot4, const R: usize>(tile: &[u8], x: [&[Act256]; R]) -> [[f32; ROWS]; R] {
    // SAFETY: called only from the entry points, which enable AVX2, FMA and F16C (and AVX-VNNI
    // for its instance).
    unsafe {
        let (low, top) = (_mm256_set1_epi8(0xF), _mm256_set1_epi8(0x30));
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for (b, column) in tile.chunks_exact(tile_bytes(Format::Q6K)).enumerate() {
            let p = column.as_ptr();
            for h in 0..2 {
                let mut total = [_mm256_setzero_si256(); R];
                for j in 0..16 {
                    // SAFETY: as in `q6k_vnni`, for one half.
                    let w = unsafe {
                        if h == 0 {
                            ahead(p, tile_bytes(Format::Q6K), j, 16);
                        }
                        let (lo, hi) = (Q6K_LOW + 128 * j + 32 * h, Q6K_HIGH + 64 * j + 32 * h);
                        let a = _mm256_loadu_si256(p.add(lo).cast());
                        let c = _mm256_loadu_si256(p.add(lo + 64).cast());
                        let t = _mm256_loadu_si256(p.add(hi).cast());
                        [
                            _mm256_or_si256(
                                _mm256_and_si256(a, low),
                                _mm256_and_si256(_mm256_slli_epi16::<4>(t), top),
                            ),
                            _mm256_or_si256(
                                _mm256_and_si256(_mm256_srli_epi16::<4>(a), low),
                                _mm256_and_si256(_mm256_slli_epi16::<2>(t), top),
                            ),
                            _mm256_or_si256(_mm256_and_si256(c, low), _mm256_and_si256(t, top)),
                            _mm256_or_si256(
                                _mm256_and_si256(_mm256_srli_epi16::<4>(c), low),
                                _mm256_and_si256(_mm256_srli_epi16::<2>(t), top),
                            ),
                        ]
                    };
                    // SAFETY: this half's eight scales of sub-block j are bytes of the column.
                    let sc = unsafe {
                        _mm256_cvtepi8_epi32(_mm_loadl_epi64(
                            p.add(Q6K_SCALES + 16 * j + 8 * h).cast(),
                        ))
                    };
                    for r in 0..R {
                        let xp = x[r][b].qs.as_ptr();
                        // SAFETY: values 16j..16j + 16 of the activation block; 0..64 · −127..=127
                        // summed in pairs stays inside `vpmaddubsw`'s 16 bits.
                        let sub = unsafe {
                            let q = |i: usize| _mm256_set1_epi32(quad(xp.add(16 * j + 4 * i)));
                            _mm256_add_epi32(
                                _mm256_add_epi32(D::dot4(w[0], q(0)), D::dot4(w[1], q(1))),
                                _mm256_add_epi32(D::dot4(w[2], q(2)), D::dot4(w[3], q(3))),
                            )
                        };
                        total[r] = _mm256_add_epi32(total[r], _mm256_mullo_epi32(sub, sc));
                    }
                }
                // The offset of 32, two sub-blocks per `vpmaddwd` (see `q6k_vnni`).
                let pairs: [__m256i; 8] = std::array::from_fn(|q| {
                    // SAFETY: this half's eight scales of sub-blocks 2q and 2q + 1 are bytes of
                    // the column.
                    let at = unsafe { p.add(Q6K_SCALES + 32 * q + 8 * h) };
                    let (even, odd) = unsafe {
                        (
                            _mm256_cvtepi8_epi32(_mm_loadl_epi64(at.cast())),
                            _mm256_cvtepi8_epi32(_mm_loadl_epi64(at.add(16).cast())),
                        )
                    };
                    halves(even, odd)
                });
                // SAFETY: the column starts with 16 f16 scales.
                let d = unsafe { scales8(p.add(16 * h)) };
                for r in 0..R {
                    let sums = &x[r][b].sums;
                    let offset = pair_dots(&pairs, |q| (sums[2 * q], sums[2 * q + 1]));
                    let exact = _mm256_sub_epi32(total[r], _mm256_slli_epi32::<5>(offset));
                    let scale = _mm256_mul_ps(d, _mm256_set1_ps(x[r][b].d));
                    acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(exact), scale, acc[r][h]);
                }
            }
        }
        store8(acc)
    }
}

/// Two vectors of 32-bit lanes (each value within 16 signed bits) as one of 16-bit pairs: `even`
/// in each lane's low half, `odd` in its high half, for [`pair_dots`].
#[inline(always)]
fn halves(even: __m256i, odd: __m256i) -> __m256i {
    // SAFETY: AVX2 is part of every caller's features.
    unsafe {
        _mm256_or_si256(
            _mm256_and_si256(even, _mm256_set1_epi32(0xFFFF)),
            _mm256_slli_epi32::<16>(odd),
        )
    }
}

/// `Σ_q even_q · a_q + odd_q · b_q` per lane, where `pairs[q]` holds the lanes' (even, odd)
/// 16-bit pairs ([`halves`]) and `(a_q, b_q) = sums(q)`: one exact `vpmaddwd` per pair.
#[inline(always)]
fn pair_dots<const N: usize>(pairs: &[__m256i; N], sums: impl Fn(usize) -> (i16, i16)) -> __m256i {
    // SAFETY: AVX2 is part of every caller's features.
    let mut acc = unsafe { _mm256_setzero_si256() };
    for (q, &pair) in pairs.iter().enumerate() {
        let (a, b) = sums(q);
        let both = i32::from(a as u16) | (i32::from(b) << 16);
        // SAFETY: AVX2 is part of every caller's features.
        acc = unsafe { _mm256_add_epi32(acc, _mm256_madd_epi16(pair, _mm256_set1_epi32(both))) };
    }
    acc
}

/// Two eight-lane halves per activation row, as 16 floats.
#[inline(always)]
fn store8<const R: usize>(acc: [[__m256; 2]; R]) -> [[f32; ROWS]; R] {
    let mut out = [[0f32; ROWS]; R];
    for r in 0..R {
        for h in 0..2 {
            // SAFETY: eight writable floats; AVX is part of every caller's features.
            unsafe { _mm256_storeu_ps(out[r].as_mut_ptr().add(8 * h), acc[r][h]) };
        }
    }
    out
}
