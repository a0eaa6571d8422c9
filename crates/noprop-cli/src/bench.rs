//! `noprop bench`: median training-step time of one block and T-step
//! inference throughput, on synthetic inputs of the configured data set's
//! shape (timings do not depend on pixel values).

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Tensor};
use noprop_core::{Inference, NoiseRng};
use noprop_data::Dataset;
use noprop_train::{dt::accuracy_runs, DeviceData, DtTrainer, Trainer};
use serde_json::json;

use crate::{device, parse_config, parse_config_text, set_threads, BenchArgs, DEFAULT_CONFIG};

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn synthetic(n: usize, c: usize, h: usize, w: usize, classes: usize, rng: &mut NoiseRng) -> Dataset {
    let mut images = vec![0f32; n * c * h * w];
    rng.fill_normal(&mut images);
    let labels = (0..n as u32).map(|i| i % classes as u32).collect();
    Dataset { images, labels, channels: c, height: h, width: w, num_classes: classes }
}

pub fn run(args: BenchArgs) -> Result<()> {
    let threads = set_threads(args.common.threads)?;
    let dev = device(&args.common.device)?;
    let mut cfg = match &args.config {
        Some(p) => parse_config(p)?,
        None => parse_config_text(DEFAULT_CONFIG, false)?,
    };
    if let Some(k) = &args.kernels {
        cfg.model.kernels = k.clone();
    }
    let kernels = cfg.model.kernels.clone();
    let mut trainer = DtTrainer::new(cfg.clone().validate()?, dev.clone())?;
    let (c, h, w) = cfg.data.dataset.shape();
    let m = cfg.data.dataset.num_classes();
    let mut rng = NoiseRng::new(0);
    let pool = synthetic(args.batch * 8, c, h, w, m, &mut rng);
    let t = cfg.model.blocks.div_ceil(2);
    let (mut noise, mut drop) = (NoiseRng::new(1), NoiseRng::new(2));
    let mut times = Vec::with_capacity(args.steps);
    for i in 0..args.warmup + args.steps {
        let start = (i % 8) * args.batch;
        let x = Tensor::from_slice(&pool.images[start * c * h * w..(start + args.batch) * c * h * w], (args.batch, c, h, w), &dev)?;
        let y = Tensor::from_slice(&pool.labels[start..start + args.batch], args.batch, &dev)?;
        let t0 = Instant::now();
        trainer.train_step(t, &x, &y, &mut noise, &mut drop)?;
        dev.synchronize()?;
        if i >= args.warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    let step_ms = 1000.0 * median(&mut times);
    let infer = synthetic(args.infer_batch, c, h, w, m, &mut rng);
    let infer = DeviceData::new(&infer, DType::F32, &dev)?;
    let sched = trainer.config().schedule().clone();
    let mut r = NoiseRng::new(3);
    accuracy_runs(trainer.model(), &sched, &infer, &[Inference::Stochastic], args.infer_batch, noprop_core::ClassProbability::Softmax, &mut r)?;
    let t0 = Instant::now();
    accuracy_runs(trainer.model(), &sched, &infer, &[Inference::Stochastic], args.infer_batch, noprop_core::ClassProbability::Softmax, &mut r)?;
    dev.synchronize()?;
    let infer_s = t0.elapsed().as_secs_f64();
    let batches_per_epoch = 60_000usize.div_ceil(args.batch);
    let summary = json!({
        "impl": "noprop",
        "kernels": kernels,
        "device": args.common.device,
        "threads": threads,
        "batch": args.batch,
        "block_step_ms": (step_ms * 100.0).round() / 100.0,
        "train_images_per_s": (args.batch as f64 / (step_ms / 1000.0) * 10.0).round() / 10.0,
        "dt_epoch_estimate_s": (step_ms / 1000.0 * cfg.model.blocks as f64 * batches_per_epoch as f64 * 10.0).round() / 10.0,
        "infer_images_per_s": (args.infer_batch as f64 / infer_s * 10.0).round() / 10.0,
    });
    if args.common.json {
        println!("{summary}");
    } else {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    }
    Ok(())
}
