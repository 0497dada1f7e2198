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
pub use rope::{Rope, RopeScaling, rope, rope_backward};
pub use segments::Segments;
