//! `dst (+)= scale · x · W` where `x` has few columns (`[m, k]`, `k` a LoRA rank) and `W` is
//! `[k, n]`: the expand of a LoRA delta (`h · Bᵀ`) and its input gradient (`dh · A`). Each
//! output vector is built in registers from `k` scaled weight rows and written once; the `gemm`
//! crate, tuned for a deep `k`, packs both operands and runs at a fraction of the speed at these
//! shapes (`tandem bench kernels` prints the LoRA delta). AVX-512 and AVX2 kernels; on other CPUs
//! the caller keeps the `gemm` crate.

use rayon::prelude::*;

use super::isa::Isa;
use super::weight::Weight;

/// Depths `k` up to which this kernel runs instead of the `gemm` crate: every LoRA rank in use
/// (PEFT's defaults are 8 and 16); beyond it the product is a GEMM like any other.
pub(crate) const MAX_DEPTH: usize = 64;

/// Rows of `x` per parallel task: enough to amortise a task's start and to reuse each block of
/// weight columns, loaded into L1 once per task, over many rows.
const ROWS_PER_TASK: usize = 16;

/// Computes `dst[m×n] (+)= scale · x[m×k] · w[k×n]` with the kernel of `isa`; `false` (and
/// `dst` untouched) when `isa` has none or the product is empty.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_xw<W: Weight>(
    isa: Isa,
    dst: &mut [f32],
    x: &[f32],
    w: &[W],
    (m, n, k): (usize, usize, usize),
    scale: f32,
    accumulate: bool,
    threads: usize,
) -> bool {
    assert!(dst.len() >= m * n && x.len() >= m * k && w.len() >= k * n, "low_rank: operands too small");
    assert!(isa <= Isa::detected(), "low_rank: {isa:?} is beyond this CPU");
    if m == 0 || n == 0 || k == 0 {
        return false;
    }
    let rows: RowsKernel<W> = match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY (both arms): the assert above: the CPU has the features the kernel is
        // compiled for.
        Isa::Avx512 | Isa::Amx => |d, x, w, n, k, s, acc| unsafe { x86::rows_avx512(d, x, w, n, k, s, acc) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => |d, x, w, n, k, s, acc| unsafe { x86::rows_avx2(d, x, w, n, k, s, acc) },
        _ => return false,
    };
    let (dst, x) = (&mut dst[..m * n], &x[..m * k]);
    let run = |(d, x): (&mut [f32], &[f32])| rows(d, x, &w[..k * n], n, k, scale, accumulate);
    if threads > 1 && m > ROWS_PER_TASK {
        dst.par_chunks_mut(ROWS_PER_TASK * n).zip(x.par_chunks(ROWS_PER_TASK * k)).for_each(run);
    } else {
        run((dst, x));
    }
    true
}

