//! A weight matrix stacked from parts that lie apart in memory. A layer made of several
//! checkpoint tensors over one input (queries, keys and values; a gate and an up projection)
//! multiplies as one matrix without its parts being copied next to each other, so that each
//! stays where it was loaded: the checkpoint file's mapped pages, shared with the page cache.

use std::ops::Range;

/// Rows of `k` values held as row-major parts, part 0's rows first, then part 1's, and so on.
#[derive(Debug, Clone, Copy)]
pub struct StackedRows<'a, T> {
    parts: &'a [&'a [T]],
    k: usize,
}

impl<'a, T: Copy> StackedRows<'a, T> {
    /// `parts`, each a whole number of rows `k` wide.
    ///
    /// # Panics
    /// When `k` is zero or a part's length is not a multiple of `k` (a caller bug).
    pub fn new(parts: &'a [&'a [T]], k: usize) -> Self {
        assert!(k > 0, "stacked rows of no values");
        for (i, part) in parts.iter().enumerate() {
            assert!(
                part.len().is_multiple_of(k),
                "part {i} holds {} values, not whole rows of {k}",
                part.len()
            );
        }
        Self { parts, k }
    }

    /// The values per row.
    pub fn k(&self) -> usize {
        self.k
    }

    /// The rows of every part together.
    pub fn rows(&self) -> usize {
        self.parts.iter().map(|p| p.len()).sum::<usize>() / self.k
    }

    /// The parts, in order.
    pub fn parts(&self) -> &'a [&'a [T]] {
        self.parts
    }

    /// Row `j`. A comparison and a subtraction per part ahead of it: streamed products ask for
    /// every row, so no division here.
    ///
    /// # Panics
    /// When `j` is not a row.
    #[inline]
    pub fn row(&self, j: usize) -> &'a [T] {
        let mut at = j * self.k;
        for part in self.parts {
            if at < part.len() {
                return &part[at..at + self.k];
            }
            at -= part.len();
        }
        panic!("row {j} of {} stacked rows", self.rows())
    }

    /// Rows `rows` as one slice, where they lie in one part.
    pub fn contiguous(&self, rows: Range<usize>) -> Option<&'a [T]> {
        let mut pieces = self.pieces(rows);
        let one = pieces.next()?;
        pieces.next().is_none().then_some(one)
    }

    /// Rows `rows`, one slice per part they fall in (in order).
    pub fn pieces(&self, rows: Range<usize>) -> impl Iterator<Item = &'a [T]> + '_ {
        let (mut start, end) = (rows.start * self.k, rows.end * self.k);
        let mut first = 0;
        self.parts.iter().filter_map(move |part| {
            let part_start = first;
            first += part.len();
            let (from, to) = (start.max(part_start), end.min(first));
            (from < to).then(|| {
                start = to;
                &part[from - part_start..to - part_start]
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_found_across_parts() {
        let (a, b, c): (Vec<u32>, Vec<u32>, Vec<u32>) =
            ((0..6).collect(), (6..8).collect(), (8..14).collect());
        let parts = [&a[..], &b[..], &[][..], &c[..]];
        let w = StackedRows::new(&parts, 2);
        assert_eq!(w.rows(), 7);
        let all: Vec<u32> = (0..7).flat_map(|j| w.row(j).to_vec()).collect();
        assert_eq!(all, (0..14).collect::<Vec<_>>());
        for start in 0..7 {
            for end in start..=7 {
                let joined: Vec<u32> = w.pieces(start..end).flatten().copied().collect();
                assert_eq!(
                    joined,
                    (2 * start as u32..2 * end as u32).collect::<Vec<_>>()
                );
            }
        }
        assert_eq!(w.contiguous(0..3), Some(&a[..]));
        assert_eq!(w.contiguous(4..6), Some(&c[..4]));
        assert_eq!(w.contiguous(2..4), None, "rows 2 and 3 lie in two parts");
    }

    #[test]
    #[should_panic(expected = "not whole rows")]
    fn a_part_of_partial_rows_is_refused() {
        let a = [1f32; 5];
        StackedRows::new(&[&a[..]], 2);
    }
}
