//! Causal attention with grouped-query heads over a paged KV cache.
//!
//! The cache of one layer is two tensors `[num_blocks, block_size, kv_heads, head_dim]` (keys
//! and values). A sequence's keys live in the blocks its block table lists, in order: key `j`
//! of the sequence is row `j % block_size` of block `block_table[j / block_size]`. One call
//! serves a ragged batch: each sequence brings `q_len` new query tokens (a whole prompt, a
//! prefill chunk, or one decode token) that sit at the end of its `context_len` keys, and each
//! query attends to every key up to its own position.

use rayon::prelude::*;

use crate::cpu::{Gemm, dot, multiversion};
use crate::error::{Result, arg_err, shape_err};
use crate::tensor::same_device;
use crate::{Device, Tensor, cuda};

/// One sequence of an attention call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqAttention {
    /// New query tokens of this sequence in this call (rows of `q`, in batch order).
    pub q_len: usize,
    /// Keys the sequence has in the cache, the new tokens' included.
    pub context_len: usize,
    /// Cache blocks holding the sequence's keys, in order.
    pub block_table: Vec<u32>,
}

/// Shapes of one attention call, checked once and shared by the CPU and CUDA paths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionDims {
    pub tokens: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub num_blocks: usize,
    pub block_size: usize,
}

impl AttentionDims {
    fn of(op: &'static str, q: &Tensor, k_cache: &Tensor, v_cache: &Tensor, seqs: &[SeqAttention]) -> Result<Self> {
        let (tokens, q_heads, head_dim) = q.dims3(op)?;
        let (num_blocks, block_size, kv_heads, kd) = k_cache.dims4(op)?;
        v_cache.expect_shape(op, "v_cache", k_cache.shape())?;
        if kd != head_dim {
            return shape_err(op, format!("q head_dim {head_dim} but cache head_dim {kd}"));
        }
        if kv_heads == 0 || q_heads % kv_heads != 0 {
            return shape_err(op, format!("{q_heads} query heads are not a multiple of {kv_heads} kv heads"));
        }
        let mut total = 0;
        for (i, s) in seqs.iter().enumerate() {
            if s.q_len > s.context_len {
                return arg_err(op, format!("sequence {i}: q_len {} > context_len {}", s.q_len, s.context_len));
            }
            if s.context_len > s.block_table.len() * block_size {
                return arg_err(
                    op,
                    format!("sequence {i}: {} keys do not fit in {} blocks", s.context_len, s.block_table.len()),
                );
            }
            if let Some(b) = s.block_table.iter().find(|&&b| b as usize >= num_blocks) {
                return arg_err(op, format!("sequence {i}: block {b} outside the cache of {num_blocks} blocks"));
            }
            total += s.q_len;
        }
        if total != tokens {
            return shape_err(op, format!("sequences bring {total} query tokens, q has {tokens}"));
        }
        Ok(AttentionDims { tokens, q_heads, kv_heads, head_dim, num_blocks, block_size })
    }

