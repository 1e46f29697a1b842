//! The three primitives every kernel is built from — dot product, `y += a·w` and widening to f32 —
//! for each storage type, in AVX2/FMA (x86-64, chosen at run time) and portable versions.
//!
//! Weights stay in their storage type in memory and are widened in registers: bf16 is the top
//! half of an f32 (a 16-bit shift), f16 goes through F16C.

/// Portable versions: the fallback, and the reference the SIMD versions are tested against.
pub(crate) mod portable {
    /// Σ x·w with 8 independent partial sums, so the compiler can vectorize it.
    #[inline]
    pub(crate) fn dot<T: Copy>(x: &[f32], w: &[T], widen: impl Fn(T) -> f32) -> f32 {
        let mut acc = [0f32; 8];
        let chunks = x.len() / 8;
        for c in 0..chunks {
            for (j, a) in acc.iter_mut().enumerate() {
                *a += x[c * 8 + j] * widen(w[c * 8 + j]);
            }
        }
        let mut sum: f32 = acc.iter().sum();
        for i in chunks * 8..x.len() {
            sum += x[i] * widen(w[i]);
        }
        sum
    }

    /// A tile of dot products: every activation row of `x` with every weight row of `w`.
    #[inline]
    pub(crate) fn tile<T: Copy, const R: usize, const C: usize>(
        x: [&[f32]; R],
        w: [&[T]; C],
        widen: impl Fn(T) -> f32,
    ) -> [[f32; C]; R] {
        x.map(|x| w.map(|w| dot(x, w, &widen)))
    }

    /// `out[r] += Σₜ p[r][t] · values[offsets[t]..][..d]` for each of the R output rows.
    #[inline]
    pub(crate) fn weighted_sum<T: Copy, const R: usize>(
        p: [&[f32]; R],
        values: &[T],
        offsets: &[usize],
        out: [&mut [f32]; R],
        widen: impl Fn(T) -> f32,
    ) {
        for (p, out) in p.iter().zip(out) {
            for (&pt, &off) in p.iter().zip(offsets) {
                axpy(pt, &values[off..off + out.len()], out, &widen);
            }
        }
    }

    #[inline]
    pub(crate) fn axpy<T: Copy>(a: f32, w: &[T], y: &mut [f32], widen: impl Fn(T) -> f32) {
        for (y, &w) in y.iter_mut().zip(w) {
            *y += a * widen(w);
        }
    }
}

/// The widest instruction set the kernels may use: what the CPU has, capped by the environment
/// variable `PIO_KERNELS` (`portable`, `avx2`, `avxvnni`, `avx512` or `amx`), so that every narrower path
/// can be run and tested on a wider machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Plain Rust, any CPU.
    Portable,
    /// AVX2 and FMA (and F16C for f16).
    Avx2,
    /// AVX2 with AVX-VNNI (Alder Lake and later client CPUs, Zen 5): the quantized products'
    /// integer dot products in one instruction (`vpdpbusd` on 256 bits).
    AvxVnni,
    /// AVX-512F, on top of AVX2.
    Avx512,
    /// AVX-512 with AMX-BF16 tiles (Sapphire Rapids and later) that the kernel lets this process
    /// use: prefill's bf16 products on the tile unit.
    Amx,
}

impl Level {
    /// The level in use: detected once, capped by `PIO_KERNELS`.
    pub fn current() -> Self {
        static LEVEL: std::sync::OnceLock<Level> = std::sync::OnceLock::new();
        *LEVEL.get_or_init(|| Self::capped(Self::detected(), Self::cap(), avx_vnni_detected()))
    }

    /// The level that runs on a CPU of level `detected`, capped at `cap`: an AVX-512 CPU capped
    /// at `avxvnni` without AVX-VNNI itself runs (and reports) AVX2, not a level it lacks.
    fn capped(detected: Self, cap: Self, avx_vnni: bool) -> Self {
        match detected.min(cap) {
            Level::AvxVnni if !avx_vnni => Level::Avx2,
            level => level,
        }
    }

    /// The cap `PIO_KERNELS` sets (unset or empty: the widest; a value that is not UTF-8 names
    /// no level).
    fn cap() -> Self {
        let named = std::env::var_os("PIO_KERNELS").unwrap_or_default();
        Self::cap_named(&named.to_string_lossy())
    }

    /// The cap a `PIO_KERNELS` value sets. A value that names no level caps at the narrowest,
    /// said on stderr: a typo must not quietly test the widest path instead of the one asked for.
    fn cap_named(named: &str) -> Self {
        if named.is_empty() {
            return Level::Amx;
        }
        Self::parse(named).unwrap_or_else(|| {
            eprintln!(
                "PIO_KERNELS={named:?} names no kernel level (portable, avx2, avxvnni, avx512, amx): using portable"
            );
            Level::Portable
        })
    }

    /// The level `name` spells, in any case (`AVX2` is `avx2`).
    pub fn parse(name: &str) -> Option<Self> {
        let name = name.trim().to_ascii_lowercase();
        Self::ALL.into_iter().find(|l| l.name() == name)
    }

    /// Every level, narrowest first.
    const ALL: [Level; 5] = [
        Level::Portable,
        Level::Avx2,
        Level::AvxVnni,
        Level::Avx512,
        Level::Amx,
    ];

