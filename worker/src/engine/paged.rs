//! Adapters resident in the page pool. All adapters live in host memory (the registry); the
//! ones the engine's batches use are paged in: each layer's weights, flattened and cut into rows
//! of the KV cache's width, are written into the key and value blocks of the adapter's pages in
//! that layer. A running request pins its adapter; unpinned adapters stay resident for the next
//! request (a hit) until the pool needs their pages, least recently used first.
//!
//! On the CPU the registry's copy already lies in the memory the pages stand for: there the pages
//! are taken and given back by the same rule (adapters and requests share the pool alike on
//! every device) but stay unwritten, costing no memory, and batches read the registry's tensors
//! in place.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use tandem_kernels::ops;
use tandem_kernels::{DType, Device, Tensor};

use super::metrics::Buckets;
use super::pool::{PagePool, PageUse};
use crate::adapters::Adapter;
use crate::adapters::registry::AdapterVersion;
use crate::error::{Error, Result};
use crate::model::{KvCache, ModelConfig};

struct Resident {
    version: Arc<AdapterVersion>,
    pages: Vec<u32>,
    /// Running requests (or training steps) using it; a pinned adapter is never evicted.
    pins: usize,
    last_used: u64,
}

/// Hits and misses of [`PagedAdapters::acquire`], and adapters evicted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
}

#[derive(Default)]
pub struct PagedAdapters {
    resident: HashMap<u64, Resident>,
    clock: u64,
    pub stats: CacheStats,
    /// How long paging an adapter's weights into the pool took.
    pub page_ins: Buckets,
}

impl PagedAdapters {
    /// Whether adapter version `id` is in the pool now.
    pub fn is_resident(&self, id: u64) -> bool {
        self.resident.contains_key(&id)
    }

    /// Pins `v`, paging it in first if it is not resident (evicting unpinned adapters, least
    /// recently used first, when the pool is short). `Ok(false)`: it cannot fit now.
    pub fn acquire(&mut self, v: &Arc<AdapterVersion>, pool: &mut PagePool, cache: &mut KvCache) -> Result<bool> {
        self.clock += 1;
        if let Some(r) = self.resident.get_mut(&v.id) {
            r.pins += 1;
            r.last_used = self.clock;
            self.stats.hits += 1;
            return Ok(true);
        }
        let need = pages_in(&v.adapter, cache);
        if !self.make_room(need, pool) {
            return Ok(false);
        }
        self.stats.misses += 1;
        self.page_in(v, need, pool, cache)?;
        if let Some(r) = self.resident.get_mut(&v.id) {
            r.pins = 1;
        }
        Ok(true)
    }

    /// Pages `v` in ahead of need, only into free pages (never evicting); no pin.
    pub fn prefetch(&mut self, v: &Arc<AdapterVersion>, pool: &mut PagePool, cache: &mut KvCache) -> Result<()> {
        let need = pages_in(&v.adapter, cache);
        if !self.resident.contains_key(&v.id) && need <= pool.usage().free() {
            self.clock += 1;
            self.page_in(v, need, pool, cache)?;
        }
        Ok(())
    }

    /// Unpins `id`. A version nobody else holds any more (replaced or removed from the
    /// registry, and no request on it) is evicted at once: it can never be asked for again.
    pub fn release(&mut self, id: u64, pool: &mut PagePool) {
        let Some(r) = self.resident.get_mut(&id) else { return };
        r.pins = r.pins.saturating_sub(1);
        if r.pins == 0 && Arc::strong_count(&r.version) == 1 {
            self.evict(id, pool);
        }
    }

    /// Evicts every unpinned version that nobody else holds (replaced or removed).
    pub fn drop_unused(&mut self, pool: &mut PagePool) {
        let unused: Vec<u64> = self
            .resident
            .iter()
            .filter(|(_, r)| r.pins == 0 && Arc::strong_count(&r.version) == 1)
            .map(|(&id, _)| id)
            .collect();
        for id in unused {
            self.evict(id, pool);
        }
    }

    /// Evicts unpinned adapters, least recently used first, until `n` pages are free.
    /// `false` (having evicted nothing) when that is impossible.
    pub fn make_room(&mut self, n: usize, pool: &mut PagePool) -> bool {
        let free = pool.usage().free();
        if free >= n {
            return true;
        }
        let mut idle: Vec<(u64, u64, usize)> = self
            .resident
            .iter()
            .filter(|(_, r)| r.pins == 0)
            .map(|(&id, r)| (r.last_used, id, r.pages.len()))
            .collect();
        if free + idle.iter().map(|x| x.2).sum::<usize>() < n {
            return false;
        }
        idle.sort_unstable();
        for (_, id, _) in idle {
            if pool.usage().free() >= n {
                break;
            }
            self.evict(id, pool);
        }
        true
    }

    /// The resident version `id`.
    pub fn version(&self, id: u64) -> Option<&Arc<AdapterVersion>> {
        self.resident.get(&id).map(|r| &r.version)
    }

