//! Splitting work over rayon's pool when several tasks write disjoint parts of one buffer.

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

#[cfg(test)]
mod tests {
    use super::ranges;

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
