//! The paged KV cache: writing token rows into slots, and causal GQA attention (forward and
//! backward) over a ragged batch (`attention.cu`). The caches are read in their own dtype; q,
//! out and the gradients go through f32.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, LaunchConfig};

use crate::cuda::backend::compile::Module;
use crate::cuda::backend::context::CudaContext;
use crate::cuda::backend::launch::{self, grid_1d};
use crate::cuda::backend::storage::{Buf, BufMut, ctx_of, cuda_storage, cuda_storage_mut, f32_in, f32_out};
use crate::error::arg_err;
use crate::ops::{AttentionDims, SeqAttention, cache_slots};
use crate::{Error, Result, Tensor};

/// Warps per (token, head) block and the largest head_dim (`ATT_WARPS`, `ATT_MAX_DIM` in
/// `attention.cu`).
const ATT_THREADS: u32 = 4 * 32;
const ATT_MAX_DIM: usize = 256;

pub fn write_kv(cache: &mut Tensor, x: &Tensor, slots: &[u32], row: usize) -> Result<()> {
    const OP: &str = "write_kv";
    let ctx = ctx_of(OP, x)?;
    let xs = f32_in(OP, x)?;
    let sl = ctx.upload(OP, slots)?;
    let (t64, r64) = (slots.len() as u64, row as u64);
    let cfg = grid_1d(slots.len() * row);
    let m = Module::Attention;
    match cuda_storage_mut(OP, cache)?.slice_mut(OP)? {
        BufMut::F32(c) => launch!(ctx, OP, m, "write_kv_f32", cfg, c, &*xs, &sl, &t64, &r64),
        BufMut::BF16(c) => launch!(ctx, OP, m, "write_kv_bf16", cfg, c, &*xs, &sl, &t64, &r64),
        BufMut::F16(c) => launch!(ctx, OP, m, "write_kv_f16", cfg, c, &*xs, &sl, &t64, &r64),
    }
}

/// Per-call metadata of a ragged batch, on the device (see `attention.cu`).
struct Meta {
    tok_seq: CudaSlice<i32>,
    tok_pos: CudaSlice<i32>,
    slots: CudaSlice<u32>,
    seq_off: CudaSlice<u64>,
}

fn meta(ctx: &CudaContext, op: &'static str, seqs: &[SeqAttention], block_size: usize) -> Result<Meta> {
    let int = |v: usize| i32::try_from(v).map_err(|_| Error::InvalidArgument { op, msg: format!("{v} exceeds i32") });
    let (mut tok_seq, mut tok_pos, mut slots, mut seq_off) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (s, seq) in seqs.iter().enumerate() {
        seq_off.push(slots.len() as u64);
        slots.extend(cache_slots(seq, block_size));
        for p in seq.context_len - seq.q_len..seq.context_len {
            tok_seq.push(int(s)?);
            tok_pos.push(int(p)?);
        }
    }
    Ok(Meta {
        tok_seq: ctx.upload(op, &tok_seq)?,
        tok_pos: ctx.upload(op, &tok_pos)?,
        slots: ctx.upload(op, &slots)?,
        seq_off: ctx.upload(op, &seq_off)?,
    })
}

