//! Times the fused convolution stages of NoProp's Figure-6 block with each
//! algorithm, printing the fastest and the median of several runs (the
//! fastest is the steadier figure on a shared machine).
//!
//! ```text
//! RAYON_NUM_THREADS=1 cargo run -p noprop-kernels --release --example bench_stage [batch] [runs] [baseline]
//! ```

use candle_core::{Device, Result, Tensor, Var};
use noprop_kernels::{conv2d_flops, conv_stage_with, ConvAlgo, ConvStage, Kernels};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn uniform(rng: &mut ChaCha8Rng, dims: &[usize]) -> Result<Tensor> {
    let len = dims.iter().product();
    let v: Vec<f32> = (0..len).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, dims, &Device::Cpu)
}

fn stats(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[0], v[v.len() / 2])
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let batch: usize = args.next().and_then(|b| b.parse().ok()).unwrap_or(128);
    let runs: usize = args.next().and_then(|b| b.parse().ok()).unwrap_or(15);
    // A third argument `baseline` times the loops compiled without AVX2; a
    // fourth keeps only the stages whose name contains it.
    if args.next().as_deref() == Some("baseline") {
        noprop_kernels::use_baseline_simd(true);
        println!("baseline SIMD only");
    }
    let only = args.next().unwrap_or_default();
    println!(
        "batch {batch}, {} rayon threads, {runs} runs: min / median ms",
        rayon::current_num_threads()
    );
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let stages = [
        ("conv1 pool", [batch, 1, 28, 28], 32, true, false),
        ("conv2", [batch, 32, 14, 14], 64, false, true),
        ("conv3 pool", [batch, 64, 14, 14], 128, true, true),
    ];
    for (name, xd, cout, pool, input_grad) in
        stages.into_iter().filter(|s| s.0.contains(only.as_str()))
    {
        let x = Var::from_tensor(&uniform(&mut rng, &xd)?)?;
        let x = if input_grad {
            x.as_tensor().clone()
        } else {
            x.as_tensor().detach()
        };
        let wd = [cout, xd[1], 3, 3];
        let w = Var::from_tensor(&(uniform(&mut rng, &wd)? * 0.1)?)?;
        let b = Var::from_tensor(&uniform(&mut rng, &[cout])?)?;
        let f = conv2d_flops(xd, wd, 1);
        // The direct method is for few input channels, Winograd for many.
        let algos = if xd[1] < noprop_kernels::WINOGRAD_MIN_CIN {
            [ConvAlgo::Im2col, ConvAlgo::Direct]
        } else {
            [ConvAlgo::Im2col, ConvAlgo::Winograd]
        };
        for algo in algos {
            let stage = ConvStage {
                padding: 1,
                pool,
                dropout: 0.2,
                seed: 3,
                input_grad,
                algo,
            };
            let (mut fwd, mut bwd) = (vec![], vec![]);
            for run in 0..runs + 1 {
                let t0 = Instant::now();
                let y = conv_stage_with(Kernels::Fast, &x, &w, &b, &stage)?;
                let t1 = Instant::now();
                let g = y.backward()?;
                let t2 = Instant::now();
                drop(g);
                if run > 0 {
                    fwd.push((t1 - t0).as_secs_f64() * 1e3);
                    bwd.push((t2 - t1).as_secs_f64() * 1e3);
                }
            }
            let ((fm, fmed), (bm, bmed)) = (stats(fwd), stats(bwd));
            let bf = if input_grad { 2.0 * f } else { f };
            println!(
                "{name:<11} {algo:<9?} fwd {fm:7.2} / {fmed:7.2} ({:5.1} GFLOP/s)   bwd {bm:7.2} / {bmed:7.2} ({:5.1} GFLOP/s)",
                f / fm / 1e6,
                bf / bm / 1e6
            );
        }
    }
    Ok(())
}
