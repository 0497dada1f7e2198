//! Token embedding lookup: a row gather from the embedding table.

use crate::Tensor;
use crate::error::{Result, arg_err};
use crate::ops::{gather_rows, scatter_add_rows};

/// Rows of `table` (`[vocab, d]`) for each token id: `[ids.len(), d]`. An id outside the
/// vocabulary is an error naming it.
pub fn embedding(table: &Tensor, ids: &[u32]) -> Result<Tensor> {
    let (vocab, _) = table.dims2("embedding")?;
    if let Some(id) = ids.iter().find(|&&id| id as usize >= vocab) {
        return arg_err("embedding", format!("token id {id} outside the vocabulary of {vocab}"));
    }
    gather_rows(table, ids)
}

/// Gradient of [`embedding`] w.r.t. the table: `dy` rows summed into `[vocab, d]`.
pub fn embedding_backward(ids: &[u32], dy: &Tensor, vocab: usize) -> Result<Tensor> {
    scatter_add_rows(dy, ids, vocab)
}
