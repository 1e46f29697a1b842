//! `y = x Wᵀ` for bf16 weights on Intel AMX (Sapphire Rapids and later): prefill's products on the
//! tile unit, which multiplies 16 × 32 bf16 by 32 × 16 bf16 into 16 × 16 f32 sums per
//! instruction, an order of magnitude more arithmetic per cycle than AVX-512's FMA ports.
//!
//! The weight rows are the tiles' left operand as stored (16 rows × 32 values, each row the next
//! `k` values of one output), so the weights are never repacked; the activations are packed as
//! bf16 into the right operand's pair layout, once per product or once for several ([`Packed`]).
//! The product is taken
//! only when that rounding is exact — every activation already a bf16, as in a bf16 model, whose
//! hidden states transformers keeps in bf16 — so it changes only what any GEMM may: the order
//! and rounding of the f32 sums (the tile unit also flushes subnormals, values below ~1e-38, to
//! zero). An f32 activation keeps the f32 GEMM (a bf16 vision tower rounds its inputs first, as
//! transformers' bf16 tower has them).
//!
//! The tiles compute `(x Wᵀ)ᵀ` a 32 × 32 block at a time (two weight tiles by two activation
//! tiles, four accumulators), written back transposed — or as they are, for a caller that wants
//! `W xᵀ` (attention's scores and its probabilities times its values:
//! [`Packed::transposed_into`]).

use std::arch::asm;
use std::arch::x86_64::__m512;
use std::cell::RefCell;
use std::ops::Range;
use std::sync::OnceLock;

use half::bf16;
use rayon::prelude::*;

use crate::parallel::{ranges, SharedMut};
use crate::stacked::StackedRows;

/// Rows of a tile, and output rows or columns per accumulator.
const ROWS: usize = 16;
/// bf16 values per tile row (64 bytes): the depth one instruction sums over.
const DEPTH: usize = 32;
/// Outputs (and activation rows) per block: two tiles.
const BLOCK: usize = 2 * ROWS;
/// bf16 values in one packed activation tile.
const TILE: usize = ROWS * DEPTH;

/// Whether the CPU has AMX-BF16 and the kernel lets this process use the tile state (Linux asks
/// each process to request it; detected once).
pub(crate) fn detected() -> bool {
    static AMX: OnceLock<bool> = OnceLock::new();
    *AMX.get_or_init(|| cpu_has_amx() && tile_data_permitted())
}

/// CPUID leaf 7: AMX-BF16 (EDX bit 22) and AMX-TILE (bit 24).
fn cpu_has_amx() -> bool {
    let leaf = std::arch::x86_64::__cpuid_count(7, 0);
    leaf.edx & (1 << 22) != 0 && leaf.edx & (1 << 24) != 0
}

/// Asks Linux for the tile data state (`ARCH_REQ_XCOMP_PERM`, `XFEATURE_XTILEDATA`); without it
/// the first tile instruction kills the process. Granted to the whole process.
fn tile_data_permitted() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with integer arguments changes nothing but this permission.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

/// Whether the tile unit runs here (the level allows it) and takes products of depth `k`.
pub(crate) fn takes(k: usize) -> bool {
    crate::Level::current() >= crate::Level::Amx && k > 0 && k.is_multiple_of(DEPTH)
}

/// Where a product runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Split {
    /// Over rayon's pool.
    Pool,
    /// On the calling thread alone: for a caller inside a pool task that holds thread-local
    /// buffers, which a nested parallel call could re-enter by running another of its tasks
    /// while it waits.
    Here,
}

/// `out[m × n] = x[m × k] · w[n × k]ᵀ` on the tile unit, when the level allows it, `k` is a whole
/// number of tile rows and every activation is a bf16; false (nothing written) otherwise.
pub(crate) fn matmul(
    x: &[f32],
    w: StackedRows<'_, bf16>,
    (m, k, n): (usize, usize, usize),
    out: &mut [f32],
    split: Split,
) -> bool {
    let Some(packed) = Packed::new(x, (m, k), split) else {
        return false;
    };
    packed.times_stacked(w, n, out, split);
    true
}

/// Activations packed once for the tiles, for several products against different weights.
pub(crate) struct Packed {
    tiles: Vec<bf16>,
    m: usize,
    k: usize,
}

