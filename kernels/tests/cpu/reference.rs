//! Kernels against plain reference loops written for clarity, not speed.

use tandem_kernels::ops::{self, AdamW, LoraBank, Segments, SeqAttention};
use tandem_kernels::{DType, Device, Tensor};

use crate::common::{Rng, assert_close, assert_tensors_close};

/// One adapter's weights as plain vectors: `A` `[rank, in]`, `B` `[out, rank]`.
#[derive(Clone)]
pub struct RawAdapter {
    a: Vec<f32>,
    b: Vec<f32>,
    rank: usize,
    scale: f32,
}

/// `y[t] = Σ_i [adapter(t) = i] · scale_i · B_i (A_i x[t])`, one token at a time.
pub fn lora_per_token(x: &[f32], adapters: &[RawAdapter], row_adapter: &[i32], in_f: usize, out_f: usize) -> Vec<f32> {
    let mut y = vec![0.0; row_adapter.len() * out_f];
    for (t, &i) in row_adapter.iter().enumerate() {
        if i < 0 {
            continue;
        }
        let RawAdapter { a, b, rank: r, scale: s } = &adapters[i as usize];
        let xt = &x[t * in_f..(t + 1) * in_f];
        let h: Vec<f32> = (0..*r).map(|j| (0..in_f).map(|c| a[j * in_f + c] * xt[c]).sum()).collect();
        for o in 0..out_f {
            y[t * out_f + o] += s * (0..*r).map(|j| b[o * r + j] * h[j]).sum::<f32>();
        }
    }
    y
}

/// Random adapters of the given ranks, and their bank.
pub fn random_adapters(rng: &mut Rng, ranks: &[usize], in_f: usize, out_f: usize) -> (Vec<RawAdapter>, LoraBank) {
    let raw: Vec<_> = ranks
        .iter()
        .map(|&rank| RawAdapter {
            a: rng.vec(rank * in_f, 1.0),
            b: rng.vec(out_f * rank, 1.0),
            rank,
            scale: 0.25 + rng.uniform().abs(),
        })
        .collect();
    let tensors: Vec<_> = raw
        .iter()
        .map(|r| {
            let a = Tensor::from_vec(r.a.clone(), [r.rank, in_f]).unwrap();
            let bt = (0..r.rank).flat_map(|j| (0..out_f).map(move |o| r.b[o * r.rank + j])).collect();
            (a, Tensor::from_vec(bt, [r.rank, out_f]).unwrap(), r.scale)
        })
        .collect();
    (raw, LoraBank::new(tensors, tandem_kernels::Device::Cpu).unwrap())
}

#[test]
fn sgmv_and_bgmv_match_a_per_token_loop_with_mixed_ranks() {
    let mut rng = Rng::new(20);
    let (in_f, out_f, n) = (24, 16, 40);
    let ranks = [8, 1, 4, 16, 2];
    let (raw, bank) = random_adapters(&mut rng, &ranks, in_f, out_f);
    let x = rng.vec(n * in_f, 1.0);
    let xt = Tensor::from_vec(x.clone(), [n, in_f]).unwrap();
    let base = rng.vec(n * out_f, 1.0);

    // BGMV: a random adapter (or none) per row.
    let row_adapter: Vec<i32> = (0..n).map(|_| rng.below(ranks.len() + 1) as i32 - 1).collect();
    let mut y = Tensor::from_vec(base.clone(), [n, out_f]).unwrap();
    ops::bgmv(&mut y, &xt, &bank, &row_adapter).unwrap();
    let want: Vec<f32> =
        lora_per_token(&x, &raw, &row_adapter, in_f, out_f).iter().zip(&base).map(|(d, b)| d + b).collect();
    assert_close("bgmv", &y.to_vec_f32().unwrap(), &want, 1e-4, 1e-4);

    // SGMV: the same rows as segments of equal consecutive indices.
    let segs = Segments::from_row_indices(&row_adapter);
    let mut y = Tensor::from_vec(base.clone(), [n, out_f]).unwrap();
    ops::sgmv(&mut y, &xt, &bank, &segs).unwrap();
    assert_close("sgmv", &y.to_vec_f32().unwrap(), &want, 1e-4, 1e-4);

    // Long runs of one adapter take the GEMM path rather than the few-rows path.
    let long: Vec<i32> = (0..n).map(|t| if t < 30 { 3 } else { 0 }).collect();
    let want = lora_per_token(&x, &raw, &long, in_f, out_f);
    for (what, segmented) in [("sgmv long segment", true), ("bgmv long group", false)] {
        let mut y = Tensor::zeros([n, out_f], DType::F32, Device::Cpu).unwrap();
        if segmented {
            ops::sgmv(&mut y, &xt, &bank, &Segments::from_row_indices(&long)).unwrap();
        } else {
            ops::bgmv(&mut y, &xt, &bank, &long).unwrap();
        }
        assert_close(what, &y.to_vec_f32().unwrap(), &want, 1e-4, 1e-4);
    }
}

