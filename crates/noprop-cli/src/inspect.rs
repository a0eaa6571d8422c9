//! `noprop inspect embeddings`: class embeddings as images (the paper's
//! Figure 2); `noprop inspect schedule`: the noise schedule a checkpoint holds.

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use noprop_core::{ContinuousSchedule, LearnableSchedule, NoiseRng};
use noprop_train::checkpoint::{load_safetensors, ModelRecord};
use noprop_train::config::RawMethod;
use noprop_train::RunDir;
use serde_json::{json, Value};

/// Renders `embed` `[m, C*H*W]` as a row of `m` tiles (one per class), pixels
/// de-normalised with the data set's constants and clipped to [0, 1]; two
/// rows (initial above learned) when the run saved its initial embedding.
pub fn embeddings(run: &Path, out: &Path, scale: usize) -> Result<()> {
    if !(1..=64).contains(&scale) {
        bail!("--scale must lie in 1..=64, got {scale}");
    }
    // Never replace a file of the run itself, nor anything that is not a PNG.
    if out
        .extension()
        .and_then(|e| e.to_str())
        .is_none_or(|e| !e.eq_ignore_ascii_case("png"))
    {
        bail!("{} must end in .png", out.display());
    }
    if let (Ok(o), Ok(r)) = (
        out.parent()
            .map(|p| {
                if p.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    p
                }
            })
            .unwrap_or(Path::new("."))
            .canonicalize(),
        run.canonicalize(),
    ) {
        if o.starts_with(&r) {
            bail!(
                "{} is inside the run folder; write the PNG elsewhere",
                out.display()
            );
        }
    }
    let dir = RunDir::open(run)?;
    let raw = dir.config()?;
    let latest = dir
        .latest_model()?
        .with_context(|| format!("{} has no checkpoint yet", run.display()))?;
    let (tensors, _) = load_safetensors(&latest, &Device::Cpu)?;
    let learned = tensors
        .get("embed")
        .context("the checkpoint has no `embed` tensor")?;
    let mut rows: Vec<Tensor> = dir.initial_embedding(&Device::Cpu)?.into_iter().collect();
    rows.push(learned.clone());
    let kind = raw.data.dataset;
    let (c, h, w) = kind.shape();
    let m = kind.num_classes();
    for r in &rows {
        if r.dims() != [m, c * h * w] {
            bail!(
                "the embedding has shape {:?}; only prototype embeddings ([{m}, {}]) are images",
                r.dims(),
                c * h * w
            );
        }
    }
    let norm = kind.normalization();
    let (tw, th) = (w * scale, h * scale);
    let (width, height) = (m * (tw + 2), rows.len() * (th + 2));
    let mut rgb = vec![255u8; width * height * 3];
    for (ri, row) in rows.iter().enumerate() {
        let v: Vec<Vec<f32>> = row.to_dtype(DType::F32)?.to_vec2()?;
        for (class, img) in v.iter().enumerate() {
            for y in 0..th {
                for x in 0..tw {
                    let (sy, sx) = (y / scale, x / scale);
                    let px = |ch: usize| {
                        let val = img[ch * h * w + sy * w + sx] * norm.std[ch] + norm.mean[ch];
                        (val.clamp(0.0, 1.0) * 255.0).round() as u8
                    };
                    let (r, g, b) = if c == 1 {
                        let g = px(0);
                        (g, g, g)
                    } else {
                        (px(0), px(1), px(2))
                    };
                    let (ox, oy) = (class * (tw + 2) + 1 + x, ri * (th + 2) + 1 + y);
                    let o = (oy * width + ox) * 3;
                    rgb[o..o + 3].copy_from_slice(&[r, g, b]);
                }
            }
        }
    }
    // Written beside the target and renamed, so an existing file is replaced whole or not at all.
    let tmp = out.with_extension("png.tmp");
    let file =
        std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), width as u32, height as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.write_header()?.write_image_data(&rgb)?;
    std::fs::rename(&tmp, out).with_context(|| format!("cannot write {}", out.display()))?;
    Ok(())
}

