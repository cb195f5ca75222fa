//! The KV block pool: which of the `num_blocks` physical blocks are free, who shares each one
//! (reference counts), and which full blocks hold a known prefix (the prefix cache).
//!
//! Invariants:
//! - A block is free (in the free list) exactly when its refcount is 0; otherwise its refcount
//!   is the number of sequences whose block table holds it.
//! - The free list is in LRU order: `allocate` takes from the front, `release` appends at the
//!   back, so recently freed blocks keep their cached content longest.
//! - A block may keep a prefix hash while free. `cached` maps each registered hash to exactly one
//!   block, and that block's `hashes` entry names it back. Allocating a block evicts its hash.
//!   A cached free block that a new sequence hits leaves the free list without losing its hash.
//!
//! Costs: every operation is O(1) (an intrusive doubly linked free list over two `u32`
//! arrays, plus one hash-map probe for cache operations); memory is ~24 bytes per block.

use std::collections::HashMap;

use super::hash::U64HashState;

const NIL: u32 = u32::MAX;

/// The pool of KV blocks, addressed by `u32` ids in `0..num_blocks`.
#[derive(Debug, Clone)]
pub struct BlockPool {
    refcounts: Vec<u32>,
    /// The prefix hash a block holds, if it is (or was, while free) a registered full block.
    hashes: Vec<Option<u64>>,
    /// Registered prefix hash -> the block holding that prefix.
    cached: HashMap<u64, u32, U64HashState>,
    prev: Vec<u32>,
    next: Vec<u32>,
    head: u32,
    tail: u32,
    num_free: usize,
}

impl BlockPool {
    /// A pool with every block free, in id order.
    pub fn new(num_blocks: usize) -> Self {
        assert!(num_blocks < NIL as usize, "block ids are u32");
        let n = num_blocks as u32;
        let prev = (0..n).map(|i| if i == 0 { NIL } else { i - 1 }).collect();
        let next = (0..n)
            .map(|i| if i + 1 == n { NIL } else { i + 1 })
            .collect();
        Self {
            refcounts: vec![0; num_blocks],
            hashes: vec![None; num_blocks],
            cached: HashMap::with_capacity_and_hasher(num_blocks, U64HashState),
            prev,
            next,
            head: if n == 0 { NIL } else { 0 },
            tail: if n == 0 { NIL } else { n - 1 },
            num_free: num_blocks,
        }
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.refcounts.len()
    }

    /// Blocks that `allocate` can hand out (including free blocks that still cache a prefix).
    pub fn num_free(&self) -> usize {
        self.num_free
    }

    /// Blocks held by at least one sequence.
    pub fn num_used(&self) -> usize {
        self.num_blocks() - self.num_free
    }

    /// Sequences holding `block`.
    pub fn refcount(&self, block: u32) -> u32 {
        self.refcounts[block as usize]
    }

    /// The prefix hash `block` holds, if any.
    pub fn block_hash(&self, block: u32) -> Option<u64> {
        self.hashes[block as usize]
    }

    /// Takes the least recently freed block (refcount 1), evicting the prefix it cached.
    /// `None` when no block is free.
    pub fn allocate(&mut self) -> Option<u32> {
        let block = self.head;
        if block == NIL {
            return None;
        }
        self.unlink(block);
        if let Some(hash) = self.hashes[block as usize].take() {
            let removed = self.cached.remove(&hash);
            debug_assert_eq!(removed, Some(block));
        }
        self.refcounts[block as usize] = 1;
        Some(block)
    }

    /// The block caching the prefix `hash`, if any (free or in use).
    pub fn lookup(&self, hash: u64) -> Option<u32> {
        self.cached.get(&hash).copied()
    }

    /// One more sequence shares `block` (a prefix-cache hit). A free cached block leaves the
    /// free list and keeps its hash.
    pub fn acquire(&mut self, block: u32) {
        let rc = &mut self.refcounts[block as usize];
        if *rc == 0 {
            self.unlink(block);
            self.refcounts[block as usize] = 1;
        } else {
            *rc += 1;
        }
    }

    /// One sequence lets go of `block`. At refcount 0 it goes to the back of the free list and
    /// keeps its hash (reusable until evicted).
    ///
    /// Panics if the block is already free: that would be a double free, a bug in the caller.
    pub fn release(&mut self, block: u32) {
        let rc = &mut self.refcounts[block as usize];
        assert!(*rc > 0, "double free of KV block {block}");
        *rc -= 1;
        if *rc == 0 {
            self.push_back(block);
        }
    }

    /// Records that `block` (in use, full, computed) holds the prefix `hash`. Returns false and
    /// changes nothing when that prefix is already cached in another block (two sequences
    /// computed it at once: the second copy stays private and is simply freed later) or when
    /// the block already holds a hash.
    pub fn register(&mut self, block: u32, hash: u64) -> bool {
        debug_assert!(self.refcounts[block as usize] > 0, "register a free block");
        if self.hashes[block as usize].is_some() || self.cached.contains_key(&hash) {
            return false;
        }
        self.hashes[block as usize] = Some(hash);
        self.cached.insert(hash, block);
        true
    }

