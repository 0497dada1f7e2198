//! Every backward op against central finite differences of its forward.

use tandem_kernels::Tensor;
use tandem_kernels::ops::{self, LoraBank, RopeScaling, Segments, SeqAttention};

use crate::common::{Rng, assert_close, check_grad};

fn upstream(rng: &mut Rng, out: &Tensor) -> (Vec<f32>, Tensor) {
    let g = rng.vec(out.elem_count(), 1.0);
    let t = Tensor::from_vec(g.clone(), out.shape().to_vec()).unwrap();
    (g, t)
}

#[test]
fn matmul_all_layouts() {
    let mut rng = Rng::new(1);
    let (m, n, k) = (3, 4, 5);
    for trans_a in [false, true] {
        for trans_b in [false, true] {
            for (batch, b_batched) in [(None, false), (Some(2), false), (Some(2), true)] {
                let mat = |rows, cols, t: bool| if t { vec![cols, rows] } else { vec![rows, cols] };
                let mut a_shape = mat(m, k, trans_a);
                let mut b_shape = mat(k, n, trans_b);
                if let Some(bs) = batch {
                    a_shape.insert(0, bs);
                    if b_batched {
                        b_shape.insert(0, bs);
                    }
                }
                let inputs = [rng.tensor(&a_shape, 1.0), rng.tensor(&b_shape, 1.0)];
                let f = |x: &[Tensor]| ops::matmul(&x[0], &x[1], trans_a, trans_b).unwrap();
                let out = f(&inputs);
                let (g, gt) = upstream(&mut rng, &out);
                let (da, db) = ops::matmul_backward(&inputs[0], &inputs[1], &gt, trans_a, trans_b).unwrap();
                let what = format!("matmul ta={trans_a} tb={trans_b} batch={batch:?} b_batched={b_batched}");
                check_grad(&format!("{what} da"), &inputs, 0, &f, &g, &da);
                check_grad(&format!("{what} db"), &inputs, 1, &f, &g, &db);
            }
        }
    }
}

#[test]
fn rms_norm() {
    let mut rng = Rng::new(2);
    let inputs = [rng.tensor(&[4, 8], 1.0), rng.tensor(&[8], 1.0)];
    let f = |x: &[Tensor]| ops::rms_norm(&x[0], &x[1], 1e-5).unwrap();
    let (g, gt) = upstream(&mut rng, &f(&inputs));
    let (dx, dw) = ops::rms_norm_backward(&inputs[0], &inputs[1], &gt, 1e-5).unwrap();
    check_grad("rms_norm dx", &inputs, 0, &f, &g, &dx);
    check_grad("rms_norm dw", &inputs, 1, &f, &g, &dw);
}

#[test]
fn rope_every_scaling() {
    let scalings = [
        RopeScaling::None,
        RopeScaling::Linear { factor: 4.0 },
        RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64,
        },
    ];
    let mut rng = Rng::new(3);
    for scaling in scalings {
        let rope = ops::Rope::new(8, 10_000.0, &scaling).unwrap();
        let positions = [0, 5, 17, 300];
        let inputs = [rng.tensor(&[4, 2, 8], 1.0)];
        let f = |x: &[Tensor]| ops::rope(&x[0], &positions, &rope).unwrap();
        let (g, gt) = upstream(&mut rng, &f(&inputs));
        let dx = ops::rope_backward(&gt, &positions, &rope).unwrap();
        check_grad(&format!("rope {scaling:?}"), &inputs, 0, &f, &g, &dx);
    }
}

#[test]
fn swiglu() {
    let mut rng = Rng::new(4);
    let inputs = [rng.tensor(&[3, 7], 2.0), rng.tensor(&[3, 7], 2.0)];
    let f = |x: &[Tensor]| ops::swiglu(&x[0], &x[1]).unwrap();
    let (g, gt) = upstream(&mut rng, &f(&inputs));
    let (dg, du) = ops::swiglu_backward(&inputs[0], &inputs[1], &gt).unwrap();
    check_grad("swiglu dgate", &inputs, 0, &f, &g, &dg);
    check_grad("swiglu dup", &inputs, 1, &f, &g, &du);
}

