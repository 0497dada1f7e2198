//! Property tests over random shapes.

use proptest::prelude::*;
use tandem_kernels::Tensor;
use tandem_kernels::ops::{self, Segments};

use crate::common::{Rng, assert_close};
use crate::reference::{Heads, check_paged_attention_against_dense, lora_per_token, random_adapters};

fn naive_matmul(a: &[f32], b: &[f32], m: usize, n: usize, k: usize, ta: bool, tb: bool) -> Vec<f32> {
    let at = |i: usize, p: usize| if ta { a[p * m + i] } else { a[i * k + p] };
    let bt = |p: usize, j: usize| if tb { b[j * k + p] } else { b[p * n + j] };
    (0..m * n).map(|ij| (0..k).map(|p| at(ij / n, p) * bt(p, ij % n)).sum()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn matmul_matches_the_triple_loop(m in 1usize..40, n in 1usize..40, k in 1usize..70, ta: bool, tb: bool, seed: u64) {
        let mut rng = Rng::new(seed);
        let (a, b) = (rng.vec(m * k, 1.0), rng.vec(k * n, 1.0));
        let a_shape = if ta { [k, m] } else { [m, k] };
        let b_shape = if tb { [n, k] } else { [k, n] };
        let got = ops::matmul(&Tensor::from_vec(a.clone(), a_shape).unwrap(), &Tensor::from_vec(b.clone(), b_shape).unwrap(), ta, tb).unwrap();
        assert_close("matmul", &got.to_vec_f32().unwrap(), &naive_matmul(&a, &b, m, n, k, ta, tb), 1e-4, 1e-4);
    }

    #[test]
    fn paged_attention_matches_dense(
        seqs in prop::collection::vec((1usize..6, 0usize..12), 1..5),
        block_size in 1usize..6,
        kv_heads in 1usize..3,
        group in 1usize..4,
        head_dim in prop::sample::select(vec![2usize, 4, 8]),
        seed: u64,
    ) {
        // (q_len, cached keys before the new tokens) -> (q_len, context_len).
        let shapes: Vec<(usize, usize)> = seqs.iter().map(|&(q, past)| (q, q + past)).collect();
        check_paged_attention_against_dense(&mut Rng::new(seed), &shapes, block_size, Heads { hq: kv_heads * group, hkv: kv_heads, d: head_dim });
    }

    #[test]
    fn paged_attention_of_long_query_runs_matches_dense(
        seqs in prop::collection::vec((14usize..140, 0usize..40), 1..3),
        block_size in 1usize..20,
        kv_heads in 1usize..3,
        group in 1usize..4,
        seed: u64,
    ) {
        let shapes: Vec<(usize, usize)> = seqs.iter().map(|&(q, past)| (q, q + past)).collect();
        check_paged_attention_against_dense(&mut Rng::new(seed), &shapes, block_size, Heads { hq: kv_heads * group, hkv: kv_heads, d: 8 });
    }

    #[test]
    fn multi_lora_matches_the_per_token_loop(
        ranks in prop::collection::vec(0usize..9, 1..6),
        rows in 1usize..30,
        in_f in 1usize..20,
        out_f in 1usize..20,
        seed: u64,
    ) {
        let mut rng = Rng::new(seed);
        let (raw, bank) = random_adapters(&mut rng, &ranks, in_f, out_f);
        let x = rng.vec(rows * in_f, 1.0);
        let xt = Tensor::from_vec(x.clone(), [rows, in_f]).unwrap();
        let row_adapter: Vec<i32> = (0..rows).map(|_| rng.below(ranks.len() + 1) as i32 - 1).collect();
        let want = lora_per_token(&x, &raw, &row_adapter, in_f, out_f);
        let zeros = || Tensor::from_vec(vec![0.0; rows * out_f], [rows, out_f]).unwrap();
        let mut y = zeros();
        ops::bgmv(&mut y, &xt, &bank, &row_adapter).unwrap();
        assert_close("bgmv", &y.to_vec_f32().unwrap(), &want, 1e-4, 1e-4);
        let mut y = zeros();
        ops::sgmv(&mut y, &xt, &bank, &Segments::from_row_indices(&row_adapter)).unwrap();
        assert_close("sgmv", &y.to_vec_f32().unwrap(), &want, 1e-4, 1e-4);
    }

    #[test]
    fn segments_from_row_indices_cover_every_row(rows in prop::collection::vec(-1i32..4, 0..40)) {
        let segs = Segments::from_row_indices(&rows);
        segs.validate("test", rows.len(), 4).unwrap();
        for (s, e, i) in segs.iter() {
            prop_assert!(s < e);
            prop_assert!(rows[s..e].iter().all(|&r| r == i));
        }
    }
}