/// Adapters held in bf16 (served beside the base's bf16 weights) and in f32 (a job's weights in
/// training) share a bank: each delta is its weights' f32 values, on the few-rows and the long
/// path, and the backward widens the bf16 ones.
#[test]
fn a_bank_of_bf16_and_f32_adapters_gives_each_its_own_values() {
    let mut rng = Rng::new(21);
    let (in_f, out_f, n) = (40, 70, 48);
    let (raw, _) = random_adapters(&mut rng, &[16, 8, 4], in_f, out_f);
    // Adapters 0 and 2 in bf16: the reference bank holds their rounded values in f32.
    let round = |v: &[f32]| -> Vec<f32> { v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect() };
    let rounded: Vec<RawAdapter> = raw
        .iter()
        .enumerate()
        .map(|(i, r)| if i == 1 { r.clone() } else { RawAdapter { a: round(&r.a), b: round(&r.b), ..r.clone() } })
        .collect();
    let as_tensors = |adapters: &[RawAdapter], bf16: bool| -> Vec<(Tensor, Tensor, f32)> {
        adapters
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let a = Tensor::from_vec(r.a.clone(), [r.rank, in_f]).unwrap();
                let bt: Vec<f32> = (0..r.rank).flat_map(|j| (0..out_f).map(move |o| r.b[o * r.rank + j])).collect();
                let bt = Tensor::from_vec(bt, [r.rank, out_f]).unwrap();
                let dtype = if bf16 && i != 1 { DType::BF16 } else { DType::F32 };
                (a.into_dtype(dtype).unwrap(), bt.into_dtype(dtype).unwrap(), r.scale)
            })
            .collect()
    };
    let mixed = LoraBank::new(as_tensors(&rounded, true), Device::Cpu).unwrap();
    let reference = LoraBank::new(as_tensors(&rounded, false), Device::Cpu).unwrap();
    let x = rng.vec(n * in_f, 1.0);
    let xt = Tensor::from_vec(x.clone(), [n, in_f]).unwrap();
    let scattered: Vec<i32> = (0..n).map(|_| rng.below(4) as i32 - 1).collect();
    let long: Vec<i32> = (0..n).map(|t| if t < 40 { 0 } else { 2 }).collect();
    // Few rows per adapter (decoding): bf16 weights read as they lie, not widened first.
    let few: Vec<i32> = (0..n).map(|t| if t < 12 { [0, 2, 1, -1][t % 4] } else { -1 }).collect();
    for rows in [&scattered, &long, &few] {
        let want = lora_per_token(&x, &rounded, rows, in_f, out_f);
        let mut y = Tensor::zeros([n, out_f], DType::F32, Device::Cpu).unwrap();
        ops::bgmv(&mut y, &xt, &mixed, rows).unwrap();
        assert_close("bgmv, mixed bank", &y.to_vec_f32().unwrap(), &want, 1e-4, 1e-4);

        let dy = Tensor::from_vec(rng.vec(n * out_f, 1.0), [n, out_f]).unwrap();
        let got = ops::bgmv_backward(&xt, &mixed, rows, &dy).unwrap();
        let want = ops::bgmv_backward(&xt, &reference, rows, &dy).unwrap();
        for (what, g, w) in [("dx", &got.dx, &want.dx), ("dA", &got.da, &want.da), ("dBt", &got.dbt, &want.dbt)] {
            assert_eq!(g.dtype(), DType::F32, "{what}");
            assert_close(what, &g.to_vec_f32().unwrap(), &w.to_vec_f32().unwrap(), 1e-5, 1e-5);
        }
    }
}