    /// Elements of one cache row (one token's keys for every kv head).
    fn row(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

/// Cache slot (`block * block_size + offset`) of every key of every sequence, sequence by
/// sequence: what the CUDA kernels index with, and what training gathers gradients from.
pub fn cache_slots(seq: &SeqAttention, block_size: usize) -> Vec<u32> {
    (0..seq.context_len)
        .map(|j| seq.block_table[j / block_size] * block_size as u32 + (j % block_size) as u32)
        .collect()
}

/// Writes token rows `x` (`[tokens, kv_heads, head_dim]`) into cache slots.
pub fn write_kv(cache: &mut Tensor, x: &Tensor, slots: &[u32]) -> Result<()> {
    const OP: &str = "write_kv";
    same_device(OP, &[cache, x])?;
    let (nb, bs, h, d) = cache.dims4(OP)?;
    x.expect_shape(OP, "x", &[slots.len(), h, d])?;
    crate::ops::elementwise::check_indices(OP, slots, nb * bs)?;
    let row = h * d;
    match x.device() {
        Device::Cpu => {
            let xs = x.cpu_f32()?;
            let storage = cache.cpu_storage_mut()?;
            for (t, &s) in slots.iter().enumerate() {
                storage.write_f32(s as usize * row, &xs[t * row..(t + 1) * row]);
            }
            Ok(())
        }
        Device::Cuda(_) => cuda::write_kv(cache, x, slots, row),
    }
}

/// Reads cache slots back as token rows `[slots.len(), kv_heads, head_dim]`: the backward of
/// [`write_kv`], turning cache-shaped gradients into per-token ones.
pub fn gather_kv(cache: &Tensor, slots: &[u32]) -> Result<Tensor> {
    let (nb, bs, h, d) = cache.dims4("gather_kv")?;
    crate::ops::elementwise::gather_flat_rows(cache, nb * bs, h * d, slots)?.reshape([slots.len(), h, d])
}

/// Causal attention of `q` (`[tokens, q_heads, head_dim]`, sequences back to back) over the
/// paged caches; `scale` multiplies the scores (usually `1/sqrt(head_dim)`).
pub fn paged_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    seqs: &[SeqAttention],
    scale: f32,
) -> Result<Tensor> {
    const OP: &str = "paged_attention";
    let device = same_device(OP, &[q, k_cache, v_cache])?;
    let dims = AttentionDims::of(OP, q, k_cache, v_cache, seqs)?;
    match device {
        Device::Cpu => {
            let (qs, ks, vs) = (q.cpu_f32()?, k_cache.cpu_f32()?, v_cache.cpu_f32()?);
            let out = attention_forward_cpu(&qs, &ks, &vs, seqs, &dims, scale);
            Ok(Tensor::cpu_from_f32(out, q.shape().to_vec(), q.dtype()))
        }
        Device::Cuda(_) => cuda::paged_attention(q, k_cache, v_cache, seqs, &dims, scale),
    }
}

/// Gradients of [`paged_attention`] given its output `out` and upstream `dout`:
/// `(dq, dk_cache, dv_cache)`, the cache gradients shaped like the caches (zero in slots no
/// query read).
pub fn paged_attention_backward(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    seqs: &[SeqAttention],
    out: &Tensor,
    dout: &Tensor,
    scale: f32,
) -> Result<(Tensor, Tensor, Tensor)> {
    const OP: &str = "paged_attention_backward";
    let device = same_device(OP, &[q, k_cache, v_cache, out, dout])?;
    let dims = AttentionDims::of(OP, q, k_cache, v_cache, seqs)?;
    out.expect_shape(OP, "out", q.shape())?;
    dout.expect_shape(OP, "dout", q.shape())?;
    match device {
        Device::Cpu => {
            let cpu = [q, k_cache, v_cache, out, dout].map(|t| t.cpu_f32());
            let [qs, ks, vs, os, dos] = cpu;
            let (dq, dk, dv) = attention_backward_cpu(&qs?, &ks?, &vs?, &os?, &dos?, seqs, &dims, scale);
            Ok((
                Tensor::cpu_from_f32(dq, q.shape().to_vec(), q.dtype()),
                Tensor::cpu_from_f32(dk, k_cache.shape().to_vec(), k_cache.dtype()),
                Tensor::cpu_from_f32(dv, v_cache.shape().to_vec(), v_cache.dtype()),
            ))
        }
        Device::Cuda(_) => cuda::paged_attention_backward(q, k_cache, v_cache, seqs, out, dout, &dims, scale),
    }
}

/// For every query token: its sequence and its position among the sequence's keys.
fn query_positions(seqs: &[SeqAttention]) -> Vec<(usize, usize)> {
    seqs.iter()
        .enumerate()
        .flat_map(|(s, seq)| (seq.context_len - seq.q_len..seq.context_len).map(move |p| (s, p)))
        .collect()
}

fn attention_forward_cpu(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    seqs: &[SeqAttention],
    d: &AttentionDims,
    scale: f32,
) -> Vec<f32> {
    let (hq, dh, group) = (d.q_heads, d.head_dim, d.q_heads / d.kv_heads);
    let slots: Vec<Vec<u32>> = seqs.iter().map(|s| cache_slots(s, d.block_size)).collect();
    let mut out = vec![0.0; d.tokens * hq * dh];
    if out.is_empty() {
        return out;
    }
    // Short query runs (decode tokens, small chunks): one query at a time, reading the keys
    // straight from the cache.
    let positions = query_positions(seqs);
    out.par_chunks_mut(hq * dh).zip(q.par_chunks(hq * dh)).zip(positions.par_iter()).for_each(
        |((o, qt), &(s, pos))| {
            if uses_tiles(&seqs[s]) {
                return;
            }
            attend_one(o, qt, &slots[s][..=pos], k, v, d, scale);
        },
    );
    // Long query runs (prompts, training sequences): GEMMs over tiles.
    let tiles = tiles(seqs, d.kv_heads);
    let results: Vec<Vec<f32>> = tiles
        .par_iter()
        .map(|t| {
            // The group's query heads stacked (head-major): one GEMM per product for all.
            let kv = TileKv::gather(k, v, &slots[t.seq], t, d);
            let qb = t.gather_group(q, d);
            let p = kv.probabilities(&qb, t, d, scale);
            let mut o = vec![0.0; group * t.rows() * dh];
            Gemm::new(group * t.rows(), dh, kv.len, false, false).run(&mut o, &p, &kv.v, 1.0, false, 1);
            o
        })
        .collect();
    for (t, r) in tiles.iter().zip(&results) {
        for (i, h) in (t.g * group..(t.g + 1) * group).enumerate() {
            t.scatter_rows(&mut out, &r[i * t.rows() * dh..(i + 1) * t.rows() * dh], h, d);
        }
    }
    out
}

multiversion! {
    /// One query token's attention (all its heads, `qt`, into `o`) over the cache slots `keys`.
    pub(crate) fn attend_one(o: &mut [f32], qt: &[f32], keys: &[u32], k: &[f32], v: &[f32], d: &AttentionDims, scale: f32) {
        let (hq, dh, group) = (d.q_heads, d.head_dim, d.q_heads / d.kv_heads);
        let mut p = vec![0.0f32; keys.len()];
        for h in 0..hq {
            let kv_off = (h / group) * dh;
            let qh = &qt[h * dh..(h + 1) * dh];
            for (pj, &slot) in p.iter_mut().zip(keys) {
                let kr = &k[slot as usize * d.row() + kv_off..][..dh];
                *pj = scale * dot(qh, kr);
            }
            crate::ops::activation::softmax_row(&mut p);
            let oh = &mut o[h * dh..(h + 1) * dh];
            for (&pj, &slot) in p.iter().zip(keys) {
                let vr = &v[slot as usize * d.row() + kv_off..][..dh];
                oh.iter_mut().zip(vr).for_each(|(o, v)| *o += pj * v);
            }
        }
    }
}

/// Query rows of one tile of the GEMM path, and the fewest query tokens a sequence must bring
/// to take that path (below it, gathering keys costs more than GEMMs save).
const TILE_ROWS: usize = 64;
const TILE_MIN_ROWS: usize = 16;

fn uses_tiles(seq: &SeqAttention) -> bool {
    seq.q_len >= TILE_MIN_ROWS
}

/// Rows `start..end` of a sequence's queries, with the query heads of kv head `g`.
struct Tile {
    seq: usize,
    /// The sequence's first query row in the batch, and its first query's position.
    base: usize,
    first_pos: usize,
    g: usize,
    start: usize,
    end: usize,
}

/// The tiles of every sequence that takes the GEMM path: per block of query rows, one per kv
/// head.
fn tiles(seqs: &[SeqAttention], kv_heads: usize) -> Vec<Tile> {
    let mut out = Vec::new();
    let mut base = 0;
    for (s, seq) in seqs.iter().enumerate() {
        if uses_tiles(seq) {
            let first_pos = seq.context_len - seq.q_len;
            for start in (0..seq.q_len).step_by(TILE_ROWS) {
                let end = (start + TILE_ROWS).min(seq.q_len);
                out.extend((0..kv_heads).map(|g| Tile { seq: s, base, first_pos, g, start, end }));
            }
        }
        base += seq.q_len;
    }
    out
}

impl Tile {
    fn rows(&self) -> usize {
        self.end - self.start
    }

