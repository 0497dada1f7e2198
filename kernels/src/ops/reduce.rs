//! Reductions over one row of logits: where its largest element is, and its log-sum-exp. The
//! sampler runs both over a whole vocabulary for every token it picks, so they are vectorised.

use crate::cpu::multiversion;

/// Elements whose exponentials are summed in f32 lanes before the sum goes on in f64: short
/// enough that the f32 partial sums lose nothing a log-probability shows.
const CHUNK: usize = 1024;

multiversion! {
    /// Index of the largest element, the lowest on ties; NaN never wins. `None` for an empty
    /// or all-NaN row.
    pub fn argmax(row: &[f32]) -> Option<usize> {
        // `f32::max` passes over a NaN operand, so the lanes' maximum ignores NaNs.
        let max = crate::cpu::max(row);
        if max.is_nan() || row.is_empty() {
            return None;
        }
        // Find the block holding the first maximum with a branch-free pass per block.
        const BLOCK: usize = 64;
        let block = row.chunks(BLOCK).position(|b| b.iter().fold(false, |hit, &v| hit | (v == max)))?;
        let start = block * BLOCK;
        row[start..].iter().position(|&v| v == max).map(|i| start + i)
    }
}

multiversion! {
    /// `ln Σ exp(row)`, computed stably around the row's maximum; NaN if any element is NaN,
    /// -inf for an empty row.
    pub fn log_sum_exp(row: &[f32]) -> f32 {
        if row.iter().fold(false, |nan, v| nan | v.is_nan()) {
            return f32::NAN;
        }
        let max = crate::cpu::max(row);
        if max.is_infinite() {
            return max;
        }
        let sum: f64 = row
            .chunks(CHUNK)
            .map(|c| {
                let mut acc = [0.0f32; 16];
                let lanes = c.chunks_exact(16);
                let tail: f32 = lanes.remainder().iter().map(|&v| crate::cpu::exp(v - max)).sum();
                for l in lanes {
                    for (a, &v) in acc.iter_mut().zip(l) {
                        *a += crate::cpu::exp(v - max);
                    }
                }
                f64::from(acc.iter().sum::<f32>() + tail)
            })
            .sum();
        (f64::from(max) + sum.ln()) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::Isa;

    fn isas() -> impl Iterator<Item = Isa> {
        [Isa::Portable, Isa::Avx2, Isa::Avx512].into_iter().filter(|&i| i <= Isa::detected())
    }

    #[test]
    fn argmax_takes_the_first_maximum_and_passes_over_nans() {
        let mut row: Vec<f32> = (0..1000).map(|i| ((i * 37) % 101) as f32).collect();
        row[700] = 500.0;
        row[900] = 500.0;
        row[10] = f32::NAN;
        for isa in isas() {
            assert_eq!(argmax::on(isa, &row), Some(700), "{isa:?}");
            assert_eq!(argmax::on(isa, &[f32::NAN, 1.0, f32::NAN]), Some(1), "{isa:?}");
            assert_eq!(argmax::on(isa, &[f32::NAN; 5]), None, "{isa:?}");
            assert_eq!(argmax::on(isa, &[]), None, "{isa:?}");
            assert_eq!(argmax::on(isa, &[f32::NEG_INFINITY, f32::NEG_INFINITY]), Some(0), "{isa:?}");
        }
    }

    #[test]
    fn log_sum_exp_matches_f64_over_a_vocabulary() {
        let row: Vec<f32> = (0..151_936).map(|i| ((i as f32 * 0.618).sin() * 12.0) - 3.0).collect();
        let max = row.iter().copied().fold(f64::NEG_INFINITY, |m, v| m.max(f64::from(v)));
        let want = max + row.iter().map(|&v| (f64::from(v) - max).exp()).sum::<f64>().ln();
        for isa in isas() {
            let got = f64::from(log_sum_exp::on(isa, &row));
            assert!((got - want).abs() < 1e-5, "{isa:?}: {got} vs {want}");
        }
    }

    #[test]
    fn log_sum_exp_of_edge_rows() {
        for isa in isas() {
            assert!(log_sum_exp::on(isa, &[1.0, f32::NAN]).is_nan(), "{isa:?}");
            assert_eq!(log_sum_exp::on(isa, &[]), f32::NEG_INFINITY, "{isa:?}");
            assert_eq!(log_sum_exp::on(isa, &[f32::NEG_INFINITY; 3]), f32::NEG_INFINITY, "{isa:?}");
            assert_eq!(log_sum_exp::on(isa, &[f32::INFINITY, 0.0]), f32::INFINITY, "{isa:?}");
            let two = log_sum_exp::on(isa, &[0.0, 0.0]);
            assert!((two - std::f32::consts::LN_2).abs() < 1e-6, "{isa:?}: {two}");
        }
    }
}
