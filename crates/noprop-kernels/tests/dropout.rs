//! `dropout`: the fast op against the stock formulation (same mask, bit for
//! bit), its gradient against autograd on the stock path and central finite
//! differences, and its argument checks.

mod common;

use candle_core::{DType, Device, Result, Tensor, Var};
use common::{assert_close, numeric_grad, uniform, weighted_sum, FINITE_DIFF};
use noprop_kernels::{dropout, dropout_with, Kernels};

fn bits(t: &Tensor) -> Result<Vec<u32>> {
    Ok(t.flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .map(|v| v.to_bits())
        .collect())
}

/// Both paths draw the same mask from the same seed, so forward values and
/// gradients agree exactly; an odd length exercises the unpaired last element.
#[test]
fn fast_matches_stock_exactly() -> Result<()> {
    for dims in [&[3usize, 5, 7][..], &[2, 40_000]] {
        let x = Var::from_tensor(&uniform(1, dims, DType::F32)?)?;
        let r = uniform(2, dims, DType::F32)?;
        let fast = dropout_with(Kernels::Fast, &x, 0.3, 42)?;
        let stock = dropout_with(Kernels::Stock, &x, 0.3, 42)?;
        assert_eq!(bits(&fast)?, bits(&stock)?, "forward {dims:?}");
        let gf = weighted_sum(&fast, &r)?.backward()?;
        let gs = weighted_sum(&stock, &r)?.backward()?;
        let (gf, gs) = (
            gf.get(&x).expect("fast grad"),
            gs.get(&x).expect("stock grad"),
        );
        assert_eq!(bits(gf)?, bits(gs)?, "gradient {dims:?}");
    }
    Ok(())
}

/// Kept elements are scaled by 1 / (1 - p), dropped ones are zero, and the
/// kept fraction is close to 1 - p.
#[test]
fn keeps_and_scales() -> Result<()> {
    let x = Tensor::ones(50_000, DType::F32, &Device::Cpu)?;
    let y: Vec<f32> = dropout(&x, 0.2, 9)?.to_vec1()?;
    assert!(y.iter().all(|&v| v == 0.0 || v == 1.25));
    let kept = y.iter().filter(|&&v| v != 0.0).count() as f64 / y.len() as f64;
    assert!((kept - 0.8).abs() < 0.01, "kept {kept}");
    // Another seed gives another mask; p = 0 is the identity.
    assert_ne!(y, dropout(&x, 0.2, 10)?.to_vec1::<f32>()?);
    assert_eq!(dropout(&x, 0.0, 9)?.to_vec1::<f32>()?, x.to_vec1::<f32>()?);
    Ok(())
}

#[test]
fn gradient_matches_finite_differences() -> Result<()> {
    let dims = [2, 3, 5];
    let x = Var::from_tensor(&uniform(3, &dims, DType::F64)?)?;
    let r = uniform(4, &dims, DType::F64)?;
    let y = dropout(&x, 0.4, 5)?;
    let grads = weighted_sum(&y, &r)?.backward()?;
    let f = |t: &Tensor| weighted_sum(&dropout(t, 0.4, 5)?, &r)?.to_scalar::<f64>();
    let want = numeric_grad(f, x.as_tensor(), 1e-6)?;
    assert_close(
        grads.get(&x).expect("grad"),
        &want,
        FINITE_DIFF,
        "dropout dx",
    );
    Ok(())
}

#[test]
fn rejects_probabilities_outside_unit_interval() {
    let x = Tensor::ones(4, DType::F32, &Device::Cpu).expect("ones");
    for p in [1.0, -0.1, f64::NAN] {
        let err = dropout(&x, p, 0).expect_err("must fail");
        assert!(err.to_string().contains("[0, 1)"), "{err}");
    }
}