impl Packed {
    /// `x` (`m × k`) packed, when the level allows the tiles, `k` is a whole number of tile rows
    /// and every value is a bf16; `None` otherwise.
    pub(crate) fn new(x: &[f32], (m, k): (usize, usize), split: Split) -> Option<Self> {
        if !takes(k) {
            return None;
        }
        let tiles = pack(x, m, k, split)?;
        Some(Self { tiles, m, k })
    }

    /// `x` (`m × k`, bf16 already) packed, when the level allows the tiles and `k` is a whole
    /// number of tile rows; `None` otherwise. On the calling thread.
    pub(crate) fn from_bf16(x: &[bf16], (m, k): (usize, usize)) -> Option<Self> {
        if !takes(k) {
            return None;
        }
        assert_eq!(x.len(), m * k, "activations are not {m} × {k}");
        let mut tiles = vec![bf16::ZERO; packed_len(m, k)];
        for (tiles, rows) in tiles.chunks_mut(k / DEPTH * TILE).zip(x.chunks(ROWS * k)) {
            for (i, row) in rows.chunks_exact(k).enumerate() {
                for (p, pair) in row.chunks_exact(2).enumerate() {
                    let at = pair_at(p, i);
                    tiles[at..at + 2].copy_from_slice(pair);
                }
            }
        }
        Some(Self { tiles, m, k })
    }

    /// `out[m × n] = x · wᵀ` for `n` rows stacked from parts.
    pub(crate) fn times_stacked(
        &self,
        w: StackedRows<'_, bf16>,
        n: usize,
        out: &mut [f32],
        split: Split,
    ) {
        assert_eq!(out.len(), self.m * n, "output is not {} × {n}", self.m);
        let out = Out::Product(SharedMut::new(out), n);
        // SAFETY: `new` checked the level (AMX, permission granted) and packed `m × k`; `out`
        // is `m × n` and this call's alone.
        unsafe { run(&self.tiles, w, self.m, self.k, n, out, split) };
    }

    /// `y[at + j·stride + i] = (w · xᵀ)[j][i]` for the `n` rows `j` of `w` and the first `m`
    /// rows `i` of `x` (at most all): the product transposed, as the tiles hold it, so nothing
    /// is transposed on the way out; written into rows `stride` apart (a head's columns of a
    /// wider output, say).
    ///
    /// # Safety
    /// Rows `at + j·stride`, `j < n`, of `m` values each lie inside `y`, and nothing else
    /// writes them meanwhile.
    pub(crate) unsafe fn transposed_into(
        &self,
        (w, n): (&[bf16], usize),
        m: usize,
        y: SharedMut<f32>,
        (at, stride): (usize, usize),
        split: Split,
    ) {
        assert!(m <= self.m, "{m} rows of {} packed", self.m);
        let w = StackedRows::new(std::slice::from_ref(&w), self.k);
        let out = Out::Transposed(y, at, stride);
        // SAFETY: as `times_stacked` (the first `m` rows' blocks are a prefix of the packed
        // ones); the caller's promise for `y`.
        unsafe { run(&self.tiles, w, m, self.k, n, out, split) };
    }

    /// The rows packed.
    pub(crate) fn rows(&self) -> usize {
        self.m
    }
}

/// Where a product's sums go.
#[derive(Clone, Copy)]
enum Out {
    /// `x · wᵀ`, row-major `m × n` (the second field): the accumulators transposed on their way.
    Product(SharedMut<f32>, usize),
    /// `w · xᵀ` as the accumulators hold it: row `j` from the second field, rows the third apart.
    Transposed(SharedMut<f32>, usize, usize),
}

/// The activations as the tiles' right operand: per block of 16 rows and 32 columns, 16 rows of
/// value pairs (`[c / 2][row][c % 2]`), blocks row-block-major; rows padded with zeros to a whole
/// [`BLOCK`]. None when a value is not a bf16 (its low 16 bits are not zero).
fn pack(x: &[f32], m: usize, k: usize, split: Split) -> Option<Vec<bf16>> {
    let mut packed = vec![bf16::ZERO; packed_len(m, k)];
    let (size, rows) = (k / DEPTH * TILE, ROWS * k);
    let exact = match split {
        Split::Pool => (packed.par_chunks_mut(size).zip(x.par_chunks(rows)))
            .all(|(tiles, rows)| pack_rows(rows, k, tiles)),
        Split::Here => (packed.chunks_mut(size).zip(x.chunks(rows)))
            .all(|(tiles, rows)| pack_rows(rows, k, tiles)),
    };
    exact.then_some(packed)
}

