//! Multi-LoRA: the low-rank deltas of many adapters applied to one batch (Punica's SGMV and
//! BGMV), with adapters of different ranks and no padding to a common rank.
//!
//! The adapters of one target module live in a [`LoraBank`]: every adapter's `A` (`[r_i, in]`)
//! stacked by rows into `a` (`[R, in]`, `R = Σ r_i`) and every `B` (`[out, r_i]`) side by side
//! by columns into `b` (`[out, R]`). Adapter `i` is the row block / column block starting at
//! its offset. For a row `x` using adapter `i`: `y += scale_i · B_i (A_i x)`.

use rayon::prelude::*;

use crate::cpu::{Gemm, threads};
use crate::error::{Result, arg_err, shape_err};
use crate::ops::Segments;
use crate::tensor::same_device;
use crate::{Device, Tensor, cuda};

/// The LoRA adapters of one target module, packed without padding (see the module docs).
#[derive(Clone, Debug)]
pub struct LoraBank {
    pub a: Tensor,
    pub b: Tensor,
    ranks: Vec<usize>,
    offsets: Vec<usize>,
    scales: Vec<f32>,
}

impl LoraBank {
    /// A bank from packed `a` (`[R, in]`) and `b` (`[out, R]`), each adapter's rank and its
    /// scale (`lora_alpha / r`, or `/ sqrt(r)` with rsLoRA).
    pub fn new(a: Tensor, b: Tensor, ranks: Vec<usize>, scales: Vec<f32>) -> Result<Self> {
        const OP: &str = "LoraBank::new";
        same_device(OP, &[&a, &b])?;
        let (r_total, _) = a.dims2(OP)?;
        let (_, rb) = b.dims2(OP)?;
        if ranks.len() != scales.len() {
            return arg_err(OP, format!("{} ranks but {} scales", ranks.len(), scales.len()));
        }
        if ranks.iter().sum::<usize>() != r_total || rb != r_total {
            return shape_err(
                OP,
                format!("ranks sum to {} but a has {r_total} rows and b {rb} columns", ranks.iter().sum::<usize>()),
            );
        }
        let offsets = ranks.iter().scan(0, |acc, &r| Some(std::mem::replace(acc, *acc + r))).collect();
        Ok(LoraBank { a, b, ranks, offsets, scales })
    }

    /// Packs adapters given as `(A [r, in], B [out, r], scale)` (PEFT's `lora_A.weight` and
    /// `lora_B.weight`), all on the CPU.
    pub fn pack(adapters: &[(Tensor, Tensor, f32)]) -> Result<Self> {
        const OP: &str = "LoraBank::pack";
        let Some((a0, b0, _)) = adapters.first() else {
            return arg_err(OP, "no adapters");
        };
        let (in_f, out_f, dtype) = (a0.dims2(OP)?.1, b0.dims2(OP)?.0, a0.dtype());
        let mut ranks = Vec::new();
        let mut a_rows = Vec::new();
        let mut b_cols: Vec<Vec<f32>> = Vec::new();
        for (i, (a, b, _)) in adapters.iter().enumerate() {
            let (r, ai) = a.dims2(OP)?;
            if ai != in_f || b.shape() != [out_f, r] {
                return shape_err(
                    OP,
                    format!(
                        "adapter {i}: A {:?} and B {:?} do not fit [r, {in_f}] and [{out_f}, r]",
                        a.shape(),
                        b.shape()
                    ),
                );
            }
            ranks.push(r);
            a_rows.extend(a.to_vec_f32()?);
            b_cols.push(b.to_vec_f32()?);
        }
        let r_total: usize = ranks.iter().sum();
        let mut b = vec![0.0; out_f * r_total];
        let mut off = 0;
        for (bi, &r) in b_cols.iter().zip(&ranks) {
            for o in 0..out_f {
                b[o * r_total + off..o * r_total + off + r].copy_from_slice(&bi[o * r..(o + 1) * r]);
            }
            off += r;
        }
        let a = Tensor::from_vec(a_rows, [r_total, in_f])?.to_dtype(dtype)?;
        let b = Tensor::from_vec(b, [out_f, r_total])?.to_dtype(dtype)?;
        LoraBank::new(a, b, ranks, adapters.iter().map(|x| x.2).collect())
    }

