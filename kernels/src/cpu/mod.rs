//! Shared pieces of the CPU backend: a safe wrapper over the `gemm` crate, used by every op that
//! multiplies matrices (matmul, multi-LoRA, grouped experts), and the reductions our own kernels
//! share. `isa.rs` picks the vector instructions our kernels use; `few_rows.rs` (`x · Wᵀ`, either
//! of them few rows) and `low_rank.rs` (`x · W`, `W` few rows) are the matmuls of decoding and
//! of LoRA deltas, where the `gemm` crate is slow, with f32 or bf16 weights (`weight.rs`);
//! `amx.rs` multiplies bf16 weights on the AMX tiles.

#[cfg(target_arch = "x86_64")]
mod amx;
mod few_rows;
mod isa;
mod low_rank;
mod weight;

pub use isa::Isa;
pub use isa::kernel_isa;
pub(crate) use isa::multiversion;
pub(crate) use weight::Weight;

use std::borrow::Cow;

use gemm::Parallelism;

/// By default `gemm` reads a row-major `b` (a weight in `dy · W`, the backward of a linear
/// layer) in place, without packing it, unless the product has more than 96 rows; the kernel then
/// strides across the weight's rows and runs at 40% of its speed for 64 rows (the LM head's
/// backward with 64 tokens: 41 against 70 GFLOP/s packed). Packing from 12 rows up makes small
/// training microbatches ~25% faster end to end (`tandem bench finetune`) and changes nothing
/// from 96 rows up.
static PACK_WEIGHTS_FOR_FEW_ROWS: std::sync::Once = std::sync::Once::new();

/// The instruction set the CPU GEMM runs with on this machine, as the `gemm` crate chooses it at
/// run time: AVX-512 where the CPU has it (the crate's `x86-v4` kernels are built in), else AVX2
/// with FMA, else portable code. Benchmarks print it beside their figures.
pub fn gemm_instruction_set() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return "avx512f";
        }
        if std::arch::is_x86_feature_detected!("fma") {
            return "avx2+fma";
        }
    }
    if cfg!(target_arch = "aarch64") { "neon" } else { "portable" }
}

/// Operand layout of one row-major GEMM: `dst[m×n] (+)= op(a)[m×k] · op(b)[k×n]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// `a` is stored as `[k, m]` and read transposed.
    pub trans_a: bool,
    /// `b` is stored as `[n, k]` and read transposed (the `x · Wᵀ` of a linear layer).
    pub trans_b: bool,
}

impl Gemm {
    pub fn new(m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool) -> Self {
        Gemm { m, n, k, trans_a, trans_b }
    }

    /// Runs the product. `accumulate` adds into `dst` instead of overwriting it; `scale`
    /// multiplies the product. `threads` is the rayon parallelism (1 = this thread only).
    pub fn run(&self, dst: &mut [f32], a: &[f32], b: &[f32], scale: f32, accumulate: bool, threads: usize) {
        let Gemm { m, n, k, trans_a, trans_b } = *self;
        PACK_WEIGHTS_FOR_FEW_ROWS.call_once(|| gemm::set_lhs_packing_threshold_multi_thread(2));
        assert!(dst.len() >= m * n, "gemm: dst too small");
        assert!(a.len() >= m * k, "gemm: lhs too small");
        assert!(b.len() >= k * n, "gemm: rhs too small");
        if m == 0 || n == 0 {
            return;
        }
        if k == 0 {
            if !accumulate {
                dst[..m * n].fill(0.0);
            }
            return;
        }
        if !trans_a
            && trans_b
            && m.min(n) <= few_rows::MAX_ROWS
            && few_rows::matmul_xwt(kernel_isa(), dst, a, b, (m, n, k), scale, accumulate, threads)
        {
            return;
        }
        if !trans_a
            && !trans_b
            && k <= low_rank::MAX_DEPTH
            && low_rank::matmul_xw(kernel_isa(), dst, a, b, (m, n, k), scale, accumulate, threads)
        {
            return;
        }
        let (a_rs, a_cs) = if trans_a { (1, m) } else { (k, 1) };
        let (b_rs, b_cs) = if trans_b { (1, k) } else { (n, 1) };
        let parallelism =
            if threads > 1 && m * n * k >= 1 << 15 { Parallelism::Rayon(threads) } else { Parallelism::None };
        // SAFETY: the asserts above bound every element the strides reach inside the slices;
        // dst does not alias a or b (it is a distinct &mut).
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst.as_mut_ptr(),
                1,
                n as isize,
                accumulate,
                a.as_ptr(),
                a_cs as isize,
                a_rs as isize,
                b.as_ptr(),
                b_cs as isize,
                b_rs as isize,
                1.0,
                scale,
                false,
                false,
                false,
                parallelism,
            );
        }
    }
}

