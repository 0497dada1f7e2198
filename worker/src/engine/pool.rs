//! One pool of fixed-size pages for everything an engine keeps per request or per adapter on
//! its device: KV-cache blocks and the weights of resident adapters (S-LoRA's unified paging).
//! A page is one KV block index: in every layer, that block of the key cache and of the value
//! cache. KV pages hold keys and values; an adapter's pages hold its weights, written into the
//! same blocks (`engine::paged`). So memory taken by idle adapters is memory requests can get
//! back, and the pool is the only allocator: it never hands out more pages than it has.

/// What a page is holding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageUse {
    Kv,
    Adapter,
}

/// Pages in use by kind, and the pool's size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PoolUsage {
    pub capacity: usize,
    pub kv: usize,
    pub adapter: usize,
}

impl PoolUsage {
    pub fn free(&self) -> usize {
        self.capacity - self.kv - self.adapter
    }
}

#[derive(Debug)]
pub struct PagePool {
    free: Vec<u32>,
    usage: PoolUsage,
}

impl PagePool {
    pub fn new(pages: usize) -> Self {
        PagePool {
            free: (0..pages as u32).rev().collect(),
            usage: PoolUsage { capacity: pages, ..PoolUsage::default() },
        }
    }

    pub fn usage(&self) -> PoolUsage {
        self.usage
    }

    /// `n` pages for `what`, or `None` (and nothing taken) when fewer are free.
    pub fn alloc(&mut self, n: usize, what: PageUse) -> Option<Vec<u32>> {
        if n > self.free.len() {
            return None;
        }
        *self.count(what) += n;
        Some(self.free.split_off(self.free.len() - n))
    }

    /// Gives `pages` (taken for `what`) back.
    pub fn release(&mut self, pages: &[u32], what: PageUse) {
        let count = self.count(what);
        debug_assert!(*count >= pages.len(), "pool: releasing more {what:?} pages than were taken");
        *count -= pages.len();
        self.free.extend_from_slice(pages);
    }

    fn count(&mut self, what: PageUse) -> &mut usize {
        match what {
            PageUse::Kv => &mut self.usage.kv,
            PageUse::Adapter => &mut self.usage.adapter,
        }
    }
}
