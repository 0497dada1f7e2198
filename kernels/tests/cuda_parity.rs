//! CUDA parity: every op of the CUDA backend against the CPU op on the same random inputs.
//!
//! Built only with `--features cuda`, and meant to run where a GPU exists: nothing here skips,
//! so on a machine without one every test fails (the first GPU call returns an error).
#![cfg(feature = "cuda")]
// A failed call is a failed test; helpers outside `#[test]` fns unwrap too.
#![allow(clippy::unwrap_used)]

use tandem_kernels::ops::{self, AdamW, LoraBank, Rope, RopeScaling, Segments, SeqAttention};
use tandem_kernels::{CpuStorage, DType, Device, Tensor};

const GPU: Device = Device::Cuda(0);

/// SplitMix64: small, seeded, good enough for test data.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| scale * self.uniform()).collect()
    }

    /// A CPU tensor of `dtype` (values rounded to it, so both devices see the same bits).
    fn tensor(&mut self, shape: &[usize], scale: f32, dtype: DType) -> Tensor {
        let t = Tensor::from_vec(self.vec(shape.iter().product(), scale), shape.to_vec()).unwrap();
        t.to_dtype(dtype).unwrap()
    }
}

fn gpu(t: &Tensor) -> Tensor {
    t.to_device(GPU).unwrap()
}

/// Tolerance per dtype: the GPU computes in f32 like the CPU but in another order, and its
/// result may round to the neighbouring bf16/f16 value.
fn tol(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => 1e-4,
        DType::F16 => 4e-3,
        DType::BF16 => 2e-2,
    }
}

/// Asserts the GPU result matches the CPU one: same shape and dtype, and every element within
/// `tol · (1 + |cpu|)`.
fn check(what: &str, got: &Tensor, want: &Tensor, tol: f32) {
    assert_eq!(got.device(), GPU, "{what}: result not on the GPU");
    assert_eq!(want.device(), Device::Cpu, "{what}: reference not on the CPU");
    assert_eq!(got.shape(), want.shape(), "{what}: shapes differ");
    assert_eq!(got.dtype(), want.dtype(), "{what}: dtypes differ");
    let (g, w) = (got.to_vec_f32().unwrap(), want.to_vec_f32().unwrap());
    let mut worst = (0.0f32, 0usize);
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let err = (a - b).abs() / (1.0 + b.abs());
        assert!(err <= tol, "{what}: element {i}: gpu {a}, cpu {b} (relative error {err}, tolerance {tol})");
        if err > worst.0 {
            worst = (err, i);
        }
    }
    eprintln!("{what}: ok, worst relative error {:.2e} at {}", worst.0, worst.1);
}

const DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

#[test]
fn device_is_available() {
    GPU.ensure_available().unwrap();
    GPU.synchronize().unwrap();
}

#[test]
fn upload_download_and_casts_are_exact() {
    let mut rng = Rng::new(1);
    let mut values = rng.vec(1000, 3.0);
    // Values around rounding boundaries, tiny (f16-subnormal) and huge (f16-overflowing) ones.
    values.extend([0.0, -0.0, 1.0, -1.0, 1.0 + 1.0 / 256.0, 1.0 + 3.0 / 512.0, 65504.0, 1e6, -1e6, 1e-6, -3e-7]);
    values.extend([1e-30, f32::INFINITY, f32::NEG_INFINITY, 0.1, 1.0 / 3.0, 2.0f32.powi(-24), 3.0 * 2.0f32.powi(-25)]);
    let base = Tensor::from_vec(values.clone(), [values.len()]).unwrap();
    for from in DTYPES {
        let cpu = base.to_dtype(from).unwrap();
        let dev = gpu(&cpu);
        assert_eq!(dev.dtype(), from);
        assert_eq!(dev.to_cpu_storage().unwrap(), cpu.to_cpu_storage().unwrap(), "round trip of {from}");
        for to in DTYPES {
            let want = cpu.to_dtype(to).unwrap().to_cpu_storage().unwrap();
            let got = dev.to_dtype(to).unwrap();
            assert_eq!(got.device(), GPU);
            assert_eq!(got.to_cpu_storage().unwrap(), want, "cast {from} -> {to}");
        }
    }
    // Empty tensors and zeros.
    for dtype in DTYPES {
        let empty = Tensor::zeros([0, 5], dtype, GPU).unwrap();
        assert_eq!(empty.to_cpu_storage().unwrap(), CpuStorage::zeros(0, dtype));
        let z = Tensor::zeros([3, 7], dtype, GPU).unwrap();
        assert_eq!(z.to_cpu_storage().unwrap(), CpuStorage::zeros(21, dtype));
        let host = Tensor::from_cpu(CpuStorage::zeros(0, dtype), [0]).unwrap();
        assert_eq!(gpu(&host).to_cpu_storage().unwrap(), CpuStorage::zeros(0, dtype));
    }
}

