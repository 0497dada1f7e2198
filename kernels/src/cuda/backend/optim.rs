//! Optimizer kernels: the AdamW step, the f64 sum of squares behind gradient clipping, and
//! in-place scaling.

use crate::cuda::backend::compile::Module;
use crate::cuda::backend::context::drv;
use crate::cuda::backend::launch::{BLOCK, grid_1d};
use crate::cuda::backend::storage::{ctx_of, f32_in, update_f32};
use crate::ops::AdamW;
use crate::{Error, Result, Tensor};

pub fn adamw_step(
    param: &mut Tensor,
    grad: &Tensor,
    m: &mut Tensor,
    v: &mut Tensor,
    cfg: &AdamW,
    bc1: f32,
    bc2: f32,
) -> Result<()> {
    const OP: &str = "adamw_step";
    let g = f32_in(OP, grad)?;
    let (step_size, bc2_sqrt) = (cfg.lr / bc1, bc2.sqrt());
    let AdamW { lr, beta1, beta2, eps, weight_decay } = *cfg;
    update_f32(OP, param, |ctx, p, len| {
        update_f32(OP, m, |_, m, _| {
            update_f32(OP, v, |_, v, _| {
                let n = len as u64;
                launch!(
                    ctx,
                    OP,
                    Module::Elementwise,
                    "adamw_f32",
                    grid_1d(len),
                    p,
                    &*g,
                    m,
                    v,
                    &n,
                    &lr,
                    &beta1,
                    &beta2,
                    &eps,
                    &weight_decay,
                    &step_size,
                    &bc2_sqrt
                )
            })
        })
    })
}

pub fn sum_squares(t: &Tensor) -> Result<f64> {
    const OP: &str = "sum_squares";
    let ctx = ctx_of(OP, t)?;
    let x = f32_in(OP, t)?;
    let n = t.elem_count();
    let mut out = ctx.zeros::<f64>(OP, 1)?;
    let n64 = n as u64;
    // One partial sum per block, so a modest grid keeps the atomics few.
    let mut cfg = grid_1d(n);
    cfg.grid_dim.0 = cfg.grid_dim.0.min(1024);
    debug_assert_eq!(cfg.block_dim.0, BLOCK);
    launch!(ctx, OP, Module::Elementwise, "sum_squares_f32", cfg, &*x, &mut out, &n64)?;
    let host = ctx.stream().clone_dtoh(&out).map_err(drv(OP))?;
    ctx.stream().synchronize().map_err(drv(OP))?;
    host.first().copied().ok_or_else(|| Error::Cuda { op: OP, msg: "empty result buffer".into() })
}

pub fn scale_in_place(t: &mut Tensor, s: f32) -> Result<()> {
    const OP: &str = "scale_in_place";
    update_f32(OP, t, |ctx, x, len| {
        let n = len as u64;
        launch!(ctx, OP, Module::Elementwise, "scale_f32", grid_1d(len), x, &s, &n)
    })
}
