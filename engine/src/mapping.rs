//! Checkpoint files mapped in place: a tensor stored as the model computes with it (a bf16
//! checkpoint loaded in bf16) is the file's own pages in the page cache, not a copy of them.
//! Reading a 4.3 GB checkpoint into fresh memory took 5–9 s on a 2-vCPU VM, nearly all of it the
//! kernel zeroing and faulting in new pages (a copy the page cache already holds); mapping it
//! takes a fraction of that, and workers serving the same files share one copy.
//!
//! candle's CPU tensors own a `Vec`, which their drop hands to the global allocator, and candle
//! has no borrowed storage. So the engine is the global allocator of whatever links it with its
//! default feature `mapped-weights` ([`Allocator`]; without the feature nothing is mapped): the
//! system's, except inside one range of address space reserved for mapped files. A `Vec` over a
//! mapped tensor is, to Rust, an allocation of this allocator, and each byte of a file is handed
//! out once (a tensor asked for again, a tied embedding, is read into memory of its own), so no
//! two `Vec`s share memory and none sees another's writes; the mapping goes when its file and its
//! last tensor have. Growing one copies it out first (weights are never grown).
//!
//! Files are mapped privately: a write to a weight (candle never writes one in place) would copy
//! its page, never reach the file. But the file's changes reach the mapping: one truncated while
//! mapped makes a read of its lost pages a SIGBUS (the worker dies and is restarted, as after any
//! crash), and one rewritten in place at the same length serves the new values, or a mix of old
//! and new, without a word. So checkpoints are replaced by renaming a new file over them, as
//! `pio pull` does; `[model.options] mmap = false` reads every tensor into memory of its own.
//!
//! A range whose mapping fails is never handed out again (an older kernel may have unmapped it
//! first, and the heap may have moved in): freeing a pointer the reservation holds but no tensor
//! claims is the system's.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

/// Address space reserved for mapped files: no memory (`PROT_NONE`, `MAP_NORESERVE`), only
/// addresses, so that one comparison tells a mapped tensor from the heap's allocations.
const RESERVED: usize = 1 << 40;

/// Mappings start on 2 MiB boundaries, where the page cache's large folios can be mapped whole.
const ALIGN: usize = 2 << 20;

/// The page size (4 KiB on x86-64, up to 64 KiB on some arm64 kernels).
fn page() -> usize {
    static PAGE: AtomicUsize = AtomicUsize::new(0);
    match PAGE.load(Ordering::Relaxed) {
        0 => {
            // SAFETY: sysconf reads a constant of the system.
            let size = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(0);
            let size = if size.is_power_of_two() { size } else { 4096 };
            PAGE.store(size, Ordering::Relaxed);
            size
        }
        size => size,
    }
}

thread_local! {
    /// Whether this thread holds the bookkeeping's lock: what it frees then is the bookkeeping's
    /// own heap memory (which may lie in a lost range), never a tensor, and must not take the
    /// lock again.
    static BOOKKEEPING: Cell<bool> = const { Cell::new(false) };
}

/// The reservation's first address, set once; 0 until a file is first mapped.
static BASE: AtomicUsize = AtomicUsize::new(0);

/// The reservation's bookkeeping.
static SPACE: Mutex<Option<Space>> = Mutex::new(None);

/// The process's global allocator: the system's, and the owner of tensors that lie in mapped
/// files (see the module's documentation).
#[derive(Debug)]
pub struct Allocator;

/// What of the reservation is free and what is mapped.
#[derive(Debug)]
struct Space {
    /// Free ranges (start → length), each merged with free neighbours.
    free: BTreeMap<usize, usize>,
    /// Mapped files by start.
    mapped: BTreeMap<usize, Region>,
}

/// One mapped file's range and who still reads it.
#[derive(Debug)]
struct Region {
    size: usize,
    /// Whether its [`MappedFile`] is alive (more tensors may be taken).
    open: bool,
    /// Tensors handed out, live or not: first address → bytes.
    claimed: BTreeMap<usize, usize>,
    /// Tensors alive.
    live: usize,
}

