//! Helpers shared by the CPU tests: a seeded generator, tensor comparison, and the
//! finite-difference gradient check.

use tandem_kernels::Tensor;

/// SplitMix64: small, seeded, good enough for test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| scale * self.uniform()).collect()
    }

    pub fn tensor(&mut self, shape: &[usize], scale: f32) -> Tensor {
        Tensor::from_vec(self.vec(shape.iter().product(), scale), shape.to_vec()).unwrap()
    }
}

/// Asserts `|a − b| <= atol + rtol·|b|` elementwise, naming the first offender.
pub fn assert_close(what: &str, a: &[f32], b: &[f32], atol: f32, rtol: f32) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= atol + rtol * y.abs(),
            "{what}: element {i}: got {x}, expected {y} (|diff| {})",
            (x - y).abs()
        );
    }
}

pub fn assert_tensors_close(what: &str, a: &Tensor, b: &Tensor, atol: f32, rtol: f32) {
    assert_eq!(a.shape(), b.shape(), "{what}: shapes differ");
    assert_close(what, &a.to_vec_f32().unwrap(), &b.to_vec_f32().unwrap(), atol, rtol);
}

/// `Σ upstream · f(inputs)` in f64: the scalar whose gradient the backward ops compute when
/// given `upstream` as the output gradient.
fn objective(out: &Tensor, upstream: &[f32]) -> f64 {
    out.to_vec_f32().unwrap().iter().zip(upstream).map(|(&o, &g)| o as f64 * g as f64).sum()
}

/// Checks `analytic` (the gradient w.r.t. `inputs[which]`) against central differences of
/// `Σ upstream · f(inputs)`, perturbing up to `max_probes` elements spread over the tensor.
pub fn check_grad(
    what: &str,
    inputs: &[Tensor],
    which: usize,
    f: &dyn Fn(&[Tensor]) -> Tensor,
    upstream: &[f32],
    analytic: &Tensor,
) {
    const H: f32 = 1e-2;
    const MAX_PROBES: usize = 48;
    let base = inputs[which].to_vec_f32().unwrap();
    assert_eq!(analytic.shape(), inputs[which].shape(), "{what}: gradient shape");
    let grad = analytic.to_vec_f32().unwrap();
    let step = base.len().div_ceil(MAX_PROBES).max(1);
    let shape = inputs[which].shape().to_vec();
    let eval = |i: usize, delta: f32| {
        let mut data = base.clone();
        data[i] += delta;
        let mut probe = inputs.to_vec();
        probe[which] = Tensor::from_vec(data, shape.clone()).unwrap();
        objective(&f(&probe), upstream)
    };
    for i in (0..base.len()).step_by(step) {
        let numeric = ((eval(i, H) - eval(i, -H)) / (2.0 * H as f64)) as f32;
        let tol = 2e-3 + 2e-2 * numeric.abs();
        assert!((grad[i] - numeric).abs() <= tol, "{what}: d/d[{i}]: analytic {} vs numeric {numeric}", grad[i]);
    }
}
