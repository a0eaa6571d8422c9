//! `noprop selftest`: every op the training and inference paths use, run
//! on the chosen device and on the CPU (the fast kernels, whose gradients
//! are tested against finite differences) on the same inputs and weights,
//! compared with tolerances. `--device cpu` runs the CPU against itself,
//! which checks the harness and that results do not depend on anything but
//! their inputs.

use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var};
use noprop_core::{
    ct_loss, dt_loss, dt_step, fm_loss, q_sample, DiscreteSchedule, Inference, NoiseRng,
};
use noprop_data::{Dataset, DatasetKind};
use noprop_models::ops::{
    batch_norm1d_train_with, conv_stage_with, linear_with, ConvStage, Kernels,
};
use noprop_train::config::RawMethod;
use noprop_train::{
    adjoint::AdjointParams, backprop::BackpropParams, ct::CtParams, dt::DtParams, fm::FmParams,
};
use noprop_train::{build_trainer, DeviceData, Method, RawConfig};
use serde_json::json;

use crate::{device, set_up_cpu, Common};

/// `noprop selftest`'s arguments.
#[derive(clap::Args)]
pub(crate) struct SelftestArgs {
    /// The kernels of the checked run (the CPU oracle always uses the fast
    /// kernels); `--device cpu --kernels stock` checks candle's CPU ops.
    #[arg(long, value_enum, default_value_t = crate::KernelsArg::Fast)]
    pub kernels: crate::KernelsArg,
    #[command(flatten)]
    pub common: Common,
}

/// The outputs of one check on one device, and how far apart two may be
/// (relative to the largest magnitude of the CPU's).
struct Case {
    name: &'static str,
    tolerance: f64,
    run: fn(&Device, Kernels) -> Result<Vec<Tensor>>,
}

/// Seeded inputs, drawn on the host so both devices get the same values.
fn randn(seed: u64, dims: &[usize], dev: &Device) -> Result<Tensor> {
    let mut v = vec![0f32; dims.iter().product()];
    NoiseRng::new(seed).fill_normal(&mut v);
    Ok(Tensor::from_vec(v, dims, dev)?)
}

/// A convolution stage and its gradients in x, w, b (a random linear functional of y).
fn stage(
    dev: &Device,
    k: Kernels,
    cin: usize,
    cout: usize,
    hw: usize,
    pool: bool,
) -> Result<Vec<Tensor>> {
    let x = Var::from_tensor(&randn(1, &[4, cin, hw, hw], dev)?)?;
    let w = Var::from_tensor(&(randn(2, &[cout, cin, 3, 3], dev)? * 0.2)?)?;
    let b = Var::from_tensor(&(randn(3, &[cout], dev)? * 0.1)?)?;
    let st = ConvStage {
        padding: 1,
        pool,
        dropout: 0.2,
        seed: 7,
        input_grad: true,
        ..ConvStage::default()
    };
    let y = conv_stage_with(k, x.as_tensor(), w.as_tensor(), b.as_tensor(), &st)?;
    let r = randn(4, y.dims(), dev)?;
    let g = (&y * &r)?.sum_all()?.backward()?;
    let grad = |v: &Var| {
        g.get(v.as_tensor())
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("no gradient"))
    };
    Ok(vec![y.clone(), grad(&x)?, grad(&w)?, grad(&b)?])
}

fn max_pool(dev: &Device, k: Kernels) -> Result<Vec<Tensor>> {
    // A stage with a 1x1-like identity would hide the pooling; pool a tensor directly.
    let x = Var::from_tensor(&randn(5, &[3, 8, 10, 10], dev)?)?;
    let y = noprop_models::ops::max_pool2x2(k, x.as_tensor())?;
    let r = randn(6, y.dims(), dev)?;
    let g = (&y * &r)?.sum_all()?.backward()?;
    Ok(vec![
        y,
        g.get(x.as_tensor())
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("no gradient"))?,
    ])
}

fn linear(dev: &Device, k: Kernels) -> Result<Vec<Tensor>> {
    let x = Var::from_tensor(&randn(7, &[16, 6272], dev)?)?;
    let w = Var::from_tensor(&(randn(8, &[256, 6272], dev)? * 0.01)?)?;
    let b = Var::from_tensor(&randn(9, &[256], dev)?)?;
    let y = linear_with(k, x.as_tensor(), w.as_tensor(), b.as_tensor())?;
    let r = randn(10, y.dims(), dev)?;
    let g = (&y * &r)?.sum_all()?.backward()?;
    let grad = |v: &Var| {
        g.get(v.as_tensor())
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("no gradient"))
    };
    Ok(vec![y.clone(), grad(&x)?, grad(&w)?, grad(&b)?])
}