impl Region {
    /// Claims `bytes` at `ptr` for a tensor; false where an earlier claim overlaps them.
    fn claim(&mut self, ptr: usize, bytes: usize) -> bool {
        let before = self.claimed.range(..ptr + bytes).next_back();
        if before.is_some_and(|(&p, &n)| p + n > ptr) {
            return false;
        }
        self.claimed.insert(ptr, bytes);
        self.live += 1;
        true
    }
}

/// Element types a tensor may be mapped as: every bit pattern is a value.
pub(crate) trait Plain: Copy {}
impl Plain for u8 {}
impl Plain for f32 {}
impl Plain for pio_kernels::bf16 {}
impl Plain for pio_kernels::f16 {}

/// One file mapped into the reservation; its tensors outlive it (each holds a reference).
#[derive(Debug)]
pub(crate) struct MappedFile {
    start: usize,
    len: usize,
}

/// The bookkeeping, locked; frees on this thread meanwhile are the heap's.
struct Locked(MutexGuard<'static, Option<Space>>);

impl Drop for Locked {
    fn drop(&mut self) {
        BOOKKEEPING.with(|b| b.set(false));
    }
}

impl std::ops::Deref for Locked {
    type Target = Option<Space>;
    fn deref(&self) -> &Option<Space> {
        &self.0
    }
}

impl std::ops::DerefMut for Locked {
    fn deref_mut(&mut self) -> &mut Option<Space> {
        &mut self.0
    }
}

fn space() -> Locked {
    // A panic cannot leave the maps half-updated in a way that matters more than the panic.
    let guard = SPACE.lock().unwrap_or_else(|e| e.into_inner());
    BOOKKEEPING.with(|b| b.set(true));
    Locked(guard)
}

/// Whether `ptr` lies in the reservation (a mapped tensor, not a heap allocation).
fn reserved(ptr: *const u8) -> bool {
    let base = BASE.load(Ordering::Relaxed);
    base != 0 && (ptr as usize).wrapping_sub(base) < RESERVED
}

/// `size` bytes of address space with no memory behind them (`PROT_NONE`, no commit charge), at
/// `at` (replacing what is mapped there) or where the kernel chooses; `None` where it fails.
///
/// # Safety
/// Nothing may refer to what is mapped at `at..at + size`.
unsafe fn address_space(at: Option<usize>, size: usize) -> Option<usize> {
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    let (addr, flags) = match at {
        Some(at) => (at as *mut libc::c_void, flags | libc::MAP_FIXED),
        None => (std::ptr::null_mut(), flags),
    };
    // SAFETY: an anonymous mapping; the caller vouches for what it replaces.
    let got = unsafe { libc::mmap(addr, size, libc::PROT_NONE, flags, -1, 0) };
    (got != libc::MAP_FAILED).then_some(got as usize)
}

/// The reservation, made on first use; `None` where the address space cannot be had (then
/// nothing is mapped and tensors are read as before).
fn reservation(space: &mut Option<Space>) -> Option<&mut Space> {
    if space.is_none() {
        // SAFETY: at an address of the kernel's choosing, it touches nothing that exists.
        let base = unsafe { address_space(None, RESERVED) }?;
        let first = base.next_multiple_of(ALIGN);
        BASE.store(base, Ordering::Relaxed);
        *space = Some(Space {
            free: BTreeMap::from([(first, base + RESERVED - first)]),
            mapped: BTreeMap::new(),
        });
    }
    space.as_mut()
}

impl Space {
    /// A free range of `size` bytes, taken from the first that is large enough.
    fn take(&mut self, size: usize) -> Option<usize> {
        let (&start, &len) = self.free.iter().find(|(_, &len)| len >= size)?;
        self.free.remove(&start);
        if len > size {
            self.free.insert(start + size, len - size);
        }
        Some(start)
    }

    /// `start..start + len` free again, merged with its free neighbours.
    fn give(&mut self, mut start: usize, mut len: usize) {
        if let Some((&before, &n)) = self.free.range(..start).next_back() {
            if before + n == start {
                self.free.remove(&before);
                (start, len) = (before, n + len);
            }
        }
        if let Some(n) = self.free.remove(&(start + len)) {
            len += n;
        }
        self.free.insert(start, len);
    }
}

/// Ends the claim of the tensor at `ptr` (`file`: of the [`MappedFile`] at `ptr`) on its
/// mapping; false where no tensor lies at `ptr` (heap memory in a lost range: the caller frees
/// it). A tensor's own pages are dropped at once (a layer that stacks two weights into a new one
/// leaves the originals' pages resident otherwise, counted in the worker's memory); the last
/// claim returns the range to the reservation (mapped over with nothing, in one call, so that no
/// other mapping can take it meanwhile).
fn release(ptr: usize, file: bool) -> bool {
    let mut guard = space();
    let Some(space) = guard.as_mut() else {
        return false;
    };
    let Some((&start, region)) = space.mapped.range_mut(..=ptr).next_back() else {
        return false;
    };
    if ptr >= start + region.size {
        return false;
    }
    match file {
        true => region.open = false,
        false => {
            let Some(&bytes) = region.claimed.get(&ptr) else {
                return false;
            };
            region.live = region.live.saturating_sub(1);
            // Only whole pages: the ones at its ends may hold a neighbour's values.
            let page = page();
            let (first, end) = (ptr.next_multiple_of(page), (ptr + bytes) / page * page);
            if end > first {
                // SAFETY: pages of this mapping that only the freed tensor was given; a private
                // file mapping reads the file again where they are touched.
                unsafe {
                    libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_DONTNEED)
                };
            }
        }
    }
    if region.open || region.live > 0 {
        return true;
    }
    let size = region.size;
    space.mapped.remove(&start);
    // A failed remap may leave the file mapped or a hole: the range is lost, never reused.
    // SAFETY: the range is this module's and nothing refers to it any more.
    if unsafe { address_space(Some(start), size) }.is_some() {
        space.give(start, size);
    }
    true
}