/// The packed length of `m × k` activations: rows padded to whole blocks of [`BLOCK`].
fn packed_len(m: usize, k: usize) -> usize {
    m.div_ceil(BLOCK) * 2 * (k / DEPTH) * TILE
}

/// Where pair `p` of row `i` (of 16) lies in its rows' packed tiles: tile `p / 16`, line
/// `p % 16`, the row's two values side by side.
fn pair_at(p: usize, i: usize) -> usize {
    p / (DEPTH / 2) * TILE + p % (DEPTH / 2) * DEPTH + i * 2
}

/// Up to 16 rows of `k` activations into their tiles' pair layout; whether every value was a
/// bf16.
fn pack_rows(rows: &[f32], k: usize, tiles: &mut [bf16]) -> bool {
    if std::arch::is_x86_feature_detected!("avx512bw") {
        // SAFETY: AVX-512BW detected just above (and with it AVX-512F).
        return unsafe { pack_rows_avx512(rows, k, tiles) };
    }
    pack_rows_scalar(rows, k, tiles)
}

/// [`pack_rows`] on vector registers: per depth block, each row's 32 values become 16 pairs (the
/// high halves, which hold a bf16 value exactly) in one register, and the 16 rows' registers,
/// transposed as 32-bit lanes, are the tile's 16 lines of pairs.
///
/// # Safety
/// The CPU has AVX-512F and AVX-512BW.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack_rows_avx512(rows: &[f32], k: usize, tiles: &mut [bf16]) -> bool {
    use std::arch::x86_64::{
        _mm512_and_si512, _mm512_castsi512_ps, _mm512_loadu_si512, _mm512_or_si512,
        _mm512_permutex2var_epi16, _mm512_set1_epi32, _mm512_setzero_ps, _mm512_setzero_si512,
        _mm512_storeu_ps, _mm512_test_epi32_mask,
    };
    let count = rows.len() / k;
    assert!(count <= ROWS && tiles.len() >= k / DEPTH * TILE);
    // Lane j takes 16-bit lane 2j + 1 of the two sources together: value j's high half.
    let odd = std::array::from_fn::<i16, 32, _>(|j| 2 * j as i16 + 1);
    // SAFETY: 64 bytes read from a 64-byte array.
    let high = unsafe { _mm512_loadu_si512(odd.as_ptr().cast()) };
    let low_half = _mm512_set1_epi32(0xffff);
    let mut low = _mm512_setzero_si512();
    for block in 0..k / DEPTH {
        let mut lines = [_mm512_setzero_ps(); ROWS];
        for (i, line) in lines.iter_mut().enumerate().take(count) {
            let at = i * k + block * DEPTH;
            let values = &rows[at..at + DEPTH];
            // SAFETY: two loads of 16 values inside `values`.
            let (a, b) = unsafe {
                (
                    _mm512_loadu_si512(values.as_ptr().cast()),
                    _mm512_loadu_si512(values[ROWS..].as_ptr().cast()),
                )
            };
            low = _mm512_or_si512(low, _mm512_and_si512(_mm512_or_si512(a, b), low_half));
            *line = _mm512_castsi512_ps(_mm512_permutex2var_epi16(a, high, b));
        }
        let out = &mut tiles[block * TILE..(block + 1) * TILE];
        for (p, line) in transposed(lines).into_iter().enumerate() {
            // SAFETY: one line of 32 bf16 (64 bytes) inside the block's tile.
            unsafe { _mm512_storeu_ps(out[p * DEPTH..(p + 1) * DEPTH].as_mut_ptr().cast(), line) };
        }
    }
    _mm512_test_epi32_mask(low, low) == 0
}

