//! Multi-LoRA: the low-rank deltas of many adapters applied to one batch (Punica's SGMV and
//! BGMV), with adapters of different ranks and no padding to a common rank.
//!
//! The adapters of one target module form a [`LoraBank`]. For a row `x` using adapter `i`:
//! `y += scale_i · B_i (A_i x)`, given as `A_i` (`[r_i, in]`) and `B_iᵀ` (`[r_i, out]`), so that
//! both products stream whole rows of the adapter's weights. On the CPU the bank holds each
//! adapter's own tensors and the kernels read them in place (a tensor's clones share its
//! elements), so a batch of resident adapters costs no copy. On a GPU the bank packs them: every
//! `A` stacked by rows into `a` (`[R, in]`, `R = Σ r_i`), every `Bᵀ` the same way into `bt`
//! (`[R, out]`), adapter `i` the same row block of both, so its weights are contiguous and read
//! coalesced. Gradients have the packed shapes on every device.

use std::borrow::Cow;
use std::ops::Range;

use rayon::prelude::*;

use half::bf16;

use crate::cpu::{self, Gemm, Weight, threads};
use crate::error::{Result, arg_err, shape_err};
use crate::ops::Segments;
use crate::tensor::same_device;
use crate::{DType, Device, Tensor, cuda};

/// The LoRA modules of one target module across adapters (see the module docs).
#[derive(Clone, Debug)]
pub struct LoraBank {
    weights: BankWeights,
    ranks: Vec<usize>,
    offsets: Vec<usize>,
    scales: Vec<f32>,
    in_f: usize,
    out_f: usize,
    dtype: DType,
}

#[derive(Clone, Debug)]
enum BankWeights {
    /// On the CPU: each adapter's `A` and `Bᵀ`, shared with the adapter.
    Each(Vec<(Tensor, Tensor)>),
    /// On a GPU: `a` (`[R, in]`) and `bt` (`[R, out]`).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    Packed { a: Tensor, bt: Tensor },
}

impl LoraBank {
    /// A bank on `device` of the modules `(A [r, in], Bᵀ [r, out], scale)` (PEFT's
    /// `lora_A.weight` and `lora_B.weight` transposed, the scale `lora_alpha / r`, or `/ sqrt(r)`
    /// with rsLoRA), from any device.
    pub fn new(modules: Vec<(Tensor, Tensor, f32)>, device: Device) -> Result<Self> {
        const OP: &str = "LoraBank::new";
        let Some((a0, bt0, _)) = modules.first() else {
            return arg_err(OP, "no adapters");
        };
        let (in_f, out_f) = (a0.dims2(OP)?.1, bt0.dims2(OP)?.1);
        let mut ranks = Vec::with_capacity(modules.len());
        for (i, (a, bt, _)) in modules.iter().enumerate() {
            let (r, ai) = a.dims2(OP)?;
            if ai != in_f || bt.shape() != [r, out_f] || a.dtype() != bt.dtype() {
                return shape_err(
                    OP,
                    format!(
                        "adapter {i}: A {:?} and Bᵀ {:?} ({} and {}) do not fit [r, {in_f}] and [r, {out_f}] of one dtype",
                        a.shape(),
                        bt.shape(),
                        a.dtype(),
                        bt.dtype()
                    ),
                );
            }
            ranks.push(r);
        }
        // Adapters may differ in dtype (bf16 ones served beside a job's f32 weights in training);
        // gradients and a GPU bank's packing are then f32.
        let dtype = if modules.iter().all(|m| m.0.dtype() == a0.dtype()) { a0.dtype() } else { DType::F32 };
        let scales = modules.iter().map(|m| m.2).collect();
        let offsets = ranks.iter().scan(0, |acc, &r| Some(std::mem::replace(acc, *acc + r))).collect();
        let weights = match device {
            Device::Cpu => BankWeights::Each(
                modules
                    .into_iter()
                    .map(|(a, bt, _)| Ok((a.into_device(device)?, bt.into_device(device)?)))
                    .collect::<Result<_>>()?,
            ),
            Device::Cuda(_) => {
                let (a, bt) = pack(&modules, &ranks, in_f, out_f)?;
                let on_device = |t: Tensor| -> Result<Tensor> { t.into_dtype(dtype)?.into_device(device) };
                BankWeights::Packed { a: on_device(a)?, bt: on_device(bt)? }
            }
        };
        Ok(LoraBank { weights, ranks, offsets, scales, in_f, out_f, dtype })
    }