fn batch_norm(dev: &Device, k: Kernels) -> Result<Vec<Tensor>> {
    let x = Var::from_tensor(&(randn(11, &[32, 256], dev)? * 3.0)?)?;
    let w = Var::from_tensor(&randn(12, &[256], dev)?)?;
    let b = Var::from_tensor(&randn(13, &[256], dev)?)?;
    let out = batch_norm1d_train_with(k, x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5)?;
    let r = randn(14, out.y.dims(), dev)?;
    let g = (&out.y * &r)?.sum_all()?.backward()?;
    let grad = |v: &Var| {
        g.get(v.as_tensor())
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("no gradient"))
    };
    Ok(vec![
        out.y.clone(),
        out.mean,
        out.var,
        grad(&x)?,
        grad(&w)?,
        grad(&b)?,
    ])
}

/// The schedule math on the device: q-sampling, the eq. 3 update.
fn schedule(dev: &Device, _: Kernels) -> Result<Vec<Tensor>> {
    let sched = DiscreteSchedule::cosine(10, 0.008, 1.0 - 1e-4)?;
    let u = randn(15, &[8, 10], dev)?;
    let z = q_sample(&u, sched.alpha_bar(3)?, &mut NoiseRng::new(16))?;
    let eps = randn(17, &[8, 10], dev)?;
    let z4 = dt_step(&sched, 4, &u, &z, Some(&eps))?;
    Ok(vec![z, z4])
}

/// The DT, CT and FM losses and their gradients.
fn losses(dev: &Device, _: Kernels) -> Result<Vec<Tensor>> {
    let logits = Var::from_tensor(&randn(18, &[8, 10], dev)?)?;
    let uhat = Var::from_tensor(&randn(19, &[8, 10], dev)?)?;
    let u = randn(20, &[8, 10], dev)?;
    let y = Tensor::from_vec((0..8u32).collect::<Vec<_>>(), 8, dev)?;
    let logp = noprop_core::log_softmax(logits.as_tensor())?;
    let dt = dt_loss(&logp, &y, uhat.as_tensor(), &u, 1e-3, 0.7)?;
    let snr_prime = (randn(21, &[8], dev)?.abs()? + 0.5)?;
    let abar0 = Tensor::full(1e-3f32, 1, dev)?;
    let ct = ct_loss(&logp, &y, uhat.as_tensor(), &u, &snr_prime, &abar0, 1.0)?;
    let fm = fm_loss(uhat.as_tensor(), &randn(22, &[8, 10], dev)?, &u)?;
    let total = ((&dt.total + &ct.total)? + &fm)?;
    let g = total.backward()?;
    let grad = |v: &Var| {
        g.get(v.as_tensor())
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("no gradient"))
    };
    Ok(vec![dt.total, ct.total, fm, grad(&logits)?, grad(&uhat)?])
}

/// One training step's loss and gradients for `method`, or (`infer`) the
/// accuracies of a stochastic and a deterministic inference run.
fn method_step(dev: &Device, k: Kernels, method: RawMethod, infer: bool) -> Result<Vec<Tensor>> {
    let mut raw = RawConfig::paper_dt(DatasetKind::Mnist);
    raw.method = method;
    raw.model.kernels = k;
    raw.eval.runs = 2;
    raw.eval.batch_size = 64;
    let cfg = raw.validate()?;
    let mut images = vec![0f32; 16 * 784];
    NoiseRng::new(23).fill_normal(&mut images);
    let ds = Dataset {
        images,
        labels: (0..16).map(|i| i % 10).collect(),
        channels: 1,
        height: 28,
        width: 28,
        num_classes: 10,
    };
    let trainer = build_trainer(cfg.clone(), dev.clone(), Some(&ds))?;
    let data = DeviceData::new(&ds, DType::F32, dev)?;
    let (x, y) = data.batch(&(0..16).collect::<Vec<_>>())?;
    // The first lane the method trains (block 1 for NoProp-DT, else 0).
    let lane = trainer.method().epoch_plan()?[0].lanes[0];
    let step =
        trainer
            .method()
            .gradients(lane, &x, &y, &mut NoiseRng::new(24), &mut NoiseRng::new(25))?;
    let mut out = vec![Tensor::from_vec(
        step.losses.iter().map(|&l| l as f32).collect::<Vec<_>>(),
        4,
        dev,
    )?];
    let mut vars: Vec<(String, Var)> = trainer
        .method()
        .param_groups()?
        .into_iter()
        .flat_map(|g| g.vars)
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (_, v) in &vars {
        if let Some(g) = step.grads.get(v.as_tensor()) {
            out.push(g.clone());
        }
    }
    if infer {
        // Inference on an untrained model: a prediction can flip on a
        // rounding difference at a near-tie, so accuracies get their own,
        // looser check (a few of the 32 predictions).
        let acc = trainer.accuracy(
            &data,
            &[Inference::Stochastic, Inference::Deterministic],
            &mut NoiseRng::new(26),
        )?;
        return Ok(vec![Tensor::from_vec(
            acc.iter().map(|&a| a as f32).collect::<Vec<_>>(),
            acc.len(),
            dev,
        )?]);
    }
    Ok(out)
}