/// Grid of one block per (query token, query head), and the kernels' int arguments.
fn config(op: &'static str, d: &AttentionDims) -> Result<(LaunchConfig, [i32; 3])> {
    if d.head_dim > ATT_MAX_DIM {
        return arg_err(op, format!("head_dim {} exceeds the CUDA kernel's limit of {ATT_MAX_DIM}", d.head_dim));
    }
    let cfg = LaunchConfig {
        grid_dim: (launch::dim(op, d.tokens)?, launch::dim(op, d.q_heads)?, 1),
        block_dim: (ATT_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let ints = [launch::dim(op, d.q_heads)? as i32, launch::dim(op, d.kv_heads)? as i32, d.head_dim as i32];
    Ok((cfg, ints))
}

pub fn paged_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    seqs: &[SeqAttention],
    dims: &AttentionDims,
    scale: f32,
) -> Result<Tensor> {
    const OP: &str = "paged_attention";
    let ctx: Arc<CudaContext> = ctx_of(OP, q)?;
    let (cfg, [hq, hkv, dh]) = config(OP, dims)?;
    let meta = meta(&ctx, OP, seqs, dims.block_size)?;
    let qs = f32_in(OP, q)?;
    let mut out = ctx.zeros::<f32>(OP, q.elem_count())?;
    let m = Module::Attention;
    macro_rules! run {
        ($name:expr, $k:expr, $v:expr) => {
            launch!(
                ctx,
                OP,
                m,
                $name,
                cfg,
                &*qs,
                $k,
                $v,
                &mut out,
                &meta.tok_seq,
                &meta.tok_pos,
                &meta.slots,
                &meta.seq_off,
                &hq,
                &hkv,
                &dh,
                &scale
            )
        };
    }
    match (cuda_storage(OP, k_cache)?.buf(), cuda_storage(OP, v_cache)?.buf()) {
        (Buf::BF16(k), Buf::BF16(v)) => run!("paged_attention_bf16", &**k, &**v)?,
        (Buf::F16(k), Buf::F16(v)) => run!("paged_attention_f16", &**k, &**v)?,
        // f32 caches (borrowed as they are), or caches of two different dtypes (converted).
        _ => {
            let (k, v) = (f32_in(OP, k_cache)?, f32_in(OP, v_cache)?);
            run!("paged_attention_f32", &*k, &*v)?
        }
    }
    f32_out(OP, &ctx, out, q.shape().to_vec(), q.dtype())
}

#[allow(clippy::too_many_arguments)]
pub fn paged_attention_backward(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    seqs: &[SeqAttention],
    out: &Tensor,
    dout: &Tensor,
    dims: &AttentionDims,
    scale: f32,
) -> Result<(Tensor, Tensor, Tensor)> {
    const OP: &str = "paged_attention_backward";
    let ctx: Arc<CudaContext> = ctx_of(OP, q)?;
    let (cfg, [hq, hkv, dh]) = config(OP, dims)?;
    let meta = meta(&ctx, OP, seqs, dims.block_size)?;
    let (qs, os, dos) = (f32_in(OP, q)?, f32_in(OP, out)?, f32_in(OP, dout)?);
    let mut dq = ctx.zeros::<f32>(OP, q.elem_count())?;
    let mut dk = ctx.zeros::<f32>(OP, k_cache.elem_count())?;
    let mut dv = ctx.zeros::<f32>(OP, v_cache.elem_count())?;
    let m = Module::Attention;
    macro_rules! run {
        ($name:expr, $k:expr, $v:expr) => {
            launch!(
                ctx,
                OP,
                m,
                $name,
                cfg,
                &*qs,
                $k,
                $v,
                &*os,
                &*dos,
                &mut dq,
                &mut dk,
                &mut dv,
                &meta.tok_seq,
                &meta.tok_pos,
                &meta.slots,
                &meta.seq_off,
                &hq,
                &hkv,
                &dh,
                &scale
            )
        };
    }
    match (cuda_storage(OP, k_cache)?.buf(), cuda_storage(OP, v_cache)?.buf()) {
        (Buf::BF16(k), Buf::BF16(v)) => run!("paged_attention_bwd_bf16", &**k, &**v)?,
        (Buf::F16(k), Buf::F16(v)) => run!("paged_attention_bwd_f16", &**k, &**v)?,
        _ => {
            let (k, v) = (f32_in(OP, k_cache)?, f32_in(OP, v_cache)?);
            run!("paged_attention_bwd_f32", &*k, &*v)?
        }
    }
    Ok((
        f32_out(OP, &ctx, dq, q.shape().to_vec(), q.dtype())?,
        f32_out(OP, &ctx, dk, k_cache.shape().to_vec(), k_cache.dtype())?,
        f32_out(OP, &ctx, dv, v_cache.shape().to_vec(), v_cache.dtype())?,
    ))
}
