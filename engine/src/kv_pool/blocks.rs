//! The block allocator: which blocks of the KV pool are free, which sequences share which, and
//! which full blocks are kept for reuse by content (the prefix cache). Plain data, no tensors.
//!
//! A full block is cached under the hash of its tokens chained with the hash of every block before
//! it, so a hit means the whole prefix matches; the tokens are compared too, so a hash collision
//! can never hand a sequence someone else's keys. Cached blocks that no sequence holds stay
//! resident until a new block is needed and none is free, then go least-recently-used first.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

/// A block's index in the pool.
pub type BlockId = u32;

/// The identity of a full block's content: the chain hash of everything up to its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PrefixHash(pub u64);

impl PrefixHash {
    /// The hash of a block holding `tokens` after the prefix `parent` (`None` for the first).
    pub fn chain(parent: Option<PrefixHash>, tokens: &[u32]) -> Self {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        parent.map(|p| p.0).hash(&mut h);
        tokens.hash(&mut h);
        Self(h.finish())
    }

    /// The chain hashes of every full block of `tokens`.
    pub fn of_blocks(tokens: &[u32], block_size: usize) -> Vec<PrefixHash> {
        let mut parent = None;
        tokens
            .chunks_exact(block_size)
            .map(|block| {
                let h = Self::chain(parent, block);
                parent = Some(h);
                h
            })
            .collect()
    }
}

/// What a cached block holds, checked on every hit.
#[derive(Debug, Clone)]
struct Cached {
    hash: PrefixHash,
    parent: Option<PrefixHash>,
    tokens: Vec<u32>,
}

/// Free, shared and cached blocks of a pool of `total` blocks.
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    /// Sequences holding each block.
    refs: Vec<u32>,
    /// Blocks nobody holds and no cache entry names, taken first.
    free: Vec<BlockId>,
    /// A cached block's content, by block.
    cached: HashMap<BlockId, Cached>,
    /// Cached blocks by content.
    by_hash: HashMap<PrefixHash, BlockId>,
    /// Cached blocks nobody holds, by when they were last released (oldest first).
    idle: BTreeMap<u64, BlockId>,
    /// When each idle block was released (its key in `idle`).
    idle_since: HashMap<BlockId, u64>,
    clock: u64,
}

impl BlockAllocator {
    /// A pool of `total` free blocks.
    pub fn new(total: usize) -> Self {
        Self {
            refs: vec![0; total],
            free: (0..total as BlockId).rev().collect(),
            cached: HashMap::new(),
            by_hash: HashMap::new(),
            idle: BTreeMap::new(),
            idle_since: HashMap::new(),
            clock: 0,
        }
    }

    /// Blocks in the pool.
    pub fn total(&self) -> usize {
        self.refs.len()
    }

    /// Blocks a new sequence could take now: never used, or cached but held by nobody.
    pub fn available(&self) -> usize {
        self.free.len() + self.idle.len()
    }

    /// Blocks held by at least one sequence.
    pub fn in_use(&self) -> usize {
        self.total() - self.available()
    }

    /// Cached blocks (held or idle).
    pub fn cached(&self) -> usize {
        self.cached.len()
    }

