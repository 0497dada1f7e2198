//! Matrix multiplication, batched, with either operand read transposed.

use crate::cpu::{self, Gemm, threads};
use crate::error::{Result, shape_err};
use crate::tensor::same_device;
use crate::{Device, Tensor, cuda};

/// How a (batched) matmul reads its operands. Shapes, with `[..]` the batch dims of `a`:
/// `a` is `[.., m, k]` (or `[.., k, m]` when `trans_a`); `b` is `[k, n]` (`[n, k]` when
/// `trans_b`), shared by every batch entry, or `[.., k, n]` with the same batch dims as `a`.
/// The result is `[.., m, n]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatmulDims {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    /// `b` has one matrix per batch entry (otherwise one matrix shared by all).
    pub b_batched: bool,
}

impl MatmulDims {
    /// Validates the shapes and works out the dimensions.
    pub fn of(a: &[usize], b: &[usize], trans_a: bool, trans_b: bool) -> Result<(Self, Vec<usize>)> {
        const OP: &str = "matmul";
        if a.len() < 2 || b.len() < 2 {
            return shape_err(OP, format!("operands must have rank >= 2, got {a:?} and {b:?}"));
        }
        let (a_batch, a_mat) = a.split_at(a.len() - 2);
        let (b_batch, b_mat) = b.split_at(b.len() - 2);
        let (m, k) = if trans_a { (a_mat[1], a_mat[0]) } else { (a_mat[0], a_mat[1]) };
        let (kb, n) = if trans_b { (b_mat[1], b_mat[0]) } else { (b_mat[0], b_mat[1]) };
        if k != kb {
            return shape_err(OP, format!("inner dims differ: {a:?} (trans {trans_a}) x {b:?} (trans {trans_b})"));
        }
        let b_batched = !b_batch.is_empty();
        if b_batched && b_batch != a_batch {
            return shape_err(OP, format!("batch dims differ: {a:?} x {b:?}"));
        }
        let mut out = a_batch.to_vec();
        out.extend([m, n]);
        let batch = a_batch.iter().product();
        Ok((MatmulDims { batch, m, n, k, trans_a, trans_b, b_batched }, out))
    }

    pub fn flops(&self) -> f64 {
        2.0 * (self.batch * self.m * self.n * self.k) as f64
    }
}

/// `op(a) · op(b)`, see [`MatmulDims`] for the shapes. The result has `a`'s dtype.
pub fn matmul(a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool) -> Result<Tensor> {
    let device = same_device("matmul", &[a, b])?;
    let (dims, out_shape) = MatmulDims::of(a.shape(), b.shape(), trans_a, trans_b)?;
    match device {
        Device::Cpu => {
            let mut out = vec![0.0; dims.batch * dims.m * dims.n];
            let a32 = a.cpu_f32()?;
            // A bf16 weight shared by the batch is read as it lies, on the AMX tiles where
            // the CPU has them; otherwise (and for a batched or transposed `a`) it is widened.
            let tiles = match b.cpu_bf16() {
                Some(w) if !dims.trans_a && !dims.b_batched => {
                    let rows = dims.batch * dims.m;
                    cpu::matmul_bf16_weight(&mut out, &a32, w, (rows, dims.n, dims.k), dims.trans_b)
                }
                _ => false,
            };
            if !tiles {
                matmul_cpu(&mut out, &a32, &b.cpu_f32()?, &dims);
            }
            Ok(Tensor::cpu_from_f32(out, out_shape, a.dtype()))
        }
        Device::Cuda(_) => cuda::matmul(a, b, &dims, out_shape),
    }
}

/// The CPU kernel behind [`matmul`], on f32 slices (also what the benchmark measures).
pub fn matmul_cpu(out: &mut [f32], a: &[f32], b: &[f32], d: &MatmulDims) {
    let gemm = Gemm::new(d.m, d.n, d.k, d.trans_a, d.trans_b);
    let (a_step, b_step, c_step) = (d.m * d.k, if d.b_batched { d.k * d.n } else { 0 }, d.m * d.n);
    // A batch whose `a` rows are contiguous and share `b` is one tall GEMM.
    if d.batch > 1 && !d.b_batched && !d.trans_a {
        let tall = Gemm::new(d.batch * d.m, d.n, d.k, false, d.trans_b);
        return tall.run(out, a, b, 1.0, false, threads());
    }
    for i in 0..d.batch {
        gemm.run(&mut out[i * c_step..], &a[i * a_step..], &b[i * b_step..], 1.0, false, threads());
    }
}

/// Gradients of [`matmul`]: returns `(da, db)` for the upstream gradient `dc` (shape of the
/// result). A `b` shared across the batch gets the sum over the batch.
pub fn matmul_backward(a: &Tensor, b: &Tensor, dc: &Tensor, trans_a: bool, trans_b: bool) -> Result<(Tensor, Tensor)> {
    let (dims, out_shape) = MatmulDims::of(a.shape(), b.shape(), trans_a, trans_b)?;
    dc.expect_shape("matmul_backward", "dc", &out_shape)?;
    // C = op(A)·op(B)  =>  dop(A) = dC·op(B)ᵀ, dop(B) = op(A)ᵀ·dC; transposing back where the
    // operand itself was stored transposed.
    let da = if !trans_a {
        matmul(dc, b, false, !trans_b)?
    } else if dims.b_batched || dims.batch == 1 {
        matmul(b, dc, trans_b, true)?.reshape(a.shape().to_vec())?
    } else {
        // a stored transposed, b shared: (dC·op(B)ᵀ)ᵀ per batch entry.
        crate::ops::transpose(&matmul(dc, b, false, !trans_b)?)?
    };
    let db = if dims.b_batched || dims.batch == 1 {
        let db = if trans_b { matmul(dc, a, true, trans_a)? } else { matmul(a, dc, !trans_a, false)? };
        db.reshape(b.shape().to_vec())?
    } else if !trans_a {
        // Shared b, contiguous rows of a: fold the batch into the rows.
        let rows = dims.batch * dims.m;
        let a2 = a.clone().reshape([rows, dims.k])?;
        let dc2 = dc.clone().reshape([rows, dims.n])?;
        if trans_b { matmul(&dc2, &a2, true, false)? } else { matmul(&a2, &dc2, true, false)? }
    } else {
        // Shared b, a stored transposed: per-entry products summed over the batch.
        let per_entry = if trans_b { matmul(dc, a, true, true)? } else { matmul(a, dc, false, false)? };
        let rows = b.elem_count();
        crate::ops::sum_batch(&per_entry.reshape([dims.batch, rows])?)?.reshape(b.shape().to_vec())?
    };
    Ok((da, db))
}
