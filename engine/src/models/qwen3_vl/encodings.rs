//! The vision tower's recent outputs, by the pixels they came from. A chat resends its images
//! with every turn and `n` choices each prepare the same prompt: without this, each runs the
//! tower again (seconds per image on a CPU) before the prefix cache is even asked.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::Encoded;
use crate::Result;

/// Recent encodings within a byte budget, least recently used dropped first. Requests for an
/// image being encoded wait for it instead of encoding it again.
pub struct Encodings {
    entries: Mutex<Vec<Entry>>,
    budget: usize,
    reused: AtomicU64,
}

struct Entry {
    key: u64,
    slot: Arc<Mutex<Option<Encoded>>>,
    bytes: usize,
}

impl std::fmt::Debug for Encodings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encodings")
            .field("budget", &self.budget)
            .finish()
    }
}

impl Encodings {
    /// An empty cache holding at most `budget` bytes of encodings.
    pub fn new(budget: usize) -> Self {
        Self {
            entries: Mutex::new(Vec::new()),
            budget,
            reused: AtomicU64::new(0),
        }
    }

    /// The encoding of the image whose pixels hash to `key`: the one kept, or `encode`'s.
    pub fn get_or_encode(
        &self,
        key: u64,
        encode: impl FnOnce() -> Result<Encoded>,
    ) -> Result<Encoded> {
        let slot = self.slot(key);
        // Held while encoding: a second request for the same image waits for this one.
        let mut held = slot.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(done) = held.as_ref() {
            self.reused.fetch_add(1, Ordering::Relaxed);
            return Ok(done.clone());
        }
        let encoded = match encode() {
            Ok(encoded) => encoded,
            Err(e) => {
                drop(held);
                // Nothing to keep: the next request for it tries again.
                let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
                entries.retain(|e| e.key != key || e.bytes > 0);
                return Err(e);
            }
        };
        *held = Some(encoded.clone());
        drop(held);
        self.settle(key, bytes_of(&encoded));
        Ok(encoded)
    }

    /// How many encodings were served from the cache.
    pub fn reused(&self) -> u64 {
        self.reused.load(Ordering::Relaxed)
    }

    /// `key`'s slot, made most recently used (made if absent).
    fn slot(&self, key: u64) -> Arc<Mutex<Option<Encoded>>> {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let entry = match entries.iter().position(|e| e.key == key) {
            Some(at) => entries.remove(at),
            None => Entry {
                key,
                slot: Arc::default(),
                bytes: 0,
            },
        };
        let slot = entry.slot.clone();
        entries.push(entry);
        slot
    }

    /// Records `key`'s size, then drops the least recently used others past the budget.
    fn settle(&self, key: u64, bytes: usize) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = entries.iter_mut().find(|e| e.key == key) {
            entry.bytes = bytes;
        }
        let mut total: usize = entries.iter().map(|e| e.bytes).sum();
        while total > self.budget {
            let Some(at) = entries.iter().position(|e| e.key != key && e.bytes > 0) else {
                break;
            };
            total -= entries.remove(at).bytes;
        }
        if total > self.budget {
            // Larger than the whole budget alone: not kept.
            entries.retain(|e| e.key != key);
        }
    }
}

fn bytes_of(encoded: &Encoded) -> usize {
    std::iter::once(&encoded.embeddings)
        .chain(&encoded.deepstack)
        .map(|t| t.elem_count() * t.dtype().size_in_bytes())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::candle_core::{Device, Tensor};

    /// An encoding of 100 f32 values (400 bytes) filled with `v`.
    fn encoding(v: f32) -> Encoded {
        Encoded {
            embeddings: Tensor::full(v, (10, 10), &Device::Cpu).unwrap(),
            deepstack: Vec::new(),
        }
    }

    #[test]
    fn the_least_recently_used_go_first_past_the_budget() {
        let cache = Encodings::new(1200); // three encodings
        let mut encoded = 0;
        let mut get = |key: u64| {
            cache
                .get_or_encode(key, || {
                    encoded += 1;
                    Ok(encoding(key as f32))
                })
                .unwrap()
        };
        for key in [1, 2, 3] {
            get(key);
        }
        get(1); // 1 is now the most recent; 2 the least
        get(4); // past the budget: 2 goes
        let value = get(3)
            .embeddings
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0];
        assert_eq!(value, 3.0);
        get(2);
        assert_eq!(encoded, 5, "1, 2, 3 and 4 once each, then 2 again");
        // One larger than the whole budget is used but not kept.
        let big = Encodings::new(100);
        let mut runs = 0;
        for _ in 0..2 {
            big.get_or_encode(9, || {
                runs += 1;
                Ok(encoding(9.0))
            })
            .unwrap();
        }
        assert_eq!(runs, 2);
    }
}
