//! Every op the models need, as free functions over [`crate::Tensor`], each forward with its
//! backward beside it. Each op checks shapes and devices once, then runs the CPU kernel (in the
//! same file) or the CUDA one (`crate::cuda`).

pub mod activation;
pub mod attention;
pub mod elementwise;
pub mod embedding;
pub mod lora;
pub mod loss;
pub mod matmul;
pub mod moe;
pub mod norm;
pub mod optim;
pub mod reduce;
pub mod rope;
pub mod segments;

pub use activation::{softmax, softmax_backward, swiglu, swiglu_backward};
pub use attention::{
    AttentionDims, SeqAttention, cache_slots, gather_kv, paged_attention, paged_attention_backward, write_kv,
};
pub use elementwise::{
    add, add_bias, gather_rows, row_dot, scale_rows, scale_rows_backward, scatter_add_rows, sum_batch, transpose,
};
pub use embedding::{embedding, embedding_backward};
pub use lora::{LoraBank, LoraGrads, bgmv, bgmv_backward, bgmv_backward_into, sgmv, sgmv_backward};
pub use loss::{cross_entropy, cross_entropy_backward, cross_entropy_with_grad};
pub use matmul::{MatmulDims, matmul, matmul_backward, matmul_cpu};
pub use moe::{MoeRouting, grouped_matmul, grouped_matmul_backward, moe_gate, moe_gate_backward};
pub use norm::{rms_norm, rms_norm_backward};
pub use optim::{AdamW, adamw_step, clip_grad_norm, grad_norm, scale_in_place, sum_squares};
pub use reduce::{argmax, log_sum_exp};
pub use rope::{Rope, RopeScaling, rope, rope_backward};
pub use segments::Segments;

/// Every multiversioned kernel gives the same bits at every vector level this CPU runs.
#[cfg(test)]
mod isa_paths {
    use crate::cpu::{Isa, random};

    /// `f(isa)` at every level against the portable copy, bit for bit.
    fn same_bits(what: &str, f: impl Fn(Isa) -> Vec<f32>) {
        let want = f(Isa::Portable);
        for isa in Isa::available() {
            let got = f(isa);
            assert!(
                got.iter().map(|v| v.to_bits()).eq(want.iter().map(|v| v.to_bits())),
                "{what}: {isa:?} differs from the portable copy"
            );
        }
    }

    #[test]
    fn every_level_gives_the_portable_bits() {
        let d = 203; // not a multiple of any vector width: the tails run too
        let (x, w) = (random(d, 1), random(d, 2));
        same_bits("norm_row", |isa| {
            let mut y = vec![0.0; d];
            super::norm::norm_row::on(isa, &mut y, &x, &w, 1e-6);
            y
        });
        same_bits("swiglu_chunk", |isa| {
            let mut o = vec![0.0; d];
            super::activation::swiglu_chunk::on(isa, &mut o, &x, &w);
            o
        });
        same_bits("softmax_in_place", |isa| {
            let mut row = x.clone();
            super::activation::softmax_in_place::on(isa, &mut row);
            row
        });
        let (sin, cos) = (random(13, 10), random(13, 11));
        same_bits("rotate_token", |isa| {
            let mut tok = random(3 * 26, 12);
            super::rope::rotate_token::on(isa, &mut tok, &sin, &cos);
            tok
        });
        let dims =
            super::AttentionDims { tokens: 1, q_heads: 4, kv_heads: 2, head_dim: 24, num_blocks: 4, block_size: 4 };
        let row = dims.kv_heads * dims.head_dim;
        let (k, v) = (random(16 * row, 7), random(16 * row, 8));
        let q = random(dims.q_heads * dims.head_dim, 9);
        let keys: Vec<u32> = vec![3, 0, 9, 12, 5, 6, 15];
        same_bits("attend_one", |isa| {
            let mut o = vec![0.0; dims.q_heads * dims.head_dim];
            super::attention::attend_one::on(isa, &mut o, &q, &keys, &k, &v, &dims, 0.2);
            o
        });
    }
}