/// [`pack_rows`] a value at a time.
fn pack_rows_scalar(rows: &[f32], k: usize, tiles: &mut [bf16]) -> bool {
    let mut low = 0;
    for (i, row) in rows.chunks_exact(k).enumerate() {
        // A pair of values at a time: a tile row holds the two side by side.
        for (p, pair) in row.chunks_exact(2).enumerate() {
            let (a, b) = (pair[0].to_bits(), pair[1].to_bits());
            low |= (a | b) & 0xffff;
            let at = pair_at(p, i);
            tiles[at] = bf16::from_bits((a >> 16) as u16);
            tiles[at + 1] = bf16::from_bits((b >> 16) as u16);
        }
    }
    low == 0
}

/// The tile configuration: palette 1, all eight tiles 16 rows of 64 bytes.
#[repr(C, align(64))]
struct Config {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

static CONFIG: Config = Config {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    bytes_per_row: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

thread_local! {
    /// A pool thread's last block of weight rows, zero-padded to [`BLOCK`] rows (the output's
    /// last columns when `n` is not a whole number of blocks).
    static PADDED: RefCell<Vec<bf16>> = const { RefCell::new(Vec::new()) };
}

/// The product over blocks of output columns, one range per pool thread.
///
/// # Safety
/// The CPU has AMX-BF16 and the process may use the tile state; `packed` is [`pack`]'s layout of
/// `m × k` activations with `k` a multiple of [`DEPTH`]; `w` is `n × k`; `out` holds the `m × n`
/// sums where it says, and nothing else writes there meanwhile.
unsafe fn run(
    packed: &[bf16],
    w: StackedRows<'_, bf16>,
    m: usize,
    k: usize,
    n: usize,
    out: Out,
    split: Split,
) {
    assert!(w.k() == k && w.rows() == n, "weights are not {n} × {k}");
    let part = |cols: Range<usize>| {
        PADDED.with_borrow_mut(|padded| {
            // SAFETY: the caller's promises; this task alone writes columns `cols`.
            unsafe { columns(packed, w, (m, k), cols, padded, out) }
        })
    };
    match split {
        Split::Pool => ranges(n, rayon::current_num_threads(), BLOCK, BLOCK)
            .into_par_iter()
            .for_each(part),
        Split::Here => part(0..n),
    }
}

/// The packed activations one pass over a thread's weight blocks multiplies: they stay in L2
/// (2 MiB a core where AMX runs) while every weight block takes them, instead of streaming from
/// L3 once per block of 32 weights. A vision tower's 3,520 rows of depth 1,024 are 7 MiB packed;
/// chunked, its 1,024 → 3,072 product ran ~1.3x as fast (`cargo bench -p pio-kernels --bench
/// matmul -- --prefill --rows 3520`). The weights are read once per chunk instead; a 512-token
/// prompt's activations at depth 1,024 are one chunk, as before.
const ACTIVATIONS_IN_L2: usize = 1 << 20;

/// The blocks of 32 activation rows, `pairs` in all at depth `k`, in chunks of at most
/// [`ACTIVATIONS_IN_L2`] packed bytes (one block at least).
fn chunks(pairs: usize, k: usize) -> impl Iterator<Item = Range<usize>> {
    let per_chunk = (ACTIVATIONS_IN_L2 / (BLOCK * k * std::mem::size_of::<bf16>())).max(1);
    (0..pairs)
        .step_by(per_chunk)
        .map(move |p| p..(p + per_chunk).min(pairs))
}

/// Four accumulators' sums on whole cache lines. A tile's rows leave and are read back 64 bytes
/// at a time, and on the stack their alignment was whatever the callers' frames left: between two
/// builds that moved it, a bf16 product of a vision tower's shape (3520 × 1024 × 3072) ran 3–8%
/// slower.
#[repr(C, align(64))]
struct Sums([[f32; ROWS * ROWS]; 4]);

/// Columns `cols` of the output, a block of 32 weight rows at a time against every block of 32
/// activation rows.
///
/// # Safety
/// As [`run`]; nothing else writes the columns `cols` meanwhile.
unsafe fn columns(
    packed: &[bf16],
    w: StackedRows<'_, bf16>,
    (m, k): (usize, usize),
    cols: Range<usize>,
    padded: &mut Vec<bf16>,
    y: Out,
) {
    // Two sets: a block's sums leave while the tiles work on the next block's (the stores come
    // after the next block's tile instructions, which the core runs ahead of, not after the
    // products they wait for).
    let mut sums = [
        Sums([[0f32; ROWS * ROWS]; 4]),
        Sums([[0f32; ROWS * ROWS]; 4]),
    ];
    // SAFETY: the CPU has AMX (the caller's promise); the configuration is 64-byte aligned.
    unsafe { asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly)) };
    for pairs in chunks(m.div_ceil(BLOCK), k) {
        for first in cols.clone().step_by(BLOCK) {
            let outputs = (cols.end - first).min(BLOCK);
            let block = first..first + outputs;
            let rows: &[bf16] = match w.contiguous(block.clone()) {
                Some(rows) if outputs == BLOCK => rows,
                // A block past the last whole one, or one across two parts of a stack.
                _ => {
                    padded.clear();
                    w.pieces(block).for_each(|p| padded.extend_from_slice(p));
                    padded.resize(BLOCK * k, bf16::ZERO);
                    padded
                }
            };
            for pair in pairs.clone() {
                let acts = &packed[2 * pair * (k / DEPTH) * TILE..];
                let [Sums(a), Sums(b)] = &mut sums;
                let (now, before) = if pair % 2 == 0 { (a, &*b) } else { (b, &*a) };
                // SAFETY: `rows` holds 32 rows of k values and `acts` two blocks of 16 packed
                // rows (padded to whole blocks); the CPU has AMX and the tiles are configured.
                unsafe { multiply(rows, acts, k, now) };
                if pair > pairs.start {
                    // SAFETY: the block lies in the output's columns `cols` (the caller's
                    // promise).
                    unsafe { put_block(before, y, m, (first, outputs, pair - 1)) };
                }
                if pair + 1 == pairs.end {
                    // SAFETY: as above.
                    unsafe { put_block(now, y, m, (first, outputs, pair)) };
                }
            }
        }
    }
    // SAFETY: as above; leaves the tile state unused again (the kernel then skips saving it).
    unsafe { asm!("tilerelease", options(nostack, nomem)) };
}