#[test]
fn clone_then_write_leaves_the_clone_alone() {
    let mut rng = Rng::new(2);
    let a = gpu(&rng.tensor(&[4, 8], 1.0, DType::F32));
    let before = a.to_vec_f32().unwrap();
    let mut b = a.clone();
    ops::scale_in_place(&mut b, 2.0).unwrap();
    assert_eq!(a.to_vec_f32().unwrap(), before);
    let doubled: Vec<f32> = before.iter().map(|v| v * 2.0).collect();
    assert_eq!(b.to_vec_f32().unwrap(), doubled);
}

#[test]
fn matmul_all_layouts() {
    let mut rng = Rng::new(3);
    // (a shape, b shape, trans_a, trans_b)
    let cases: &[(&[usize], &[usize], bool, bool)] = &[
        (&[5, 7], &[7, 3], false, false),
        (&[5, 7], &[3, 7], false, true),
        (&[7, 5], &[7, 3], true, false),
        (&[7, 5], &[3, 7], true, true),
        (&[2, 3, 33, 65], &[65, 17], false, false), // shared b, contiguous rows: one tall GEMM
        (&[4, 65, 33], &[17, 65], true, true),      // shared b, a transposed: stride-0 batch
        (&[4, 33, 65], &[4, 65, 17], false, false), // batched b
        (&[4, 65, 33], &[4, 17, 65], true, true),
        (&[3, 0], &[0, 4], false, false), // k = 0: zeros
        (&[0, 4], &[4, 6], false, false),
    ];
    for &(sa, sb, ta, tb) in cases {
        for dtype in DTYPES {
            let (a, b) = (rng.tensor(sa, 1.0, dtype), rng.tensor(sb, 1.0, dtype));
            let want = ops::matmul(&a, &b, ta, tb).unwrap();
            let got = ops::matmul(&gpu(&a), &gpu(&b), ta, tb).unwrap();
            check(&format!("matmul {sa:?} x {sb:?} ({ta}, {tb}) {dtype}"), &got, &want, tol(dtype));
            let dc = rng.tensor(want.shape(), 1.0, dtype);
            let (da, db) = ops::matmul_backward(&a, &b, &dc, ta, tb).unwrap();
            let (gda, gdb) = ops::matmul_backward(&gpu(&a), &gpu(&b), &gpu(&dc), ta, tb).unwrap();
            check(&format!("matmul_backward da {sa:?} {dtype}"), &gda, &da, tol(dtype));
            check(&format!("matmul_backward db {sb:?} {dtype}"), &gdb, &db, tol(dtype));
        }
    }
}

