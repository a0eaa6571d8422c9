//! `linear`: the fast op against candle's matmul + broadcast add, and
//! against central finite differences.

mod common;

use candle_core::{DType, Result, Tensor, Var};
use common::{assert_close, numeric_grad, uniform, weighted_sum, F32, FINITE_DIFF};
use noprop_kernels::{linear, linear_with, Kernels};

/// Forward values and all three gradients agree with the stock path, for a
/// small layer and one large enough to take the parallel GEMM.
#[test]
fn fast_matches_stock() -> Result<()> {
    for (batch, inp, out) in [(3, 5, 4), (64, 700, 96)] {
        let x = Var::from_tensor(&uniform(1, &[batch, inp], DType::F32)?)?;
        let w = Var::from_tensor(&uniform(2, &[out, inp], DType::F32)?)?;
        let b = Var::from_tensor(&uniform(3, &[out], DType::F32)?)?;
        let r = uniform(4, &[batch, out], DType::F32)?;
        let run = |k| -> Result<_> {
            let y = linear_with(k, &x, &w, &b)?;
            let grads = weighted_sum(&y, &r)?.backward()?;
            let get = |v: &Var| grads.get(v).expect("gradient").clone();
            Ok((y, get(&x), get(&w), get(&b)))
        };
        let (yf, xf, wf, bf) = run(Kernels::Fast)?;
        let (ys, xs, ws, bs) = run(Kernels::Stock)?;
        // Sums of up to 700 products: scale the tolerance with the length.
        let tol = common::Tolerance {
            abs: F32.abs * 10.0,
            rel: F32.rel * 10.0,
        };
        assert_close(&yf, &ys, tol, "y");
        assert_close(&xf, &xs, tol, "dx");
        assert_close(&wf, &ws, tol, "dw");
        assert_close(&bf, &bs, tol, "db");
    }
    Ok(())
}

#[test]
fn gradients_match_finite_differences() -> Result<()> {
    let x = uniform(5, &[4, 3], DType::F64)?;
    let w = uniform(6, &[2, 3], DType::F64)?;
    let b = uniform(7, &[2], DType::F64)?;
    let r = uniform(8, &[4, 2], DType::F64)?;
    let (xv, wv, bv) = (
        Var::from_tensor(&x)?,
        Var::from_tensor(&w)?,
        Var::from_tensor(&b)?,
    );
    let grads = weighted_sum(&linear(&xv, &wv, &bv)?, &r)?.backward()?;
    let loss = |x: &Tensor, w: &Tensor, b: &Tensor| {
        weighted_sum(&linear(x, w, b)?, &r)?.to_scalar::<f64>()
    };
    let want_x = numeric_grad(|t| loss(t, &w, &b), &x, 1e-6)?;
    let want_w = numeric_grad(|t| loss(&x, t, &b), &w, 1e-6)?;
    let want_b = numeric_grad(|t| loss(&x, &w, t), &b, 1e-6)?;
    assert_close(grads.get(&xv).expect("dx"), &want_x, FINITE_DIFF, "dx");
    assert_close(grads.get(&wv).expect("dw"), &want_w, FINITE_DIFF, "dw");
    assert_close(grads.get(&bv).expect("db"), &want_b, FINITE_DIFF, "db");
    Ok(())
}

#[test]
fn rejects_mismatched_shapes() {
    let x = Tensor::zeros((2, 3), DType::F32, &candle_core::Device::Cpu).expect("x");
    let w = Tensor::zeros((4, 5), DType::F32, &candle_core::Device::Cpu).expect("w");
    let b = Tensor::zeros(4, DType::F32, &candle_core::Device::Cpu).expect("b");
    let err = linear(&x, &w, &b).expect_err("must fail");
    assert!(err.to_string().contains("linear"), "{err}");
}
