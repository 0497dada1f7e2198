//! Shared pieces of the CPU backend: a safe wrapper over the `gemm` crate, used by every op that
//! multiplies matrices (matmul, multi-LoRA, grouped experts).

use gemm::Parallelism;

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

/// Threads a large CPU kernel may use.
pub(crate) fn threads() -> usize {
    rayon::current_num_threads()
}

/// Dot product with eight independent accumulators, so the compiler can keep it in SIMD lanes
/// (a plain `.sum()` must add in order and stays scalar).
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