/// Head geometry of an attention test: query heads, kv heads, head dim.
#[derive(Clone, Copy)]
pub struct Heads {
    pub hq: usize,
    pub hkv: usize,
    pub d: usize,
}

/// Causal attention of one sequence with its keys and values contiguous:
/// `q` is `[q_len, hq, d]`, `k`/`v` are `[ctx, hkv, d]`.
fn dense_attention(q: &[f32], k: &[f32], v: &[f32], q_len: usize, ctx: usize, heads: Heads) -> Vec<f32> {
    let Heads { hq, hkv, d } = heads;
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = vec![0.0; q_len * hq * d];
    for i in 0..q_len {
        let pos = ctx - q_len + i;
        for h in 0..hq {
            let g = h / (hq / hkv);
            let qv = &q[(i * hq + h) * d..][..d];
            let scores: Vec<f32> = (0..ctx)
                .map(|j| {
                    if j <= pos {
                        scale * (0..d).map(|c| qv[c] * k[(j * hkv + g) * d + c]).sum::<f32>()
                    } else {
                        f32::NEG_INFINITY
                    }
                })
                .collect();
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f32 = e.iter().sum();
            for c in 0..d {
                out[(i * hq + h) * d + c] = (0..ctx).map(|j| e[j] / sum * v[(j * hkv + g) * d + c]).sum();
            }
        }
    }
    out
}

/// A ragged batch in a paged cache, with each sequence's keys and values also kept dense.
pub struct RaggedBatch {
    pub k_cache: Tensor,
    pub v_cache: Tensor,
    pub seqs: Vec<SeqAttention>,
    pub dense: Vec<(Vec<f32>, Vec<f32>)>,
}

/// Builds a ragged batch: sequences with `(q_len, context_len)`, their keys written through
/// `write_kv` into shuffled blocks.
pub fn ragged_batch(rng: &mut Rng, shapes: &[(usize, usize)], block_size: usize, hkv: usize, d: usize) -> RaggedBatch {
    let blocks_needed: usize = shapes.iter().map(|&(_, ctx)| ctx.div_ceil(block_size)).sum();
    let num_blocks = blocks_needed + 2;
    // A fixed shuffle of block ids, so sequences own scattered, non-contiguous blocks.
    let mut free: Vec<u32> = (0..num_blocks as u32).collect();
    for i in (1..free.len()).rev() {
        free.swap(i, rng.below(i + 1));
    }
    let shape = [num_blocks, block_size, hkv, d];
    let mut k_cache = Tensor::zeros(shape, DType::F32, Device::Cpu).unwrap();
    let mut v_cache = Tensor::zeros(shape, DType::F32, Device::Cpu).unwrap();
    let mut seqs = Vec::new();
    let mut dense = Vec::new();
    for &(q_len, ctx) in shapes {
        let block_table: Vec<u32> = (0..ctx.div_ceil(block_size)).map(|_| free.pop().unwrap()).collect();
        let seq = SeqAttention { q_len, context_len: ctx, block_table };
        let (k, v) = (rng.vec(ctx * hkv * d, 1.0), rng.vec(ctx * hkv * d, 1.0));
        let slots = ops::cache_slots(&seq, block_size);
        ops::write_kv(&mut k_cache, &Tensor::from_vec(k.clone(), [ctx, hkv, d]).unwrap(), &slots).unwrap();
        ops::write_kv(&mut v_cache, &Tensor::from_vec(v.clone(), [ctx, hkv, d]).unwrap(), &slots).unwrap();
        seqs.push(seq);
        dense.push((k, v));
    }
    RaggedBatch { k_cache, v_cache, seqs, dense }
}

