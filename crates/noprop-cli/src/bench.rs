//! `noprop bench`: per-op forward and backward times of the Figure-6 block's
//! hot ops, the median training step of one block, the fused all-block step
//! per block, and full T-step inference throughput, on synthetic inputs of
//! the configured data set's shape (timings do not depend on pixel values).
//!
//! Throughput is reported against the FP32 peak `threads x clock x 32`
//! (two 256-bit FMA units per core: 16 multiply-adds per cycle, as on AMD
//! Zen 3 and Intel cores since Haswell), `x 64` where the GEMMs run
//! AVX-512 kernels (a build with the `avx512` feature; two 512-bit FMA
//! units assumed, so half that peak on CPUs with one), with the clock given by
//! `--clock-ghz` (default 2.98, the sustained clock measured on the
//! development VM). FLOP counts are those of the direct method (two per
//! multiply-add); a Winograd convolution does 2.25 times fewer multiplies
//! in its GEMMs, so its effective rate can exceed what its GEMMs achieve.

use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var};
use noprop_core::{Inference, NoiseRng};
use noprop_data::{Batcher, Dataset, Split};
use noprop_models::ops::{
    batch_norm1d_train_with, conv2d_flops, conv_stage_with, linear_with, ConvAlgo, ConvStage,
    Kernels, WINOGRAD_MIN_CIN,
};
use noprop_models::{BlockFlops, NetShape, FIGURE6};
use noprop_train::method::DeterministicRun;
use noprop_train::{build_trainer, Config, DeviceData, Method};
use serde_json::{json, Value};

use crate::{device, parse_config, parse_config_text, set_up_cpu, BenchArgs, DEFAULT_CONFIG};