/// `dst[m×n] = x[m×k] · op(w)` for a bf16 weight, on the AMX tiles: `w` is `[n, k]` read
/// transposed (`x · Wᵀ`, a linear layer) or, without `trans_w`, `[k, n]` (`dy · W`, its input
/// gradient). `false` (and `dst` untouched) where this CPU has no AMX or the shape does not
/// fit the tiles; the caller then widens the weight to f32.
pub(crate) fn matmul_bf16_weight(
    dst: &mut [f32],
    x: &[f32],
    w: &[half::bf16],
    (m, n, k): (usize, usize, usize),
    trans_w: bool,
) -> bool {
    if kernel_isa() < Isa::Amx {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    if trans_w {
        amx::matmul_xwt(dst, x, w, (m, n, k), threads())
    } else {
        amx::matmul_xw(dst, x, w, (m, k, n), threads());
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("Isa::Amx is detected on x86-64 only")
}

/// Whether this CPU multiplies bf16 weights as they lie, on AMX tiles, for linear layers whose
/// inputs are `widths` wide; where it does not, a bf16 weight is widened to f32 at every
/// product, so a caller choosing the dtype to hold weights in keeps f32.
pub fn multiplies_bf16_weights(widths: &[usize]) -> bool {
    #[cfg(target_arch = "x86_64")]
    return kernel_isa() >= Isa::Amx && widths.iter().all(|&k| amx::fits(k));
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = widths;
        false
    }
}

/// Rows of a LoRA block above which [`lora_delta`] widens bf16 weights to f32 first.
const WIDEN_ABOVE_ROWS: usize = 8;

/// `y[m×out] += scale · (x·Aᵀ)·Bᵀ` for one adapter's dense block of rows `x` (`[m, in]`), `a`
/// (`[r, in]`) and `bt` (`[r, out]`) in f32 or bf16, read as they lie: the LoRA delta on our
/// kernels, which stream each weight row once however few rows the block has. `false` (and `y`
/// untouched) where this CPU has none; the caller then runs [`Gemm`]s.
pub(crate) fn lora_delta<W: Weight>(
    y: &mut [f32],
    x: &[f32],
    a: &[W],
    bt: &[W],
    r: usize,
    scale: f32,
    threads: usize,
) -> bool {
    let isa = kernel_isa();
    if isa < Isa::Avx2 || r == 0 {
        return false;
    }
    let (in_f, out_f) = (a.len() / r, bt.len() / r);
    let m = x.len() / in_f.max(1);
    // Over many rows the product is bound by arithmetic, not by reading the weights, and
    // widening each bf16 weight vector at every use would cost more than widening them all once.
    if m > WIDEN_ABOVE_ROWS
        && let (Cow::Owned(a), Cow::Owned(bt)) = (W::widen(a), W::widen(bt))
    {
        return lora_delta(y, x, &a, &bt, r, scale, threads);
    }
    let mut h = vec![0.0; m * r];
    // Both kernels run on every ISA from AVX2 up, so neither refuses here.
    few_rows::matmul_xwt(isa, &mut h, x, a, (m, r, in_f), 1.0, false, threads)
        && low_rank::matmul_xw(isa, y, &h, bt, (m, out_f, r), scale, true, threads)
}

/// Threads a large CPU kernel may use.
pub(crate) fn threads() -> usize {
    rayon::current_num_threads()
}

/// Dot product with eight independent accumulators, so the compiler can keep it in SIMD lanes
/// (a plain `.sum()` must add in order and stays scalar).
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Sum and maximum of a slice in eight independent lanes, so they vectorise (an in-order
/// reduction cannot).
#[inline]
pub(crate) fn sum(x: &[f32]) -> f32 {
    lanes(x, 0.0, |a, b| a + b).iter().sum()
}

#[inline]
pub(crate) fn max(x: &[f32]) -> f32 {
    lanes(x, f32::NEG_INFINITY, f32::max).into_iter().fold(f32::NEG_INFINITY, f32::max)
}

#[inline]
fn lanes(x: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> [f32; 8] {
    let mut acc = [init; 8];
    let chunks = x.chunks_exact(8);
    for (l, &v) in chunks.remainder().iter().enumerate() {
        acc[l] = f(acc[l], v);
    }
    for c in chunks {
        for l in 0..8 {
            acc[l] = f(acc[l], c[l]);
        }
    }
    acc
}

/// `e^x` in f32 without a libm call, branch-free so that loops over slices vectorise: `x = n·ln2
/// + r` with `|r| <= ln2/2`, Cephes' degree-6 polynomial for `e^r`, and `2^n` written into the
/// exponent bits. Within 2 ulp of the true value for `x` in [-87.3, 88] (see the test); inputs
/// are clamped to that range (below it the result is ~1e-38 instead of 0, above it e^88), which
/// is all softmax (max-subtracted, so `x <= 0`) and the sigmoid need.
#[inline]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in a part exact in f32 and the rest (Cody-Waite).
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5·2^23 rounds to the nearest integer with plain arithmetic.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.0);
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_2e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5e-1;
    let e_r = p * r * r + r + 1.0;
    // The integer n sits in the low mantissa bits of `shifted`: 2^n without a float-to-int
    // conversion (which would not vectorise).
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    e_r * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

/// Test data: `n` values uniform in [-2, 2), the same for the same `seed`.
#[cfg(test)]
pub(crate) fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
        })
        .collect()
}

