//! `tandem bench ...`: benchmarks that print ratios measured in one run (ours against a peer on
//! the same machine), which stay meaningful on shared, noisy machines.

use std::str::FromStr;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use tandem_kernels::ops::{self, LoraBank, MatmulDims, Segments};
use tandem_kernels::{DType, Device, Tensor};

#[derive(Subcommand)]
pub enum Bench {
    /// A mixed-adapter serving workload against no adapters, transformers + PEFT and the GEMM
    /// peak.
    Serve(crate::bench_serve::ServeArgs),
    /// LoRA training tokens/s and peak memory against transformers + PEFT + torch, and many
    /// small jobs trained in one batch against one after another.
    Finetune(crate::bench_finetune::FinetuneArgs),
    /// Inference of many adapters and fine-tuning of several jobs on one engine, at several
    /// request rates: inference alone, fine-tuning alone, naive time slicing, co-serving.
    Coserve(crate::bench_coserve::CoserveArgs),
    /// The outage clients see when the coordinators' leader is killed, over many kills.
    Failover(crate::bench_failover::FailoverArgs),
    /// Requests/s of 1-token completions through the gateway against straight to the worker.
    Gateway(crate::bench_gateway::GatewayArgs),
    /// Matmul GFLOP/s at LLM shapes next to the raw `gemm` crate, and the cost of a multi-LoRA
    /// delta as a fraction of the base matmul.
    Kernels {
        /// `cpu`, `cuda` or `cuda:N`.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Timed repetitions per measurement (the median is reported).
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// Rows (tokens) of the matmuls, comma-separated.
        #[arg(long, value_delimiter = ',', default_values_t = [1usize, 16, 256, 2048])]
        m: Vec<usize>,
        /// Features in and out of the base layer (a square `d x d` weight).
        #[arg(long, default_value_t = 4096)]
        d: usize,
        /// Adapters, their rank, and the tokens of the multi-LoRA measurement.
        #[arg(long, default_value_t = 64)]
        adapters: usize,
        #[arg(long, default_value_t = 16)]
        rank: usize,
        #[arg(long, default_value_t = 256)]
        lora_tokens: usize,
        #[arg(long = "floor", value_name = "RATIO=MIN")]
        floors: Vec<Floor>,
    },
}

/// `--floor RATIO=MIN`: a ratio the run must reach (each benchmark names its ratios), or the
/// benchmark fails. Ratios of two measurements of one run hold on any machine, so CI guards
/// against regressions with them and with no absolute time.
#[derive(Clone, Debug)]
pub struct Floor {
    ratio: String,
    min: f64,
}

impl FromStr for Floor {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let (ratio, min) = s.rsplit_once('=').context("a floor is RATIO=MIN, e.g. adapters/baseline=0.5")?;
        let min: f64 = min.parse().with_context(|| format!("the floor of {ratio} is not a number: {min:?}"))?;
        Ok(Floor { ratio: ratio.to_string(), min })
    }
}

/// Fails, before anything is measured, on a floor for a ratio the benchmark does not report.
pub(crate) fn check_floor_names(floors: &[Floor], known: &[&str]) -> Result<()> {
    match floors.iter().find(|f| !known.contains(&f.ratio.as_str())) {
        Some(f) => bail!("no ratio {:?} in this benchmark (it reports {})", f.ratio, known.join(", ")),
        None => Ok(()),
    }
}

/// Prints each floored ratio beside its floor and fails naming every one that fell below.
pub(crate) fn check_floors(floors: &[Floor], measured: &[(&str, f64)]) -> Result<()> {
    let mut below = Vec::new();
    for f in floors {
        let value = measured.iter().find(|(name, _)| *name == f.ratio).map(|m| m.1).unwrap_or(f64::NAN);
        let ok = value >= f.min;
        println!("floor {}: {value:.3} {} {}", f.ratio, if ok { ">=" } else { "BELOW" }, f.min);
        if !ok {
            below.push(format!("{} = {value:.3} < {}", f.ratio, f.min));
        }
    }
    if !below.is_empty() {
        bail!("below the floor: {}", below.join("; "));
    }
    Ok(())
}