#[test]
fn softmax() {
    let mut rng = Rng::new(5);
    let inputs = [rng.tensor(&[2, 3, 6], 2.0)];
    let f = |x: &[Tensor]| ops::softmax(&x[0]).unwrap();
    let y = f(&inputs);
    let (g, gt) = upstream(&mut rng, &y);
    let dx = ops::softmax_backward(&y, &gt).unwrap();
    check_grad("softmax", &inputs, 0, &f, &g, &dx);
}

#[test]
fn embedding_and_row_ops() {
    let mut rng = Rng::new(6);
    let ids = [3, 0, 3, 5];
    let inputs = [rng.tensor(&[6, 4], 1.0)];
    let f = |x: &[Tensor]| ops::embedding(&x[0], &ids).unwrap();
    let (g, gt) = upstream(&mut rng, &f(&inputs));
    let dt = ops::embedding_backward(&ids, &gt, 6).unwrap();
    check_grad("embedding", &inputs, 0, &f, &g, &dt);

    let inputs = [rng.tensor(&[4, 3], 1.0), rng.tensor(&[4], 1.0)];
    let f = |x: &[Tensor]| ops::scale_rows(&x[0], &x[1]).unwrap();
    let (g, gt) = upstream(&mut rng, &f(&inputs));
    let (dx, ds) = ops::scale_rows_backward(&inputs[0], &inputs[1], &gt).unwrap();
    check_grad("scale_rows dx", &inputs, 0, &f, &g, &dx);
    check_grad("scale_rows ds", &inputs, 1, &f, &g, &ds);

    let idx = [2, 2, 0];
    let inputs = [rng.tensor(&[3, 5], 1.0)];
    let f = |x: &[Tensor]| ops::scatter_add_rows(&x[0], &idx, 4).unwrap();
    let (g, gt) = upstream(&mut rng, &f(&inputs));
    let dx = ops::gather_rows(&gt, &idx).unwrap();
    check_grad("scatter_add_rows", &inputs, 0, &f, &g, &dx);
}

#[test]
fn cross_entropy_with_ignored_tokens() {
    let mut rng = Rng::new(7);
    let targets = [2, -100, 0, 4];
    let inputs = [rng.tensor(&[4, 5], 3.0)];
    let f = |x: &[Tensor]| ops::cross_entropy(&x[0], &targets).unwrap();
    let losses = f(&inputs);
    assert_eq!(losses.to_vec_f32().unwrap()[1], 0.0, "an ignored token carries no loss");
    let (g, gt) = upstream(&mut rng, &losses);
    let dl = ops::cross_entropy_backward(&inputs[0], &targets, &gt).unwrap();
    assert!(dl.to_vec_f32().unwrap()[5..10].iter().all(|&v| v == 0.0), "no gradient on an ignored token");
    check_grad("cross_entropy", &inputs, 0, &f, &g, &dl);
    // The fused form gives the same losses and gradient.
    let (fused_losses, fused_grad) = ops::cross_entropy_with_grad(inputs[0].clone(), &targets, &gt).unwrap();
    assert_close("fused loss", &fused_losses.to_vec_f32().unwrap(), &losses.to_vec_f32().unwrap(), 1e-6, 1e-6);
    assert_close("fused grad", &fused_grad.to_vec_f32().unwrap(), &dl.to_vec_f32().unwrap(), 1e-6, 1e-6);
}

#[test]
fn moe_gate_with_and_without_renormalisation() {
    let mut rng = Rng::new(8);
    for renormalize in [false, true] {
        let inputs = [rng.tensor(&[5, 6], 3.0)];
        let routing = ops::moe_gate(&inputs[0], 2, renormalize).unwrap();
        // The choice of experts is held fixed, as the backward assumes; small probes do not
        // change it for these well-separated logits.
        let f = |x: &[Tensor]| ops::moe_gate(&x[0], 2, renormalize).unwrap().weights;
        let (g, gt) = upstream(&mut rng, &routing.weights);
        let dl = ops::moe_gate_backward(&inputs[0], &routing, &gt, renormalize).unwrap();
        check_grad(&format!("moe_gate renormalize={renormalize}"), &inputs, 0, &f, &g, &dl);
    }
}