impl MappedFile {
    /// The first `len` bytes of `file` (its length), mapped; `None` where they cannot be (no
    /// address space, a file that cannot be mapped): the caller reads the file instead.
    pub(crate) fn map(file: &File, len: usize) -> Option<Self> {
        // Without the feature this module's allocator is not the global one: a `Vec` over
        // mapped pages would be freed by another allocator.
        if len == 0 || !cfg!(feature = "mapped-weights") {
            return None;
        }
        let size = len.checked_next_multiple_of(ALIGN)?;
        let mut guard = space();
        let space = reservation(&mut guard)?;
        let start = space.take(size)?;
        // SAFETY: `start..start + size` is a free range of the reservation, which this module
        // alone maps over. Without a reservation of memory: pages are written only by accident
        // (a write copies one), and a charge of the file's size could fail a large file where
        // overcommit is strict.
        let at = unsafe {
            libc::mmap(
                start as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                0,
            )
        };
        if at == libc::MAP_FAILED {
            // Lost: a kernel before 6.12 unmapped the range before it failed some mappings.
            return None;
        }
        let region = Region {
            size,
            open: true,
            claimed: BTreeMap::new(),
            live: 0,
        };
        space.mapped.insert(start, region);
        Some(Self { start, len })
    }

    /// The `count` values of `T` at byte `offset` of the file as a `Vec` that shares the file's
    /// pages, faulted in now (a load does the reading, not the first request); `None` where they
    /// are not inside the file, not aligned for `T`, overlap ones handed out before, or cannot be
    /// read (the caller reads them from the file, which names the error; before Linux 5.14,
    /// which lacks the prefetch, a read error is a SIGBUS when the values are first used).
    pub(crate) fn values<T: Plain>(&self, offset: usize, count: usize) -> Option<Vec<T>> {
        let bytes = count.checked_mul(std::mem::size_of::<T>())?;
        if offset.checked_add(bytes)? > self.len {
            return None;
        }
        if count == 0 {
            return Some(Vec::new());
        }
        let ptr = self.start + offset;
        if !ptr.is_multiple_of(std::mem::align_of::<T>()) {
            return None;
        }
        let claimed = space()
            .as_mut()
            .and_then(|s| s.mapped.get_mut(&self.start))
            .is_some_and(|region| region.claim(ptr, bytes));
        if !claimed {
            return None;
        }
        let first = ptr - ptr % page();
        // SAFETY: advice over pages of this mapping; it reads the file, changes nothing.
        let populated = unsafe {
            libc::madvise(
                first as *mut libc::c_void,
                ptr + bytes - first,
                libc::MADV_POPULATE_READ,
            )
        };
        // EINVAL: a kernel before 5.14 lacks the advice, and the pages fault in on first use.
        if populated != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
            release(ptr, false);
            return None;
        }
        // SAFETY: `count` values of `T` lie at `ptr`, aligned, inside a private mapping (every
        // bit pattern is a `T`, writes copy the page) that no other `Vec` was given; the
        // allocator owns the reservation, and freeing the `Vec` (through it) ends the claim.
        // (`from_raw_parts` asks for memory from the global allocator's `alloc`: this memory
        // is the global allocator's without passing through `alloc`, which the compiler cannot
        // see and Miri cannot check.)
        Some(unsafe { Vec::from_raw_parts(ptr as *mut T, count, count) })
    }
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        release(self.start, true);
    }
}