#[test]
fn elementwise_ops() {
    let mut rng = Rng::new(4);
    for dtype in DTYPES {
        let t = tol(dtype);
        let (a, b) = (rng.tensor(&[3, 5, 70], 2.0, dtype), rng.tensor(&[3, 5, 70], 2.0, dtype));
        check("add", &ops::add(&gpu(&a), &gpu(&b)).unwrap(), &ops::add(&a, &b).unwrap(), t);
        check("swiglu", &ops::swiglu(&gpu(&a), &gpu(&b)).unwrap(), &ops::swiglu(&a, &b).unwrap(), t);
        let dy = rng.tensor(&[3, 5, 70], 1.0, dtype);
        let (dg, du) = ops::swiglu_backward(&a, &b, &dy).unwrap();
        let (gdg, gdu) = ops::swiglu_backward(&gpu(&a), &gpu(&b), &gpu(&dy)).unwrap();
        check("swiglu_backward dgate", &gdg, &dg, t);
        check("swiglu_backward dup", &gdu, &du, t);
        check("transpose", &ops::transpose(&gpu(&a)).unwrap(), &ops::transpose(&a).unwrap(), t);

        let x = rng.tensor(&[9, 300], 1.0, dtype);
        check("sum_batch", &ops::sum_batch(&gpu(&x)).unwrap(), &ops::sum_batch(&x).unwrap(), t);
        let s = rng.tensor(&[9], 1.0, dtype);
        check("scale_rows", &ops::scale_rows(&gpu(&x), &gpu(&s)).unwrap(), &ops::scale_rows(&x, &s).unwrap(), t);
        let y = rng.tensor(&[9, 300], 1.0, dtype);
        check("row_dot", &ops::row_dot(&gpu(&x), &gpu(&y)).unwrap(), &ops::row_dot(&x, &y).unwrap(), t);
        let (dx, ds) = ops::scale_rows_backward(&x, &s, &y).unwrap();
        let (gdx, gds) = ops::scale_rows_backward(&gpu(&x), &gpu(&s), &gpu(&y)).unwrap();
        check("scale_rows_backward dx", &gdx, &dx, t);
        check("scale_rows_backward ds", &gds, &ds, t);

        let idx: Vec<u32> = (0..23).map(|_| rng.below(9) as u32).collect(); // with repeats
        check("gather_rows", &ops::gather_rows(&gpu(&x), &idx).unwrap(), &ops::gather_rows(&x, &idx).unwrap(), t);
        let rows = rng.tensor(&[23, 300], 1.0, dtype);
        let want = ops::scatter_add_rows(&rows, &idx, 11).unwrap();
        check("scatter_add_rows", &ops::scatter_add_rows(&gpu(&rows), &idx, 11).unwrap(), &want, t);
        check("embedding", &ops::embedding(&gpu(&x), &idx).unwrap(), &ops::embedding(&x, &idx).unwrap(), t);
        let want = ops::embedding_backward(&idx, &rows, 9).unwrap();
        check("embedding_backward", &ops::embedding_backward(&idx, &gpu(&rows), 9).unwrap(), &want, t);
    }
}

#[test]
fn softmax_and_rms_norm() {
    let mut rng = Rng::new(5);
    for dtype in DTYPES {
        let t = tol(dtype);
        for d in [1, 7, 256, 513] {
            let x = rng.tensor(&[2, 3, d], 4.0, dtype);
            let y = ops::softmax(&x).unwrap();
            let gy = ops::softmax(&gpu(&x)).unwrap();
            check(&format!("softmax d={d} {dtype}"), &gy, &y, t);
            let dy = rng.tensor(&[2, 3, d], 1.0, dtype);
            let want = ops::softmax_backward(&y, &dy).unwrap();
            check(&format!("softmax_backward d={d}"), &ops::softmax_backward(&gpu(&y), &gpu(&dy)).unwrap(), &want, t);

            let x = rng.tensor(&[6, d], 2.0, dtype);
            let w = rng.tensor(&[d], 1.0, dtype);
            let want = ops::rms_norm(&x, &w, 1e-5).unwrap();
            check(&format!("rms_norm d={d} {dtype}"), &ops::rms_norm(&gpu(&x), &gpu(&w), 1e-5).unwrap(), &want, t);
            let dy = rng.tensor(&[6, d], 1.0, dtype);
            let (dx, dw) = ops::rms_norm_backward(&x, &w, &dy, 1e-5).unwrap();
            let (gdx, gdw) = ops::rms_norm_backward(&gpu(&x), &gpu(&w), &gpu(&dy), 1e-5).unwrap();
            check(&format!("rms_norm_backward dx d={d} {dtype}"), &gdx, &dx, t);
            check(&format!("rms_norm_backward dw d={d} {dtype}"), &gdw, &dw, t);
        }
    }
}