#[test]
fn grouped_matmul() {
    let mut rng = Rng::new(9);
    let segs = Segments::new(vec![0, 2, 3, 3, 6], vec![1, -1, 0, 1]);
    let inputs = [rng.tensor(&[6, 4], 1.0), rng.tensor(&[3, 5, 4], 1.0)];
    let f = |x: &[Tensor]| ops::grouped_matmul(&x[0], &x[1], &segs).unwrap();
    let (g, gt) = upstream(&mut rng, &f(&inputs));
    let (dx, dw) = ops::grouped_matmul_backward(&inputs[0], &inputs[1], &segs, &gt, true).unwrap();
    check_grad("grouped_matmul dx", &inputs, 0, &f, &g, &dx);
    check_grad("grouped_matmul dw", &inputs, 1, &f, &g, &dw.unwrap());
    let (dx_only, none) = ops::grouped_matmul_backward(&inputs[0], &inputs[1], &segs, &gt, false).unwrap();
    assert!(none.is_none());
    assert_eq!(dx_only.to_vec_f32().unwrap(), dx.to_vec_f32().unwrap());
}

/// Adapters with ranks 2, 0 (degenerate but legal), 3 and 1 over 5 -> 4 features, and their scales.
const RANKS: [usize; 4] = [2, 0, 3, 1];
const SCALES: [f32; 4] = [0.5, 1.5, 2.5, 3.5];

/// The input rows and the adapters' weights in the packed shapes the gradients come in: every
/// `A` stacked (`[6, 5]`) and every `Bᵀ` stacked (`[6, 4]`).
fn lora_inputs(rng: &mut Rng) -> (LoraBank, [Tensor; 3]) {
    let inputs = [rng.tensor(&[7, 5], 1.0), rng.tensor(&[6, 5], 1.0), rng.tensor(&[6, 4], 1.0)];
    (rebank(&inputs), inputs)
}

/// The bank of the packed weights `x[1]` and `x[2]`, each adapter's `A` and `Bᵀ` their row blocks.
fn rebank(x: &[Tensor]) -> LoraBank {
    let (a, bt) = (x[1].to_vec_f32().unwrap(), x[2].to_vec_f32().unwrap());
    let mut off = 0;
    let modules = RANKS
        .iter()
        .zip(SCALES)
        .map(|(&r, scale)| {
            let rows = |data: &[f32], width: usize| {
                Tensor::from_vec(data[off * width..(off + r) * width].to_vec(), [r, width]).unwrap()
            };
            let module = (rows(&a, 5), rows(&bt, 4), scale);
            off += r;
            module
        })
        .collect();
    LoraBank::new(modules, tandem_kernels::Device::Cpu).unwrap()
}

#[test]
fn sgmv() {
    let mut rng = Rng::new(10);
    let (bank, inputs) = lora_inputs(&mut rng);
    let segs = Segments::new(vec![0, 2, 3, 5, 5, 7], vec![2, -1, 0, 1, 3]);
    let f = |x: &[Tensor]| {
        let mut y = Tensor::zeros([7, 4], tandem_kernels::DType::F32, tandem_kernels::Device::Cpu).unwrap();
        ops::sgmv(&mut y, &x[0], &rebank(x), &segs).unwrap();
        y
    };
    let (g, gt) = upstream(&mut rng, &f(&inputs));
    let grads = ops::sgmv_backward(&inputs[0], &bank, &segs, &gt).unwrap();
    check_grad("sgmv dx", &inputs, 0, &f, &g, &grads.dx);
    check_grad("sgmv da", &inputs, 1, &f, &g, &grads.da);
    check_grad("sgmv dbt", &inputs, 2, &f, &g, &grads.dbt);
}