pub fn check_paged_attention_against_dense(rng: &mut Rng, shapes: &[(usize, usize)], block_size: usize, heads: Heads) {
    let Heads { hq, hkv, d } = heads;
    let RaggedBatch { k_cache, v_cache, seqs, dense } = ragged_batch(rng, shapes, block_size, hkv, d);
    let tokens: usize = shapes.iter().map(|s| s.0).sum();
    let q = rng.vec(tokens * hq * d, 1.0);
    let scale = 1.0 / (d as f32).sqrt();
    let out =
        ops::paged_attention(&Tensor::from_vec(q.clone(), [tokens, hq, d]).unwrap(), &k_cache, &v_cache, &seqs, scale)
            .unwrap();
    let mut want = Vec::new();
    let mut start = 0;
    for (&(q_len, ctx), (k, v)) in shapes.iter().zip(&dense) {
        want.extend(dense_attention(&q[start * hq * d..(start + q_len) * hq * d], k, v, q_len, ctx, heads));
        start += q_len;
    }
    assert_close("paged attention vs dense", &out.to_vec_f32().unwrap(), &want, 1e-5, 1e-4);
}

#[test]
fn paged_attention_matches_dense_on_a_ragged_batch() {
    let mut rng = Rng::new(21);
    // Prefills of different lengths, decodes, and a chunked prefill, with GQA (8 q, 2 kv heads).
    check_paged_attention_against_dense(
        &mut rng,
        &[(7, 7), (1, 13), (3, 9), (16, 16), (1, 1)],
        4,
        Heads { hq: 8, hkv: 2, d: 8 },
    );
    // Pure decode batch, multi-head attention, a block size that is not a power of two.
    check_paged_attention_against_dense(&mut rng, &[(1, 5), (1, 11), (1, 3)], 3, Heads { hq: 4, hkv: 4, d: 16 });
    // Long query runs take the GEMM path, in tiles of 64 rows: a prompt of several tiles, a
    // chunk after cached keys, next to decode tokens that keep the per-token path.
    check_paged_attention_against_dense(
        &mut rng,
        &[(150, 150), (1, 40), (70, 90), (16, 16), (15, 15)],
        16,
        Heads { hq: 6, hkv: 2, d: 8 },
    );
}

#[test]
fn gather_kv_reads_back_what_write_kv_wrote() {
    let mut rng = Rng::new(22);
    let RaggedBatch { k_cache, seqs, dense, .. } = ragged_batch(&mut rng, &[(2, 6), (1, 3)], 4, 2, 4);
    for (seq, (k, _)) in seqs.iter().zip(&dense) {
        let got = ops::gather_kv(&k_cache, &ops::cache_slots(seq, 4)).unwrap();
        assert_close("gather_kv", &got.to_vec_f32().unwrap(), k, 0.0, 0.0);
    }
}

#[test]
fn write_kv_into_a_bf16_cache_rounds_only_the_rows_it_writes() {
    let mut rng = Rng::new(26);
    let mut cache = rng.tensor(&[3, 2, 1, 4], 1.0).to_dtype(DType::BF16).unwrap();
    let before = cache.to_vec_f32().unwrap();
    let rows = rng.tensor(&[2, 1, 4], 1.0);
    ops::write_kv(&mut cache, &rows, &[5, 0]).unwrap();
    let after = cache.to_vec_f32().unwrap();
    let rounded = rows.to_dtype(DType::BF16).unwrap().to_vec_f32().unwrap();
    assert_close("slot 5", &after[20..24], &rounded[..4], 0.0, 0.0);
    assert_close("slot 0", &after[0..4], &rounded[4..], 0.0, 0.0);
    assert_close("untouched slots", &after[4..20], &before[4..20], 0.0, 0.0);
}