/// Weight rows 0-15 and 16-31 of `rows` × activation blocks 0 and 1 of `acts` over the whole
/// depth `k`, into `sums` (accumulators 0-3 = (0, 0), (0, 1), (1, 0), (1, 1)). One asm block:
/// the tile registers hold nothing across blocks that the compiler could not see.
///
/// # Safety
/// The CPU has AMX and the tiles are configured; `k` is a positive multiple of [`DEPTH`];
/// `rows` holds 32 rows of `k` values and `acts` two packed blocks of 16 rows of depth `k`.
unsafe fn multiply(rows: &[bf16], acts: &[bf16], k: usize, sums: &mut [[f32; ROWS * ROWS]; 4]) {
    let depth_blocks = k / DEPTH;
    let (w0, w1) = (rows.as_ptr(), rows[ROWS * k..].as_ptr());
    let (x0, x1) = (acts.as_ptr(), acts[depth_blocks * TILE..].as_ptr());
    let [s0, s1, s2, s3] = sums;
    // SAFETY: every load reads 16 rows of 64 bytes inside `rows` (a row's next 32 values) or
    // one packed tile of `acts`, `depth_blocks` ≥ 1 times; each store writes one array of
    // `sums` (16 rows of 64 bytes). Tiles 0-3 accumulate, 4-7 hold the operands.
    unsafe {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            "2:",
            // Each operand loaded just before its first use: tiles are not renamed, so a load
            // waits for the products still reading its tile, and four loads up front left the
            // unit idle longer (~10% on a loop of L1-resident tiles).
            "tileloadd tmm4, [{w0} + {stride} * 1]",
            "tileloadd tmm6, [{x0} + {row} * 1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tileloadd tmm7, [{x1} + {row} * 1]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tileloadd tmm5, [{w1} + {stride} * 1]",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "add {w0}, 64",
            "add {w1}, 64",
            "add {x0}, 1024",
            "add {x1}, 1024",
            "dec {d}",
            "jnz 2b",
            "tilestored [{s0} + {row} * 1], tmm0",
            "tilestored [{s1} + {row} * 1], tmm1",
            "tilestored [{s2} + {row} * 1], tmm2",
            "tilestored [{s3} + {row} * 1], tmm3",
            w0 = inout(reg) w0 => _,
            w1 = inout(reg) w1 => _,
            x0 = inout(reg) x0 => _,
            x1 = inout(reg) x1 => _,
            d = inout(reg) depth_blocks => _,
            stride = in(reg) k * 2,
            // A packed tile's rows and an accumulator's rows are both 64 bytes.
            row = in(reg) DEPTH * 2,
            s0 = in(reg) s0.as_mut_ptr(),
            s1 = in(reg) s1.as_mut_ptr(),
            s2 = in(reg) s2.as_mut_ptr(),
            s3 = in(reg) s3.as_mut_ptr(),
            out("tmm0") _,
            out("tmm1") _,
            out("tmm2") _,
            out("tmm3") _,
            out("tmm4") _,
            out("tmm5") _,
            out("tmm6") _,
            out("tmm7") _,
            options(nostack)
        );
    }
}