fn small_ct() -> RawMethod {
    RawMethod::Ct(CtParams {
        steps: 20,
        ..Default::default()
    })
}

fn small_fm() -> RawMethod {
    RawMethod::Fm(FmParams {
        steps: 20,
        ..Default::default()
    })
}

fn small_backprop() -> RawMethod {
    RawMethod::Backprop(BackpropParams {
        blocks: 2,
        alpha_init: 0.5,
    })
}

fn small_adjoint() -> RawMethod {
    RawMethod::Adjoint(AdjointParams {
        train_steps: 10,
        steps: 10,
        ..Default::default()
    })
}

fn small_dt() -> RawMethod {
    RawMethod::Dt(DtParams {
        blocks: 2,
        ..Default::default()
    })
}

fn cases() -> Vec<Case> {
    let c = |name, tolerance, run| Case {
        name,
        tolerance,
        run,
    };
    vec![
        c(
            "conv stage 1->32, 28x28, pool, dropout (y, dx, dw, db)",
            1e-4,
            |d, k| stage(d, k, 1, 32, 28, true),
        ),
        c(
            "conv stage 32->64, 14x14, dropout (y, dx, dw, db)",
            1e-4,
            |d, k| stage(d, k, 32, 64, 14, false),
        ),
        c(
            "conv stage 64->128, 14x14, pool, dropout (y, dx, dw, db)",
            1e-4,
            |d, k| stage(d, k, 64, 128, 14, true),
        ),
        c(
            "max-pool 2x2 (y, dx: all of the gradient to the maximum)",
            1e-6,
            max_pool,
        ),
        c("linear 6272->256 (y, dx, dw, db)", 1e-4, linear),
        c(
            "batch norm, training (y, mean, var, dx, dgamma, dbeta)",
            1e-4,
            batch_norm,
        ),
        c("schedule: q-sample, eq. 3 step", 1e-5, schedule),
        c("losses: DT, CT, FM and their gradients", 1e-5, losses),
        c("NoProp-DT step (losses, every gradient)", 1e-3, |d, k| {
            method_step(d, k, small_dt(), false)
        }),
        c("NoProp-DT inference (eq. 3 sampler)", 0.3, |d, k| {
            method_step(d, k, small_dt(), true)
        }),
        c("NoProp-CT step (losses, every gradient)", 1e-3, |d, k| {
            method_step(d, k, small_ct(), false)
        }),
        c("NoProp-CT inference (eq. 3 sampler)", 0.3, |d, k| {
            method_step(d, k, small_ct(), true)
        }),
        c("NoProp-FM step (losses, every gradient)", 1e-3, |d, k| {
            method_step(d, k, small_fm(), false)
        }),
        c("NoProp-FM inference (Euler)", 0.3, |d, k| {
            method_step(d, k, small_fm(), true)
        }),
        c(
            "back-prop baseline step (loss, every gradient)",
            1e-3,
            |d, k| method_step(d, k, small_backprop(), false),
        ),
        c("back-prop baseline inference", 0.3, |d, k| {
            method_step(d, k, small_backprop(), true)
        }),
        c(
            "adjoint baseline step (adjoint solve, every gradient)",
            1e-3,
            |d, k| method_step(d, k, small_adjoint(), false),
        ),
        c("adjoint baseline inference (Euler)", 0.3, |d, k| {
            method_step(d, k, small_adjoint(), true)
        }),
    ]
}