// SAFETY: every call outside the reservation is the system allocator's, with the caller's
// promises passed on; inside it, a pointer a tensor claims is one `MappedFile::values` handed
// out, and its claim ends once; any other is the heap's (in a lost range) and goes to it.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's promises.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's promises.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if tensor(ptr) && release(ptr as usize, false) {
            return;
        }
        // SAFETY: a heap allocation, with the caller's promises.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !tensor(ptr) || !claimed(ptr as usize) {
            // SAFETY: a heap allocation, with the caller's promises.
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        // SAFETY: `new_size` is non-zero and fits `layout.align()` (the caller's promises).
        let moved =
            unsafe { System.alloc(Layout::from_size_align_unchecked(new_size, layout.align())) };
        if !moved.is_null() {
            // SAFETY: both ranges are valid for the shorter length and do not overlap.
            unsafe { std::ptr::copy_nonoverlapping(ptr, moved, layout.size().min(new_size)) };
            release(ptr as usize, false);
        }
        moved
    }
}

/// Whether `ptr` may be a tensor's: it lies in the reservation and this thread is not freeing
/// the bookkeeping's own memory.
fn tensor(ptr: *const u8) -> bool {
    reserved(ptr) && !BOOKKEEPING.with(Cell::get)
}

/// Whether a tensor's claim starts at `ptr`.
fn claimed(ptr: usize) -> bool {
    let guard = space();
    let region = guard
        .as_ref()
        .and_then(|s| s.mapped.range(..=ptr).next_back());
    region.is_some_and(|(_, r)| r.claimed.contains_key(&ptr))
}

/// Whether `ptr` lies in a mapped file (for tests that a tensor was mapped, not copied).
#[cfg(test)]
pub(crate) fn is_mapped<T>(ptr: *const T) -> bool {
    reserved(ptr.cast())
}

/// Whether `t`'s values lie in a mapped file (a CPU tensor of f32, bf16 or f16).
#[cfg(test)]
pub(crate) fn holds_mapped(t: &candle_core::Tensor) -> bool {
    use candle_core::{CpuStorage, Storage};
    let (storage, _) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => is_mapped(v.as_ptr()),
        Storage::Cpu(CpuStorage::BF16(v)) => is_mapped(v.as_ptr()),
        Storage::Cpu(CpuStorage::F16(v)) => is_mapped(v.as_ptr()),
        _ => false,
    }
}