    pub fn device(&self) -> Device {
        match &self.weights {
            BankWeights::Each(_) => Device::Cpu,
            BankWeights::Packed { a, .. } => a.device(),
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
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
        self.in_f
    }
    pub fn out_features(&self) -> usize {
        self.out_f
    }

    /// The packed `a` and `bt` of a GPU bank.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn packed(&self, op: &'static str) -> Result<(&Tensor, &Tensor)> {
        match &self.weights {
            BankWeights::Packed { a, bt } => Ok((a, bt)),
            BankWeights::Each(_) => arg_err(op, "the bank is on the CPU"),
        }
    }

    /// Each adapter's `A` and `Bᵀ` on the host, read in place where they are f32 or bf16.
    fn host(&self, op: &'static str) -> Result<Vec<HostModule<'_>>> {
        match &self.weights {
            BankWeights::Each(w) => w
                .iter()
                .map(|(a, b)| match (a.cpu_bf16(), b.cpu_bf16()) {
                    (Some(a), Some(b)) => Ok(HostModule::Bf16(a, b)),
                    _ => Ok(HostModule::F32(a.cpu_f32()?, b.cpu_f32()?)),
                })
                .collect(),
            BankWeights::Packed { .. } => arg_err(op, "the bank is on a GPU"),
        }
    }
}

/// One adapter's `A` and `Bᵀ` on the host.
enum HostModule<'a> {
    F32(Cow<'a, [f32]>, Cow<'a, [f32]>),
    /// Served adapters where the base weights are bf16: the deltas of decoding stream each
    /// adapter's weights once per step, and bf16 halves those bytes.
    Bf16(&'a [bf16], &'a [bf16]),
}

impl HostModule<'_> {
    /// `A` and `Bᵀ` in f32 (the backward computes in f32).
    fn widened(&self) -> (Cow<'_, [f32]>, Cow<'_, [f32]>) {
        match self {
            HostModule::F32(a, bt) => (Cow::Borrowed(&**a), Cow::Borrowed(&**bt)),
            HostModule::Bf16(a, bt) => (Weight::widen(a), Weight::widen(bt)),
        }
    }
}

/// Every `A` and every `Bᵀ` stacked, as f32 on the host.
fn pack(modules: &[(Tensor, Tensor, f32)], ranks: &[usize], in_f: usize, out_f: usize) -> Result<(Tensor, Tensor)> {
    let r_total: usize = ranks.iter().sum();
    let (mut a_rows, mut bt_rows) = (Vec::with_capacity(r_total * in_f), Vec::with_capacity(r_total * out_f));
    for (a, bt, _) in modules {
        a_rows.extend_from_slice(&a.to_vec_f32()?);
        bt_rows.extend_from_slice(&bt.to_vec_f32()?);
    }
    Ok((Tensor::from_vec(a_rows, [r_total, in_f])?, Tensor::from_vec(bt_rows, [r_total, out_f])?))
}

/// Gradients of a multi-LoRA op: w.r.t. the input rows and the packed bank.
#[derive(Clone, Debug)]
pub struct LoraGrads {
    /// `[n, in]`, the delta's contribution only (add it to the base layer's input gradient).
    pub dx: Tensor,
    /// `[R, in]`, shaped like the bank's `a`.
    pub da: Tensor,
    /// `[R, out]`, shaped like the bank's `bt`.
    pub dbt: Tensor,
}