/// `noprop inspect schedule`: the noise schedule a checkpoint holds, on a
/// grid of `points` times (NoProp-CT: the learned `gamma(t)`; NoProp-DT: the
/// fixed `alpha_bar_t` of each block), with what decides inference: the
/// noise left in the last latent and where the denoising loss's weight lies.
pub fn schedule(target: &Path, points: usize, json: bool) -> Result<()> {
    if !(2..=10_000).contains(&points) {
        bail!("--points must lie in 2..=10000, got {points}");
    }
    let model = if target.is_dir() {
        RunDir::open(target)?
            .latest_model()?
            .with_context(|| format!("{} has no checkpoint yet", target.display()))?
    } else {
        target.to_path_buf()
    };
    let (tensors, meta) = load_safetensors(&model, &Device::Cpu)?;
    let record = ModelRecord::from_metadata(&model, &meta)?;
    let cfg = record.config.clone().validate()?;
    let report = match &cfg.method {
        RawMethod::Ct(s) => {
            let sched = LearnableSchedule::new(
                &s.schedule,
                DType::F32,
                &Device::Cpu,
                &mut NoiseRng::new(0),
            )?;
            sched.load(&tensors)?;
            let ts: Vec<f64> = (0..points)
                .map(|i| i as f64 / (points - 1) as f64)
                .collect();
            let rows: Vec<Value> = sched
                .points(&ts)?
                .iter()
                .map(|p| {
                    json!({"t": p.t, "gamma": p.gamma, "alpha_bar": p.alpha_bar,
                           "snr_derivative": p.snr_derivative})
                })
                .collect();
            // The expected weight of the denoising term over t in [a, b] is
            // SNR(b) - SNR(a); its share on t < 1/2 says how much of the
            // loss falls where the class is still being decided.
            let ends = sched.points(&[0.0, 0.5, 1.0])?;
            let (noisy, half, clean) = (ends[0], ends[1], ends[2]);
            let share = (half.snr - noisy.snr) / (clean.snr - noisy.snr);
            let clean_abar = clean.alpha_bar;
            json!({
                "method": "ct",
                "gamma_at_0": noisy.gamma,
                "gamma_at_1": clean.gamma,
                "final_noise_std": (1.0 - clean_abar).sqrt(),
                "final_signal_scale": clean_abar.sqrt(),
                "weight_share_below_half": share,
                "points": rows,
            })
        }
        RawMethod::Dt(_) => {
            let abar = record
                .schedule
                .clone()
                .context("the checkpoint records no NoProp-DT schedule")?;
            let last = *abar.last().context("the recorded schedule is empty")?;
            let rows: Vec<Value> = abar
                .iter()
                .enumerate()
                .map(|(t, &a)| json!({"t": t, "alpha_bar": a, "snr": a / (1.0 - a)}))
                .collect();
            json!({
                "method": "dt",
                "final_noise_std": (1.0 - last).sqrt(),
                "final_signal_scale": last.sqrt(),
                "points": rows,
            })
        }
        RawMethod::Fm(_) | RawMethod::Backprop(_) | RawMethod::Adjoint(_) => bail!(
            "a {} run has no noise schedule (NoProp-DT and NoProp-CT runs have one)",
            cfg.method.kind()
        ),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("{} (epoch {})", model.display(), record.epoch);
    let num = |k: &str| report[k].as_f64().unwrap_or(f64::NAN);
    if report["method"] == "ct" {
        println!(
            "gamma(0) = {:.3} (noisy end), gamma(1) = {:.3} (clean end)",
            num("gamma_at_0"),
            num("gamma_at_1")
        );
        println!(
            "share of the denoising loss's weight SNR'(t) on t < 0.5: {:.3}%",
            100.0 * num("weight_share_below_half")
        );
    }
    println!(
        "last latent: {:.4} u_y + noise of std {:.4} per dimension",
        num("final_signal_scale"),
        num("final_noise_std")
    );
    let rows = report["points"].as_array().cloned().unwrap_or_default();
    if report["method"] == "ct" {
        println!(
            "{:>8} {:>10} {:>10} {:>12}",
            "t", "gamma", "alpha_bar", "SNR'(t)"
        );
        for r in &rows {
            println!(
                "{:>8.4} {:>10.4} {:>10.6} {:>12.5e}",
                r["t"].as_f64().unwrap_or(f64::NAN),
                r["gamma"].as_f64().unwrap_or(f64::NAN),
                r["alpha_bar"].as_f64().unwrap_or(f64::NAN),
                r["snr_derivative"].as_f64().unwrap_or(f64::NAN)
            );
        }
    } else {
        println!("{:>8} {:>10} {:>12}", "block t", "alpha_bar", "SNR");
        for r in &rows {
            println!(
                "{:>8} {:>10.6} {:>12.5e}",
                r["t"].as_u64().unwrap_or(0),
                r["alpha_bar"].as_f64().unwrap_or(f64::NAN),
                r["snr"].as_f64().unwrap_or(f64::NAN)
            );
        }
    }
    Ok(())
}
