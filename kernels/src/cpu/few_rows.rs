//! `dst (+)= scale · x · Wᵀ` where `x` or `W` has few rows: a decoding batch through a linear
//! layer, or any batch through a LoRA shrink (`x · Aᵀ`, `A` of rank rows). Each weight row is
//! loaded once and used for every row of `x` while it is in registers. The `gemm` crate packs
//! both operands first, which at these shapes costs more than the product itself (`tandem bench
//! kernels` prints both). AVX-512 and AVX2 kernels; on other CPUs the caller keeps the `gemm`
//! crate.

use rayon::prelude::*;

use super::isa::Isa;
use super::weight::Weight;

/// Rows of `x`, or of `W`, up to which this kernel runs instead of the `gemm` crate; more rows
/// of `x` than this go in chunks of this many, in parallel.
pub(crate) const MAX_ROWS: usize = 64;

/// Weight rows per parallel task: a task must amortise its start, and the tasks spread over the
/// threads even for a narrow layer (the 128 outputs of a grouped-query key projection).
const BLOCK: usize = 32;

/// Computes `dst[m×n] (+)= scale · x[m×k] · w[n×k]ᵀ` with the kernel of `isa`; `false` (and
/// `dst` untouched) when `isa` has none or the product is empty.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_xwt<W: Weight>(
    isa: Isa,
    dst: &mut [f32],
    x: &[f32],
    w: &[W],
    (m, n, k): (usize, usize, usize),
    scale: f32,
    accumulate: bool,
    threads: usize,
) -> bool {
    assert!(dst.len() >= m * n && x.len() >= m * k && w.len() >= n * k, "few_rows: operands too small");
    assert!(isa <= Isa::detected(), "few_rows: {isa:?} is beyond this CPU");
    if m == 0 || n == 0 || k == 0 || isa < Isa::Avx2 {
        return false;
    }
    if m > MAX_ROWS {
        let run = |(d, x): (&mut [f32], &[f32])| {
            let rows = x.len() / k;
            matmul_xwt(isa, d, x, w, (rows, n, k), scale, accumulate, 1);
        };
        let (dst, x) = (&mut dst[..m * n], &x[..m * k]);
        if threads > 1 {
            dst.par_chunks_mut(MAX_ROWS * n).zip(x.par_chunks(MAX_ROWS * k)).for_each(run);
        } else {
            dst.chunks_mut(MAX_ROWS * n).zip(x.chunks(MAX_ROWS * k)).for_each(run);
        }
        return true;
    }
    let block: fn(&mut [f32], &[f32], &[W], usize, usize) = match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY (both arms): the assert above: the CPU has the features the kernel is
        // compiled for.
        Isa::Avx512 | Isa::Amx => |out, x, w, m, k| unsafe { x86::block_avx512(out, x, w, m, k) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => |out, x, w, m, k| unsafe { x86::block_avx2(out, x, w, m, k) },
        _ => return false,
    };
    // Each task computes `x · Wᵀ` for its block of weight rows into its own `[m, rows]` part of
    // one buffer (block-major), which is then scaled into `dst`'s columns.
    let mut outs = vec![0.0f32; m * n];
    let run = |(b, out): (usize, &mut [f32])| {
        let rows = &w[b * BLOCK * k..((b + 1) * BLOCK).min(n) * k];
        block(out, &x[..m * k], rows, m, k);
    };
    if threads > 1 && m * n * k >= 1 << 15 {
        let per_task = n.div_ceil(BLOCK).div_ceil(4 * threads).max(1);
        outs.par_chunks_mut(m * BLOCK).enumerate().with_min_len(per_task).for_each(run);
    } else {
        outs.chunks_mut(m * BLOCK).enumerate().for_each(run);
    }
    for (b, out) in outs.chunks(m * BLOCK).enumerate() {
        let width = out.len() / m;
        for i in 0..m {
            let d = &mut dst[i * n + b * BLOCK..][..width];
            let o = &out[i * width..][..width];
            if accumulate {
                d.iter_mut().zip(o).for_each(|(d, o)| *d += scale * o);
            } else {
                d.iter_mut().zip(o).for_each(|(d, o)| *d = scale * o);
            }
        }
    }
    true
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::Weight;

    /// `out[m×nb] = x[m×k] · w[nb×k]ᵀ` in tiles of `R` rows of `x` by `C` weight rows; a last
    /// partial tile of weight rows repeats the block's last row and drops its results.
    macro_rules! block {
        ($name:ident, $tile:ident, $feature:literal, $cols:expr) => {
            #[target_feature(enable = $feature)]
            pub(super) fn $name<W: Weight>(out: &mut [f32], x: &[f32], w: &[W], m: usize, k: usize) {
                const C: usize = $cols;
                let nb = w.len() / k;
                assert!(out.len() >= m * nb && x.len() >= m * k);
                for j in (0..nb).step_by(C) {
                    let cols: [usize; C] = std::array::from_fn(|c| (j + c).min(nb - 1));
                    // SAFETY: every pointer starts a row that lies whole inside `w` or `x`
                    // (`cols` < nb, rows < m), and the tiles read exactly `k` elements of each.
                    let wr = cols.map(|c| unsafe { w.as_ptr().add(c * k) });
                    let mut i = 0;
                    while i < m {
                        let xr = unsafe { x.as_ptr().add(i * k) };
                        let (sums, rows): ([[f32; C]; 4], usize) = if i + 4 <= m {
                            (unsafe { $tile::<W, 4, C>(xr, k, wr) }, 4)
                        } else {
                            let one = unsafe { $tile::<W, 1, C>(xr, k, wr) };
                            (std::array::from_fn(|r| if r == 0 { one[0] } else { [0.0; C] }), 1)
                        };
                        for (r, row) in sums.iter().enumerate().take(rows) {
                            for (c, &v) in row.iter().enumerate().filter(|(c, _)| j + c < nb) {
                                out[(i + r) * nb + j + c] = v;
                            }
                        }
                        i += rows;
                    }
                }
            }
        };
    }

    block!(block_avx512, tile_avx512, "avx512f,avx512bw,avx512vl", 4);
    block!(block_avx2, tile_avx2, "avx2,fma", 2);

    /// Dot products of `R` consecutive rows of `x` (stride `k`) with `C` weight rows, 16 lanes.
    ///
    /// # Safety
    /// The CPU has AVX-512 F, BW and VL; each of the `R` rows at `x` and each row in `w` has
    /// `k` readable elements.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn tile_avx512<W: Weight, const R: usize, const C: usize>(
        x: *const f32,
        k: usize,
        w: [*const W; C],
    ) -> [[f32; C]; R] {
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        let full = k / 16 * 16;
        let mut p = 0;
        // SAFETY (the loads): `p + 16 <= full <= k` in the loop; the tail's mask covers only
        // the `k - full` elements left.
        while p < full {
            let wv: [__m512; C] = std::array::from_fn(|c| unsafe { W::load16(w[c].add(p), !0) });
            for (r, acc) in acc.iter_mut().enumerate() {
                let xv = unsafe { _mm512_loadu_ps(x.add(r * k + p)) };
                for c in 0..C {
                    acc[c] = _mm512_fmadd_ps(xv, wv[c], acc[c]);
                }
            }
            p += 16;
        }
        if full < k {
            let mask: __mmask16 = ((1u32 << (k - full)) - 1) as __mmask16;
            let wv: [__m512; C] = std::array::from_fn(|c| unsafe { W::load16(w[c].add(p), mask) });
            for (r, acc) in acc.iter_mut().enumerate() {
                let xv = unsafe { _mm512_maskz_loadu_ps(mask, x.add(r * k + p)) };
                for c in 0..C {
                    acc[c] = _mm512_fmadd_ps(xv, wv[c], acc[c]);
                }
            }
        }
        acc.map(|row| row.map(|v| _mm512_reduce_add_ps(v)))
    }

    /// As [`tile_avx512`], 8 lanes.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; each of the `R` rows at `x` and each row in `w` has `k`
    /// readable elements.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile_avx2<W: Weight, const R: usize, const C: usize>(
        x: *const f32,
        k: usize,
        w: [*const W; C],
    ) -> [[f32; C]; R] {
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let full = k / 8 * 8;
        let mut p = 0;
        // SAFETY (the loads): `p + 8 <= full <= k`.
        while p < full {
            let wv: [__m256; C] = std::array::from_fn(|c| unsafe { W::load8(w[c].add(p)) });
            for (r, acc) in acc.iter_mut().enumerate() {
                let xv = unsafe { _mm256_loadu_ps(x.add(r * k + p)) };
                for c in 0..C {
                    acc[c] = _mm256_fmadd_ps(xv, wv[c], acc[c]);
                }
            }
            p += 8;
        }
        let mut sums = acc.map(|row| row.map(|v| hsum256(v)));
        // The last `k - full` (< 8) elements, scalar.
        for (r, row) in sums.iter_mut().enumerate() {
            for (c, s) in row.iter_mut().enumerate() {
                for q in full..k {
                    // SAFETY: q < k.
                    *s += unsafe { *x.add(r * k + q) * (*w[c].add(q)).to_f32() };
                }
            }
        }
        sums
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum256(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
    }
}

#[cfg(test)]
mod tests {
    use half::bf16;

    use super::*;
    use crate::cpu::{check_product, random};

    /// Every kernel this CPU runs against an f64 reference, over shapes with partial tiles, odd
    /// `k` (the tails), a single row, more weight rows than one block, and accumulation.
    #[test]
    fn each_isa_matches_a_reference() {
        for isa in Isa::available() {
            for &(m, n, k) in &[
                (1, 1, 1),
                (1, 7, 17),
                (3, 33, 31),
                (4, 64, 16),
                (5, 70, 100),
                (13, 129, 8),
                (64, 40, 65),
                (150, 16, 37),
            ] {
                let w = random(n * k, 2);
                check(isa, (m, n, k), &w);
                check(isa, (m, n, k), &w.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>());
            }
        }
    }

    /// One shape with weights of type `W`.
    fn check<W: Weight>(isa: Isa, (m, n, k): (usize, usize, usize), w: &[W]) {
        let kernel = |dst: &mut [f32], x: &[f32], acc| matmul_xwt(isa, dst, x, w, (m, n, k), 0.5, acc, 2);
        check_product(isa, (m, n, k), |p, j| w[j * k + p].to_f32(), kernel, std::any::type_name::<W>());
    }
}