    /// The resident adapter `id` as device tensors: read back from its pages, or on the CPU the
    /// registry's own tensors (shared, not copied).
    pub fn load(&self, id: u64, cache: &KvCache) -> Result<Adapter> {
        let r = self.resident.get(&id).ok_or_else(|| Error::InvalidRequest(format!("adapter {id} is not resident")))?;
        if !pages_hold_weights(cache) {
            return Ok(r.version.adapter.clone());
        }
        read_pages(&r.version.adapter, &r.pages, cache)
    }

    fn page_in(
        &mut self,
        v: &Arc<AdapterVersion>,
        need: usize,
        pool: &mut PagePool,
        cache: &mut KvCache,
    ) -> Result<()> {
        let started = Instant::now();
        let pages =
            pool.alloc(need, PageUse::Adapter).ok_or_else(|| Error::InvalidRequest("page pool is full".into()))?;
        if pages_hold_weights(cache)
            && let Err(e) = write_pages(&v.adapter, &pages, cache)
        {
            pool.release(&pages, PageUse::Adapter);
            return Err(e);
        }
        self.resident.insert(v.id, Resident { version: v.clone(), pages, pins: 0, last_used: self.clock });
        self.page_ins.observe(started.elapsed().as_secs_f64());
        Ok(())
    }

    fn evict(&mut self, id: u64, pool: &mut PagePool) {
        if let Some(r) = self.resident.remove(&id) {
            pool.release(&r.pages, PageUse::Adapter);
            self.stats.evictions += 1;
        }
    }
}

/// Whether the pages of a cache hold their adapters' weights (see the module docs).
fn pages_hold_weights(cache: &KvCache) -> bool {
    cache.k.first().is_some_and(|t| t.device() != Device::Cpu)
}

/// The adapter shaped like `template` read back from `pages`, as device tensors.
fn read_pages(template: &Adapter, pages: &[u32], cache: &KvCache) -> Result<Adapter> {
    let width = row_width(cache);
    let mut flat: Vec<Vec<f32>> = Vec::with_capacity(cache.k.len());
    for layer in 0..cache.k.len() {
        let elems: usize = template.weights().iter().filter(|(l, _)| *l == layer).map(|(_, t)| t.elem_count()).sum();
        let rows = elems.div_ceil(width);
        let (k_slots, v_slots) = slots(pages, rows, cache.block_size);
        let read = |half: &Tensor, slots: &[u32]| -> Result<Vec<f32>> {
            if slots.is_empty() { Ok(Vec::new()) } else { Ok(ops::gather_kv(half, slots)?.to_vec_f32()?) }
        };
        let (k_rows, v_rows) = (read(&cache.k[layer], &k_slots)?, read(&cache.v[layer], &v_slots)?);
        flat.push(merge_rows(&k_rows, &v_rows, rows, cache.block_size, width));
    }
    let mut offsets = vec![0usize; cache.k.len()];
    let device = cache.k.first().map(Tensor::device).unwrap_or(Device::Cpu);
    let weights = template
        .weights()
        .into_iter()
        .map(|(layer, t)| {
            let n = t.elem_count();
            let data = flat[layer][offsets[layer]..offsets[layer] + n].to_vec();
            offsets[layer] += n;
            Tensor::from_vec(data, t.shape().to_vec())?.into_dtype(t.dtype())?.into_device(device).map_err(Error::from)
        })
        .collect::<Result<Vec<_>>>()?;
    template.with_weights(weights)
}

/// Pool pages `adapter` takes over a model of this shape with pages of `block_size` tokens.
pub fn adapter_pages(adapter: &Adapter, config: &ModelConfig, block_size: usize) -> usize {
    pages_for(adapter, config.num_layers, block_size, config.num_kv_heads * config.head_dim)
}

fn pages_in(adapter: &Adapter, cache: &KvCache) -> usize {
    pages_for(adapter, cache.k.len(), cache.block_size, row_width(cache))
}

/// Its largest layer, in rows of the KV width, over the 2·`block` rows (keys and values) a
/// page has in each layer.
fn pages_for(adapter: &Adapter, layers: usize, block: usize, width: usize) -> usize {
    let mut per_layer = vec![0usize; layers];
    for (layer, t) in adapter.weights() {
        if let Some(n) = per_layer.get_mut(layer) {
            // In KV elements (f32): a bf16 adapter takes half the room.
            *n += (t.elem_count() * t.dtype().size_in_bytes()).div_ceil(4);
        }
    }
    per_layer.iter().map(|n| n.div_ceil(width).div_ceil(2 * block)).max().unwrap_or(0)
}

/// Floats in one row of a KV block: one token's keys (or values) in one layer.
fn row_width(cache: &KvCache) -> usize {
    cache.k.first().map_or(1, |t| t.shape()[2] * t.shape()[3])
}

