//! Multi-LoRA (SGMV, BGMV and their backward) on cuBLAS, adapters of mixed ranks without
//! padding. Adapter `i` is the same dense row block `off..off+r` of the bank's `a` (`[R, in]`)
//! and `bt` (`[R, out]`, the adapters' `Bᵀ`), so each of its GEMMs reads contiguous weights.

use std::sync::Arc;

use cudarc::driver::CudaSlice;

use crate::cuda::backend::blas::{RowGemm, gemm, view, view_mut};
use crate::cuda::backend::compile::Module;
use crate::cuda::backend::context::CudaContext;
use crate::cuda::backend::launch::grid_1d;
use crate::cuda::backend::storage::{ctx_of, f32_in, f32_out, update_f32};
use crate::ops::{LoraBank, LoraGrads, Segments};
use crate::{Result, Tensor};

/// One adapter's blocks of the (f32) bank.
struct Adapter<'a> {
    bank: &'a LoraBank,
    a: &'a CudaSlice<f32>,
    bt: &'a CudaSlice<f32>,
    i: usize,
}

impl Adapter<'_> {
    fn rank(&self) -> usize {
        self.bank.rank(self.i)
    }

    /// `h [rows, r] = x · A_iᵀ` for `rows` dense input rows.
    fn shrink(
        &self,
        ctx: &CudaContext,
        op: &'static str,
        x: &CudaSlice<f32>,
        x_start: usize,
        rows: usize,
    ) -> Result<CudaSlice<f32>> {
        let (r, off, in_f) = (self.rank(), self.bank.offset(self.i), self.bank.in_features());
        let mut h = ctx.zeros::<f32>(op, rows * r)?;
        let xv = view(op, x, x_start, rows * in_f)?;
        let av = view(op, self.a, off * in_f, r * in_f)?;
        let mut hv = view_mut(op, &mut h, 0, rows * r)?;
        gemm(ctx, op, &RowGemm::new(rows, r, in_f, false, true), &xv, &av, &mut hv)?;
        Ok(h)
    }

    /// `y [rows, out] (+)= s_i · h · Bt_i` into `y` from element `y_start`.
    #[allow(clippy::too_many_arguments)]
    fn expand(
        &self,
        ctx: &CudaContext,
        op: &'static str,
        h: &CudaSlice<f32>,
        rows: usize,
        y: &mut CudaSlice<f32>,
        y_start: usize,
        accumulate: bool,
    ) -> Result<()> {
        let (r, off, out_f) = (self.rank(), self.bank.offset(self.i), self.bank.out_features());
        let hv = view(op, h, 0, rows * r)?;
        let btv = view(op, self.bt, off * out_f, r * out_f)?;
        let mut yv = view_mut(op, y, y_start, rows * out_f)?;
        let g = RowGemm::new(rows, out_f, r, false, false)
            .scaled(self.bank.scale(self.i), if accumulate { 1.0 } else { 0.0 });
        gemm(ctx, op, &g, &hv, &btv, &mut yv)
    }
}

/// Rows of each adapter in row order (-1 rows left out).
fn rows_by_adapter(adapter: &[i32], adapters: usize) -> Vec<Vec<u32>> {
    let mut groups = vec![Vec::new(); adapters];
    for (t, &i) in adapter.iter().enumerate() {
        if let Some(g) = usize::try_from(i).ok().and_then(|i| groups.get_mut(i)) {
            g.push(t as u32);
        }
    }
    groups
}

/// Rows `idx` of `x` (`[.., d]`) as a dense `[idx.len(), d]` buffer.
fn gather(
    ctx: &Arc<CudaContext>,
    op: &'static str,
    x: &CudaSlice<f32>,
    idx: &CudaSlice<u32>,
    m: usize,
    d: usize,
) -> Result<CudaSlice<f32>> {
    let mut out = ctx.zeros::<f32>(op, m * d)?;
    let (m64, d64) = (m as u64, d as u64);
    launch!(ctx, op, Module::Elementwise, "gather_rows_f32", grid_1d(m * d), x, idx, &mut out, &m64, &d64)?;
    Ok(out)
}

/// `y[idx[j]] += x[j]` for the `m` rows of `x` (`[m, d]`).
fn scatter_add(
    ctx: &Arc<CudaContext>,
    op: &'static str,
    x: &CudaSlice<f32>,
    idx: &CudaSlice<u32>,
    y: &mut CudaSlice<f32>,
    m: usize,
    d: usize,
) -> Result<()> {
    let (m64, d64) = (m as u64, d as u64);
    launch!(ctx, op, Module::Elementwise, "scatter_add_rows_f32", grid_1d(m * d), x, idx, y, &m64, &d64)
}

pub fn sgmv(
    y: &mut Tensor,
    x: &Tensor,
    bank: &LoraBank,
    segs: &Segments,
    _n: usize,
    in_f: usize,
    out_f: usize,
) -> Result<()> {
    const OP: &str = "sgmv";
    let (a, bt) = bank.packed(OP)?;
    let (xs, a, bt) = (f32_in(OP, x)?, f32_in(OP, a)?, f32_in(OP, bt)?);
    update_f32(OP, y, |ctx, ys, _| {
        for (s, e, i) in segs.iter() {
            let Ok(i) = usize::try_from(i) else { continue };
            let ad = Adapter { bank, a: &a, bt: &bt, i };
            let rows = e - s;
            if rows == 0 || ad.rank() == 0 {
                continue;
            }
            let h = ad.shrink(ctx, OP, &xs, s * in_f, rows)?;
            ad.expand(ctx, OP, &h, rows, ys, s * out_f, true)?;
        }
        Ok(())
    })
}