    /// Its name, as `PIO_KERNELS` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Level::Portable => "portable",
            Level::Avx2 => "avx2",
            Level::AvxVnni => "avxvnni",
            Level::Avx512 => "avx512",
            Level::Amx => "amx",
        }
    }

    /// The widest level this CPU has (on Linux, finding AMX asks for this process's permission
    /// to use its tiles).
    pub fn detected() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            if avx2 && is_x86_feature_detected!("avx512f") {
                return if amx_detected() {
                    Level::Amx
                } else {
                    Level::Avx512
                };
            }
            if avx2 && is_x86_feature_detected!("avxvnni") {
                return Level::AvxVnni;
            }
            if avx2 {
                return Level::Avx2;
            }
        }
        Level::Portable
    }
}

/// Whether the CPU has AVX-VNNI (the 256-bit form).
fn avx_vnni_detected() -> bool {
    #[cfg(target_arch = "x86_64")]
    return is_x86_feature_detected!("avxvnni");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether the CPU has AMX-BF16 and Linux lets this process use it (only Linux is asked).
#[cfg(target_arch = "x86_64")]
fn amx_detected() -> bool {
    #[cfg(target_os = "linux")]
    return crate::amx::detected();
    #[cfg(not(target_os = "linux"))]
    false
}

/// Whether the AVX2 + FMA paths run (F16C included: every AVX2 CPU has it).
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn has_avx2() -> bool {
    Level::current() >= Level::Avx2
}

/// Whether the F16C path for f16 weights runs.
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn has_f16c() -> bool {
    has_avx2()
}

/// Whether the AVX-VNNI (256-bit) paths of the quantized products run: the level allows them and
/// the CPU has AVX-VNNI (an AVX-512 machine may too; its VNNI paths are tried first).
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn has_avx_vnni() -> bool {
    static AVX_VNNI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    Level::current() >= Level::AvxVnni
        && *AVX_VNNI.get_or_init(|| is_x86_feature_detected!("avxvnni"))
}

/// Whether the AVX-512 paths run.
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn has_avx512() -> bool {
    Level::current() >= Level::Avx512
}

/// Whether the AVX-512 VNNI paths of the quantized products run (AVX-512BW and VNNI beside
/// AVX-512F; capped like the rest by `PIO_KERNELS`).
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn has_vnni() -> bool {
    static VNNI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    has_avx512()
        && *VNNI.get_or_init(|| {
            is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vnni")
        })
}

/// Query heads per value sum at the level in use (four output vectors per head in registers).
pub(crate) fn weighted_rows() -> usize {
    if Level::current() >= Level::Avx512 {
        4
    } else {
        2
    }
}

/// Weight rows per register tile at the level in use (what fits the registers beside four
/// activation rows' accumulators: 16 ymm for AVX2, 32 zmm for AVX-512).
pub(crate) fn tile_cols() -> usize {
    if Level::current() >= Level::Avx512 {
        4
    } else {
        2
    }
}

/// AVX2/FMA instances of every primitive.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;

/// AVX-512F instances of the tile kernel and the value sum.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;

/// The SIMD algorithms, written once over the register type.
#[cfg(target_arch = "x86_64")]
pub(crate) mod vector;

/// Asks memory for the `bytes` of `pool` from element `at` on, every cache line of them (a hint:
/// it never faults, wherever it points; nothing off x86).
#[inline(always)]
pub(crate) fn prefetch<P>(pool: &[P], at: usize, bytes: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let start = pool
            .as_ptr()
            .cast::<i8>()
            .wrapping_add(at * std::mem::size_of::<P>());
        let end = start.wrapping_add(bytes);
        let mut line = start.wrapping_sub(start as usize % 64);
        while line < end {
            // SAFETY: a prefetch is a hint that never faults; SSE is part of x86_64.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(line) };
            line = line.wrapping_add(64);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (pool, at, bytes);
}

#[cfg(test)]
mod tests {
    use super::Level;

    /// CI runs the suite with `PIO_KERNELS` at `avx2`, `avxvnni` and `portable` (and the
    /// operator may set `avx512`): the cap must hold, or those runs would test the widest path
    /// again.
    #[test]
    fn a_pio_kernels_value_caps_by_name_in_any_case_and_a_typo_at_the_narrowest() {
        assert_eq!(Level::cap_named(""), Level::Amx);
        assert_eq!(Level::cap_named("avx2"), Level::Avx2);
        assert_eq!(Level::cap_named("AVX512"), Level::Avx512);
        assert_eq!(Level::cap_named(" AvxVnni "), Level::AvxVnni);
        assert_eq!(Level::cap_named("avx-512"), Level::Portable);
        assert_eq!(Level::cap_named("none"), Level::Portable);
    }

    /// A cap at AVX-VNNI on an AVX-512 CPU without AVX-VNNI runs AVX2 and says so (it reported
    /// `avxvnni` while the AVX2 paths ran).
    #[test]
    fn a_level_the_cpu_lacks_is_not_reported() {
        use Level::*;
        assert_eq!(Level::capped(Avx512, AvxVnni, false), Avx2);
        assert_eq!(Level::capped(Avx512, AvxVnni, true), AvxVnni);
        assert_eq!(Level::capped(Amx, Avx512, false), Avx512);
        assert_eq!(Level::capped(Avx2, Amx, false), Avx2);
    }

    #[test]
    fn pio_kernels_caps_the_level() {
        let cap = Level::cap_named(&std::env::var("PIO_KERNELS").unwrap_or_default());
        let expected = Level::capped(Level::detected(), cap, super::avx_vnni_detected());
        assert_eq!(Level::current(), expected);
        assert!(Level::current() <= cap);
        #[cfg(target_arch = "x86_64")]
        if Level::current() < Level::AvxVnni {
            assert!(
                !super::has_avx_vnni(),
                "AVX-VNNI runs only from its level up"
            );
        }
    }
}