#[test]
fn rope_forward_and_backward() {
    let mut rng = Rng::new(6);
    let scalings = [
        RopeScaling::None,
        RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        },
    ];
    for scaling in &scalings {
        let rope = Rope::new(64, 500_000.0, scaling).unwrap();
        let positions: Vec<u32> = vec![0, 1, 2, 17, 4095, 131_071, 5];
        for dtype in DTYPES {
            let x = rng.tensor(&[positions.len(), 3, 64], 1.0, dtype);
            let want = ops::rope(&x, &positions, &rope).unwrap();
            check(&format!("rope {dtype}"), &ops::rope(&gpu(&x), &positions, &rope).unwrap(), &want, tol(dtype));
            let want = ops::rope_backward(&x, &positions, &rope).unwrap();
            let got = ops::rope_backward(&gpu(&x), &positions, &rope).unwrap();
            check(&format!("rope_backward {dtype}"), &got, &want, tol(dtype));
        }
    }
}

#[test]
fn cross_entropy_with_ignored_targets() {
    let mut rng = Rng::new(7);
    for dtype in DTYPES {
        let vocab = 1000;
        let logits = rng.tensor(&[6, vocab], 5.0, dtype);
        let targets = [3, -100, 999, 0, -1, 512];
        let want = ops::cross_entropy(&logits, &targets).unwrap();
        let got = ops::cross_entropy(&gpu(&logits), &targets).unwrap();
        check(&format!("cross_entropy {dtype}"), &got, &want, tol(dtype).max(1e-4));
        let dloss = rng.tensor(&[6], 1.0, DType::F32);
        let want = ops::cross_entropy_backward(&logits, &targets, &dloss).unwrap();
        let got = ops::cross_entropy_backward(&gpu(&logits), &targets, &gpu(&dloss)).unwrap();
        check(&format!("cross_entropy_backward {dtype}"), &got, &want, tol(dtype));
        let (want_l, want_g) = ops::cross_entropy_with_grad(logits.clone(), &targets, &dloss).unwrap();
        let (got_l, got_g) = ops::cross_entropy_with_grad(gpu(&logits), &targets, &gpu(&dloss)).unwrap();
        check(&format!("cross_entropy_with_grad loss {dtype}"), &got_l, &want_l, tol(dtype).max(1e-4));
        check(&format!("cross_entropy_with_grad grad {dtype}"), &got_g, &want_g, tol(dtype));
    }
}

/// A ragged batch over one paged cache: a prefill, a decode, a chunked prefill, and a short
/// sequence sharing its first block with the prefill (a shared prefix, so two sequences' key
/// gradients meet in one block).
fn ragged_batch() -> Vec<SeqAttention> {
    vec![
        SeqAttention { q_len: 7, context_len: 7, block_table: vec![3, 0] },
        SeqAttention { q_len: 1, context_len: 9, block_table: vec![5, 1, 7] },
        SeqAttention { q_len: 3, context_len: 6, block_table: vec![2, 9] },
        SeqAttention { q_len: 2, context_len: 3, block_table: vec![3] },
        SeqAttention { q_len: 1, context_len: 1, block_table: vec![11] },
    ]
}