/// The four accumulators of the block of outputs `first..first + outputs` by activation rows
/// `32·pair..` into the output. Accumulator t holds outputs `first + 16·(t / 2) ..` (its rows)
/// for activation rows `32·pair + 16·(t % 2) ..` (its columns).
///
/// # Safety
/// The CPU has AMX (and so AVX-512F); the outputs lie inside the `m × n` output, in columns
/// nothing else writes meanwhile.
#[target_feature(enable = "avx512f")]
unsafe fn put_block(
    sums: &[[f32; ROWS * ROWS]; 4],
    y: Out,
    m: usize,
    (first, outputs, pair): (usize, usize, usize),
) {
    for (t, sum) in sums.iter().enumerate() {
        let (col0, row0) = (first + ROWS * (t / 2), BLOCK * pair + ROWS * (t % 2));
        let cols = (first + outputs).saturating_sub(col0).min(ROWS);
        let rows = m.saturating_sub(row0).min(ROWS);
        if rows == 0 || cols == 0 {
            // Padding only (not even a pointer into the output is formed).
            continue;
        }
        match y {
            // SAFETY: rows row0.. and columns col0.. of the output as far as they exist; the
            // CPU has AVX-512F (the caller's promise).
            Out::Product(y, n) => unsafe { put(sum, y, n, (row0, rows), (col0, cols)) },
            // SAFETY: as above, in the transposed output's rows col0.. and columns row0...
            Out::Transposed(y, at, stride) => unsafe {
                put_as_held(sum, y, (at, stride), (col0, cols), (row0, rows))
            },
        }
    }
}

/// One accumulator as it is held — line `r` is output row `row0 + r`, its 16 values columns
/// `col0..` — into rows `stride` apart from `at`: a store per line, masked to `cols`.
///
/// # Safety
/// The CPU has AVX-512F; `rows ≤ 16` rows `at + (row0 + r)·stride`, `cols ≤ 16` values from
/// `col0` each, lie inside `y` and nothing else writes them meanwhile.
#[target_feature(enable = "avx512f")]
unsafe fn put_as_held(
    sum: &[f32; ROWS * ROWS],
    y: SharedMut<f32>,
    (at, stride): (usize, usize),
    (row0, rows): (usize, usize),
    (col0, cols): (usize, usize),
) {
    use std::arch::x86_64::{__mmask16, _mm512_loadu_ps, _mm512_mask_storeu_ps};
    let mask = (((1u32 << cols) - 1) & 0xffff) as __mmask16;
    for r in 0..rows {
        // SAFETY: `sum` holds 16 lines of 16; the caller's promise for the store, which the mask
        // keeps to `cols` values.
        unsafe {
            let line = _mm512_loadu_ps(sum[ROWS * r..].as_ptr());
            _mm512_mask_storeu_ps(y.at(at + (row0 + r) * stride + col0), mask, line);
        }
    }
}

