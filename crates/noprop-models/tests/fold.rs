//! Inference with BatchNorm folded into the preceding Linear layers equals
//! the unfolded block in evaluation mode, up to f32 rounding.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use noprop_core::NoiseRng;
use noprop_models::{dt_block, seeded_var_builder, DtBlockConfig, Kernels, Mode};

fn randn(rng: &mut NoiseRng, dims: &[usize], scale: f32, shift: f32) -> Tensor {
    let mut v = vec![0f32; dims.iter().product()];
    rng.fill_normal(&mut v);
    let v: Vec<f32> = v.iter().map(|x| x * scale + shift).collect();
    Tensor::from_vec(v, dims, &Device::Cpu).expect("tensor")
}

fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a: Vec<f32> = a.flatten_all().and_then(|t| t.to_vec1()).expect("a");
    let b: Vec<f32> = b.flatten_all().and_then(|t| t.to_vec1()).expect("b");
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs() / scale))
}

#[test]
fn folded_block_matches_eval_forward() {
    let dev = Device::Cpu;
    // The one-hot label path (d = 10) and the prototype path (d = C*H*W).
    for (latent_dim, kernels) in [
        (10, Kernels::Fast),
        (10, Kernels::Stock),
        (64, Kernels::Fast),
    ] {
        let cfg = DtBlockConfig {
            in_channels: 1,
            height: 8,
            width: 8,
            latent_dim,
            classes: 10,
            dropout: 0.2,
            kernels,
        };
        let vars = VarMap::new();
        let block =
            dt_block(cfg, seeded_var_builder(&vars, 7, DType::F32, &dev).pp("b")).expect("block");
        let mut rng = NoiseRng::new(1);
        let w_embed = randn(&mut rng, &[10, latent_dim], 1.0, 0.0);
        // Training-mode passes move the running statistics far from their
        // initial (0, 1), with inputs whose scale and offset differ from the test's.
        let mut drop = NoiseRng::new(2);
        for _ in 0..5 {
            let x = randn(&mut rng, &[16, 1, 8, 8], 2.0, 0.5);
            let z = randn(&mut rng, &[16, latent_dim], 3.0, -1.0);
            block
                .forward(&z, &x, &w_embed, &mut Mode::Train(&mut drop))
                .expect("train forward");
        }
        let x = randn(&mut rng, &[6, 1, 8, 8], 1.0, 0.0);
        let z = randn(&mut rng, &[6, latent_dim], 1.0, 0.0);
        let folded = block.folded().expect("fold");
        let fx = block.image_features(&x, &mut Mode::Eval).expect("features");
        let fx_folded = folded.image_features(&x).expect("folded features");
        let d = max_rel_diff(&fx_folded, &fx);
        assert!(
            d < 1e-5,
            "latent {latent_dim} {kernels}: image features differ by {d}"
        );
        let logits = block
            .logits_from_features(&z, &fx, &mut Mode::Eval)
            .expect("logits");
        let logits_folded = folded
            .logits_from_features(&z, &fx_folded)
            .expect("folded logits");
        let d = max_rel_diff(&logits_folded, &logits);
        assert!(
            d < 1e-5,
            "latent {latent_dim} {kernels}: logits differ by {d}"
        );
        let uhat = block
            .forward(&z, &x, &w_embed, &mut Mode::Eval)
            .expect("uhat");
        let d = max_rel_diff(
            &folded.forward(&z, &x, &w_embed).expect("folded uhat"),
            &uhat,
        );
        assert!(
            d < 1e-5,
            "latent {latent_dim} {kernels}: uhat differs by {d}"
        );
        // The fold is not trivial: the running statistics moved.
        let bn = vars.data().lock().expect("vars")["b.fuse.bn1.running_var"]
            .as_tensor()
            .mean_all()
            .expect("mean");
        assert!((bn.to_scalar::<f32>().expect("scalar") - 1.0).abs() > 0.05);
    }
}