    /// Keys the tile's last query sees (all earlier queries see a prefix of them).
    fn keys(&self) -> usize {
        self.first_pos + self.end
    }

    /// The tile's query rows of `x` (`[tokens, heads, head_dim]`) for every query head of its
    /// group, head-major: `[group · rows, head_dim]`.
    fn gather_group(&self, x: &[f32], d: &AttentionDims) -> Vec<f32> {
        let (dh, stride, group) = (d.head_dim, d.q_heads * d.head_dim, d.q_heads / d.kv_heads);
        let mut out = Vec::with_capacity(group * self.rows() * dh);
        for h in self.g * group..(self.g + 1) * group {
            for t in self.base + self.start..self.base + self.end {
                out.extend_from_slice(&x[t * stride + h * dh..][..dh]);
            }
        }
        out
    }

    fn scatter_rows(&self, x: &mut [f32], rows: &[f32], h: usize, d: &AttentionDims) {
        let (dh, stride) = (d.head_dim, d.q_heads * d.head_dim);
        for (i, t) in (self.base + self.start..self.base + self.end).enumerate() {
            x[t * stride + h * dh..][..dh].copy_from_slice(&rows[i * dh..(i + 1) * dh]);
        }
    }
}

/// A tile's keys and values of its kv head, `[len, head_dim]` each, gathered from the cache.
struct TileKv {
    k: Vec<f32>,
    v: Vec<f32>,
    len: usize,
}

impl TileKv {
    fn gather(k: &[f32], v: &[f32], slots: &[u32], t: &Tile, d: &AttentionDims) -> Self {
        let (len, dh, off) = (t.keys(), d.head_dim, t.g * d.head_dim);
        let pick = |c: &[f32]| {
            slots[..len].iter().flat_map(|&s| c[s as usize * d.row() + off..][..dh].iter().copied()).collect()
        };
        TileKv { k: pick(k), v: pick(v), len }
    }