pub fn run(bench: Bench) -> Result<()> {
    match bench {
        Bench::Serve(args) => crate::bench_serve::run(args),
        Bench::Finetune(args) => crate::bench_finetune::run(args),
        Bench::Coserve(args) => crate::bench_coserve::run(args),
        Bench::Failover(args) => crate::bench_failover::run(args),
        Bench::Gateway(args) => crate::bench_gateway::run(args),
        Bench::Kernels { device, reps, m, d, adapters, rank, lora_tokens, floors } => {
            check_floor_names(&floors, &KERNEL_RATIOS)?;
            let device: Device = device.parse()?;
            device.ensure_available()?;
            let ratios = kernels(device, reps.max(1), &m, d, adapters, rank, lora_tokens)?;
            check_floors(&floors, &ratios)
        }
    }
}

/// Median wall time of `f` over `reps` runs after one warm-up; waits for the device each run.
fn time(reps: usize, device: Device, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    Ok(time_each(reps, device, &mut [&mut f])?[0])
}

/// Median wall times of several functions whose runs are interleaved (a, b, a, b, ...), so a
/// burst of load from a neighbour on a shared machine hits all of them alike.
fn time_each(reps: usize, device: Device, fs: &mut [&mut dyn FnMut() -> Result<()>]) -> Result<Vec<f64>> {
    let mut times = vec![Vec::with_capacity(reps); fs.len()];
    for rep in 0..=reps {
        for (f, t) in fs.iter_mut().zip(&mut times) {
            let start = Instant::now();
            f()?;
            device.synchronize()?;
            if rep > 0 {
                t.push(start.elapsed().as_secs_f64());
            }
        }
    }
    Ok(times
        .into_iter()
        .map(|mut t| {
            t.sort_by(f64::total_cmp);
            t[t.len() / 2]
        })
        .collect())
}

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
        })
        .collect()
}

/// This machine as a figure needs it beside: its CPU ([`crate::machine::cpu`]), the instruction
/// set the GEMM runs with and the one our own kernels run with.
pub(crate) fn machine() -> String {
    format!(
        "{}, GEMM kernels: {}, our kernels: {}",
        crate::machine::cpu(),
        tandem_kernels::gemm_instruction_set(),
        tandem_kernels::kernel_isa().name()
    )
}

fn tensor(shape: &[usize], seed: u64, device: Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(random(shape.iter().product(), seed), shape.to_vec())?.to_device(device)?)
}

/// The ratios `bench kernels` reports, higher is better: our matmul against the raw GEMM (the
/// lowest over the Ms; CPU only), and the base matmul's time over each multi-LoRA delta's.
const KERNEL_RATIOS: [&str; 3] = ["matmul/gemm", "base/sgmv", "base/bgmv"];

