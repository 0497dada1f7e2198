//! Bad input gets a clear error, never a panic.

use tandem_kernels::ops::{self, LoraBank, Segments, SeqAttention};
use tandem_kernels::{DType, Device, Error, Tensor};

fn t(shape: &[usize]) -> Tensor {
    Tensor::zeros(shape.to_vec(), DType::F32, Device::Cpu).unwrap()
}

fn message<T: std::fmt::Debug>(r: Result<T, Error>) -> String {
    r.expect_err("bad input must be refused").to_string()
}

#[test]
fn shape_mismatches_name_the_op() {
    assert!(message(ops::matmul(&t(&[2, 3]), &t(&[4, 5]), false, false)).contains("matmul"));
    assert!(message(ops::rms_norm(&t(&[2, 3]), &t(&[4]), 1e-5)).contains("weight must be [3]"));
    assert!(message(Tensor::from_vec(vec![1.0; 5], [2, 3])).contains("holds 6 elements"));
    assert!(message(t(&[6]).reshape([4])).contains("reshape"));
}

#[test]
fn out_of_range_indices_are_refused() {
    assert!(message(ops::embedding(&t(&[4, 2]), &[1, 4])).contains("token id 4"));
    assert!(message(ops::cross_entropy(&t(&[2, 3]), &[0, 3])).contains("target 3"));
    let bank = LoraBank::new(vec![(t(&[2, 3]), t(&[2, 4]), 1.0)], Device::Cpu).unwrap();
    let mut y = t(&[2, 4]);
    assert!(message(ops::bgmv(&mut y, &t(&[2, 3]), &bank, &[0, 1])).contains("adapter index 1"));
    let segs = Segments::new(vec![0, 1], vec![0]);
    assert!(message(ops::sgmv(&mut y, &t(&[2, 3]), &bank, &segs)).contains("cover rows 0..2"));
    assert!(message(ops::gather_rows(&t(&[3, 2]), &[3])).contains("out of range"));
}

#[test]
fn attention_metadata_is_checked() {
    let (q, cache) = (t(&[2, 2, 4]), t(&[2, 4, 1, 4]));
    let seq = |q_len, context_len, block_table| SeqAttention { q_len, context_len, block_table };
    let run = |seqs: &[SeqAttention]| ops::paged_attention(&q, &cache, &cache, seqs, 1.0);
    assert!(message(run(&[seq(2, 9, vec![0, 1])])).contains("do not fit"));
    assert!(message(run(&[seq(2, 2, vec![7])])).contains("block 7"));
    assert!(message(run(&[seq(3, 2, vec![0])])).contains("q_len 3 > context_len 2"));
    assert!(message(run(&[seq(1, 2, vec![0])])).contains("bring 1 query tokens"));
    let two_kv_heads = t(&[2, 4, 2, 4]);
    let three_q_heads = t(&[2, 3, 4]);
    let err = message(ops::paged_attention(&three_q_heads, &two_kv_heads, &two_kv_heads, &[seq(2, 2, vec![0])], 1.0));
    assert!(err.contains("not a multiple"), "{err}");
}

#[test]
fn a_mismatched_lora_adapter_is_refused() {
    let err = message(LoraBank::new(vec![(t(&[2, 3]), t(&[2, 4]), 1.0), (t(&[2, 5]), t(&[2, 4]), 1.0)], Device::Cpu));
    assert!(err.contains("adapter 1"), "{err}");
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_without_the_backend_is_a_clear_error() {
    let err = Tensor::zeros([2], DType::F32, Device::Cuda(0)).expect_err("no CUDA in this build");
    assert!(matches!(err, Error::CudaUnavailable(_)), "{err}");
    assert!(Device::Cuda(0).ensure_available().is_err());
    assert!(t(&[2]).to_device(Device::Cuda(0)).is_err());
}

/// Built with the backend: on a machine without CUDA (CI runs this binary with `--features
/// cuda`) every use of the device is an error, not a panic; on a GPU machine it works.
#[cfg(feature = "cuda")]
#[test]
fn cuda_backend_reports_missing_libraries_as_errors() {
    match Device::Cuda(0).ensure_available() {
        Err(err) => {
            assert!(matches!(err, Error::CudaUnavailable(_)), "{err}");
            assert!(matches!(Tensor::zeros([2], DType::F32, Device::Cuda(0)), Err(Error::CudaUnavailable(_))));
            assert!(t(&[2]).to_device(Device::Cuda(0)).is_err());
        }
        Ok(()) => {
            let back = t(&[2]).to_device(Device::Cuda(0)).unwrap().to_vec_f32().unwrap();
            assert_eq!(back, vec![0.0, 0.0]);
        }
    }
    let err = Device::Cuda(usize::MAX).ensure_available().expect_err("no such ordinal");
    assert!(matches!(err, Error::CudaUnavailable(_) | Error::Cuda { .. }), "{err}");
}

#[test]
fn optimizer_arguments_are_checked() {
    let (mut p, mut m, mut v) = (t(&[3]), t(&[3]), t(&[3]));
    assert!(message(ops::adamw_step(&mut p, &t(&[4]), &mut m, &mut v, &ops::AdamW::default(), 1)).contains("grad"));
    assert!(message(ops::adamw_step(&mut p, &t(&[3]), &mut m, &mut v, &ops::AdamW::default(), 0)).contains("step"));
    assert!(message(ops::clip_grad_norm(&mut [&mut p], 0.0)).contains("max_norm"));
}

#[test]
fn free_memory_is_read_on_the_cpu_and_an_error_without_cuda() {
    let free = Device::Cpu.free_memory().unwrap();
    assert!(free > 0 && free < 1 << 50, "{free} bytes");
    if !Device::cuda_compiled() {
        assert!(matches!(Device::Cuda(0).free_memory(), Err(Error::CudaUnavailable(_))));
    }
}