#[test]
fn adamw_matches_the_pytorch_formula() {
    let mut rng = Rng::new(23);
    let n = 50;
    let (p0, g1, g2) = (rng.vec(n, 1.0), rng.vec(n, 1.0), rng.vec(n, 1.0));
    let cfg = AdamW { lr: 0.01, beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.1 };
    let mut p = Tensor::from_vec(p0.clone(), [n]).unwrap();
    let mut m = Tensor::zeros([n], DType::F32, Device::Cpu).unwrap();
    let mut v = Tensor::zeros([n], DType::F32, Device::Cpu).unwrap();
    for (step, g) in [(1u64, &g1), (2, &g2)] {
        ops::adamw_step(&mut p, &Tensor::from_vec(g.clone(), [n]).unwrap(), &mut m, &mut v, &cfg, step).unwrap();
    }
    // torch.optim.AdamW, written out in f64.
    let want: Vec<f32> = (0..n)
        .map(|i| {
            let (mut p, mut m, mut v) = (p0[i] as f64, 0.0f64, 0.0f64);
            for (t, g) in [(1, g1[i] as f64), (2, g2[i] as f64)] {
                p *= 1.0 - 0.01 * 0.1;
                m = 0.9 * m + 0.1 * g;
                v = 0.99 * v + 0.01 * g * g;
                let (bc1, bc2) = (1.0 - 0.9f64.powi(t), 1.0 - 0.99f64.powi(t));
                p -= 0.01 / bc1 * m / (v.sqrt() / bc2.sqrt() + 1e-8);
            }
            p as f32
        })
        .collect();
    assert_close("adamw", &p.to_vec_f32().unwrap(), &want, 1e-6, 1e-5);
}

#[test]
fn clip_grad_norm_scales_all_gradients_together() {
    let mut a = Tensor::from_vec(vec![3.0, 0.0], [2]).unwrap();
    let mut b = Tensor::from_vec(vec![0.0, 4.0, 0.0], [3]).unwrap();
    let norm = ops::clip_grad_norm(&mut [&mut a, &mut b], 1.0).unwrap();
    assert!((norm - 5.0).abs() < 1e-6, "norm before clipping: {norm}");
    let after = ops::grad_norm(&[&a, &b]).unwrap();
    assert!((after - 1.0).abs() < 1e-5, "norm after clipping: {after}");
    assert_close("direction kept", &a.to_vec_f32().unwrap(), &[0.6, 0.0], 1e-6, 1e-5);
    // Below the threshold nothing changes.
    let mut c = Tensor::from_vec(vec![0.1, 0.2], [2]).unwrap();
    ops::clip_grad_norm(&mut [&mut c], 1.0).unwrap();
    assert_close("unclipped", &c.to_vec_f32().unwrap(), &[0.1, 0.2], 0.0, 0.0);
}

#[test]
fn moe_gate_picks_the_top_k_and_renormalises() {
    let logits = Tensor::from_vec(vec![0.0, 2.0, 1.0, -1.0, 3.0, 3.0, 0.0, 0.0], [2, 4]).unwrap();
    let r = ops::moe_gate(&logits, 2, true).unwrap();
    assert_eq!(r.experts, vec![1, 2, 0, 1], "best first; ties to the lower expert id");
    let w = r.weights.to_vec_f32().unwrap();
    let e = std::f32::consts::E;
    assert_close("renormalised weights", &w, &[e / (e + 1.0), 1.0 / (e + 1.0), 0.5, 0.5], 1e-6, 1e-5);
    let plain = ops::moe_gate(&logits, 2, false).unwrap().weights.to_vec_f32().unwrap();
    assert!(plain[0] + plain[1] < 1.0, "without renormalisation the top-k weights sum below 1");
}