#[test]
fn paged_attention_ragged_gqa() {
    let mut rng = Rng::new(8);
    let seqs = ragged_batch();
    let tokens: usize = seqs.iter().map(|s| s.q_len).sum();
    // (q_heads, kv_heads, head_dim): GQA, MQA with a head_dim that is no multiple of 32, MHA.
    for (hq, hkv, dh) in [(4, 2, 64), (3, 1, 80), (2, 2, 128), (2, 1, 256)] {
        let (nb, bs) = (12, 4);
        let scale = 1.0 / (dh as f32).sqrt();
        for dtype in DTYPES {
            let t = tol(dtype);
            let q = rng.tensor(&[tokens, hq, dh], 1.0, dtype);
            let k = rng.tensor(&[nb, bs, hkv, dh], 1.0, dtype);
            let v = rng.tensor(&[nb, bs, hkv, dh], 1.0, dtype);
            let (gq, gk, gv) = (gpu(&q), gpu(&k), gpu(&v));
            let what = format!("paged_attention hq={hq} hkv={hkv} dh={dh} {dtype}");
            let out = ops::paged_attention(&q, &k, &v, &seqs, scale).unwrap();
            let gout = ops::paged_attention(&gq, &gk, &gv, &seqs, scale).unwrap();
            check(&what, &gout, &out, t);
            let dout = rng.tensor(&[tokens, hq, dh], 1.0, dtype);
            let (dq, dk, dv) = ops::paged_attention_backward(&q, &k, &v, &seqs, &out, &dout, scale).unwrap();
            let (gdq, gdk, gdv) =
                ops::paged_attention_backward(&gq, &gk, &gv, &seqs, &gpu(&out), &gpu(&dout), scale).unwrap();
            check(&format!("{what} dq"), &gdq, &dq, t);
            check(&format!("{what} dk"), &gdk, &dk, t);
            check(&format!("{what} dv"), &gdv, &dv, t);
        }
    }
    // A bf16 key cache with an f32 value cache takes the converting path.
    let q = rng.tensor(&[tokens, 4, 64], 1.0, DType::F32);
    let k = rng.tensor(&[12, 4, 2, 64], 1.0, DType::BF16);
    let v = rng.tensor(&[12, 4, 2, 64], 1.0, DType::F32);
    let want = ops::paged_attention(&q, &k, &v, &seqs, 0.125).unwrap();
    let got = ops::paged_attention(&gpu(&q), &gpu(&k), &gpu(&v), &seqs, 0.125).unwrap();
    check("paged_attention mixed cache dtypes", &got, &want, 1e-4);
}

#[test]
fn write_kv_into_every_dtype() {
    let mut rng = Rng::new(9);
    let slots = [5u32, 0, 47, 13, 14, 30];
    for cache_dtype in DTYPES {
        for x_dtype in [DType::F32, DType::BF16] {
            let mut cache = rng.tensor(&[12, 4, 2, 16], 1.0, cache_dtype);
            let mut gcache = gpu(&cache);
            let x = rng.tensor(&[slots.len(), 2, 16], 1.0, x_dtype);
            ops::write_kv(&mut cache, &x, &slots).unwrap();
            ops::write_kv(&mut gcache, &gpu(&x), &slots).unwrap();
            // Same rounding on both sides: exact.
            check(&format!("write_kv cache {cache_dtype} x {x_dtype}"), &gcache, &cache, 0.0);
            let want = ops::gather_kv(&cache, &slots).unwrap();
            check("gather_kv", &ops::gather_kv(&gcache, &slots).unwrap(), &want, 0.0);
        }
    }
}