/// One accumulator (16 outputs × 16 activation rows) into the row-major output: transposed in
/// registers, so that each activation row's outputs leave in one store (a masked one for the
/// last columns) instead of 16 stores a whole output row apart. Every CPU with AMX has
/// AVX-512F. (Gathered into a line in memory first, the store became a call to memcpy per line,
/// a tenth of a bf16 prefill.)
///
/// # Safety
/// The CPU has AVX-512F; `rows` rows from `row0` and `cols ≤ 16` columns from `col0` lie inside
/// the `· × n` output and nothing else writes them meanwhile.
#[target_feature(enable = "avx512f")]
unsafe fn put(
    sum: &[f32; ROWS * ROWS],
    y: SharedMut<f32>,
    n: usize,
    (row0, rows): (usize, usize),
    (col0, cols): (usize, usize),
) {
    use std::arch::x86_64::{__mmask16, _mm512_loadu_ps, _mm512_mask_storeu_ps};
    // SAFETY: `sum` holds 16 lines of 16 values.
    let lines = std::array::from_fn(|i| unsafe { _mm512_loadu_ps(sum[ROWS * i..].as_ptr()) });
    let lines = transposed(lines);
    let mask = (((1u32 << cols) - 1) & 0xffff) as __mmask16;
    for (r, line) in lines.iter().enumerate().take(rows) {
        // SAFETY: the caller's promise; the mask writes only the output's `cols` columns.
        unsafe { _mm512_mask_storeu_ps(y.at((row0 + r) * n + col0), mask, *line) };
    }
}