/// SGMV: adds every segment's LoRA delta to `y` (`[n, out]`) for input rows `x` (`[n, in]`).
/// Segment indices are adapters of `bank` (-1: no adapter).
pub fn sgmv(y: &mut Tensor, x: &Tensor, bank: &LoraBank, segs: &Segments) -> Result<()> {
    const OP: &str = "sgmv";
    let (n, in_f, out_f) = check(OP, y, x, bank)?;
    segs.validate(OP, n, bank.num_adapters())?;
    match x.device() {
        Device::Cpu => {
            let (xs, w) = (x.cpu_f32()?, bank.host(OP)?);
            let seg_list: Vec<_> = segs.iter().collect();
            // Many segments: one per thread; few: let each GEMM use the threads.
            let gemm_threads = if seg_list.len() >= threads() { 1 } else { threads() };
            y.cpu_update(|ys| {
                segs.split_rows_mut(ys, out_f).into_par_iter().zip(seg_list).for_each(|(yseg, (s, e, i))| {
                    if i >= 0 {
                        lora_forward_rows(yseg, &xs[s * in_f..e * in_f], &w, bank, i as usize, gemm_threads);
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
            let (xs, w) = (x.cpu_f32()?, bank.host(OP)?);
            let groups = rows_by_adapter(adapter, bank.num_adapters());
            let gemm_threads = threads_per_group(&groups);
            if let Some(runs) = contiguous(&groups) {
                // Every adapter's rows are one run (a decoding batch grouped by adapter, a
                // prefill, training): each delta goes straight into its rows of `y`.
                return y.cpu_update(|ys| {
                    par_runs(ys, out_f, &runs, vec![(); runs.len()], |i, run, y_rows, ()| {
                        lora_forward_rows(y_rows, &xs[run.start * in_f..run.end * in_f], &w, bank, i, gemm_threads);
                    })
                });
            }
            // Rows of one adapter are gathered into a dense block so the delta is two GEMMs per
            // adapter rather than two matrix-vector products per row.
            y.cpu_update(|ys| {
                par_groups(ys, out_f, &groups, vec![(); groups.len()], |i, rows, mine, ()| {
                    let mut d = vec![0.0; rows.len() * out_f];
                    lora_forward_rows(&mut d, &gather(&xs, rows, in_f), &w, bank, i, gemm_threads);
                    add_rows(mine, &d);
                })
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
    with_fresh_dx(x, bank, &adapter, dy)
}

/// Gradients of [`bgmv`] for upstream `dy` (`[n, out]`).
pub fn bgmv_backward(x: &Tensor, bank: &LoraBank, adapter: &[i32], dy: &Tensor) -> Result<LoraGrads> {
    const OP: &str = "bgmv_backward";
    let (n, _, _) = check(OP, dy, x, bank)?;
    check_row_adapters(OP, adapter, n, bank)?;
    with_fresh_dx(x, bank, adapter, dy)
}

/// [`bgmv_backward`] adding the input gradient into `dx` (the base layer's, `[n, in]`) instead
/// of returning it: training saves a full-size tensor and a pass over it per projection.
/// Returns `(da, dbt)`.
pub fn bgmv_backward_into(
    dx: &mut Tensor,
    x: &Tensor,
    bank: &LoraBank,
    adapter: &[i32],
    dy: &Tensor,
) -> Result<(Tensor, Tensor)> {
    const OP: &str = "bgmv_backward_into";
    let (n, in_f, _) = check(OP, dy, x, bank)?;
    check_row_adapters(OP, adapter, n, bank)?;
    same_device(OP, &[dx, x])?;
    dx.expect_shape(OP, "dx", &[n, in_f])?;
    lora_backward(x, bank, adapter, dy, dx)
}

fn with_fresh_dx(x: &Tensor, bank: &LoraBank, adapter: &[i32], dy: &Tensor) -> Result<LoraGrads> {
    let mut dx = Tensor::zeros(x.shape().to_vec(), x.dtype(), x.device())?;
    let (da, dbt) = lora_backward(x, bank, adapter, dy, &mut dx)?;
    Ok(LoraGrads { dx, da, dbt })
}

/// The backward of both forms, from one adapter index per row: adds the input gradient into
/// `dx` and returns `(da, dbt)`.
fn lora_backward(
    x: &Tensor,
    bank: &LoraBank,
    adapter: &[i32],
    dy: &Tensor,
    dx: &mut Tensor,
) -> Result<(Tensor, Tensor)> {
    let (n, in_f) = (x.shape()[0], bank.in_features());
    let out_f = bank.out_features();
    let r_total = bank.total_rank();
    match x.device() {
        Device::Cpu => {
            let (xs, w, dys) = (x.cpu_f32()?, bank.host("lora_backward")?, dy.cpu_f32()?);
            let groups = rows_by_adapter(adapter, bank.num_adapters());
            let (mut da, mut dbt) = (vec![0.0; r_total * in_f], vec![0.0; r_total * out_f]);
            // Adapters own disjoint row blocks of dA and dBᵀ.
            let da_blocks = split_blocks(&mut da, bank, in_f);
            let dbt_blocks = split_blocks(&mut dbt, bank, out_f);
            let per_adapter =
                |i: usize, rows: &[usize], da_i: &mut [f32], dbt_i: &mut [f32], dx_i: &mut [f32], t: usize| {
                    let (r, scale, m) = (bank.rank(i), bank.scale(i), rows.len());
                    if m == 0 || r == 0 {
                        return;
                    }
                    let xg = gather(&xs, rows, in_f);
                    let dyg = gather(&dys, rows, out_f);
                    let (a_i, bt_i) = w[i].widened();
                    let (a_i, bt_i) = (&*a_i, &*bt_i);
                    // h = x·A_iᵀ ; dB_iᵀ = s·hᵀ·dy ; dh = s·dy·B_i ; dA_i = dhᵀ·x ; dx += dh·A_i.
                    let (mut h, mut dh) = (vec![0.0; m * r], vec![0.0; m * r]);
                    Gemm::new(m, r, in_f, false, true).run(&mut h, &xg, a_i, 1.0, false, t);
                    Gemm::new(r, out_f, m, true, false).run(dbt_i, &h, &dyg, scale, false, t);
                    Gemm::new(m, r, out_f, false, true).run(&mut dh, &dyg, bt_i, scale, false, t);
                    Gemm::new(r, in_f, m, true, false).run(da_i, &dh, &xg, 1.0, false, t);
                    Gemm::new(m, in_f, r, false, false).run(dx_i, &dh, a_i, 1.0, true, t);
                };
            let gemm_threads = threads_per_group(&groups);
            let blocks = da_blocks.into_iter().zip(dbt_blocks).collect();
            if let Some(runs) = contiguous(&groups) {
                // Every adapter's rows are one run: its input gradient goes straight into its
                // rows of dx.
                dx.cpu_update(|dxs| {
                    par_runs(dxs, in_f, &runs, blocks, |i, run, dx_i, (da_i, dbt_i)| {
                        per_adapter(i, &run.collect::<Vec<_>>(), da_i, dbt_i, dx_i, gemm_threads);
                    })
                })?;
            } else {
                // Scattered rows: each adapter adds its dx rows into its own rows of dx.
                dx.cpu_update(|dxs| {
                    par_groups(dxs, in_f, &groups, blocks, |i, rows, mine, (da_i, dbt_i)| {
                        let mut dx_i = vec![0.0; rows.len() * in_f];
                        per_adapter(i, rows, da_i, dbt_i, &mut dx_i, gemm_threads);
                        add_rows(mine, &dx_i);
                    })
                })?;
            }
            Ok((
                Tensor::cpu_from_f32(da, vec![r_total, in_f], DType::F32),
                Tensor::cpu_from_f32(dbt, vec![r_total, out_f], DType::F32),
            ))
        }
        Device::Cuda(_) => {
            let g = cuda::lora_backward(x, bank, adapter, dy, n, in_f, out_f)?;
            *dx = crate::ops::add(dx, &g.dx)?;
            Ok((g.da, g.dbt))
        }
    }
}

/// `y += s_i · (x·A_iᵀ)·B_iᵀ` for a dense block of rows `x` (the shrink then expand of Punica),
/// `w` the bank's host weights.
fn lora_forward_rows(y: &mut [f32], x: &[f32], w: &[HostModule], bank: &LoraBank, i: usize, threads: usize) {
    let (r, in_f, scale) = (bank.rank(i), bank.in_features(), bank.scale(i));
    let m = x.len() / in_f.max(1);
    if r == 0 || m == 0 {
        return;
    }
    let done = match &w[i] {
        HostModule::F32(a, bt) => cpu::lora_delta(y, x, a, bt, r, scale, threads),
        HostModule::Bf16(a, bt) => cpu::lora_delta(y, x, a, bt, r, scale, threads),
    };
    if !done {
        let (a_i, bt_i) = w[i].widened();
        let mut h = vec![0.0; m * r];
        Gemm::new(m, r, in_f, false, true).run(&mut h, x, &a_i, 1.0, false, threads);
        Gemm::new(m, bank.out_features(), r, false, false).run(y, &h, &bt_i, scale, true, threads);
    }
}

/// Runs `f(i, rows, mine, extra_i)` for every adapter `i` that has rows, in parallel: `mine`
/// are its rows of `ys` (`[_, width]`; a row belongs to one adapter, so each gets its own).
fn par_groups<T: Send>(
    ys: &mut [f32],
    width: usize,
    groups: &[Vec<usize>],
    extra: Vec<T>,
    f: impl Fn(usize, &[usize], &mut [&mut [f32]], T) + Sync,
) {
    let mut y_rows: Vec<Option<&mut [f32]>> = ys.chunks_mut(width).map(Some).collect();
    let mine: Vec<Vec<&mut [f32]>> =
        groups.iter().map(|g| g.iter().filter_map(|&t| y_rows[t].take()).collect()).collect();
    mine.into_par_iter().zip(extra).zip(groups).enumerate().for_each(|(i, ((mut mine, extra), rows))| {
        if !rows.is_empty() {
            f(i, rows, &mut mine, extra);
        }
    });
}

/// Runs `f(i, run, block, extra_i)` for every adapter `i` whose rows are the non-empty run
/// `runs[i]` of `ys` (`[_, width]`), in parallel: `block` is those rows of `ys`, given straight,
/// with nothing gathered or added back.
fn par_runs<T: Send>(
    mut ys: &mut [f32],
    width: usize,
    runs: &[Range<usize>],
    extra: Vec<T>,
    f: impl Fn(usize, Range<usize>, &mut [f32], T) + Sync,
) {
    let mut order: Vec<_> =
        runs.iter().cloned().zip(extra).enumerate().filter(|(_, (run, _))| !run.is_empty()).collect();
    order.sort_by_key(|(_, (run, _))| run.start);
    let (mut blocks, mut at) = (Vec::with_capacity(order.len()), 0);
    for (i, (run, extra)) in order {
        let (_, tail) = std::mem::take(&mut ys).split_at_mut((run.start - at) * width);
        let (block, tail) = tail.split_at_mut(run.len() * width);
        (ys, at) = (tail, run.end);
        blocks.push((i, run, block, extra));
    }
    blocks.into_par_iter().for_each(|(i, run, block, extra)| f(i, run, block, extra));
}

/// Adds the rows of `d` (dense, as many as `rows`) into `rows`.
fn add_rows(rows: &mut [&mut [f32]], d: &[f32]) {
    let width = d.len() / rows.len().max(1);
    for (row, d_row) in rows.iter_mut().zip(d.chunks_exact(width)) {
        row.iter_mut().zip(d_row).for_each(|(y, d)| *y += d);
    }
}

/// Splits a bank-shaped buffer (`[R, width]`) into each adapter's row block.
fn split_blocks<'a>(mut data: &'a mut [f32], bank: &LoraBank, width: usize) -> Vec<&'a mut [f32]> {
    let mut blocks = Vec::with_capacity(bank.num_adapters());
    for i in 0..bank.num_adapters() {
        let (head, tail) = data.split_at_mut(bank.rank(i) * width);
        blocks.push(head);
        data = tail;
    }
    blocks
}

/// The rows `rows` (ascending) of a `[_, width]` buffer as one dense block: borrowed when they
/// are consecutive (a sequence's tokens, a fine-tuning job's microbatch), copied otherwise.
fn gather<'a>(data: &'a [f32], rows: &[usize], width: usize) -> Cow<'a, [f32]> {
    if let (Some(&first), Some(&last)) = (rows.first(), rows.last())
        && last + 1 - first == rows.len()
    {
        return Cow::Borrowed(&data[first * width..(last + 1) * width]);
    }
    let mut out = Vec::with_capacity(rows.len() * width);
    for &t in rows {
        out.extend_from_slice(&data[t * width..(t + 1) * width]);
    }
    Cow::Owned(out)
}

/// Each adapter's rows as one range, when every adapter's rows are consecutive (empty ranges for
/// adapters without rows); `None` when some adapter's rows are scattered.
fn contiguous(groups: &[Vec<usize>]) -> Option<Vec<Range<usize>>> {
    groups
        .iter()
        .map(|rows| match (rows.first(), rows.last()) {
            (Some(&first), Some(&last)) if last + 1 - first == rows.len() => Some(first..last + 1),
            (None, _) => Some(0..0),
            _ => None,
        })
        .collect()
}

/// Threads for each adapter group's GEMMs: groups run in parallel, so with many busy groups
/// each gets one thread, and a lone adapter (one fine-tuning job) gets them all.
fn threads_per_group(groups: &[Vec<usize>]) -> usize {
    let busy = groups.iter().filter(|g| !g.is_empty()).count().max(1);
    (threads() / busy).max(1)
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
    same_device(op, &[y, x])?;
    if x.device() != bank.device() {
        return Err(crate::Error::DeviceMismatch { op, lhs: x.device(), rhs: bank.device() });
    }
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