/// Whether the mapping that starts at `start` is still mapped.
#[cfg(test)]
fn is_live(start: usize) -> bool {
    space()
        .as_ref()
        .is_some_and(|s| s.mapped.contains_key(&start))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_of(values: &[f32]) -> (tempfile::TempDir, File) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("values");
        let mut f = File::create(&path).unwrap();
        for v in values {
            f.write_all(&v.to_le_bytes()).unwrap();
        }
        drop(f);
        (dir, File::open(&path).unwrap())
    }

    #[test]
    fn mapped_values_are_the_files_and_the_last_one_freed_unmaps_it() {
        let values: Vec<f32> = (0..10_000).map(|i| i as f32 * 0.5).collect();
        let (_dir, file) = file_of(&values);
        let map = MappedFile::map(&file, values.len() * 4).unwrap();
        let start = map.start;
        let a = map.values::<f32>(400, 100).unwrap();
        let b = map.values::<f32>(0, 100).unwrap();
        assert!(is_mapped(a.as_ptr()) && is_mapped(b.as_ptr()));
        assert_eq!(a, values[100..200]);
        assert_eq!(b, values[..100]);
        assert!(!release(start + 4, false), "no tensor starts there");
        drop(map);
        assert!(is_live(start), "tensors keep their file mapped");
        drop(a);
        assert!(is_live(start));
        drop(b);
        assert!(!is_live(start), "the last tensor freed unmaps the file");
    }

    #[test]
    fn a_file_mapped_after_another_is_gone_reads_its_own_values() {
        for round in 0..3 {
            let values: Vec<f32> = (0..5000).map(|i| (i * (round + 2)) as f32).collect();
            let (_dir, file) = file_of(&values);
            let map = MappedFile::map(&file, values.len() * 4).unwrap();
            let start = map.start;
            let tensor = map.values::<f32>(0, values.len()).unwrap();
            drop(map);
            assert_eq!(tensor, values, "round {round}");
            drop(tensor);
            assert!(!is_live(start));
        }
    }

    #[test]
    fn out_of_range_or_misaligned_values_are_declined() {
        let (_dir, file) = file_of(&[1.0; 64]);
        let map = MappedFile::map(&file, 256).unwrap();
        assert!(map.values::<f32>(0, 65).is_none(), "past the file's end");
        assert!(map.values::<f32>(2, 4).is_none(), "not aligned for f32");
        assert!(map.values::<pio_kernels::bf16>(2, 4).is_some());
        assert_eq!(map.values::<f32>(256, 0), Some(Vec::new()));
    }

    #[test]
    fn a_grown_or_written_tensor_leaves_the_file_alone() {
        let values: Vec<f32> = (0..2048).map(|i| i as f32).collect();
        let (dir, file) = file_of(&values);
        let map = MappedFile::map(&file, values.len() * 4).unwrap();
        let start = map.start;
        let mut written = map.values::<f32>(0, 1024).unwrap();
        written[3] = -1.0;
        assert!(
            map.values::<f32>(8, 4).is_none(),
            "no two tensors share memory"
        );
        drop(written);
        // SAFETY: the freed tensor's first page is still mapped (its file is), at the mapping's
        // start; read through the mapping, not through the freed `Vec`.
        let now = unsafe { (map.start as *const f32).add(3).read_volatile() };
        assert_eq!(
            now, 3.0,
            "a freed tensor's pages are dropped, its writes with them"
        );
        assert!(
            map.values::<f32>(0, 4).is_none(),
            "each byte is handed out once"
        );
        let mut grown = map.values::<f32>(4096, 1024).unwrap();
        grown.push(7.0);
        assert!(!is_mapped(grown.as_ptr()), "growing copies the values out");
        assert_eq!(grown[..1024], values[1024..]);
        drop(map);
        assert!(
            !is_live(start),
            "the copied-out tensor released its reference"
        );
        let on_disk = std::fs::read(dir.path().join("values")).unwrap();
        assert_eq!(on_disk[12..16], 3f32.to_le_bytes());
    }

    #[test]
    fn released_ranges_merge_and_are_taken_again() {
        let mut space = Space {
            free: BTreeMap::from([(0, 100)]),
            mapped: BTreeMap::new(),
        };
        let mut region = Region {
            size: 100,
            open: true,
            claimed: BTreeMap::new(),
            live: 0,
        };
        assert!(region.claim(10, 10) && region.claim(20, 5) && region.claim(0, 10));
        assert!(!region.claim(24, 1) && !region.claim(5, 10) && !region.claim(0, 100));
        let (a, b, c) = (space.take(10), space.take(20), space.take(30));
        assert_eq!((a, b, c), (Some(0), Some(10), Some(30)));
        space.give(10, 20);
        space.give(0, 10);
        assert_eq!(space.free, BTreeMap::from([(0, 30), (60, 40)]));
        space.give(30, 30);
        assert_eq!(space.free, BTreeMap::from([(0, 100)]));
        assert_eq!(space.take(101), None);
    }
}