/// A 16 × 16 block of f32 held as 16 lines, transposed: value pairs, then groups of four, then
/// 128-bit lanes across groups of eight and of sixteen.
#[target_feature(enable = "avx512f")]
fn transposed(r: [__m512; ROWS]) -> [__m512; ROWS] {
    use std::arch::x86_64::{
        _mm512_shuffle_f32x4, _mm512_shuffle_ps, _mm512_unpackhi_ps, _mm512_unpacklo_ps,
    };
    let t: [__m512; ROWS] = std::array::from_fn(|i| {
        let (a, b) = (r[i / 2 * 2], r[i / 2 * 2 + 1]);
        match i % 2 {
            0 => _mm512_unpacklo_ps(a, b),
            _ => _mm512_unpackhi_ps(a, b),
        }
    });
    let u: [__m512; ROWS] = std::array::from_fn(|i| {
        let (g, j) = (i / 4 * 4, i % 4);
        let (a, b) = (t[g + j / 2], t[g + 2 + j / 2]);
        match j % 2 {
            0 => _mm512_shuffle_ps::<0x44>(a, b),
            _ => _mm512_shuffle_ps::<0xee>(a, b),
        }
    });
    let v: [__m512; ROWS] = std::array::from_fn(|i| {
        let (g, j) = (i / 8 * 8, i % 8);
        let (a, b) = (u[g + j % 4], u[g + 4 + j % 4]);
        match j < 4 {
            true => _mm512_shuffle_f32x4::<0x88>(a, b),
            false => _mm512_shuffle_f32x4::<0xdd>(a, b),
        }
    });
    std::array::from_fn(|i| {
        let (a, b) = (v[i % 8], v[8 + i % 8]);
        match i < 8 {
            true => _mm512_shuffle_f32x4::<0x88>(a, b),
            false => _mm512_shuffle_f32x4::<0xdd>(a, b),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_data::{bf16_values, data};

    /// Against f32 sums of the same bf16 values, on shapes with partial blocks of rows and of
    /// outputs, and one of each; skipped where the CPU has no AMX.
    #[test]
    fn tile_products_match_plain_sums() {
        if crate::Level::current() < crate::Level::Amx {
            eprintln!(
                "no AMX at this level ({:?}): skipped",
                crate::Level::current()
            );
            return;
        }
        for (m, k, n) in [
            (1, 32, 1),
            (17, 64, 33),
            (64, 96, 100),
            (50, 1024, 70),
            (33, 32, 200),
            // Three blocks of rows: the sums' two sets each taken more than once.
            (70, 64, 40),
            // A last block of 20 outputs (the second accumulators' lines partial), and of
            // exactly 16 (the second accumulators padding only).
            (40, 64, 52),
            (5, 32, 48),
            // Several chunks of activation rows (the last one partial), each block of weights
            // taken once per chunk.
            (300, 4096, 40),
        ] {
            let x = bf16_values(m * k, 1);
            let w: Vec<bf16> = data(n * k, 2).into_iter().map(bf16::from_f32).collect();
            let parts = [&w[..]];
            for split in [Split::Pool, Split::Here] {
                let mut out = vec![f32::NAN; m * n];
                assert!(
                    matmul(&x, StackedRows::new(&parts, k), (m, k, n), &mut out, split),
                    "{m} × {k} × {n}"
                );
                for i in 0..m {
                    for j in 0..n {
                        let want: f32 = (0..k).map(|c| x[i * k + c] * w[j * k + c].to_f32()).sum();
                        let got = out[i * n + j];
                        assert!(
                            (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "{m}×{k}×{n} {split:?} [{i},{j}]: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// The vector packing writes what the scalar one does, and finds an inexact value as it does.
    #[test]
    fn vector_packing_is_the_scalar_packing() {
        if !std::arch::is_x86_feature_detected!("avx512bw") {
            eprintln!("no AVX-512BW: skipped");
            return;
        }
        for (count, k) in [(1, 32), (16, 32), (5, 96), (16, 128), (11, 64)] {
            let mut x = bf16_values(count * k, 4);
            let depth = k / DEPTH * TILE;
            let (mut scalar, mut vector) = (vec![bf16::ZERO; depth], vec![bf16::ZERO; depth]);
            assert!(pack_rows_scalar(&x, k, &mut scalar));
            // SAFETY: checked above.
            assert!(unsafe { pack_rows_avx512(&x, k, &mut vector) });
            assert_eq!(vector, scalar, "{count} × {k}");
            x[count * k - 1] += 1e-3;
            // SAFETY: as above.
            assert!(
                !unsafe { pack_rows_avx512(&x, k, &mut vector) },
                "{count} × {k}"
            );
        }
    }

    /// Chunks cover every block of activation rows once, in order, within the L2 budget.
    #[test]
    fn activation_chunks_cover_the_rows_within_the_budget() {
        for (pairs, k) in [(1, 32), (110, 1024), (7, 4096), (3, 1 << 20), (0, 64)] {
            let all: Vec<Range<usize>> = chunks(pairs, k).collect();
            let flat: Vec<usize> = all.iter().flat_map(|r| r.clone()).collect();
            assert_eq!(flat, (0..pairs).collect::<Vec<_>>(), "{pairs} × {k}");
            for r in &all {
                let bytes = r.len() * BLOCK * k * 2;
                assert!(
                    r.len() == 1 || bytes <= ACTIVATIONS_IN_L2,
                    "{pairs} × {k}: {r:?}"
                );
            }
        }
        assert_eq!(chunks(110, 1024).next(), Some(0..16));
    }

    /// The register transposition, on any CPU with AVX-512F (AMX or not).
    #[test]
    fn accumulators_transpose_in_registers() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            eprintln!("no AVX-512F: skipped");
            return;
        }
        use std::arch::x86_64::{_mm512_loadu_ps, _mm512_storeu_ps};
        let block: Vec<f32> = (0..ROWS * ROWS).map(|i| i as f32).collect();
        let mut out = vec![0f32; ROWS * ROWS];
        // SAFETY: the CPU has AVX-512F; every load and store is one line of 16 inside the
        // vectors.
        unsafe {
            let lines = std::array::from_fn(|i| _mm512_loadu_ps(block[ROWS * i..].as_ptr()));
            for (i, line) in transposed(lines).iter().enumerate() {
                _mm512_storeu_ps(out[ROWS * i..].as_mut_ptr(), *line);
            }
        }
        for r in 0..ROWS {
            for c in 0..ROWS {
                assert_eq!(out[r * ROWS + c], block[c * ROWS + r], "[{r}][{c}]");
            }
        }
    }

    /// Activations that are not bf16, or a depth that is not whole tile rows, leave the product
    /// to the f32 GEMM and write nothing.
    #[test]
    fn inexact_activations_and_odd_depths_are_declined() {
        let (m, n) = (4, 8);
        let w = vec![bf16::ONE; n * 64];
        let mut out = vec![f32::NAN; m * n];
        let pool = Split::Pool;
        let (all, narrow) = ([&w[..]], [&w[..n * 48]]);
        let (all, narrow) = (StackedRows::new(&all, 64), StackedRows::new(&narrow, 48));
        assert!(!matmul(&data(m * 64, 3), all, (m, 64, n), &mut out, pool));
        let odd = bf16_values(m * 48, 3);
        assert!(!matmul(&odd, narrow, (m, 48, n), &mut out, pool));
        assert!(out.iter().all(|v| v.is_nan()));
    }
}