#[test]
fn grouped_matmul_with_unused_segment() {
    let mut rng = Rng::new(10);
    // Expert 1 used twice, a -1 segment, an empty segment.
    let segs = Segments::new(vec![0, 5, 9, 9, 12, 20], vec![1, -1, 0, 2, 1]);
    for dtype in DTYPES {
        let t = tol(dtype);
        let x = rng.tensor(&[20, 48], 1.0, dtype);
        let w = rng.tensor(&[4, 24, 48], 1.0, dtype);
        let want = ops::grouped_matmul(&x, &w, &segs).unwrap();
        check(&format!("grouped_matmul {dtype}"), &ops::grouped_matmul(&gpu(&x), &gpu(&w), &segs).unwrap(), &want, t);
        let dy = rng.tensor(&[20, 24], 1.0, dtype);
        let (dx, dw) = ops::grouped_matmul_backward(&x, &w, &segs, &dy, true).unwrap();
        let (gdx, gdw) = ops::grouped_matmul_backward(&gpu(&x), &gpu(&w), &segs, &gpu(&dy), true).unwrap();
        check(&format!("grouped_matmul_backward dx {dtype}"), &gdx, &dx, t);
        check(&format!("grouped_matmul_backward dw {dtype}"), &gdw.unwrap(), &dw.unwrap(), t);
        let (gdx_only, none) = ops::grouped_matmul_backward(&gpu(&x), &gpu(&w), &segs, &gpu(&dy), false).unwrap();
        assert!(none.is_none());
        check(&format!("grouped_matmul_backward dx only {dtype}"), &gdx_only, &dx, t);
    }
}

/// The same adapters in a CPU bank and a GPU bank.
fn banks(rng: &mut Rng, ranks: &[usize], in_f: usize, out_f: usize, dtype: DType) -> (LoraBank, LoraBank) {
    let adapters: Vec<(Tensor, Tensor, f32)> = ranks
        .iter()
        .enumerate()
        .map(|(i, &r)| (rng.tensor(&[r, in_f], 1.0, dtype), rng.tensor(&[r, out_f], 1.0, dtype), 0.5 + i as f32))
        .collect();
    (LoraBank::new(adapters.clone(), Device::Cpu).unwrap(), LoraBank::new(adapters, Device::Cuda(0)).unwrap())
}

#[test]
fn sgmv_and_bgmv_mixed_ranks() {
    let mut rng = Rng::new(11);
    let (in_f, out_f, n) = (40, 56, 24);
    for dtype in DTYPES {
        let t = tol(dtype);
        let (b, gb) = banks(&mut rng, &[4, 1, 16, 8], in_f, out_f, dtype);
        let x = rng.tensor(&[n, in_f], 1.0, dtype);
        let y0 = rng.tensor(&[n, out_f], 1.0, dtype);

        let segs = Segments::new(vec![0, 3, 4, 10, 10, 17, 24], vec![2, -1, 0, 3, 1, 2]);
        let (mut y, mut gy) = (y0.clone(), gpu(&y0));
        ops::sgmv(&mut y, &x, &b, &segs).unwrap();
        ops::sgmv(&mut gy, &gpu(&x), &gb, &segs).unwrap();
        check(&format!("sgmv {dtype}"), &gy, &y, t);

        let adapter: Vec<i32> = (0..n).map(|_| rng.below(5) as i32 - 1).collect();
        let (mut y, mut gy) = (y0.clone(), gpu(&y0));
        ops::bgmv(&mut y, &x, &b, &adapter).unwrap();
        ops::bgmv(&mut gy, &gpu(&x), &gb, &adapter).unwrap();
        check(&format!("bgmv {dtype}"), &gy, &y, t);

        let dy = rng.tensor(&[n, out_f], 1.0, dtype);
        let want = ops::sgmv_backward(&x, &b, &segs, &dy).unwrap();
        let got = ops::sgmv_backward(&gpu(&x), &gb, &segs, &gpu(&dy)).unwrap();
        check(&format!("sgmv_backward dx {dtype}"), &got.dx, &want.dx, t);
        check(&format!("sgmv_backward da {dtype}"), &got.da, &want.da, t);
        check(&format!("sgmv_backward dbt {dtype}"), &got.dbt, &want.dbt, t);
        let want = ops::bgmv_backward(&x, &b, &adapter, &dy).unwrap();
        let got = ops::bgmv_backward(&gpu(&x), &gb, &adapter, &gpu(&dy)).unwrap();
        check(&format!("bgmv_backward dx {dtype}"), &got.dx, &want.dx, t);
        check(&format!("bgmv_backward da {dtype}"), &got.da, &want.da, t);
        check(&format!("bgmv_backward dbt {dtype}"), &got.dbt, &want.dbt, t);
    }
}