    pub fn num_adapters(&self) -> usize {
        self.ranks.len()
    }
    pub fn rank(&self, i: usize) -> usize {
        self.ranks[i]
    }
    pub fn offset(&self, i: usize) -> usize {
        self.offsets[i]
    }
    pub fn scale(&self, i: usize) -> f32 {
        self.scales[i]
    }
    pub fn total_rank(&self) -> usize {
        self.ranks.iter().sum()
    }
    pub fn in_features(&self) -> usize {
        self.a.shape()[1]
    }
    pub fn out_features(&self) -> usize {
        self.b.shape()[0]
    }
}

/// Gradients of a multi-LoRA op: w.r.t. the input rows and the packed bank.
#[derive(Clone, Debug)]
pub struct LoraGrads {
    /// `[n, in]`, the delta's contribution only (add it to the base layer's input gradient).
    pub dx: Tensor,
    /// `[R, in]`, shaped like the bank's `a`.
    pub da: Tensor,
    /// `[out, R]`, shaped like the bank's `b`.
    pub db: Tensor,
}

/// SGMV: adds every segment's LoRA delta to `y` (`[n, out]`) for input rows `x` (`[n, in]`).
/// Segment indices are adapters of `bank` (-1: no adapter).
pub fn sgmv(y: &mut Tensor, x: &Tensor, bank: &LoraBank, segs: &Segments) -> Result<()> {
    const OP: &str = "sgmv";
    let (n, in_f, out_f) = check(OP, y, x, bank)?;
    segs.validate(OP, n, bank.num_adapters())?;
    match x.device() {
        Device::Cpu => {
            let (xs, a, b) = (x.cpu_f32()?, bank.a.cpu_f32()?, bank.b.cpu_f32()?);
            let seg_list: Vec<_> = segs.iter().collect();
            // Many segments: one per thread; few: let each GEMM use the threads.
            let gemm_threads = if seg_list.len() >= threads() { 1 } else { threads() };
            y.cpu_update(|ys| {
                segs.split_rows_mut(ys, out_f).into_par_iter().zip(seg_list).for_each(|(yseg, (s, e, i))| {
                    if i >= 0 {
                        let rows = CpuRows { x: &xs[s * in_f..e * in_f], rows: e - s };
                        lora_forward_rows(yseg, rows, &a, &b, bank, i as usize, gemm_threads);
                    }
                });
            })
        }
        Device::Cuda(_) => cuda::sgmv(y, x, bank, segs, n, in_f, out_f),
    }
}

/// BGMV: adds each row's LoRA delta to `y`, row `t` using adapter `adapter[t]` (-1: none).
pub fn bgmv(y: &mut Tensor, x: &Tensor, bank: &LoraBank, adapter: &[i32]) -> Result<()> {
    const OP: &str = "bgmv";
    let (n, in_f, out_f) = check(OP, y, x, bank)?;
    check_row_adapters(OP, adapter, n, bank)?;
    match x.device() {
        Device::Cpu => {
            // Rows of one adapter are gathered into a dense block so the delta is two GEMMs per
            // adapter rather than two matrix-vector products per row.
            let (xs, a, b) = (x.cpu_f32()?, bank.a.cpu_f32()?, bank.b.cpu_f32()?);
            let groups = rows_by_adapter(adapter, bank.num_adapters());
            let deltas: Vec<Vec<f32>> = groups
                .par_iter()
                .enumerate()
                .map(|(i, rows)| {
                    let mut d = vec![0.0; rows.len() * out_f];
                    if !rows.is_empty() {
                        let gathered: Vec<f32> =
                            rows.iter().flat_map(|&t| xs[t * in_f..(t + 1) * in_f].iter().copied()).collect();
                        lora_forward_rows(&mut d, CpuRows { x: &gathered, rows: rows.len() }, &a, &b, bank, i, 1);
                    }
                    d
                })
                .collect();
            y.cpu_update(|ys| {
                for (rows, d) in groups.iter().zip(&deltas) {
                    for (j, &t) in rows.iter().enumerate() {
                        ys[t * out_f..(t + 1) * out_f].iter_mut().zip(&d[j * out_f..]).for_each(|(y, d)| *y += d);
                    }
                }
            })
        }
        Device::Cuda(_) => cuda::bgmv(y, x, bank, adapter, n, in_f, out_f),
    }
}