/// FP32 floating-point operations per cycle and core: two FMA units of
/// eight lanes, two operations per multiply-add; with AVX-512 GEMMs, two
/// units of sixteen lanes (Intel Xeon Gold 6xxx/Platinum and later; CPUs
/// with one 512-bit unit, or AMD Zen 4's two 256-bit halves, reach half).
fn flop_per_cycle(cpu_gemm: &str) -> f64 {
    if cpu_gemm == "avx512f" {
        64.0
    } else {
        32.0
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn round(v: f64, digits: i32) -> f64 {
    let s = 10f64.powi(digits);
    (v * s).round() / s
}

fn synthetic(
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    classes: usize,
    rng: &mut NoiseRng,
) -> Dataset {
    let mut images = vec![0f32; n * c * h * w];
    rng.fill_normal(&mut images);
    let labels = (0..n as u32).map(|i| i % classes as u32).collect();
    Dataset {
        images,
        labels,
        channels: c,
        height: h,
        width: w,
        num_classes: classes,
    }
}

/// Minibatch `i` of `batch` images: the benchmarks cycle through the first
/// eight minibatches of `pool`.
fn minibatch(pool: &Dataset, batch: usize, i: usize, dev: &Device) -> Result<(Tensor, Tensor)> {
    let size = pool.channels * pool.height * pool.width;
    let start = (i % 8) * batch;
    let x = Tensor::from_slice(
        &pool.images[start * size..(start + batch) * size],
        (batch, pool.channels, pool.height, pool.width),
        dev,
    )?;
    let y = Tensor::from_slice(&pool.labels[start..start + batch], batch, dev)?;
    Ok((x, y))
}

/// The seconds of `steps` calls of `step(i)`, each synchronised with the
/// device, after `warmup` untimed ones.
fn time_steps(
    warmup: usize,
    steps: usize,
    dev: &Device,
    mut step: impl FnMut(usize) -> Result<()>,
) -> Result<Vec<f64>> {
    let mut times = Vec::with_capacity(steps);
    for i in 0..warmup + steps {
        let t0 = Instant::now();
        step(i)?;
        dev.synchronize()?;
        if i >= warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    Ok(times)
}

fn randn(rng: &mut NoiseRng, dims: &[usize], dev: &Device) -> Result<Tensor> {
    let mut v = vec![0f32; dims.iter().product()];
    rng.fill_normal(&mut v);
    Ok(Tensor::from_vec(v, dims, dev)?)
}

fn var(rng: &mut NoiseRng, dims: &[usize], scale: f32, dev: &Device) -> Result<Var> {
    Ok(Var::from_tensor(&(randn(rng, dims, dev)? * scale as f64)?)?)
}

/// One op's forward and backward times (seconds, one entry per repetition).
struct OpTimes {
    name: &'static str,
    shape: String,
    algo: &'static str,
    fwd: Vec<f64>,
    bwd: Vec<f64>,
    /// Direct-method FLOPs of the forward and backward passes, if meaningful.
    flop: Option<(f64, f64)>,
}

/// Times `f` (the forward pass) and the backward pass of its output, after
/// two untimed repetitions.
fn time_op(
    dev: &Device,
    reps: usize,
    mut f: impl FnMut() -> candle_core::Result<Tensor>,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let (mut fwd, mut bwd) = (vec![], vec![]);
    for i in 0..reps + 2 {
        let t0 = Instant::now();
        let y = f()?;
        dev.synchronize()?;
        let t1 = Instant::now();
        // The backward pass from a gradient of ones.
        let grads = y.backward()?;
        dev.synchronize()?;
        let t2 = Instant::now();
        drop(grads);
        if i >= 2 {
            fwd.push((t1 - t0).as_secs_f64());
            bwd.push((t2 - t1).as_secs_f64());
        }
    }
    Ok((fwd, bwd))
}

/// The block's hot ops at the bench's batch size, each with fresh inputs.
fn op_timings(
    kernels: Kernels,
    dev: &Device,
    batch: usize,
    (c, h, w): (usize, usize, usize),
    reps: usize,
) -> Result<Vec<OpTimes>> {
    let mut rng = NoiseRng::new(11);
    let mut out = vec![];
    // What `ConvAlgo::Auto` picks for these 3x3, padding-1 stages.
    let algo = |cin: usize| match kernels {
        Kernels::Stock => "stock",
        Kernels::Fast if cin < WINOGRAD_MIN_CIN => "direct",
        Kernels::Fast if h % 4 == 0 && w % 4 == 0 => "winograd",
        Kernels::Fast => "im2col",
    };
    // The three convolution stages of the image path: (cin, cout, size, pool, input gradient).
    let ([c1, c2, c3], f) = (FIGURE6.conv, FIGURE6.features);
    let stages = [
        ("conv1+relu+pool+dropout", c, c1, (h, w), true, false),
        ("conv2+relu+dropout", c1, c2, (h / 2, w / 2), false, true),
        (
            "conv3+relu+pool+dropout",
            c2,
            c3,
            (h / 2, w / 2),
            true,
            true,
        ),
    ];
    for (name, cin, cout, (sh, sw), pool, input_grad) in stages {
        let xd = [batch, cin, sh, sw];
        let wd = [cout, cin, 3, 3];
        let x = var(&mut rng, &xd, 1.0, dev)?;
        let wv = var(&mut rng, &wd, (1.0 / (cin as f32 * 9.0)).sqrt(), dev)?;
        let b = var(&mut rng, &[cout], 0.1, dev)?;
        let stage = ConvStage {
            padding: 1,
            pool,
            dropout: 0.2,
            seed: 1,
            input_grad,
            algo: ConvAlgo::Auto,
        };
        let xt = if input_grad {
            x.as_tensor().clone()
        } else {
            x.as_tensor().detach()
        };
        let (fwd, bwd) = time_op(dev, reps, || conv_stage_with(kernels, &xt, &wv, &b, &stage))?;
        let f = conv2d_flops(xd, wd, 1);
        out.push(OpTimes {
            name,
            shape: format!("{xd:?} -> {cout}"),
            algo: algo(cin),
            fwd,
            bwd,
            flop: Some((f, if input_grad { 2.0 * f } else { f })),
        });
    }
    let flat = FIGURE6.image_flat(h, w);
    let x = var(&mut rng, &[batch, flat], 1.0, dev)?;
    let wv = var(&mut rng, &[f, flat], (1.0 / flat as f32).sqrt(), dev)?;
    let b = var(&mut rng, &[f], 0.1, dev)?;
    let (fwd, bwd) = time_op(dev, reps, || linear_with(kernels, &x, &wv, &b))?;
    let flop = 2.0 * (batch * flat * f) as f64;
    let gemm = if kernels == Kernels::Fast {
        "gemm"
    } else {
        "stock"
    };
    out.push(OpTimes {
        name: "linear",
        shape: format!("[{batch}, {flat}] -> {f}"),
        algo: gemm,
        fwd,
        bwd,
        flop: Some((flop, 2.0 * flop)),
    });
    let x = var(&mut rng, &[batch, f], 1.0, dev)?;
    let g = var(&mut rng, &[f], 1.0, dev)?;
    let b = var(&mut rng, &[f], 0.1, dev)?;
    let (fwd, bwd) = time_op(dev, reps, || {
        Ok(batch_norm1d_train_with(kernels, &x, &g, &b, 1e-5)?.y)
    })?;
    out.push(OpTimes {
        name: "batch_norm1d (train)",
        shape: format!("[{batch}, {f}]"),
        algo: if kernels == Kernels::Fast {
            "fused"
        } else {
            "stock"
        },
        fwd,
        bwd,
        flop: None,
    });
    Ok(out)
}

/// The Figure-6 block's forward FLOPs per image for these shapes.
fn block_flops((c, h, w): (usize, usize, usize), d: usize, m: usize) -> BlockFlops {
    FIGURE6.dt_block_flops(&NetShape {
        channels: c,
        height: h,
        width: w,
        latent_dim: d,
        classes: m,
    })
}

/// Direct-method FLOPs of one training step of one Figure-6 block: the
/// forward pass, and a backward pass costing twice the forward except for
/// the first convolution (no input gradient).
fn block_step_flop(batch: usize, shape: (usize, usize, usize), d: usize, m: usize) -> f64 {
    let f = block_flops(shape, d, m);
    let fwd = f.conv1 + f.image_rest + f.label + f.fuse;
    batch as f64 * (fwd + f.conv1 + 2.0 * (f.image_rest + f.label + f.fuse))
}

/// The share of one NoProp-DT inference run's time that stacked runs share.
///
/// The evaluator computes each block's image features once per batch of
/// images and stacks every inference run's latents behind them (dt.rs,
/// `predictor`), so `k` runs cost `s + k (1 - s)` single runs, with `s` the
/// image path's share. Here `s` is its share of the block's forward FLOPs:
/// the image path (three 3x3 convolutions and a Linear to 256), against the
/// label path (an MLP from `d`, or a second image path when `d = C*H*W`),
/// the fuse layers and `softmax(logits) W_embed`. On MNIST one-hot (s =
/// 0.985) `noprop eval` took 1.13 times as long for 6 stacked runs as for 2
/// (measured; the FLOP split says 1.07). `cargo xtask reproduce --plan`
/// reads it from the JSON summary to estimate evaluation times.
fn dt_shared_fraction(shape: (usize, usize, usize), d: usize, m: usize) -> f64 {
    let f = block_flops(shape, d, m);
    let image = f.conv1 + f.image_rest;
    image / (image + f.label + f.fuse + f.embed)
}

/// One epoch and one evaluation of `cfg`'s run in seconds, from a measured
/// step of one lane (`step_s`) and one stochastic inference run per image
/// (`infer_s`), counted as the trainer runs them: each pass of the method's
/// epoch plan steps each of its lanes once per minibatch of the (limited)
/// training set, whose last batch is dropped below 2 examples
/// (`Trainer::train_epoch`); an evaluation stacks the stochastic runs (and
/// NoProp-DT's deterministic run), of which `shared` is paid once, makes
/// NoProp-CT's deterministic eq. 3 run on its own, and one run on the train
/// subset (`Trainer::evaluate`). Data loading and checkpoints are left out.
pub(crate) fn run_costs(
    cfg: &Config,
    method: &dyn Method,
    step_s: f64,
    infer_s: f64,
    shared: f64,
) -> Result<(f64, f64)> {
    let kind = cfg.dataset();
    let limit = |n: Option<usize>, split| n.unwrap_or(usize::MAX).min(kind.examples(split));
    let n_train = limit(cfg.data.train_limit, Split::Train);
    let n_test = limit(cfg.data.test_limit, Split::Test);
    let batches = Batcher::new(n_train, cfg.train.batch_size, 0, 0)?
        .min_batch_len(2)
        .num_batches();
    let lanes: usize = method.epoch_plan()?.iter().map(|p| p.lanes.len()).sum();
    let runs = cfg.eval.runs;
    let det = if cfg.eval.deterministic {
        method.deterministic_run()
    } else {
        DeterministicRun::None
    };
    let (stacked, separate) = match det {
        DeterministicRun::Stacked => (runs + 1, 0),
        DeterministicRun::Separate => (runs, 1),
        DeterministicRun::None => (runs, 0),
    };
    let stacked_cost = shared + stacked as f64 * (1.0 - shared);
    let subset = cfg.eval.train_subset.min(n_train);
    let eval = infer_s * (n_test as f64 * (stacked_cost + separate as f64) + subset as f64);
    Ok(((lanes * batches) as f64 * step_s, eval))
}

pub fn run(args: BenchArgs) -> Result<()> {
    let threads = set_up_cpu(args.common.threads)?;
    // Sizes are checked before anything is allocated for them.
    for (flag, v, min, max) in [
        (
            "--batch",
            args.batch,
            2,
            noprop_train::config::limits::BATCH,
        ),
        (
            "--infer-batch",
            args.infer_batch,
            1,
            noprop_train::config::limits::EVAL_BATCH,
        ),
        ("--steps", args.steps, 1, 1_000_000),
        ("--warmup", args.warmup, 0, 1_000_000),
        ("--op-reps", args.op_reps, 0, 1_000_000),
        ("--fused-steps", args.fused_steps, 0, 1_000_000),
    ] {
        if !(min..=max).contains(&v) {
            bail!("{flag} must lie in {min}..={max}, got {v}");
        }
    }
    let dev = device(args.common.device)?;
    let mut raw = match &args.config {
        Some(p) => parse_config(p)?,
        None => parse_config_text(DEFAULT_CONFIG, false)?,
    };
    if let Some(k) = args.kernels {
        raw.model.kernels = k.into();
    }
    // The timed inference passes all `infer_batch` images at once.
    raw.eval.batch_size = args.infer_batch.max(1);
    // The timed steps train minibatches of `--batch`; so do the epochs counted.
    raw.train.batch_size = args.batch;
    let cfg = raw.validate()?;
    let kernels = cfg.model.kernels;
    let shape = cfg.dataset().shape();
    let (c, h, w) = shape;
    let m = cfg.dataset().num_classes();
    let Some(blocks) = cfg.method.params().independent_blocks() else {
        return bench_method(&args, cfg, &dev, threads);
    };

    let ops = if args.op_reps > 0 {
        op_timings(kernels, &dev, args.batch, shape, args.op_reps)?
    } else {
        vec![]
    };

    // One block's Algorithm 1 step.
    let mut trainer = build_trainer(cfg.clone(), dev.clone(), None)?;
    let d = cfg.latent_dim();
    let mut rng = NoiseRng::new(0);
    let pool = synthetic(args.batch * 8, c, h, w, m, &mut rng);
    let batches: Vec<(Tensor, Tensor)> = (0..8)
        .map(|i| minibatch(&pool, args.batch, i, &dev))
        .collect::<Result<_>>()?;
    let t = blocks.div_ceil(2);
    let (mut noise, mut drop) = (NoiseRng::new(1), NoiseRng::new(2));
    let times = time_steps(args.warmup, args.steps, &dev, |i| {
        let (x, y) = &batches[i % 8];
        trainer.train_step(t, x, y, &mut noise, &mut drop)?;
        Ok(())
    })?;
    let step_ms = 1000.0 * median(&times);

    // The fused order: all blocks on one minibatch, per block.
    let mut fused_ms = None;
    if args.fused_steps > 0 {
        let mut fused = build_trainer(cfg.clone(), dev.clone(), None)?;
        let mut streams: Vec<(NoiseRng, NoiseRng)> = (0..blocks as u64)
            .map(|b| (NoiseRng::new(10 + b), NoiseRng::new(100 + b)))
            .collect();
        let ftimes = time_steps(1, args.fused_steps, &dev, |i| {
            let (x, y) = &batches[i % 8];
            for (t, (noise, drop)) in streams.iter_mut().enumerate() {
                fused.train_step(t + 1, x, y, noise, drop)?;
            }
            Ok(())
        })?;
        fused_ms = Some(1000.0 * median(&ftimes) / blocks as f64);
    }

    // Full T-step inference (one stochastic run) on `infer_batch` images.
    let infer = synthetic(args.infer_batch, c, h, w, m, &mut rng);
    let infer = DeviceData::new(&infer, DType::F32, &dev)?;
    let mut r = NoiseRng::new(3);
    trainer.accuracy(&infer, &[Inference::Stochastic], &mut r)?;
    let t0 = Instant::now();
    trainer.accuracy(&infer, &[Inference::Stochastic], &mut r)?;
    dev.synchronize()?;
    let infer_s = t0.elapsed().as_secs_f64();

    let shared = dt_shared_fraction(shape, d, m);
    let (epoch_s, eval_s) = run_costs(
        &cfg,
        trainer.method(),
        step_ms / 1000.0,
        infer_s / args.infer_batch as f64,
        shared,
    )?;
    let cpu_gemm = dev.is_cpu().then(noprop_kernels::gemm_isa);
    let per_cycle = flop_per_cycle(cpu_gemm.unwrap_or(""));
    let peak = threads as f64 * args.clock_ghz * per_cycle;
    let gflops = |flop: f64, s: f64| flop / s / 1e9;
    let step_flop = block_step_flop(args.batch, shape, d, m);
    let batches_per_epoch = cfg
        .dataset()
        .examples(noprop_data::Split::Train)
        .div_ceil(args.batch);
    let op_json: Vec<Value> = ops
        .iter()
        .map(|o| {
            let (f, b) = (median(&o.fwd), median(&o.bwd));
            let mut v = json!({
                "op": o.name,
                "shape": o.shape,
                "algo": o.algo,
                "fwd_ms": round(1000.0 * f, 3),
                "bwd_ms": round(1000.0 * b, 3),
                "fwd_ms_min": round(1000.0 * min(&o.fwd), 3),
                "bwd_ms_min": round(1000.0 * min(&o.bwd), 3),
            });
            if let Some((ff, bf)) = o.flop {
                v["fwd_gflop"] = json!(round(ff / 1e9, 4));
                v["bwd_gflop"] = json!(round(bf / 1e9, 4));
                v["fwd_gflops"] = json!(round(gflops(ff, f), 1));
                v["bwd_gflops"] = json!(round(gflops(bf, b), 1));
                v["fwd_pct_peak"] = json!(round(100.0 * gflops(ff, f) / peak, 1));
                v["bwd_pct_peak"] = json!(round(100.0 * gflops(bf, b) / peak, 1));
            }
            v
        })
        .collect();
    let mut summary = json!({
        "impl": "noprop",
        "kernels": kernels.to_string(),
        "device": format!("{:?}", args.common.device).to_lowercase(),
        "threads": threads,
        "batch": args.batch,
        "method": "dt",
        "blocks": blocks,
        "step_ms": round(step_ms, 2),
        "block_step_ms": round(step_ms, 2),
        "block_step_ms_min": round(1000.0 * min(&times), 2),
        "train_images_per_s": round(args.batch as f64 / (step_ms / 1000.0), 1),
        "dt_epoch_estimate_s": round(step_ms / 1000.0 * blocks as f64 * batches_per_epoch as f64, 1),
        "block_step_gflop": round(step_flop / 1e9, 3),
        "block_step_gflops": round(gflops(step_flop, step_ms / 1000.0), 1),
        "block_step_pct_peak": round(100.0 * gflops(step_flop, step_ms / 1000.0) / peak, 1),
        "dt_shared_fraction": shared,
        "epoch_s": round(epoch_s, 2),
        "eval_s": round(eval_s, 2),
        "infer_batch": args.infer_batch,
        "infer_images_per_s": round(args.infer_batch as f64 / infer_s, 1),
        "peak_gflops": round(peak, 1),
        "peak_basis": format!("{threads} threads x {} GHz x {per_cycle} FLOP/cycle (FP32 FMA)", args.clock_ghz),
        "cpu_gemm": cpu_gemm,
        "ops": op_json,
    });
    if let Some(f) = fused_ms {
        summary["fused_step_ms_per_block"] = json!(round(f, 2));
        summary["fused_epoch_estimate_s"] = json!(round(
            f / 1000.0 * blocks as f64 * batches_per_epoch as f64,
            1
        ));
    }
    if args.common.json {
        println!("{summary}");
    } else {
        print_table(&summary);
    }
    Ok(())
}

/// Any method but NoProp-DT (CT, FM, back-prop, adjoint): the median of its
/// one optimizer step per minibatch (`train_step` on lane 0) and one
/// stochastic inference run at the config's step count, through the same
/// trainer `noprop train` builds. Per-op and FLOP figures are NoProp-DT's
/// only.
fn bench_method(args: &BenchArgs, cfg: Config, dev: &Device, threads: usize) -> Result<()> {
    let (c, h, w) = cfg.dataset().shape();
    let m = cfg.dataset().num_classes();
    let method = cfg.method.kind();
    let infer_steps = cfg.method.params().inference_steps();
    let mut rng = NoiseRng::new(0);
    // At least one image per class, for prototype embeddings to start from.
    let pool = synthetic((args.batch * 8).max(m), c, h, w, m, &mut rng);
    let mut trainer = build_trainer(cfg, dev.clone(), Some(&pool))?;
    let batches: Vec<(Tensor, Tensor)> = (0..8)
        .map(|i| minibatch(&pool, args.batch, i, dev))
        .collect::<Result<_>>()?;
    let (mut noise, mut drop) = (NoiseRng::new(1), NoiseRng::new(2));
    let times = time_steps(args.warmup, args.steps, dev, |i| {
        let (x, y) = &batches[i % 8];
        trainer.train_step(0, x, y, &mut noise, &mut drop)?;
        Ok(())
    })?;
    let step_ms = 1000.0 * median(&times);
    // One stochastic run over `infer_batch` images, after a warm-up on two.
    let mut r = NoiseRng::new(3);
    let warm = DeviceData::new(&synthetic(2, c, h, w, m, &mut rng), DType::F32, dev)?;
    trainer.accuracy(&warm, &[Inference::Stochastic], &mut r)?;
    let infer = synthetic(args.infer_batch, c, h, w, m, &mut rng);
    let infer = DeviceData::new(&infer, DType::F32, dev)?;
    let t0 = Instant::now();
    trainer.accuracy(&infer, &[Inference::Stochastic], &mut r)?;
    dev.synchronize()?;
    let infer_s = t0.elapsed().as_secs_f64();
    let (epoch_s, eval_s) = run_costs(
        trainer.config(),
        trainer.method(),
        step_ms / 1000.0,
        infer_s / args.infer_batch as f64,
        0.0,
    )?;
    let summary = json!({
        "impl": "noprop",
        "method": method,
        "epoch_s": round(epoch_s, 2),
        "eval_s": round(eval_s, 2),
        "kernels": trainer.config().model.kernels.to_string(),
        "device": format!("{:?}", args.common.device).to_lowercase(),
        "threads": threads,
        "batch": args.batch,
        "step_ms": round(step_ms, 2),
        "step_ms_min": round(1000.0 * min(&times), 2),
        "train_images_per_s": round(args.batch as f64 / (step_ms / 1000.0), 1),
        "infer_batch": args.infer_batch,
        "infer_steps": infer_steps,
        "infer_images_per_s": round(args.infer_batch as f64 / infer_s, 1),
    });
    if args.common.json {
        println!("{summary}");
    } else {
        for (k, v) in summary.as_object().into_iter().flatten() {
            println!("{k:<24} {v}");
        }
    }
    Ok(())
}

/// The summary for people: one line per op, then the step and inference figures.
fn print_table(s: &Value) {
    println!(
        "{:<26} {:<24} {:>9} {:>9} {:>9} {:>9} {:>8}",
        "op", "shape", "algo", "fwd ms", "bwd ms", "GFLOP/s", "% peak"
    );
    for o in s["ops"].as_array().into_iter().flatten() {
        let rate = |k: &str| o[k].as_f64().map_or("-".to_string(), |v| format!("{v:.1}"));
        println!(
            "{:<26} {:<24} {:>9} {:>9.2} {:>9.2} {:>9} {:>8}",
            o["op"].as_str().unwrap_or(""),
            o["shape"].as_str().unwrap_or(""),
            o["algo"].as_str().unwrap_or(""),
            o["fwd_ms"].as_f64().unwrap_or(f64::NAN),
            o["bwd_ms"].as_f64().unwrap_or(f64::NAN),
            format!("{}/{}", rate("fwd_gflops"), rate("bwd_gflops")),
            format!("{}/{}", rate("fwd_pct_peak"), rate("bwd_pct_peak")),
        );
    }
    println!();
    let keys = [
        "kernels",
        "cpu_gemm",
        "threads",
        "block_step_ms",
        "block_step_gflops",
        "block_step_pct_peak",
        "fused_step_ms_per_block",
        "infer_images_per_s",
        "dt_epoch_estimate_s",
        "fused_epoch_estimate_s",
        "peak_gflops",
        "peak_basis",
    ];
    for k in keys {
        if !s[k].is_null() {
            println!("{k:<24} {}", s[k]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * b.abs().max(1.0)
    }

    /// `run_costs` of a config (the model built with no data).
    fn costs(raw: noprop_train::RawConfig, shared: f64) -> (f64, f64) {
        let cfg = raw.validate().unwrap();
        let t = build_trainer(cfg.clone(), Device::Cpu, None).unwrap();
        run_costs(&cfg, t.method(), 1.0, 1.0, shared).unwrap()
    }

    #[test]
    fn an_epoch_and_an_evaluation_as_the_trainer_runs_them() {
        use noprop_data::DatasetKind;
        use noprop_train::config::{CtSampler, DtParams, RawMethod, TrainOrder};
        use noprop_train::RawConfig;
        let mut dt = RawConfig::paper_dt(DatasetKind::Mnist);
        dt.eval.train_subset = 0;
        // 60000 = 468 x 128 + 96: 469 minibatches, each stepping 10 blocks;
        // 10000 test images, 5 stochastic runs and the deterministic one stacked.
        let s = 0.985;
        let (epoch, eval) = costs(dt.clone(), s);
        assert!(close(epoch, 10.0 * 469.0), "{epoch}");
        assert!(close(eval, 10_000.0 * (s + 6.0 * (1.0 - s))), "{eval}");
        // The fused order steps the same blocks on the same minibatches.
        let mut fused = dt.clone();
        fused.method = RawMethod::Dt(DtParams {
            order: TrainOrder::Fused,
            ..Default::default()
        });
        assert!(close(costs(fused, s).0, epoch));
        // Limits: 257 = 2 x 128 + 1, the last example dropped; the train
        // subset clipped to the training set.
        let mut small = dt.clone();
        small.data.train_limit = Some(257);
        small.data.test_limit = Some(100);
        small.eval.train_subset = 10_000;
        small.eval.deterministic = false;
        let (epoch, eval) = costs(small, 0.0);
        assert!(close(epoch, 10.0 * 2.0), "{epoch}");
        assert!(close(eval, 100.0 * 5.0 + 257.0), "{eval}");
        // NoProp-CT steps one network; its eq. 3 deterministic run is its own.
        let mut ct = RawConfig::paper_ct(DatasetKind::Cifar10);
        ct.eval.train_subset = 0;
        let (epoch, eval) = costs(ct.clone(), 0.0);
        assert!(close(epoch, 391.0), "{epoch}");
        assert!(close(eval, 10_000.0 * 6.0), "{eval}");
        if let RawMethod::Ct(p) = &mut ct.method {
            p.sampler = CtSampler::Flow(noprop_core::OdeSolver::Heun);
        }
        assert!(close(costs(ct, 0.0).1, 10_000.0 * 5.0));
    }

    #[test]
    fn shared_fraction_from_flops() {
        // MNIST, one-hot: image path 451584 + 7225344 + 28901376 + 3211264
        // = 39789568 FLOPs; label MLP 5120 + 262144, fuse 262144 + 65536 +
        // 2560, softmax(logits) W_embed 200: 597704.
        let s = dt_shared_fraction((1, 28, 28), 10, 10);
        assert!(close(s, 39_789_568.0 / (39_789_568.0 + 597_704.0)), "{s}");
        // Prototypes run a second image path for every run: under half shared.
        let p = dt_shared_fraction((1, 28, 28), 784, 10);
        assert!(p > 0.45 && p < 0.5, "{p}");
        let c = dt_shared_fraction((3, 32, 32), 20, 100);
        assert!(c > 0.98 && c < 1.0, "{c}");
    }

    #[test]
    fn block_step_counts_the_backward_pass() {
        // MNIST, one-hot, one image: forward 39789568 (image path) + 267264
        // (label MLP) + 330240 (fuse) = 40387072; the backward pass twice
        // that but for the first convolution's 451584.
        let f = block_step_flop(1, (1, 28, 28), 10, 10);
        assert!(close(f, 3.0 * 40_387_072.0 - 451_584.0), "{f}");
        assert!(close(block_step_flop(128, (1, 28, 28), 10, 10), 128.0 * f));
    }
}