/// Prints the measurements and returns the [`KERNEL_RATIOS`] measured.
fn kernels(
    device: Device,
    reps: usize,
    ms: &[usize],
    d: usize,
    adapters: usize,
    rank: usize,
    tokens: usize,
) -> Result<Vec<(&'static str, f64)>> {
    println!(
        "tandem bench kernels: device {device}, {} rayon threads, f32, median of {reps}",
        rayon::current_num_threads()
    );
    println!("machine: {}", machine());
    println!();
    println!("matmul  y[M,{d}] = x[M,{d}] . W[{d},{d}]^T  (a linear layer)");
    println!(
        "{:>6}  {:>12}  {:>12}  {:>8}  {:>12}  {:>12}",
        "M", "ours GFLOP/s", "gemm GFLOP/s", "ours/gemm", "bf16 W x.W^T", "bf16 W dy.W"
    );
    let w = tensor(&[d, d], 1, device)?;
    let w_host = random(d * d, 1);
    // The same weight in bf16, as a bf16 checkpoint is served: the AMX tiles multiply it where
    // the CPU has them (`our kernels: avx512f+amx-bf16` above); elsewhere it is widened to f32.
    let w_bf16 = w.to_dtype(DType::BF16)?;
    let mut matmul_vs_gemm = f64::INFINITY;
    for &m in ms {
        let x = tensor(&[m, d], 2, device)?;
        let flops = 2.0 * (m * d * d) as f64;
        let mut ours = || -> Result<()> {
            ops::matmul(&x, &w, false, true)?;
            Ok(())
        };
        let mut bf16_xwt = || -> Result<()> {
            ops::matmul(&x, &w_bf16, false, true)?;
            Ok(())
        };
        let mut bf16_xw = || -> Result<()> {
            ops::matmul(&x, &w_bf16, false, false)?;
            Ok(())
        };
        let (ours, raw, ratio, bf16) = if device == Device::Cpu {
            let x_host = random(m * d, 2);
            let mut y = vec![0.0f32; m * d];
            let dims = MatmulDims { batch: 1, m, n: d, k: d, trans_a: false, trans_b: true, b_batched: false };
            let mut raw = || -> Result<()> {
                raw_gemm(&mut y, &x_host, &w_host, &dims);
                Ok(())
            };
            let t = time_each(reps, device, &mut [&mut ours, &mut raw, &mut bf16_xwt, &mut bf16_xw])?;
            matmul_vs_gemm = matmul_vs_gemm.min(t[1] / t[0]);
            let rate = |t: f64| format!("{:12.1}", flops / t / 1e9);
            (t[0], rate(t[1]), format!("{:8.3}", t[1] / t[0]), format!("{}  {}", rate(t[2]), rate(t[3])))
        } else {
            let dash = format!("{:>12}", "-");
            (time(reps, device, ours)?, dash.clone(), format!("{:>8}", "-"), format!("{dash}  {dash}"))
        };
        println!("{m:>6}  {:12.1}  {raw}  {ratio}  {bf16}", flops / ours / 1e9);
    }

    println!();
    println!("multi-LoRA delta: {adapters} adapters, rank {rank}, {tokens} tokens, {d} -> {d}");
    let x = tensor(&[tokens, d], 3, device)?;
    let modules = (0..adapters as u64)
        .map(|i| Ok((tensor(&[rank, d], 4 + 2 * i, Device::Cpu)?, tensor(&[rank, d], 5 + 2 * i, Device::Cpu)?, 2.0)))
        .collect::<Result<Vec<_>>>()?;
    let bank = LoraBank::new(modules.clone(), device)?;
    // Served adapters are bf16 where the base weights are (`Model::serving_adapter`).
    let bf16 = |t: &Tensor| t.clone().into_dtype(DType::BF16);
    let bank16 =
        LoraBank::new(modules.iter().map(|(a, bt, s)| Ok((bf16(a)?, bf16(bt)?, *s))).collect::<Result<_>>()?, device)?;
    // SGMV: tokens arrive grouped by adapter (prefill); BGMV: each token its own adapter (decode).
    let per = tokens.div_ceil(adapters);
    let row_adapter: Vec<i32> = (0..tokens).map(|t| (t / per) as i32).collect();
    let segs = Segments::from_row_indices(&row_adapter);
    let shuffled: Vec<i32> = (0..tokens).map(|t| ((t * 37) % adapters) as i32).collect();
    let mut y = Tensor::zeros([tokens, d], DType::F32, device)?;
    let (mut y2, mut y3, mut y4) = (y.clone(), y.clone(), y.clone());
    let t = time_each(
        reps,
        device,
        &mut [
            &mut || {
                ops::matmul(&x, &w, false, true)?;
                Ok(())
            },
            &mut || Ok(ops::sgmv(&mut y, &x, &bank, &segs)?),
            &mut || Ok(ops::bgmv(&mut y2, &x, &bank, &shuffled)?),
            &mut || Ok(ops::sgmv(&mut y3, &x, &bank16, &segs)?),
            &mut || Ok(ops::bgmv(&mut y4, &x, &bank16, &shuffled)?),
        ],
    )?;
    let (base, sgmv, bgmv) = (t[0], t[1], t[2]);
    println!("{:>28}  {:>9.3} ms", "base matmul", base * 1e3);
    for (what, t) in [
        ("SGMV (segments)", sgmv),
        ("BGMV (index per token)", bgmv),
        ("SGMV, bf16 adapters", t[3]),
        ("BGMV, bf16 adapters", t[4]),
    ] {
        println!("{what:>28}  {:>9.3} ms  {:>6.1}% of base", t * 1e3, 100.0 * t / base);
    }
    let mut ratios = vec![("base/sgmv", base / sgmv), ("base/bgmv", base / bgmv)];
    if matmul_vs_gemm.is_finite() {
        ratios.push(("matmul/gemm", matmul_vs_gemm));
    }
    Ok(ratios)
}

/// The peer: the `gemm` crate called directly on the same row-major layout, no wrapper.
fn raw_gemm(y: &mut [f32], x: &[f32], w: &[f32], d: &MatmulDims) {
    let (m, n, k) = (d.m, d.n, d.k);
    assert!(y.len() >= m * n && x.len() >= m * k && w.len() >= n * k);
    // SAFETY: the assert bounds every element the strides below reach; y does not alias x or w.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            y.as_mut_ptr(),
            1,
            n as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(rayon::current_num_threads()),
        )
    }
}
