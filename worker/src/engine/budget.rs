//! How much work fits in one iteration. Every running request gets one token per iteration, so an
//! iteration must not last longer than the time-per-output-token target. The engine measures
//! what each kind of work costs (an inference batch by its tokens, what fine-tuning rows add to
//! an iteration by their tokens, a backward layer by its tokens)
//! and fits a line to each online; it plans the next iteration from those lines, and a headroom
//! factor shrinks when a token's wait still overruns (and grows back slowly when it does not).

use std::time::Duration;

/// `seconds ≈ fixed + per_unit · units`, fitted by least squares over recent measurements,
/// older ones weighing exponentially less.
#[derive(Clone, Debug, Default)]
pub struct LinearCost {
    // Decayed sums of 1, x, y, x², x·y.
    s0: f64,
    sx: f64,
    sy: f64,
    sxx: f64,
    sxy: f64,
    /// Decayed sum of squared prediction errors (each measured before it joined the fit).
    see: f64,
}

/// Weight kept by older measurements at each new one.
const DECAY: f64 = 0.95;

impl LinearCost {
    pub fn observe(&mut self, units: usize, seconds: f64) {
        if let Some(p) = self.predict(units) {
            self.see = self.see * DECAY + (seconds - p).powi(2);
        }
        let x = units as f64;
        for (s, v) in [(&mut self.s0, 1.0), (&mut self.sx, x), (&mut self.sy, seconds), (&mut self.sxx, x * x)] {
            *s = *s * DECAY + v;
        }
        self.sxy = self.sxy * DECAY + x * seconds;
    }

    /// (fixed, per unit) seconds; `None` before any measurement.
    fn line(&self) -> Option<(f64, f64)> {
        if self.s0 == 0.0 || self.sx <= 0.0 {
            return None;
        }
        let (mx, my) = (self.sx / self.s0, self.sy / self.s0);
        let var = self.sxx / self.s0 - mx * mx;
        // Measurements all at (about) one size say nothing of the slope: charge per unit.
        if var <= 1e-6 * mx * mx {
            return Some((0.0, my / mx));
        }
        let slope = (self.sxy / self.s0 - mx * my) / var;
        if slope <= 0.0 {
            return Some((0.0, my / mx));
        }
        Some(((my - slope * mx).max(0.0), slope))
    }

    /// Predicted seconds for `units`; `None` before any measurement.
    pub fn predict(&self, units: usize) -> Option<f64> {
        self.line().map(|(a, b)| a + b * units as f64)
    }

    /// A prediction that the measurements rarely exceed: the line plus twice the typical
    /// error of its recent predictions (machines are noisy; the target is about the tail).
    pub fn predict_high(&self, units: usize) -> Option<f64> {
        let spread = if self.s0 > 0.0 { 2.0 * (self.see / self.s0).sqrt() } else { 0.0 };
        self.predict(units).map(|p| p + spread)
    }

    /// The most units predicted to fit in `seconds` (`None` before any measurement).
    pub fn units_within(&self, seconds: f64) -> Option<usize> {
        self.line().map(|(a, b)| if b > 0.0 { ((seconds - a) / b).max(0.0) as usize } else { usize::MAX })
    }
}

#[derive(Clone, Debug)]
pub struct Budget {
    /// The time-per-output-token target.
    pub target: Duration,
    /// Share of the target the plan aims at (adapts to overruns).
    pub headroom: f64,
    /// An iteration's inference part (packing its adapters, the forward pass, sampling), by
    /// its tokens.
    pub forward: LinearCost,
    /// What fine-tuning rows add to an iteration (packing the jobs' adapters, their share of
    /// the forward pass, their loss and its gradient), by their tokens.
    pub finetune: LinearCost,
    /// One backward layer, by its tokens.
    pub backward: LinearCost,
    /// Finishing a group's backward (each job's gradients, optimizer steps, publishing the new
    /// weights), by the group's jobs.
    pub finish: LinearCost,
}

impl Budget {
    pub fn new(target: Duration) -> Self {
        Budget {
            target,
            headroom: 0.9,
            forward: LinearCost::default(),
            finetune: LinearCost::default(),
            backward: LinearCost::default(),
            finish: LinearCost::default(),
        }
    }

    /// Seconds an iteration should take.
    pub fn limit(&self) -> f64 {
        self.target.as_secs_f64() * self.headroom
    }

    /// Feedback from a decoding request's wait between two tokens (what the target is about):
    /// shrink the aim fast when over, grow it back slowly when well under.
    pub fn observe_wait(&mut self, seconds: f64) {
        let target = self.target.as_secs_f64();
        if seconds > target {
            self.headroom = (self.headroom * 0.85).max(0.2);
        } else if seconds < 0.9 * target {
            self.headroom = (self.headroom * 1.02).min(0.9);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_recovered_and_inverted() {
        let mut c = LinearCost::default();
        assert_eq!(c.predict(10), None);
        for x in [4, 40, 8, 120, 16, 64] {
            c.observe(x, 0.01 + 0.002 * x as f64);
        }
        let p = c.predict(100).unwrap();
        assert!((p - 0.21).abs() < 1e-6, "{p}");
        assert_eq!(c.units_within(0.2105), Some(100));
        assert_eq!(c.units_within(0.2095), Some(99));
    }

    #[test]
    fn one_size_only_charges_per_unit() {
        let mut c = LinearCost::default();
        for _ in 0..5 {
            c.observe(8, 0.08);
        }
        assert!((c.predict(16).unwrap() - 0.16).abs() < 1e-9);
    }

    #[test]
    fn overruns_shrink_the_aim_and_quiet_iterations_restore_it() {
        let mut b = Budget::new(Duration::from_millis(100));
        let start = b.limit();
        b.observe_wait(0.2);
        assert!(b.limit() < start);
        for _ in 0..100 {
            b.observe_wait(0.01);
        }
        assert!((b.limit() - start).abs() < 1e-12);
    }
}