/// Gradients of [`sgmv`] for upstream `dy` (`[n, out]`).
pub fn sgmv_backward(x: &Tensor, bank: &LoraBank, segs: &Segments, dy: &Tensor) -> Result<LoraGrads> {
    const OP: &str = "sgmv_backward";
    let (n, _, _) = check(OP, dy, x, bank)?;
    segs.validate(OP, n, bank.num_adapters())?;
    let mut adapter = vec![-1; n];
    for (s, e, i) in segs.iter() {
        adapter[s..e].fill(i);
    }
    lora_backward(OP, x, bank, &adapter, dy)
}

/// Gradients of [`bgmv`] for upstream `dy` (`[n, out]`).
pub fn bgmv_backward(x: &Tensor, bank: &LoraBank, adapter: &[i32], dy: &Tensor) -> Result<LoraGrads> {
    const OP: &str = "bgmv_backward";
    let (n, _, _) = check(OP, dy, x, bank)?;
    check_row_adapters(OP, adapter, n, bank)?;
    lora_backward(OP, x, bank, adapter, dy)
}

/// The backward of both forms, from one adapter index per row.
fn lora_backward(op: &'static str, x: &Tensor, bank: &LoraBank, adapter: &[i32], dy: &Tensor) -> Result<LoraGrads> {
    let (n, in_f) = x.dims2(op)?;
    let out_f = bank.out_features();
    let r_total = bank.total_rank();
    match x.device() {
        Device::Cpu => {
            let (xs, a, b, dys) = (x.cpu_f32()?, bank.a.cpu_f32()?, bank.b.cpu_f32()?, dy.cpu_f32()?);
            let groups = rows_by_adapter(adapter, bank.num_adapters());
            // Per adapter: (dA_i [r, in], dB_i [out, r], dx rows), assembled afterwards.
            let per_adapter: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = groups
                .par_iter()
                .enumerate()
                .map(|(i, rows)| {
                    let (r, off, scale) = (bank.rank(i), bank.offset(i), bank.scale(i));
                    let m = rows.len();
                    let (mut da, mut db, mut dx) = (vec![0.0; r * in_f], vec![0.0; out_f * r], vec![0.0; m * in_f]);
                    if m == 0 || r == 0 {
                        return (da, db, dx);
                    }
                    let xg: Vec<f32> =
                        rows.iter().flat_map(|&t| xs[t * in_f..(t + 1) * in_f].iter().copied()).collect();
                    let dyg: Vec<f32> =
                        rows.iter().flat_map(|&t| dys[t * out_f..(t + 1) * out_f].iter().copied()).collect();
                    let a_i = &a[off * in_f..];
                    let b_i = &b[off..];
                    // h = x·A_iᵀ ; dB_i = s·dyᵀ·h ; dh = s·dy·B_i ; dA_i = dhᵀ·x ; dx = dh·A_i.
                    let mut h = vec![0.0; m * r];
                    Gemm::new(m, r, in_f, false, true).run(&mut h, &xg, a_i, 1.0, false, 1);
                    Gemm::new(out_f, r, m, true, false).run(&mut db, &dyg, &h, scale, false, 1);
                    let mut dh = vec![0.0; m * r];
                    let b_block = Gemm { b_row_stride: Some(r_total), ..Gemm::new(m, r, out_f, false, false) };
                    b_block.run(&mut dh, &dyg, b_i, scale, false, 1);
                    Gemm::new(r, in_f, m, true, false).run(&mut da, &dh, &xg, 1.0, false, 1);
                    Gemm::new(m, in_f, r, false, false).run(&mut dx, &dh, a_i, 1.0, false, 1);
                    (da, db, dx)
                })
                .collect();
            let (mut da, mut db, mut dx) = (vec![0.0; r_total * in_f], vec![0.0; out_f * r_total], vec![0.0; n * in_f]);
            for (i, ((da_i, db_i, dx_i), rows)) in per_adapter.iter().zip(&groups).enumerate() {
                let (r, off) = (bank.rank(i), bank.offset(i));
                da[off * in_f..(off + r) * in_f].copy_from_slice(da_i);
                for o in 0..out_f {
                    db[o * r_total + off..o * r_total + off + r].copy_from_slice(&db_i[o * r..(o + 1) * r]);
                }
                for (j, &t) in rows.iter().enumerate() {
                    dx[t * in_f..(t + 1) * in_f].copy_from_slice(&dx_i[j * in_f..(j + 1) * in_f]);
                }
            }
            Ok(LoraGrads {
                dx: Tensor::cpu_from_f32(dx, vec![n, in_f], x.dtype()),
                da: Tensor::cpu_from_f32(da, vec![r_total, in_f], bank.a.dtype()),
                db: Tensor::cpu_from_f32(db, vec![out_f, r_total], bank.b.dtype()),
            })
        }
        Device::Cuda(_) => cuda::lora_backward(x, bank, adapter, dy, n, in_f, out_f),
    }
}

