//! `max_pool2x2`: a hand-computed gradient, the stock formulation, and
//! central finite differences.

mod common;

use candle_core::{DType, Device, Result, Tensor, Var};
use common::{assert_close, numeric_grad, uniform, weighted_sum, F32, FINITE_DIFF};
use noprop_kernels::{max_pool2x2, max_pool2x2_with, Kernels};

/// A 4x4 input whose four windows each have one maximum: the gradient of the
/// sum is exactly 1 at each maximum and 0 elsewhere. candle's own
/// `max_pool2d` gives 1/4 here.
#[test]
fn gradient_goes_wholly_to_each_windows_maximum() -> Result<()> {
    #[rustfmt::skip]
    let input = [
        1.0f32, 9.0,   3.0, 2.0,
        4.0,    0.5,   7.0, 8.5,
        -1.0,  -2.0,   6.0, 5.0,
        -0.5,  -3.0,   4.0, 6.5,
    ];
    #[rustfmt::skip]
    let expected_grad = [
        0.0f32, 1.0,   0.0, 0.0,
        0.0,    0.0,   0.0, 1.0,
        0.0,    0.0,   0.0, 0.0,
        1.0,    0.0,   0.0, 1.0,
    ];
    for kernels in [Kernels::Fast, Kernels::Stock] {
        let x = Var::from_tensor(&Tensor::from_slice(&input, (1, 1, 4, 4), &Device::Cpu)?)?;
        let y = max_pool2x2_with(kernels, &x)?;
        assert_eq!(
            y.flatten_all()?.to_vec1::<f32>()?,
            [9.0, 8.5, -0.5, 6.5],
            "{kernels}"
        );
        let grads = y.sum_all()?.backward()?;
        let g = grads
            .get(&x)
            .expect("x gradient")
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert_eq!(g, expected_grad, "{kernels}");
    }
    Ok(())
}

/// Ties go to the first maximum in row-major order, like PyTorch (the stock
/// path's `max` would give the full gradient to each tied element).
#[test]
fn ties_go_to_the_first_maximum() -> Result<()> {
    let input = [2.0f32, 5.0, 5.0, 5.0];
    let x = Var::from_tensor(&Tensor::from_slice(&input, (1, 1, 2, 2), &Device::Cpu)?)?;
    let grads = max_pool2x2(&x)?.sum_all()?.backward()?;
    let g = grads
        .get(&x)
        .expect("x gradient")
        .flatten_all()?
        .to_vec1::<f32>()?;
    assert_eq!(g, [0.0, 1.0, 0.0, 0.0]);
    Ok(())
}

#[test]
fn forward_and_gradient_match_stock() -> Result<()> {
    // Even sizes, odd sizes (the last row or column is dropped) and a
    // minimal 2x3 plane.
    for dims in [[3, 5, 8, 10], [3, 5, 7, 9], [2, 3, 2, 3], [128, 32, 28, 28]] {
        let out = [dims[0], dims[1], dims[2] / 2, dims[3] / 2];
        let r = uniform(2, &out, DType::F32)?;
        let run = |kernels| -> Result<(Tensor, Tensor)> {
            let x = Var::from_tensor(&uniform(1, &dims, DType::F32)?)?;
            let y = max_pool2x2_with(kernels, &x)?;
            let grads = weighted_sum(&y, &r)?.backward()?;
            Ok((y, grads.get(&x).cloned().expect("x gradient")))
        };
        let (y_fast, g_fast) = run(Kernels::Fast)?;
        let (y_stock, g_stock) = run(Kernels::Stock)?;
        assert_close(&y_fast, &y_stock, F32, &format!("{dims:?}: output"));
        assert_close(&g_fast, &g_stock, F32, &format!("{dims:?}: gradient"));
    }
    Ok(())
}

#[test]
fn gradient_matches_finite_differences() -> Result<()> {
    for dims in [[2, 2, 4, 6], [1, 3, 5, 3]] {
        let x = uniform(7, &dims, DType::F64)?;
        let r = uniform(8, &[dims[0], dims[1], dims[2] / 2, dims[3] / 2], DType::F64)?;
        let loss = |x: &Tensor| weighted_sum(&max_pool2x2(x)?, &r);
        let xv = Var::from_tensor(&x)?;
        let grads = loss(&xv)?.backward()?;
        let numeric = numeric_grad(|x| loss(x)?.to_scalar::<f64>(), &x, 1e-6)?;
        let analytic = grads.get(&xv).expect("x gradient");
        assert_close(analytic, &numeric, FINITE_DIFF, &format!("{dims:?}"));
    }
    Ok(())
}

#[test]
fn non_contiguous_input_matches_stock() -> Result<()> {
    let x = uniform(1, &[2, 3, 9, 6], DType::F32)?.transpose(2, 3)?;
    assert!(!x.is_contiguous());
    let fast = max_pool2x2_with(Kernels::Fast, &x)?;
    let stock = max_pool2x2_with(Kernels::Stock, &x)?;
    assert_close(&fast, &stock, F32, "transposed input");
    Ok(())
}

#[test]
fn rejects_inputs_smaller_than_a_window() -> Result<()> {
    for dims in [[1, 1, 1, 4], [1, 1, 4, 1]] {
        let x = uniform(1, &dims, DType::F32)?;
        for kernels in [Kernels::Fast, Kernels::Stock] {
            assert!(
                max_pool2x2_with(kernels, &x).is_err(),
                "{kernels}: {dims:?}"
            );
        }
    }
    assert!(
        max_pool2x2(&uniform(1, &[4, 4], DType::F32)?).is_err(),
        "rank 2"
    );
    Ok(())
}
