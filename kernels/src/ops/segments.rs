//! Row segments: runs of consecutive rows that share one weight (an expert, an adapter). The
//! common currency of SGMV and the grouped expert matmul.

use crate::error::{Result, arg_err};

/// `bounds` has one more entry than `index`: segment `s` covers rows
/// `bounds[s]..bounds[s + 1]` and uses weight `index[s]` (-1: no weight, the rows get nothing).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Segments {
    pub bounds: Vec<usize>,
    pub index: Vec<i32>,
}

impl Segments {
    /// Segments from explicit bounds and weight indices.
    pub fn new(bounds: Vec<usize>, index: Vec<i32>) -> Self {
        Segments { bounds, index }
    }

    /// Runs of equal consecutive indices of a per-row index list (the BGMV form).
    pub fn from_row_indices(rows: &[i32]) -> Self {
        let mut seg = Segments { bounds: vec![0], index: Vec::new() };
        for (i, &a) in rows.iter().enumerate() {
            if seg.index.last() != Some(&a) {
                if i > 0 {
                    seg.bounds.push(i);
                }
                seg.index.push(a);
            }
        }
        if !rows.is_empty() {
            seg.bounds.push(rows.len());
        }
        seg
    }

    /// Segments with their row ranges: `(start, end, index)`.
    pub fn iter(&self) -> impl Iterator<Item = (usize, usize, i32)> + '_ {
        self.index.iter().enumerate().map(|(s, &i)| (self.bounds[s], self.bounds[s + 1], i))
    }

    /// Checks the segments cover exactly `rows` rows, in order, with indices below `weights`.
    pub fn validate(&self, op: &'static str, rows: usize, weights: usize) -> Result<()> {
        if self.bounds.len() != self.index.len() + 1 {
            return arg_err(op, format!("{} bounds for {} segments", self.bounds.len(), self.index.len()));
        }
        if self.bounds.first() != Some(&0) || self.bounds.last() != Some(&rows) {
            return arg_err(op, format!("segments must cover rows 0..{rows}, bounds are {:?}", self.bounds));
        }
        if self.bounds.windows(2).any(|w| w[0] > w[1]) {
            return arg_err(op, format!("segment bounds must not decrease: {:?}", self.bounds));
        }
        if let Some(i) = self.index.iter().find(|&&i| i < -1 || i >= weights as i32) {
            return arg_err(op, format!("weight index {i} outside 0..{weights} (or -1)"));
        }
        Ok(())
    }

    /// Splits `data` (`rows × width`) into one mutable slice per segment.
    pub(crate) fn split_rows_mut<'a>(&self, mut data: &'a mut [f32], width: usize) -> Vec<&'a mut [f32]> {
        let mut out = Vec::with_capacity(self.index.len());
        for w in self.bounds.windows(2) {
            let (head, tail) = data.split_at_mut((w[1] - w[0]) * width);
            out.push(head);
            data = tail;
        }
        out
    }
}