    /// Free blocks, front (next to allocate) to back.
    pub fn free_blocks(&self) -> impl Iterator<Item = u32> + '_ {
        let mut cur = self.head;
        std::iter::from_fn(move || {
            if cur == NIL {
                return None;
            }
            let b = cur;
            cur = self.next[b as usize];
            Some(b)
        })
    }

    /// Checks the pool's own invariants (free list <-> refcount 0, hash map <-> block hashes).
    /// For tests and debugging: O(num_blocks).
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut seen = vec![false; self.num_blocks()];
        let mut count = 0;
        let mut prev = NIL;
        for b in self.free_blocks() {
            if seen[b as usize] {
                return Err(format!("block {b} twice in the free list"));
            }
            seen[b as usize] = true;
            if self.refcounts[b as usize] != 0 {
                return Err(format!(
                    "free block {b} has refcount {}",
                    self.refcounts[b as usize]
                ));
            }
            if self.prev[b as usize] != prev {
                return Err(format!("free list back link broken at {b}"));
            }
            prev = b;
            count += 1;
        }
        if prev != self.tail {
            return Err("free list tail mismatch".into());
        }
        if count != self.num_free {
            return Err(format!("free count {} but list has {count}", self.num_free));
        }
        for (b, &rc) in self.refcounts.iter().enumerate() {
            if rc == 0 && !seen[b] {
                return Err(format!("block {b} has refcount 0 but is not free"));
            }
        }
        for (&hash, &b) in &self.cached {
            if self.hashes[b as usize] != Some(hash) {
                return Err(format!(
                    "cached hash {hash:x} points at block {b} which disagrees"
                ));
            }
        }
        let hashed = self.hashes.iter().filter(|h| h.is_some()).count();
        if hashed != self.cached.len() {
            return Err(format!(
                "{hashed} hashed blocks but {} cache entries",
                self.cached.len()
            ));
        }
        Ok(())
    }

    fn unlink(&mut self, block: u32) {
        let (p, n) = (self.prev[block as usize], self.next[block as usize]);
        if p == NIL {
            self.head = n;
        } else {
            self.next[p as usize] = n;
        }
        if n == NIL {
            self.tail = p;
        } else {
            self.prev[n as usize] = p;
        }
        self.prev[block as usize] = NIL;
        self.next[block as usize] = NIL;
        self.num_free -= 1;
    }

    fn push_back(&mut self, block: u32) {
        self.prev[block as usize] = self.tail;
        self.next[block as usize] = NIL;
        if self.tail == NIL {
            self.head = block;
        } else {
            self.next[self.tail as usize] = block;
        }
        self.tail = block;
        self.num_free += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_takes_blocks_in_order_and_exhausts() {
        let mut pool = BlockPool::new(3);
        assert_eq!(pool.allocate(), Some(0));
        assert_eq!(pool.allocate(), Some(1));
        assert_eq!(pool.allocate(), Some(2));
        assert_eq!(pool.allocate(), None);
        assert_eq!(pool.num_free(), 0);
        pool.check_invariants().unwrap();
    }

    #[test]
    fn released_blocks_go_to_the_back_of_the_free_list() {
        let mut pool = BlockPool::new(4);
        let a = pool.allocate().unwrap();
        let b = pool.allocate().unwrap();
        pool.release(b);
        pool.release(a);
        assert_eq!(pool.free_blocks().collect::<Vec<_>>(), vec![2, 3, b, a]);
        pool.check_invariants().unwrap();
    }

    #[test]
    fn freed_cached_block_keeps_its_hash_until_reallocated() {
        let mut pool = BlockPool::new(2);
        let a = pool.allocate().unwrap();
        assert!(pool.register(a, 42));
        pool.release(a);
        assert_eq!(pool.lookup(42), Some(a));
        // Block 1 is at the front, so the cached block survives one allocation...
        let b = pool.allocate().unwrap();
        assert_eq!(b, 1);
        assert_eq!(pool.lookup(42), Some(a));
        // ...and is evicted by the next.
        assert_eq!(pool.allocate(), Some(a));
        assert_eq!(pool.lookup(42), None);
        assert_eq!(pool.block_hash(a), None);
        pool.check_invariants().unwrap();
    }

    #[test]
    fn hit_on_a_free_cached_block_takes_it_out_of_the_free_list() {
        let mut pool = BlockPool::new(3);
        let a = pool.allocate().unwrap();
        pool.register(a, 7);
        pool.release(a);
        assert_eq!(pool.num_free(), 3);
        pool.acquire(a);
        assert_eq!(pool.refcount(a), 1);
        assert_eq!(pool.num_free(), 2);
        assert!(!pool.free_blocks().any(|b| b == a));
        assert_eq!(pool.lookup(7), Some(a), "a hit keeps the hash");
        pool.acquire(a);
        assert_eq!(pool.refcount(a), 2);
        pool.release(a);
        pool.release(a);
        assert_eq!(pool.num_free(), 3);
        pool.check_invariants().unwrap();
    }

    #[test]
    fn a_prefix_cached_twice_keeps_the_first_block() {
        let mut pool = BlockPool::new(2);
        let a = pool.allocate().unwrap();
        let b = pool.allocate().unwrap();
        assert!(pool.register(a, 9));
        assert!(!pool.register(b, 9));
        assert_eq!(pool.lookup(9), Some(a));
        assert_eq!(pool.block_hash(b), None);
        pool.check_invariants().unwrap();
    }

    #[test]
    #[should_panic(expected = "double free")]
    fn double_free_panics() {
        let mut pool = BlockPool::new(1);
        let a = pool.allocate().unwrap();
        pool.release(a);
        pool.release(a);
    }
}