/// Checks a kernel computing `dst[m×n] (+)= 0.5 · x[m×k] · W` (`kernel(dst, x, accumulate)`,
/// which answers whether it ran; only the portable ISA may refuse) against f64 sums, `weight(p,
/// j)` the element of `W` at reduction step `p` of output column `j`; overwriting and
/// accumulating.
#[cfg(test)]
pub(crate) fn check_product(
    isa: Isa,
    (m, n, k): (usize, usize, usize),
    weight: impl Fn(usize, usize) -> f32,
    kernel: impl Fn(&mut [f32], &[f32], bool) -> bool,
    what: &str,
) {
    let x = random(m * k, 1);
    let init = random(m * n, 3);
    for accumulate in [false, true] {
        let mut dst = init.clone();
        if !kernel(&mut dst, &x, accumulate) {
            assert_eq!(isa, Isa::Portable, "{isa:?} has a kernel");
            assert_eq!(dst, init, "a refused call wrote");
            continue;
        }
        for i in 0..m {
            for j in 0..n {
                let dot: f64 = (0..k).map(|p| x[i * k + p] as f64 * weight(p, j) as f64).sum();
                let want = 0.5 * dot + if accumulate { init[i * n + j] as f64 } else { 0.0 };
                let got = dst[i * n + j] as f64;
                assert!(
                    (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "{isa:?} {what} {m}x{n}x{k} [{i},{j}]: {got} vs {want}"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_is_within_two_ulp() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = super::exp(x) as f64;
            let ulp = (want as f32).abs() as f64 * f32::EPSILON as f64;
            worst = worst.max((got - want).abs() / ulp);
            x += 0.000_731;
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        assert_eq!(super::exp(0.0), 1.0);
        assert!(super::exp(-1000.0) < 1e-37 && super::exp(-1000.0) >= 0.0);
        assert!(super::exp(f32::NAN).is_nan());
    }
}
