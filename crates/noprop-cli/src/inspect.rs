//! `noprop inspect embeddings`: class embeddings as images (the paper's Figure 2).

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use noprop_train::{checkpoint::load_safetensors, RunDir};

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