#[test]
fn bf16_and_f16_compute_in_f32_and_round_once() {
    let mut rng = Rng::new(24);
    let (a, b) = (rng.tensor(&[16, 32], 1.0), rng.tensor(&[32, 8], 1.0));
    for dtype in [DType::BF16, DType::F16] {
        let (a2, b2) = (a.to_dtype(dtype).unwrap(), b.to_dtype(dtype).unwrap());
        let got = ops::matmul(&a2, &b2, false, false).unwrap();
        assert_eq!(got.dtype(), dtype);
        // Reference: the same rounded inputs multiplied in f32, rounded once at the end.
        let want = ops::matmul(&a2.to_dtype(DType::F32).unwrap(), &b2.to_dtype(DType::F32).unwrap(), false, false)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        assert_tensors_close(&format!("{dtype} matmul"), &got, &want, 0.0, 0.0);
    }
}

/// f32 activations times a bf16 weight (a bf16 checkpoint served as it is stored), in both
/// layouts a linear layer needs and with a batch sharing the weight. Where the CPU has AMX
/// tiles they multiply the weight as it lies and round the activations to bf16, so the result
/// is the product of the rounded activations; elsewhere the weight is widened and the
/// activations are exact.
#[test]
fn matmul_of_a_bf16_weight() {
    let mut rng = Rng::new(26);
    let tiles = tandem_kernels::kernel_isa() >= tandem_kernels::Isa::Amx;
    for (x_shape, w_shape, trans_b) in
        [(vec![5, 64], [40, 64], true), (vec![2, 17, 96], [33, 96], true), (vec![19, 40], [40, 23], false)]
    {
        let x = rng.tensor(&x_shape, 1.0);
        let w = rng.tensor(&w_shape, 1.0).to_dtype(DType::BF16).unwrap();
        let got = ops::matmul(&x, &w, false, trans_b).unwrap();
        assert_eq!(got.dtype(), DType::F32);
        let wide = w.to_dtype(DType::F32).unwrap();
        let what = format!("{x_shape:?} x bf16 {w_shape:?} (trans {trans_b}, tiles {tiles})");
        if tiles {
            let rounded = x.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap();
            let want = ops::matmul(&rounded, &wide, false, trans_b).unwrap();
            assert_tensors_close(&what, &got, &want, 1e-5, 1e-5);
        } else {
            let want = ops::matmul(&x, &wide, false, trans_b).unwrap();
            assert_tensors_close(&what, &got, &want, 0.0, 0.0);
        }
    }
}

#[test]
fn matmul_shares_or_batches_b() {
    let mut rng = Rng::new(25);
    let a = rng.tensor(&[3, 2, 4], 1.0);
    let w = rng.tensor(&[5, 4], 1.0);
    // Shared b read transposed (a linear layer, x·Wᵀ) equals each batch entry on its own.
    let y = ops::matmul(&a, &w, false, true).unwrap();
    assert_eq!(y.shape(), &[3, 2, 5]);
    let av = a.to_vec_f32().unwrap();
    for i in 0..3 {
        let ai = Tensor::from_vec(av[i * 8..(i + 1) * 8].to_vec(), [2, 4]).unwrap();
        let yi = ops::matmul(&ai, &w, false, true).unwrap();
        assert_close(
            "batch entry",
            &y.to_vec_f32().unwrap()[i * 10..(i + 1) * 10],
            &yi.to_vec_f32().unwrap(),
            1e-6,
            1e-6,
        );
    }
}

#[test]
fn add_bias_adds_to_every_row() {
    let x = Tensor::from_vec(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [2, 3]).unwrap();
    let b = Tensor::from_vec(vec![10.0, 20.0, 30.0], [3]).unwrap();
    let y = ops::add_bias(&x, &b).unwrap();
    assert_close("add_bias", &y.to_vec_f32().unwrap(), &[11.0, 22.0, 33.0, 14.0, 25.0, 36.0], 0.0, 0.0);
}