    /// A block for one sequence, evicting the least recently used idle cached block when no
    /// block is free; `None` when every block is held.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let block = match self.free.pop() {
            Some(b) => b,
            None => {
                let (_, b) = self.idle.pop_first()?;
                self.idle_since.remove(&b);
                if let Some(c) = self.cached.remove(&b) {
                    self.by_hash.remove(&c.hash);
                }
                b
            }
        };
        self.refs[block as usize] = 1;
        Some(block)
    }

    /// Releases one hold on `block`: a cached block nobody holds becomes idle (reusable by
    /// content until evicted), any other becomes free.
    pub fn release(&mut self, block: BlockId) {
        let refs = &mut self.refs[block as usize];
        if *refs == 0 {
            // Released more often than held (a bug): never hand the block out twice.
            debug_assert!(false, "block {block} released more often than held");
            return;
        }
        *refs -= 1;
        if *refs > 0 {
            return;
        }
        if self.cached.contains_key(&block) {
            self.clock += 1;
            self.idle.insert(self.clock, block);
            self.idle_since.insert(block, self.clock);
        } else {
            self.free.push(block);
        }
    }

    /// Records that full `block` holds `tokens` after the prefix `parent`, under `hash`. When
    /// another block already holds that content, `block` stays private (freed as usual).
    pub fn cache(
        &mut self,
        block: BlockId,
        parent: Option<PrefixHash>,
        tokens: &[u32],
        hash: PrefixHash,
    ) {
        if self.by_hash.contains_key(&hash) || self.cached.contains_key(&block) {
            return;
        }
        self.by_hash.insert(hash, block);
        self.cached.insert(
            block,
            Cached {
                hash,
                parent,
                tokens: tokens.to_vec(),
            },
        );
    }

    /// The cached blocks that hold the longest prefix of `tokens` whose block hashes are
    /// `hashes` (see [`PrefixHash::of_blocks`]); takes no hold.
    pub fn lookup(&self, tokens: &[u32], hashes: &[PrefixHash]) -> Vec<BlockId> {
        let mut found = Vec::new();
        let mut parent = None;
        for (i, hash) in hashes.iter().enumerate() {
            let Some(&block) = self.by_hash.get(hash) else {
                break;
            };
            let c = &self.cached[&block];
            let size = c.tokens.len();
            if c.parent != parent || tokens.get(i * size..(i + 1) * size) != Some(&c.tokens[..]) {
                break;
            }
            found.push(block);
            parent = Some(*hash);
        }
        found
    }

    /// Sequences holding `block`.
    pub fn holders(&self, block: BlockId) -> u32 {
        self.refs[block as usize]
    }

    /// Takes a hold on a cached block found by [`lookup`](Self::lookup).
    pub fn share(&mut self, block: BlockId) {
        let refs = &mut self.refs[block as usize];
        if *refs == 0 {
            if let Some(since) = self.idle_since.remove(&block) {
                self.idle.remove(&since);
            }
        }
        *refs += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_handed_out_once_and_come_back() {
        let mut a = BlockAllocator::new(3);
        let got: Vec<_> = (0..3).map(|_| a.allocate().unwrap()).collect();
        assert_eq!(a.available(), 0);
        assert!(a.allocate().is_none(), "every block is held");
        let mut sorted = got.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 3, "no block handed out twice");
        a.release(got[1]);
        assert_eq!(a.available(), 1);
        assert_eq!(a.allocate(), Some(got[1]));
        for b in got {
            a.release(b);
        }
        assert_eq!((a.available(), a.in_use()), (3, 0));
    }

    #[test]
    fn a_cached_prefix_is_found_shared_and_survives_its_owner() {
        let mut a = BlockAllocator::new(4);
        let tokens: Vec<u32> = (0..10).collect();
        let hashes = PrefixHash::of_blocks(&tokens, 4);
        assert_eq!(hashes.len(), 2, "only full blocks are hashed");
        let (b0, b1) = (a.allocate().unwrap(), a.allocate().unwrap());
        a.cache(b0, None, &tokens[..4], hashes[0]);
        a.cache(b1, Some(hashes[0]), &tokens[4..8], hashes[1]);
        // Another sequence with the same first 9 tokens finds both blocks.
        assert_eq!(a.lookup(&tokens[..9], &hashes), vec![b0, b1]);
        a.share(b0);
        a.share(b1);
        // The owner finishes: the blocks stay held by the sharer.
        a.release(b0);
        a.release(b1);
        assert_eq!(a.in_use(), 2);
        // The sharer finishes too: idle, still found, and counted as available.
        a.release(b0);
        a.release(b1);
        assert_eq!((a.in_use(), a.available()), (0, 4));
        assert_eq!(a.lookup(&tokens, &hashes), vec![b0, b1]);
        // A different second block matches only the first.
        let other: Vec<u32> = (0..4).chain(100..104).collect();
        assert_eq!(
            a.lookup(&other, &PrefixHash::of_blocks(&other, 4)),
            vec![b0]
        );
    }

    #[test]
    fn idle_cached_blocks_are_evicted_least_recently_used_first() {
        let mut a = BlockAllocator::new(2);
        let (x, y) = (a.allocate().unwrap(), a.allocate().unwrap());
        let hx = PrefixHash::chain(None, &[1, 2]);
        let hy = PrefixHash::chain(None, &[3, 4]);
        a.cache(x, None, &[1, 2], hx);
        a.cache(y, None, &[3, 4], hy);
        a.release(y);
        a.release(x);
        // y went idle first: it is the one evicted.
        assert_eq!(a.allocate(), Some(y));
        assert!(
            a.lookup(&[3, 4], &[hy]).is_empty(),
            "evicted content is gone"
        );
        assert_eq!(a.lookup(&[1, 2], &[hx]), vec![x]);
        assert_eq!(a.cached(), 1);
    }

    #[test]
    fn a_hash_collision_never_matches_other_tokens() {
        let mut a = BlockAllocator::new(2);
        let b = a.allocate().unwrap();
        let h = PrefixHash::chain(None, &[1, 2]);
        a.cache(b, None, &[1, 2], h);
        // Same hash claimed for other tokens: the token check refuses it.
        assert!(a.lookup(&[9, 9], &[h]).is_empty());
    }
}
