//! Splitting work over rayon's pool when several tasks write disjoint parts of one buffer, and
//! keeping the pool awake through a step of many small parallel kernels.

/// A raw pointer that tasks may share because each writes a disjoint part of the buffer.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut<T>(*mut T);

// SAFETY: tasks only write disjoint elements (each kernel's partition guarantees it), and the
// buffer outlives the scope that spawns them.
unsafe impl<T: Send> Send for SharedMut<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    pub(crate) fn new(slice: &mut [T]) -> Self {
        Self(slice.as_mut_ptr())
    }

    /// The pointer, `offset` elements in.
    ///
    /// # Safety
    /// `offset` is inside the buffer, and no other task touches the elements written through it.
    pub(crate) unsafe fn at(self, offset: usize) -> *mut T {
        // SAFETY: the caller keeps `offset` inside the buffer.
        unsafe { self.0.add(offset) }
    }
}

/// Splits `0..n` into about `parts` ranges of at least `min` elements (a multiple of `align`).
pub(crate) fn ranges(
    n: usize,
    parts: usize,
    min: usize,
    align: usize,
) -> Vec<std::ops::Range<usize>> {
    let size = n
        .div_ceil(parts.max(1))
        .max(min)
        .next_multiple_of(align.max(1));
    (0..n)
        .step_by(size.max(1))
        .map(|s| s..(s + size).min(n))
        .collect()
}

/// How long a kept-awake thread waits for work before it goes back to rayon's own idling (longer
/// than the serial gaps between one decode step's products, short enough that a pause in the
/// step does not burn a CPU).
const AWAKE_FOR: std::time::Duration = std::time::Duration::from_millis(2);

thread_local! {
    /// Whether this thread is running a [`keep_awake`] call's work or one of its wakeful waits.
    static AWAKE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `work` (a step of many short parallel kernels with serial work between them, such as one
/// decode step) on a thread of the current rayon pool while the pool's other threads wait for
/// its parallel parts awake instead of asleep. Between two kernels rayon's idle threads spin for
/// tens of microseconds and then sleep on a futex; a decode step's serial gaps are longer, so
/// every product began with a wake-up: about an eighth of a Qwen3-0.6B decode step went to
/// futex wake-ups and sleeps on a 2-vCPU VM. The threads kept awake return to rayon once `work`
/// is done or after [`AWAKE_FOR`] without work.
pub fn keep_awake<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    let done = std::sync::atomic::AtomicBool::new(false);
    rayon::scope(|s| {
        if AWAKE.get() {
            // Already inside one: its threads are awake.
            return work();
        }
        for _ in 1..rayon::current_num_threads() {
            let done = &done;
            s.spawn(move |_| wait_awake(done));
        }
        /// Sets `done` however `work` ends (a panic too), or the scope would wait for the
        /// waiting threads forever.
        struct Done<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::Release);
                AWAKE.set(false);
            }
        }
        AWAKE.set(true);
        let _done = Done(&done);
        work()
    })
}

/// Takes the pool's pending jobs until `done`, or until [`AWAKE_FOR`] passes without one.
fn wait_awake(done: &std::sync::atomic::AtomicBool) {
    // A thread that is already awake for a call (its own work waiting inside a join picked this
    // up, or another call's wait did) must not wait here: two calls' work could each end up
    // beneath the other's wait, and neither would finish.
    if AWAKE.get() {
        return;
    }
    AWAKE.set(true);
    let mut idle_since = None;
    while !done.load(std::sync::atomic::Ordering::Acquire) {
        if let Some(rayon::Yield::Executed) = rayon::yield_now() {
            idle_since = None;
            continue;
        }
        let since = *idle_since.get_or_insert_with(std::time::Instant::now);
        if since.elapsed() > AWAKE_FOR {
            break;
        }
        std::hint::spin_loop();
    }
    AWAKE.set(false);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::{keep_awake, ranges};
    use rayon::prelude::*;

    /// Work shaped like a decode step: parallel sums with serial gaps between them.
    fn step(seed: u64) -> u64 {
        let mut total = seed;
        for round in 0..50u64 {
            total += (0..10_000u64)
                .into_par_iter()
                .map(|i| i ^ round)
                .sum::<u64>();
            std::hint::black_box((0..2_000).fold(total, |a, b| a.wrapping_mul(31) ^ b));
        }
        total
    }

    #[test]
    fn awake_work_returns_its_result_from_inside_and_outside_the_pool() {
        let want = step(7);
        assert_eq!(keep_awake(|| step(7)), want);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        assert_eq!(pool.install(|| keep_awake(|| step(7))), want);
        // Nested: the inner call runs inside the outer one's awake threads.
        assert_eq!(pool.install(|| keep_awake(|| keep_awake(|| step(7)))), want);
    }

    #[test]
    fn concurrent_awake_calls_on_one_pool_all_finish() {
        // Several callers' steps and waits interleave on the same threads: none may end up
        // waiting beneath another's wait forever.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let results: Vec<u64> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..12u64)
                .map(|i| {
                    let pool = &pool;
                    s.spawn(move || pool.install(|| keep_awake(|| step(i))))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let want: Vec<u64> = (0..12).map(step).collect();
        assert_eq!(results, want);
    }

    #[test]
    fn a_panic_in_awake_work_reaches_the_caller_and_the_pool_recovers() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.install(|| keep_awake(|| -> u64 { panic!("model failed") }))
        }));
        assert!(caught.is_err());
        assert_eq!(pool.install(|| keep_awake(|| step(3))), step(3));
    }

    #[test]
    fn ranges_cover_everything_once() {
        for (n, parts, min, align) in [(0, 4, 1, 1), (10, 3, 1, 1), (100, 8, 16, 16), (7, 64, 1, 4)]
        {
            let r = ranges(n, parts, min, align);
            let flat: Vec<usize> = r.iter().flat_map(|r| r.clone()).collect();
            assert_eq!(
                flat,
                (0..n).collect::<Vec<_>>(),
                "{n} {parts} {min} {align}"
            );
        }
    }
}

/// The most bytes a thread's scratch buffer keeps between calls beyond what its last call used:
/// one 128k-token prefill gathered hundreds of MiB into each pool thread's buffers, held until
/// the process ended.
const KEEP_BYTES: usize = 8 << 20;

/// Gives back `buf`'s memory past what its last use took, when it holds more than
/// [`KEEP_BYTES`] and more than four times that use (a smaller call after a long one).
pub(crate) fn trim<T>(buf: &mut Vec<T>) {
    let bytes = buf.capacity() * std::mem::size_of::<T>();
    if bytes > KEEP_BYTES && buf.capacity() > 4 * buf.len() {
        buf.shrink_to(buf.len());
    }
}

#[cfg(test)]
mod trim_tests {
    /// A buffer a long call grew is given back after a short one; a small one is kept, and so
    /// is one the short call still mostly uses.
    #[test]
    fn scratch_past_its_use_is_given_back() {
        let mut big: Vec<f32> = vec![0.0; 16 << 20];
        big.truncate(1000);
        super::trim(&mut big);
        assert!(big.capacity() < 1 << 20, "{}", big.capacity());
        let mut small: Vec<f32> = Vec::with_capacity(1 << 20);
        super::trim(&mut small);
        assert_eq!(small.capacity(), 1 << 20);
        let mut used: Vec<f32> = vec![0.0; 16 << 20];
        used.truncate(8 << 20);
        super::trim(&mut used);
        assert!(used.capacity() >= 16 << 20);
    }
}