    /// The causal attention probabilities of stacked query rows `qb` (`[heads · rows, head_dim]`,
    /// see [`Tile::gather_group`]):
    /// `softmax(scale · q·kᵀ)` over the keys each row may see, zero beyond them.
    fn probabilities(&self, qb: &[f32], t: &Tile, d: &AttentionDims, scale: f32) -> Vec<f32> {
        let (n, rows) = (self.len, qb.len() / d.head_dim);
        let mut p = vec![0.0; rows * n];
        Gemm::new(rows, n, d.head_dim, false, true).run(&mut p, qb, &self.k, scale, false, 1);
        for (i, row) in p.chunks_exact_mut(n).enumerate() {
            // Rows are head-major: row i is query i % rows of the tile.
            let visible = t.first_pos + t.start + i % t.rows() + 1;
            crate::ops::activation::softmax_in_place(&mut row[..visible]);
            row[visible..].fill(0.0);
        }
        p
    }
}

#[allow(clippy::too_many_arguments)]
fn attention_backward_cpu(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    dout: &[f32],
    seqs: &[SeqAttention],
    d: &AttentionDims,
    scale: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (hq, dh, group, row) = (d.q_heads, d.head_dim, d.q_heads / d.kv_heads, d.row());
    let tok = hq * dh;
    let starts: Vec<usize> = seqs.iter().scan(0, |acc, s| Some(std::mem::replace(acc, *acc + s.q_len))).collect();
    // Each sequence yields its dq rows and dense per-key dk/dv; they are scattered into the
    // cache-shaped gradients afterwards, so sequences sharing a block add up correctly.
    let tiled = tiles(seqs, d.kv_heads);
    let tile_grads: Vec<TileGrads> =
        tiled.par_iter().map(|t| tile_backward(q, k, v, out, dout, seqs, t, d, scale)).collect();
    let per_seq: Vec<SeqGrads> = seqs
        .par_iter()
        .zip(starts.par_iter())
        .enumerate()
        .map(|(s, (seq, &start))| {
            let slots = cache_slots(seq, d.block_size);
            let (n, first) = (seq.context_len, seq.context_len - seq.q_len);
            let mut dq = vec![0.0; seq.q_len * tok];
            let (mut dk, mut dv) = (vec![0.0; n * row], vec![0.0; n * row]);
            if uses_tiles(seq) {
                // Gathered from the tiles in a fixed order, so the sums are reproducible.
                for (t, g) in tiled.iter().zip(&tile_grads).filter(|(t, _)| t.seq == s) {
                    for (i, h) in (t.g * group..(t.g + 1) * group).enumerate() {
                        let rows = &g.dq[i * t.rows() * dh..(i + 1) * t.rows() * dh];
                        for (r, src) in rows.chunks_exact(dh).enumerate() {
                            dq[(t.start + r) * tok + h * dh..][..dh].copy_from_slice(src);
                        }
                    }
                    for j in 0..t.keys() {
                        let (dst_k, dst_v) = (&mut dk[j * row + t.g * dh..][..dh], &mut dv[j * row + t.g * dh..][..dh]);
                        dst_k.iter_mut().zip(&g.dk[j * dh..]).for_each(|(a, b)| *a += b);
                        dst_v.iter_mut().zip(&g.dv[j * dh..]).for_each(|(a, b)| *a += b);
                    }
                }
                return SeqGrads { dq, dk, dv, slots };
            }
            let mut p = vec![0.0f32; n];
            for i in 0..seq.q_len {
                let t = start + i;
                let keys = &slots[..=first + i];
                for h in 0..hq {
                    let kv_off = (h / group) * dh;
                    let qh = &q[t * tok + h * dh..][..dh];
                    let doh = &dout[t * tok + h * dh..][..dh];
                    let oh = &out[t * tok + h * dh..][..dh];
                    let p = &mut p[..keys.len()];
                    for (pj, &slot) in p.iter_mut().zip(keys) {
                        *pj = scale * dot(qh, &k[slot as usize * row + kv_off..][..dh]);
                    }
                    crate::ops::activation::softmax_in_place(p);
                    // dS_j = P_j·(dout·v_j − dout·out).
                    let delta = dot(doh, oh);
                    let dqh = &mut dq[i * tok + h * dh..][..dh];
                    for (j, (&pj, &slot)) in p.iter().zip(keys).enumerate() {
                        let kr = &k[slot as usize * row + kv_off..][..dh];
                        let vr = &v[slot as usize * row + kv_off..][..dh];
                        let ds = pj * (dot(doh, vr) - delta) * scale;
                        dqh.iter_mut().zip(kr).for_each(|(g, k)| *g += ds * k);
                        let dkj = &mut dk[j * row + kv_off..][..dh];
                        dkj.iter_mut().zip(qh).for_each(|(g, q)| *g += ds * q);
                        let dvj = &mut dv[j * row + kv_off..][..dh];
                        dvj.iter_mut().zip(doh).for_each(|(g, o)| *g += pj * o);
                    }
                }
            }
            SeqGrads { dq, dk, dv, slots }
        })
        .collect();
    let cache_len = d.num_blocks * d.block_size * row;
    let (mut dq, mut dk_cache, mut dv_cache) =
        (Vec::with_capacity(q.len()), vec![0.0; cache_len], vec![0.0; cache_len]);
    for SeqGrads { dq: sdq, dk: sdk, dv: sdv, slots } in per_seq {
        dq.extend_from_slice(&sdq);
        for (j, &slot) in slots.iter().enumerate() {
            let s = slot as usize * row;
            dk_cache[s..s + row].iter_mut().zip(&sdk[j * row..]).for_each(|(g, v)| *g += v);
            dv_cache[s..s + row].iter_mut().zip(&sdv[j * row..]).for_each(|(g, v)| *g += v);
        }
    }
    (dq, dk_cache, dv_cache)
}

/// One tile's gradients: `dq` of its query rows for each head of its group (head-major), and
/// `dk`, `dv` (`[keys, head_dim]`) of its kv head, summed over the group.
struct TileGrads {
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

/// The backward of one tile with GEMMs: recompute `P`, then `dP = dO·vᵀ`,
/// `dS = P·(dP − rowsum(dO·O))·scale`, `dq = dS·k`, `dk = dSᵀ·q`, `dv = Pᵀ·dO`.
#[allow(clippy::too_many_arguments)]
fn tile_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    dout: &[f32],
    seqs: &[SeqAttention],
    t: &Tile,
    d: &AttentionDims,
    scale: f32,
) -> TileGrads {
    let (dh, group, rows) = (d.head_dim, d.q_heads / d.kv_heads, t.rows());
    let slots = cache_slots(&seqs[t.seq], d.block_size);
    let kv = TileKv::gather(k, v, &slots, t, d);
    let n = kv.len;
    // The group's heads stacked, as in the forward: dk and dv sum over them inside the GEMMs.
    let (qb, ob, dob) = (t.gather_group(q, d), t.gather_group(out, d), t.gather_group(dout, d));
    let m = group * rows;
    let p = kv.probabilities(&qb, t, d, scale);
    let mut ds = vec![0.0; m * n];
    Gemm::new(m, n, dh, false, true).run(&mut ds, &dob, &kv.v, 1.0, false, 1);
    for (i, (ds_row, p_row)) in ds.chunks_exact_mut(n).zip(p.chunks_exact(n)).enumerate() {
        let delta = dot(&dob[i * dh..(i + 1) * dh], &ob[i * dh..(i + 1) * dh]);
        ds_row.iter_mut().zip(p_row).for_each(|(x, &p)| *x = p * (*x - delta) * scale);
    }
    let mut g = TileGrads { dq: vec![0.0; m * dh], dk: vec![0.0; n * dh], dv: vec![0.0; n * dh] };
    Gemm::new(m, dh, n, false, false).run(&mut g.dq, &ds, &kv.k, 1.0, false, 1);
    Gemm::new(n, dh, m, true, false).run(&mut g.dk, &ds, &qb, 1.0, false, 1);
    Gemm::new(n, dh, m, true, false).run(&mut g.dv, &p, &dob, 1.0, false, 1);
    g
}

/// One sequence's share of the attention gradients: its query rows, and dense per-key dk/dv
/// with the cache slot of each key.
struct SeqGrads {
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
    slots: Vec<u32>,
}