/// The largest difference of `a` and `b`, each output relative to its own
/// largest magnitude in `b`, but to no less than a thousandth of the largest
/// magnitude of all outputs: a gradient that is zero up to rounding (a bias
/// before a BatchNorm) is compared at the scale of the others.
fn rel_diff(a: &[Tensor], b: &[Tensor]) -> Result<f64> {
    if a.len() != b.len() {
        bail!("{} outputs against {}", a.len(), b.len());
    }
    let host = |t: &Tensor| -> Result<Vec<f64>> {
        Ok(t.to_device(&Device::Cpu)?
            .flatten_all()?
            .to_dtype(DType::F64)?
            .to_vec1()?)
    };
    let mut pairs = vec![];
    for (x, y) in a.iter().zip(b) {
        if x.dims() != y.dims() {
            bail!("shape {:?} against {:?}", x.dims(), y.dims());
        }
        pairs.push((host(x)?, host(y)?));
    }
    let max_abs = |v: &[f64]| v.iter().fold(0f64, |m, x| m.max(x.abs()));
    let global = pairs.iter().fold(0f64, |m, (_, y)| m.max(max_abs(y)));
    let mut worst = 0f64;
    for (x, y) in &pairs {
        let scale = max_abs(y).max(1e-3 * global).max(1e-12);
        for (p, q) in x.iter().zip(y) {
            let d = (p - q).abs() / scale;
            if !d.is_finite() {
                return Ok(f64::INFINITY);
            }
            worst = worst.max(d);
        }
    }
    Ok(worst)
}

pub(crate) fn run(args: SelftestArgs) -> Result<()> {
    set_up_cpu(args.common.threads)?;
    let dev = device(args.common.device)?;
    let mut rows = vec![];
    let mut failed = 0;
    for case in cases() {
        let t0 = Instant::now();
        let kernels: Kernels = args.kernels.into();
        let outcome = (case.run)(&Device::Cpu, Kernels::Fast).and_then(|cpu| {
            let on_dev = (case.run)(&dev, kernels)?;
            dev.synchronize()?;
            rel_diff(&on_dev, &cpu)
        });
        let (ok, detail) = match &outcome {
            Ok(d) if *d <= case.tolerance => (true, format!("{d:.1e}")),
            Ok(d) => (false, format!("{d:.1e}")),
            Err(e) => (false, format!("error: {e:#}")),
        };
        failed += usize::from(!ok);
        eprintln!(
            "{:<62} {:>4} {:>10} (tol {:.0e}, {:.1} s)",
            case.name,
            if ok { "ok" } else { "FAIL" },
            detail,
            case.tolerance,
            t0.elapsed().as_secs_f64()
        );
        rows.push(json!({"check": case.name, "ok": ok, "max_rel_diff": outcome.as_ref().ok(), "tolerance": case.tolerance, "detail": detail}));
    }
    if args.common.json {
        println!(
            "{}",
            json!({"device": format!("{dev:?}"), "kernels": format!("{:?}", args.kernels).to_lowercase(), "cpu_gemm": noprop_kernels::gemm_isa(), "checks": rows, "failed": failed})
        );
    }
    if failed > 0 {
        bail!(
            "selftest: {failed} of {} checks differ between {dev:?} and the CPU",
            rows.len()
        );
    }
    eprintln!(
        "selftest: all {} checks agree between {dev:?} and the CPU",
        rows.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rel_diff_sees_a_difference_and_a_shape_change() {
        let dev = Device::Cpu;
        let a = Tensor::new(&[1f32, 2.0, 4.0], &dev).unwrap();
        let b = Tensor::new(&[1f32, 2.0, 4.004], &dev).unwrap();
        let d = rel_diff(std::slice::from_ref(&a), &[b]).unwrap();
        assert!((d - 1e-3).abs() < 1e-6, "{d}");
        assert_eq!(
            rel_diff(std::slice::from_ref(&a), std::slice::from_ref(&a)).unwrap(),
            0.0
        );
        assert!(rel_diff(std::slice::from_ref(&a), &[a.reshape((3, 1)).unwrap()]).is_err());
        let nan = Tensor::new(&[f32::NAN, 2.0, 4.0], &dev).unwrap();
        assert!(rel_diff(&[nan], &[a]).unwrap().is_infinite());
    }
}