/// `(dst, x, w, n, k, scale, accumulate)`: every row of `x` into `dst`.
type RowsKernel<W> = fn(&mut [f32], &[f32], &[W], usize, usize, f32, bool);

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::Weight;

    /// All rows of `x` (`[_, k]`) into `dst` (`[_, n]`): blocks of `C` vectors of columns,
    /// outermost, so each block of `w` is read from memory once and then from L1 for every
    /// row; within a block, tiles of 4 rows (a last 1 to 3 one row at a time).
    macro_rules! rows {
        ($name:ident, $tile:ident, $feature:literal, $lanes:expr, $cols:expr) => {
            #[target_feature(enable = $feature)]
            pub(super) fn $name<W: Weight>(
                dst: &mut [f32],
                x: &[f32],
                w: &[W],
                n: usize,
                k: usize,
                scale: f32,
                accumulate: bool,
            ) {
                const C: usize = $cols;
                let m = x.len() / k;
                assert!(dst.len() >= m * n && w.len() >= k * n);
                for c0 in (0..n).step_by($lanes * C) {
                    let mut i = 0;
                    while i < m {
                        let rows = if i + 4 <= m { 4 } else { 1 };
                        // SAFETY: rows `i..i + rows` < m of `x` and `dst`, columns from `c0`
                        // below `n`: the tile reads and writes lanes below `n` only.
                        unsafe {
                            let (d, xr) = (dst.as_mut_ptr().add(i * n + c0), x.as_ptr().add(i * k));
                            let wc = w.as_ptr().add(c0);
                            if rows == 4 {
                                $tile::<W, 4>(d, xr, wc, n, k, n - c0, scale, accumulate)
                            } else {
                                $tile::<W, 1>(d, xr, wc, n, k, n - c0, scale, accumulate)
                            }
                        }
                        i += rows;
                    }
                }
            }
        };
    }

    rows!(rows_avx512, tile_avx512, "avx512f,avx512bw,avx512vl", 16, 4);
    rows!(rows_avx2, tile_avx2, "avx2,fma", 8, 2);

    /// `R` rows of `dst` (stride `n`), 4 vectors of 16 columns from `d`, of which the first
    /// `left` exist: `Σ_j x[r, j] · w[j, ·]` over the `k` weight rows (stride `n`).
    ///
    /// # Safety
    /// The CPU has AVX-512 F, BW and VL; `R` rows of `k` elements at `x`, `k` rows of `left`
    /// elements at `w` and `R` rows of `left` elements at `d` are in bounds.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn tile_avx512<W: Weight, const R: usize>(
        d: *mut f32,
        x: *const f32,
        w: *const W,
        n: usize,
        k: usize,
        left: usize,
        scale: f32,
        accumulate: bool,
    ) {
        const C: usize = 4;
        // Lanes past `left` are masked off: loads give 0 there and stores leave memory alone.
        let mask: [__mmask16; C] = std::array::from_fn(|c| {
            let lanes = left.saturating_sub(16 * c).min(16);
            ((1u32 << lanes) - 1) as __mmask16
        });
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        for j in 0..k {
            // SAFETY (the loads): row j < k of `w`, lanes below `left` only.
            let wv: [__m512; C] = std::array::from_fn(|c| unsafe { W::load16(w.add(j * n + 16 * c), mask[c]) });
            for (r, acc) in acc.iter_mut().enumerate() {
                let xv = _mm512_set1_ps(unsafe { *x.add(r * k + j) });
                for c in 0..C {
                    acc[c] = _mm512_fmadd_ps(xv, wv[c], acc[c]);
                }
            }
        }
        let s = _mm512_set1_ps(scale);
        for (r, acc) in acc.iter().enumerate() {
            for c in 0..C {
                // SAFETY: row r < R of `d`, lanes below `left` only.
                unsafe {
                    let p = d.add(r * n + 16 * c);
                    let v = _mm512_mul_ps(acc[c], s);
                    let v = if accumulate { _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask[c], p)) } else { v };
                    _mm512_mask_storeu_ps(p, mask[c], v);
                }
            }
        }
    }

    /// As [`tile_avx512`], 2 vectors of 8 columns.
    ///
    /// # Safety
    /// As [`tile_avx512`], with AVX2 and FMA.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile_avx2<W: Weight, const R: usize>(
        d: *mut f32,
        x: *const f32,
        w: *const W,
        n: usize,
        k: usize,
        left: usize,
        scale: f32,
        accumulate: bool,
    ) {
        const C: usize = 2;
        // A lane is on where its mask element has the sign bit set.
        let mask: [__m256i; C] = std::array::from_fn(|c| {
            let lanes = left.saturating_sub(8 * c).min(8) as i32;
            _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
        });
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        for j in 0..k {
            // SAFETY (the loads): row j < k of `w`, lanes below `left` only.
            let wv: [__m256; C] = std::array::from_fn(|c| unsafe { W::load8_masked(w.add(j * n + 8 * c), mask[c]) });
            for (r, acc) in acc.iter_mut().enumerate() {
                let xv = _mm256_set1_ps(unsafe { *x.add(r * k + j) });
                for c in 0..C {
                    acc[c] = _mm256_fmadd_ps(xv, wv[c], acc[c]);
                }
            }
        }
        let s = _mm256_set1_ps(scale);
        for (r, acc) in acc.iter().enumerate() {
            for c in 0..C {
                // SAFETY: row r < R of `d`, lanes below `left` only.
                unsafe {
                    let p = d.add(r * n + 8 * c);
                    let v = _mm256_mul_ps(acc[c], s);
                    let v = if accumulate { _mm256_add_ps(v, _mm256_maskload_ps(p, mask[c])) } else { v };
                    _mm256_maskstore_ps(p, mask[c], v);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use half::bf16;

    use super::*;
    use crate::cpu::{check_product, random};

    /// Every kernel this CPU runs against an f64 reference, over shapes with partial column
    /// blocks and vectors, row counts that leave a partial tile and span several tasks, a depth
    /// of 1, and accumulation.
    #[test]
    fn each_isa_matches_a_reference() {
        for isa in Isa::available() {
            for &(m, n, k) in
                &[(1, 1, 1), (1, 7, 16), (3, 33, 5), (4, 64, 16), (5, 70, 8), (37, 129, 16), (70, 896, 64)]
            {
                let w = random(n * k, 2);
                check(isa, (m, n, k), &w);
                check(isa, (m, n, k), &w.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>());
            }
        }
    }

    /// One shape with weights of type `W`.
    fn check<W: Weight>(isa: Isa, (m, n, k): (usize, usize, usize), w: &[W]) {
        let kernel = |dst: &mut [f32], x: &[f32], acc| matmul_xw(isa, dst, x, w, (m, n, k), 0.5, acc, 2);
        check_product(isa, (m, n, k), |p, j| w[p * n + j].to_f32(), kernel, std::any::type_name::<W>());
    }
}