#[test]
fn moe_gate_on_the_gpu() {
    let mut rng = Rng::new(12);
    let logits = rng.tensor(&[10, 8], 2.0, DType::F32);
    let want = ops::moe_gate(&logits, 2, true).unwrap();
    let got = ops::moe_gate(&gpu(&logits), 2, true).unwrap();
    assert_eq!(got.experts, want.experts);
    check("moe_gate weights", &got.weights, &want.weights, 1e-4);
    let dw = rng.tensor(&[10, 2], 1.0, DType::F32);
    let want = ops::moe_gate_backward(&logits, &want, &dw, true).unwrap();
    let got = ops::moe_gate_backward(&gpu(&logits), &got, &gpu(&dw), true).unwrap();
    check("moe_gate_backward", &got, &want, 1e-4);
}

#[test]
fn optimizer_ops() {
    let mut rng = Rng::new(13);
    let cfg = AdamW { lr: 1e-2, weight_decay: 0.1, ..AdamW::default() };
    for dtype in DTYPES {
        let t = tol(dtype);
        let shape = [37, 29];
        let (mut p, mut m) = (rng.tensor(&shape, 1.0, dtype), rng.tensor(&shape, 0.1, dtype));
        // Second moments are non-negative.
        let v: Vec<f32> = rng.vec(37 * 29, 0.01).iter().map(|x| x.abs()).collect();
        let mut v = Tensor::from_vec(v, shape).unwrap().to_dtype(dtype).unwrap();
        let (mut gp, mut gm, mut gv) = (gpu(&p), gpu(&m), gpu(&v));
        for step in 1..=3 {
            let g = rng.tensor(&shape, 1.0, dtype);
            ops::adamw_step(&mut p, &g, &mut m, &mut v, &cfg, step).unwrap();
            ops::adamw_step(&mut gp, &gpu(&g), &mut gm, &mut gv, &cfg, step).unwrap();
        }
        check(&format!("adamw param {dtype}"), &gp, &p, t);
        check(&format!("adamw m {dtype}"), &gm, &m, t);
        check(&format!("adamw v {dtype}"), &gv, &v, t);

        let x = rng.tensor(&[1000, 33], 1.0, dtype);
        let (want, got) = (ops::sum_squares(&x).unwrap(), ops::sum_squares(&gpu(&x)).unwrap());
        assert!((want - got).abs() <= 1e-6 * want.abs(), "sum_squares {dtype}: gpu {got}, cpu {want}");
        let empty = Tensor::zeros([0], dtype, GPU).unwrap();
        assert_eq!(ops::sum_squares(&empty).unwrap(), 0.0);

        let (mut c, mut gc) = (x.clone(), gpu(&x));
        ops::scale_in_place(&mut c, -0.37).unwrap();
        ops::scale_in_place(&mut gc, -0.37).unwrap();
        check(&format!("scale_in_place {dtype}"), &gc, &c, t);

        let (mut a, mut b) = (rng.tensor(&[50], 3.0, dtype), rng.tensor(&[7, 9], 3.0, dtype));
        let (mut ga, mut gb) = (gpu(&a), gpu(&b));
        let want = ops::clip_grad_norm(&mut [&mut a, &mut b], 1.0).unwrap();
        let got = ops::clip_grad_norm(&mut [&mut ga, &mut gb], 1.0).unwrap();
        assert!((want - got).abs() <= 1e-4 * want.abs(), "clip_grad_norm {dtype}: gpu {got}, cpu {want}");
        check(&format!("clip_grad_norm a {dtype}"), &ga, &a, t);
        check(&format!("clip_grad_norm b {dtype}"), &gb, &b, t);
    }
}
