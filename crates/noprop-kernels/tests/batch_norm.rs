//! `batch_norm1d_train`: the fused op against candle's stock composition in
//! f32 (output, batch statistics, every gradient) and against central finite
//! differences in f64.

mod common;

use candle_core::{DType, Result, Tensor, Var};
use common::{assert_close, numeric_grad, uniform, weighted_sum, F32, FINITE_DIFF};
use noprop_kernels::{batch_norm1d_train_with, Kernels};

const EPS: f64 = 1e-5;

/// Inputs with a feature-dependent offset and scale, as after a Linear layer.
fn input(seed: u64, dims: [usize; 2], dtype: DType) -> Result<Tensor> {
    let offset = (uniform(seed + 100, &[1, dims[1]], dtype)? * 3.0)?;
    let scale = (uniform(seed + 200, &[1, dims[1]], dtype)?.abs()? + 0.5)?;
    uniform(seed, &dims, dtype)?
        .broadcast_mul(&scale)?
        .broadcast_add(&offset)
}

#[test]
fn matches_stock_composition() -> Result<()> {
    for dims in [[2, 3], [7, 5], [128, 256], [33, 1]] {
        let run = |kernels| -> Result<(Vec<Tensor>, [Tensor; 3])> {
            let x = Var::from_tensor(&input(1, dims, DType::F32)?)?;
            let w = Var::from_tensor(&(uniform(2, &[dims[1]], DType::F32)? + 1.0)?)?;
            let b = Var::from_tensor(&uniform(3, &[dims[1]], DType::F32)?)?;
            let r = uniform(4, &dims, DType::F32)?;
            let out = batch_norm1d_train_with(kernels, &x, &w, &b, EPS)?;
            let grads = weighted_sum(&out.y, &r)?.backward()?;
            let g = |v: &Var| grads.get(v).cloned().expect("gradient");
            Ok((vec![out.y, out.mean, out.var], [g(&x), g(&w), g(&b)]))
        };
        let (fast, gf) = run(Kernels::Fast)?;
        let (stock, gs) = run(Kernels::Stock)?;
        for (name, (f, s)) in ["y", "mean", "var"].iter().zip(fast.iter().zip(&stock)) {
            assert_close(f, s, F32, &format!("{dims:?} {name}"));
        }
        for (name, (f, s)) in ["x", "weight", "bias"].iter().zip(gf.iter().zip(&gs)) {
            assert_close(f, s, F32, &format!("{dims:?} grad {name}"));
        }
    }
    Ok(())
}

#[test]
fn gradients_match_finite_differences() -> Result<()> {
    for dims in [[5, 3], [2, 1], [3, 4]] {
        let x = input(11, dims, DType::F64)?;
        let w = (uniform(12, &[dims[1]], DType::F64)? + 1.0)?;
        let b = uniform(13, &[dims[1]], DType::F64)?;
        let r = uniform(14, &dims, DType::F64)?;
        let loss = |x: &Tensor, w: &Tensor, b: &Tensor| {
            weighted_sum(&batch_norm1d_train_with(Kernels::Fast, x, w, b, EPS)?.y, &r)
        };
        let scalar = |t: Tensor| t.to_scalar::<f64>();
        let (xv, wv, bv) = (
            Var::from_tensor(&x)?,
            Var::from_tensor(&w)?,
            Var::from_tensor(&b)?,
        );
        let grads = loss(&xv, &wv, &bv)?.backward()?;
        let got = |v: &Var| grads.get(v).cloned().expect("gradient");
        let eps = 1e-6;
        assert_close(
            &got(&xv),
            &numeric_grad(|x| scalar(loss(x, &w, &b)?), &x, eps)?,
            FINITE_DIFF,
            &format!("{dims:?} grad x"),
        );
        assert_close(
            &got(&wv),
            &numeric_grad(|w| scalar(loss(&x, w, &b)?), &w, eps)?,
            FINITE_DIFF,
            &format!("{dims:?} grad w"),
        );
        assert_close(
            &got(&bv),
            &numeric_grad(|b| scalar(loss(&x, &w, b)?), &b, eps)?,
            FINITE_DIFF,
            &format!("{dims:?} grad b"),
        );
    }
    Ok(())
}

#[test]
fn normalises_and_reports_statistics() -> Result<()> {
    let x = input(21, [64, 6], DType::F64)?;
    let ones = Tensor::ones(6, DType::F64, x.device())?;
    let zeros = Tensor::zeros(6, DType::F64, x.device())?;
    let out = batch_norm1d_train_with(Kernels::Fast, &x, &ones, &zeros, 0.0)?;
    let mean: Vec<f64> = out.y.mean(0)?.to_vec1()?;
    let var: Vec<f64> = out.y.sqr()?.mean(0)?.to_vec1()?;
    assert!(mean.iter().all(|m| m.abs() < 1e-12), "{mean:?}");
    assert!(var.iter().all(|v| (v - 1.0).abs() < 1e-10), "{var:?}");
    let want_mean: Vec<f64> = x.mean(0)?.to_vec1()?;
    let got_mean: Vec<f64> = out.mean.to_vec1()?;
    for (a, b) in got_mean.iter().zip(&want_mean) {
        assert!((a - b).abs() < 1e-12);
    }
    Ok(())
}

#[test]
fn rejects_bad_shapes() -> Result<()> {
    let t = |dims: &[usize]| uniform(0, dims, DType::F32);
    for kernels in [Kernels::Fast, Kernels::Stock] {
        assert!(batch_norm1d_train_with(kernels, &t(&[4, 3])?, &t(&[4])?, &t(&[3])?, EPS).is_err());
        assert!(batch_norm1d_train_with(kernels, &t(&[0, 3])?, &t(&[3])?, &t(&[3])?, EPS).is_err());
        assert!(
            batch_norm1d_train_with(kernels, &t(&[2, 3, 1])?, &t(&[3])?, &t(&[3])?, EPS).is_err()
        );
    }
    Ok(())
}