pub fn bgmv(
    y: &mut Tensor,
    x: &Tensor,
    bank: &LoraBank,
    adapter: &[i32],
    _n: usize,
    in_f: usize,
    out_f: usize,
) -> Result<()> {
    const OP: &str = "bgmv";
    let (a, bt) = bank.packed(OP)?;
    let (xs, a, bt) = (f32_in(OP, x)?, f32_in(OP, a)?, f32_in(OP, bt)?);
    let groups = rows_by_adapter(adapter, bank.num_adapters());
    update_f32(OP, y, |ctx, ys, _| {
        // Per adapter: gather its rows, shrink and expand as dense blocks, add back.
        for (i, rows) in groups.iter().enumerate() {
            let ad = Adapter { bank, a: &a, bt: &bt, i };
            let m = rows.len();
            if m == 0 || ad.rank() == 0 {
                continue;
            }
            let idx = ctx.upload(OP, rows)?;
            let xg = gather(ctx, OP, &xs, &idx, m, in_f)?;
            let h = ad.shrink(ctx, OP, &xg, 0, m)?;
            let mut delta = ctx.zeros::<f32>(OP, m * out_f)?;
            ad.expand(ctx, OP, &h, m, &mut delta, 0, false)?;
            scatter_add(ctx, OP, &delta, &idx, ys, m, out_f)?;
        }
        Ok(())
    })
}

/// Per adapter with rows: h = x·A_iᵀ; dBt_i = s·hᵀ·dy; dh = s·dy·Bt_iᵀ; dA_i = dhᵀ·x;
/// dx = dh·A_i (as the CPU path).
pub fn lora_backward(
    x: &Tensor,
    bank: &LoraBank,
    adapter: &[i32],
    dy: &Tensor,
    n: usize,
    in_f: usize,
    out_f: usize,
) -> Result<LoraGrads> {
    const OP: &str = "lora_backward";
    let ctx = ctx_of(OP, x)?;
    let (a, bt) = bank.packed(OP)?;
    let (xs, a, bt, dys) = (f32_in(OP, x)?, f32_in(OP, a)?, f32_in(OP, bt)?, f32_in(OP, dy)?);
    let r_total = bank.total_rank();
    let mut dx = ctx.zeros::<f32>(OP, n * in_f)?;
    let mut da = ctx.zeros::<f32>(OP, r_total * in_f)?;
    let mut dbt = ctx.zeros::<f32>(OP, r_total * out_f)?;
    for (i, rows) in rows_by_adapter(adapter, bank.num_adapters()).iter().enumerate() {
        let ad = Adapter { bank, a: &a, bt: &bt, i };
        let (m, r, off, scale) = (rows.len(), ad.rank(), bank.offset(i), bank.scale(i));
        if m == 0 || r == 0 {
            continue;
        }
        let idx = ctx.upload(OP, rows)?;
        let xg = gather(&ctx, OP, &xs, &idx, m, in_f)?;
        let dyg = gather(&ctx, OP, &dys, &idx, m, out_f)?;
        let h = ad.shrink(&ctx, OP, &xg, 0, m)?;
        let (xv, dyv, hv) = (view(OP, &xg, 0, m * in_f)?, view(OP, &dyg, 0, m * out_f)?, view(OP, &h, 0, m * r)?);
        let av = view(OP, &a, off * in_f, r * in_f)?;
        let btv = view(OP, &bt, off * out_f, r * out_f)?;
        {
            // dBt_i [r, out]: rows off..off+r of dbt.
            let mut dbtv = view_mut(OP, &mut dbt, off * out_f, r * out_f)?;
            gemm(&ctx, OP, &RowGemm::new(r, out_f, m, true, false).scaled(scale, 0.0), &hv, &dyv, &mut dbtv)?;
        }
        let mut dh = ctx.zeros::<f32>(OP, m * r)?;
        {
            let mut dhv = view_mut(OP, &mut dh, 0, m * r)?;
            gemm(&ctx, OP, &RowGemm::new(m, r, out_f, false, true).scaled(scale, 0.0), &dyv, &btv, &mut dhv)?;
        }
        let dhv = view(OP, &dh, 0, m * r)?;
        {
            // dA_i [r, in]: rows off..off+r of da.
            let mut dav = view_mut(OP, &mut da, off * in_f, r * in_f)?;
            gemm(&ctx, OP, &RowGemm::new(r, in_f, m, true, false), &dhv, &xv, &mut dav)?;
        }
        let mut dxg = ctx.zeros::<f32>(OP, m * in_f)?;
        {
            let mut dxv = view_mut(OP, &mut dxg, 0, m * in_f)?;
            gemm(&ctx, OP, &RowGemm::new(m, in_f, r, false, false), &dhv, &av, &mut dxv)?;
        }
        scatter_add(&ctx, OP, &dxg, &idx, &mut dx, m, in_f)?;
    }
    Ok(LoraGrads {
        dx: f32_out(OP, &ctx, dx, vec![n, in_f], x.dtype())?,
        da: f32_out(OP, &ctx, da, vec![r_total, in_f], bank.dtype())?,
        dbt: f32_out(OP, &ctx, dbt, vec![r_total, out_f], bank.dtype())?,
    })
}