/// The cache slots of an adapter's first `rows` rows in a layer: row `i` goes to page
/// `i / (2·block)`, to its key block for the first half of the page and its value block for the
/// second. Returns (key slots, value slots), each in row order.
fn slots(pages: &[u32], rows: usize, block: usize) -> (Vec<u32>, Vec<u32>) {
    let (mut k, mut v) = (Vec::new(), Vec::new());
    for i in 0..rows {
        let (page, j) = (pages[i / (2 * block)] as usize, i % (2 * block));
        if j < block { k.push((page * block + j) as u32) } else { v.push((page * block + j - block) as u32) }
    }
    (k, v)
}

/// Key rows and value rows, each in row order, merged back into the adapter's row order (the
/// rule of [`slots`]).
fn merge_rows(k_rows: &[f32], v_rows: &[f32], rows: usize, block: usize, width: usize) -> Vec<f32> {
    let (mut k, mut v) = (k_rows.chunks(width), v_rows.chunks(width));
    let mut out = Vec::with_capacity(rows * width);
    for i in 0..rows {
        let row = if i % (2 * block) < block { k.next() } else { v.next() };
        out.extend_from_slice(row.unwrap_or_default());
    }
    out
}

/// Writes each layer's weights, flattened and zero-padded to whole rows, into `pages`.
fn write_pages(adapter: &Adapter, pages: &[u32], cache: &mut KvCache) -> Result<()> {
    if cache.k.first().is_some_and(|t| t.dtype() != DType::F32) {
        return Err(Error::Unsupported("adapter paging needs an f32 KV cache".into()));
    }
    let (width, block) = (row_width(cache), cache.block_size);
    let (heads, head_dim) = cache.k.first().map_or((1, 1), |t| (t.shape()[2], t.shape()[3]));
    let device = cache.k.first().map(Tensor::device).unwrap_or(Device::Cpu);
    for layer in 0..cache.k.len() {
        let mut flat = Vec::new();
        for (_, t) in adapter.weights().into_iter().filter(|(l, _)| *l == layer) {
            flat.extend(t.to_vec_f32()?);
        }
        let rows = flat.len().div_ceil(width);
        flat.resize(rows * width, 0.0);
        let (k_slots, v_slots) = slots(pages, rows, block);
        let (mut k_data, mut v_data) = (Vec::new(), Vec::new());
        for (i, row) in flat.chunks(width).enumerate() {
            if i % (2 * block) < block { k_data.extend_from_slice(row) } else { v_data.extend_from_slice(row) }
        }
        for (half, slots, data) in [(&mut cache.k[layer], k_slots, k_data), (&mut cache.v[layer], v_slots, v_data)] {
            if !slots.is_empty() {
                let x = Tensor::from_vec(data, [slots.len(), heads, head_dim])?.into_device(device)?;
                ops::write_kv(half, &x, &slots)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::adapters::LoraAdapter;
    use crate::rng::Xoshiro256;

    /// The layout the GPU's pages use, written and read back on a CPU cache: every weight comes
    /// back bit for bit, and other pages are untouched.
    #[test]
    fn an_adapter_round_trips_through_its_pages() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/oracle/fixtures/llama");
        let config = ModelConfig::load(&dir).unwrap();
        let lora = serde_json::json!({"r": 3, "lora_alpha": 6, "target_modules": "all-linear"});
        let adapter =
            Adapter::Lora(LoraAdapter::init_random(&config, lora, &mut Xoshiro256::seed_from_u64(7), 0.5).unwrap());
        let (blocks, block) = (32, 4);
        let shape = [blocks, block, config.num_kv_heads, config.head_dim];
        let half = || (0..config.num_layers).map(|_| Tensor::zeros(shape, DType::F32, Device::Cpu).unwrap()).collect();
        let mut cache = KvCache { k: half(), v: half(), block_size: block, num_blocks: blocks };
        let need = adapter_pages(&adapter, &config, block);
        assert!(need > 1 && need < blocks, "{need} pages");
        // Pages out of order and not from the start, as the pool hands them out.
        let pages: Vec<u32> = (0..need as u32).map(|i| blocks as u32 - 1 - 2 * i).collect();
        write_pages(&adapter, &pages, &mut cache).unwrap();
        let back = read_pages(&adapter, &pages, &cache).unwrap();
        for ((_, want), (_, got)) in adapter.weights().iter().zip(back.weights()) {
            assert_eq!(got.shape(), want.shape());
            assert_eq!(got.to_vec_f32().unwrap(), want.to_vec_f32().unwrap());
        }
        let untouched = (0..blocks as u32).find(|p| !pages.contains(p)).unwrap() as usize;
        let row = block * config.num_kv_heads * config.head_dim;
        for t in cache.k.iter().chain(&cache.v) {
            assert!(t.to_vec_f32().unwrap()[untouched * row..][..row].iter().all(|&x| x == 0.0));
        }
    }
}