/// Input rows of one adapter's block, contiguous.
struct CpuRows<'a> {
    x: &'a [f32],
    rows: usize,
}

/// `y += s_i · (x·A_iᵀ)·B_iᵀ` for a dense block of rows (the shrink then expand of Punica).
fn lora_forward_rows(y: &mut [f32], x: CpuRows<'_>, a: &[f32], b: &[f32], bank: &LoraBank, i: usize, threads: usize) {
    let (r, off, in_f, out_f) = (bank.rank(i), bank.offset(i), bank.in_features(), bank.out_features());
    if r == 0 || x.rows == 0 {
        return;
    }
    let mut h = vec![0.0; x.rows * r];
    Gemm::new(x.rows, r, in_f, false, true).run(&mut h, x.x, &a[off * in_f..], 1.0, false, threads);
    let expand = Gemm { b_row_stride: Some(bank.total_rank()), ..Gemm::new(x.rows, out_f, r, false, true) };
    expand.run(y, &h, &b[off..], bank.scale(i), true, threads);
}

/// Row numbers of each adapter, in row order (rows with -1 are left out).
fn rows_by_adapter(adapter: &[i32], adapters: usize) -> Vec<Vec<usize>> {
    let mut groups = vec![Vec::new(); adapters];
    for (t, &i) in adapter.iter().enumerate() {
        if i >= 0 {
            groups[i as usize].push(t);
        }
    }
    groups
}

fn check(op: &'static str, y: &Tensor, x: &Tensor, bank: &LoraBank) -> Result<(usize, usize, usize)> {
    same_device(op, &[y, x, &bank.a, &bank.b])?;
    let (n, in_f) = x.dims2(op)?;
    if in_f != bank.in_features() {
        return shape_err(op, format!("x has {in_f} features, the bank's A takes {}", bank.in_features()));
    }
    y.expect_shape(op, "y", &[n, bank.out_features()])?;
    Ok((n, in_f, bank.out_features()))
}

fn check_row_adapters(op: &'static str, adapter: &[i32], n: usize, bank: &LoraBank) -> Result<()> {
    if adapter.len() != n {
        return shape_err(op, format!("{} adapter indices for {n} rows", adapter.len()));
    }
    match adapter.iter().find(|&&i| i < -1 || i >= bank.num_adapters() as i32) {
        Some(i) => arg_err(op, format!("adapter index {i} outside 0..{} (or -1)", bank.num_adapters())),
        None => Ok(()),
    }
}