#[test]
fn bgmv() {
    let mut rng = Rng::new(11);
    let (bank, inputs) = lora_inputs(&mut rng);
    let adapter = [3, -1, 0, 2, 0, 3, 2];
    let f = |x: &[Tensor]| {
        let mut y = Tensor::zeros([7, 4], tandem_kernels::DType::F32, tandem_kernels::Device::Cpu).unwrap();
        ops::bgmv(&mut y, &x[0], &rebank(x), &adapter).unwrap();
        y
    };
    let (g, gt) = upstream(&mut rng, &f(&inputs));
    let grads = ops::bgmv_backward(&inputs[0], &bank, &adapter, &gt).unwrap();
    check_grad("bgmv dx", &inputs, 0, &f, &g, &grads.dx);
    check_grad("bgmv da", &inputs, 1, &f, &g, &grads.da);
    check_grad("bgmv dbt", &inputs, 2, &f, &g, &grads.dbt);
}

/// Checks all three attention gradients by finite differences on one batch; returns dk.
fn check_attention(rng: &mut Rng, label: &str, seqs: &[SeqAttention], inputs: &[Tensor; 3]) -> Tensor {
    let scale = 0.5;
    let f = |x: &[Tensor]| ops::paged_attention(&x[0], &x[1], &x[2], seqs, scale).unwrap();
    let out = f(inputs);
    let (g, gt) = upstream(rng, &out);
    let (dq, dk, dv) =
        ops::paged_attention_backward(&inputs[0], &inputs[1], &inputs[2], seqs, &out, &gt, scale).unwrap();
    check_grad(&format!("{label} dq"), inputs, 0, &f, &g, &dq);
    check_grad(&format!("{label} dk"), inputs, 1, &f, &g, &dk);
    check_grad(&format!("{label} dv"), inputs, 2, &f, &g, &dv);
    dk
}

#[test]
fn paged_attention_ragged_gqa() {
    let mut rng = Rng::new(12);
    // Cache of 6 blocks of 4 slots, 2 kv heads, head_dim 4; 4 query heads (GQA group of 2).
    // Sequence 0: full prefill of 5 tokens; 1: decode of one token after 6 cached keys;
    // 2: a chunk of 2 new tokens after 1 cached key.
    let seqs = vec![
        SeqAttention { q_len: 5, context_len: 5, block_table: vec![4, 1] },
        SeqAttention { q_len: 1, context_len: 7, block_table: vec![0, 5] },
        SeqAttention { q_len: 2, context_len: 3, block_table: vec![2] },
    ];
    let inputs = [rng.tensor(&[8, 4, 4], 1.0), rng.tensor(&[6, 4, 2, 4], 1.0), rng.tensor(&[6, 4, 2, 4], 1.0)];
    let dk = check_attention(&mut rng, "attention", &seqs, &inputs);
    // Block 3 belongs to no sequence: no gradient reaches it.
    let block = 4 * 2 * 4;
    assert!(dk.to_vec_f32().unwrap()[3 * block..4 * block].iter().all(|&v| v == 0.0));
}

#[test]
fn paged_attention_long_query_runs() {
    let mut rng = Rng::new(13);
    // Runs of 70 and 20 query tokens take the GEMM path (tiles of 64 rows), the first after 3
    // cached keys; a decode token keeps the per-token path. 2 kv heads, 6 query heads.
    let seqs = vec![
        SeqAttention { q_len: 70, context_len: 73, block_table: (0..10).collect() },
        SeqAttention { q_len: 1, context_len: 9, block_table: vec![10, 11] },
        SeqAttention { q_len: 20, context_len: 20, block_table: (12..17).collect() },
    ];
    let inputs = [rng.tensor(&[91, 6, 4], 1.0), rng.tensor(&[17, 8, 2, 4], 1.0), rng.tensor(&[17, 8, 2, 4], 1.0)];
    check_attention(&mut rng, "long attention", &seqs, &inputs);
}
