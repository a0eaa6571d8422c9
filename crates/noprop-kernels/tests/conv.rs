//! `conv2d` and `conv2d_relu`: the fast kernels against candle's stock ops in
//! f32, and against central finite differences in f64.

mod common;

use candle_core::{DType, Result, Tensor, Var};
use common::{assert_close, numeric_grad, uniform, weighted_sum, F32, FINITE_DIFF};
use noprop_kernels::{conv2d_relu_with, conv2d_with, Kernels};

/// One convolution to test: `[batch, cin, h, w]` input, `cout` filters of
/// `k x k`, and the padding.
#[derive(Debug, Clone, Copy)]
struct Case {
    x: [usize; 4],
    cout: usize,
    k: usize,
    pad: usize,
}

impl Case {
    fn w(&self) -> [usize; 4] {
        [self.cout, self.x[1], self.k, self.k]
    }
    fn out(&self) -> [usize; 4] {
        let o = |s: usize| s + 2 * self.pad + 1 - self.k;
        [self.x[0], self.cout, o(self.x[2]), o(self.x[3])]
    }
}

/// Odd shapes around every padding and kernel size the kernels special-case:
/// 1x1 without padding (no im2col), 1x1 with padding, padding wider than
/// the kernel's reach, no padding, and a batch of one (parallel GEMM).
const CASES: &[Case] = &[
    Case {
        x: [3, 5, 7, 9],
        cout: 4,
        k: 3,
        pad: 1,
    },
    Case {
        x: [3, 5, 7, 9],
        cout: 4,
        k: 3,
        pad: 0,
    },
    Case {
        x: [3, 5, 7, 9],
        cout: 4,
        k: 3,
        pad: 2,
    },
    Case {
        x: [3, 5, 7, 9],
        cout: 6,
        k: 1,
        pad: 0,
    },
    Case {
        x: [3, 5, 7, 9],
        cout: 6,
        k: 1,
        pad: 1,
    },
    Case {
        x: [3, 5, 7, 9],
        cout: 6,
        k: 1,
        pad: 2,
    },
    Case {
        x: [3, 5, 7, 9],
        cout: 2,
        k: 5,
        pad: 0,
    },
    Case {
        x: [3, 5, 7, 9],
        cout: 2,
        k: 5,
        pad: 1,
    },
    Case {
        x: [3, 5, 7, 9],
        cout: 2,
        k: 5,
        pad: 2,
    },
    Case {
        x: [1, 2, 6, 5],
        cout: 3,
        k: 3,
        pad: 1,
    },
    Case {
        x: [5, 1, 4, 4],
        cout: 7,
        k: 3,
        pad: 1,
    },
];

/// Runs one convolution on `kernels` with fresh variables and returns the
/// output and the gradients of `sum(y * r)` with respect to x, w and b.
fn run(
    kernels: Kernels,
    case: &Case,
    relu: bool,
    bias: bool,
    dtype: DType,
) -> Result<(Tensor, [Option<Tensor>; 3])> {
    let x = Var::from_tensor(&uniform(1, &case.x, dtype)?)?;
    let w = Var::from_tensor(&uniform(2, &case.w(), dtype)?)?;
    let b = Var::from_tensor(&uniform(3, &[case.cout], dtype)?)?;
    let r = uniform(4, &case.out(), dtype)?;
    let b_arg = bias.then_some(b.as_tensor());
    let y = if relu {
        conv2d_relu_with(kernels, &x, &w, b_arg, case.pad, true)?
    } else {
        conv2d_with(kernels, &x, &w, b_arg, case.pad, true)?
    };
    let grads = weighted_sum(&y, &r)?.backward()?;
    let grad = |v: &Var| grads.get(v).cloned();
    Ok((y, [grad(&x), grad(&w), grad(&b)]))
}

#[test]
fn forward_and_gradients_match_stock() -> Result<()> {
    for case in CASES {
        for (relu, bias) in [(false, false), (false, true), (true, true), (true, false)] {
            let what = format!("{case:?} relu={relu} bias={bias}");
            let (y_fast, g_fast) = run(Kernels::Fast, case, relu, bias, DType::F32)?;
            let (y_stock, g_stock) = run(Kernels::Stock, case, relu, bias, DType::F32)?;
            assert_close(&y_fast, &y_stock, F32, &format!("{what}: output"));
            for (name, (f, s)) in ["x", "w", "b"].iter().zip(g_fast.iter().zip(&g_stock)) {
                match (f, s) {
                    (Some(f), Some(s)) => assert_close(f, s, F32, &format!("{what}: grad {name}")),
                    (None, None) => {}
                    _ => panic!("{what}: grad {name} present on one path only"),
                }
            }
            assert_eq!(g_fast[2].is_some(), bias, "{what}: bias gradient");
        }
    }
    Ok(())
}

/// The MNIST block's middle convolution at a reduced batch, where the GEMMs
/// are large enough to take the packed micro-kernel paths.
#[test]
fn mnist_sized_layer_matches_stock() -> Result<()> {
    let case = Case {
        x: [4, 32, 14, 14],
        cout: 64,
        k: 3,
        pad: 1,
    };
    let (y_fast, g_fast) = run(Kernels::Fast, &case, true, true, DType::F32)?;
    let (y_stock, g_stock) = run(Kernels::Stock, &case, true, true, DType::F32)?;
    assert_close(&y_fast, &y_stock, F32, "output");
    for (f, s) in g_fast.iter().zip(&g_stock) {
        match (f, s) {
            (Some(f), Some(s)) => assert_close(f, s, F32, "gradient"),
            _ => panic!("missing gradient"),
        }
    }
    Ok(())
}

/// Every gradient of `sum(y * r)` against central differences in f64.
#[test]
fn gradients_match_finite_differences() -> Result<()> {
    let cases = [
        Case {
            x: [2, 2, 4, 5],
            cout: 3,
            k: 3,
            pad: 1,
        },
        Case {
            x: [1, 3, 3, 4],
            cout: 2,
            k: 1,
            pad: 1,
        },
        Case {
            x: [2, 1, 5, 4],
            cout: 2,
            k: 5,
            pad: 2,
        },
    ];
    let eps = 1e-6;
    for case in &cases {
        for relu in [false, true] {
            let what = format!("{case:?} relu={relu}");
            let x = uniform(11, &case.x, DType::F64)?;
            let w = uniform(12, &case.w(), DType::F64)?;
            let b = uniform(13, &[case.cout], DType::F64)?;
            let r = uniform(14, &case.out(), DType::F64)?;
            let loss = |x: &Tensor, w: &Tensor, b: &Tensor| -> Result<Tensor> {
                let y = if relu {
                    conv2d_relu_with(Kernels::Fast, x, w, Some(b), case.pad, true)?
                } else {
                    conv2d_with(Kernels::Fast, x, w, Some(b), case.pad, true)?
                };
                weighted_sum(&y, &r)
            };
            let scalar = |t: Tensor| t.to_scalar::<f64>();

            let (xv, wv, bv) = (
                Var::from_tensor(&x)?,
                Var::from_tensor(&w)?,
                Var::from_tensor(&b)?,
            );
            let grads = loss(&xv, &wv, &bv)?.backward()?;
            let analytic = |v: &Var| grads.get(v).cloned().expect("gradient present");

            let num_x = numeric_grad(|x| scalar(loss(x, &w, &b)?), &x, eps)?;
            let num_w = numeric_grad(|w| scalar(loss(&x, w, &b)?), &w, eps)?;
            let num_b = numeric_grad(|b| scalar(loss(&x, &w, b)?), &b, eps)?;
            assert_close(
                &analytic(&xv),
                &num_x,
                FINITE_DIFF,
                &format!("{what}: grad x"),
            );
            assert_close(
                &analytic(&wv),
                &num_w,
                FINITE_DIFF,
                &format!("{what}: grad w"),
            );
            assert_close(
                &analytic(&bv),
                &num_b,
                FINITE_DIFF,
                &format!("{what}: grad b"),
            );
        }
    }
    Ok(())
}

#[test]
fn input_grad_false_gives_no_input_gradient() -> Result<()> {
    let case = CASES[0];
    for kernels in [Kernels::Fast, Kernels::Stock] {
        for relu in [false, true] {
            let x = Var::from_tensor(&uniform(1, &case.x, DType::F32)?)?;
            let w = Var::from_tensor(&uniform(2, &case.w(), DType::F32)?)?;
            let y = if relu {
                conv2d_relu_with(kernels, &x, &w, None, case.pad, false)?
            } else {
                conv2d_with(kernels, &x, &w, None, case.pad, false)?
            };
            let grads = y.sum_all()?.backward()?;
            assert!(
                grads.get(&x).is_none(),
                "{kernels} relu={relu}: x has a gradient"
            );
            assert!(
                grads.get(&w).is_some(),
                "{kernels} relu={relu}: w has no gradient"
            );
        }
    }
    Ok(())
}

/// Gradients reach a variable through earlier ops, and a variable used twice
/// accumulates both contributions.
#[test]
fn composes_with_candle_autograd() -> Result<()> {
    let case = Case {
        x: [2, 3, 5, 6],
        cout: 3,
        k: 3,
        pad: 1,
    };
    let grads_on = |kernels| -> Result<Vec<Tensor>> {
        let x = Var::from_tensor(&uniform(1, &case.x, DType::F32)?)?;
        let w = Var::from_tensor(&uniform(2, &[3, 3, 3, 3], DType::F32)?)?;
        let h = conv2d_relu_with(kernels, &(x.as_tensor() * 2.0)?, &w, None, 1, true)?;
        let y = conv2d_with(kernels, &h, &w, None, 1, true)?;
        let grads = y.sqr()?.sum_all()?.backward()?;
        Ok(vec![
            grads.get(&x).cloned().expect("x"),
            grads.get(&w).cloned().expect("w"),
        ])
    };
    for (f, s) in grads_on(Kernels::Fast)?
        .iter()
        .zip(&grads_on(Kernels::Stock)?)
    {
        assert_close(f, s, F32, "chained gradient");
    }
    Ok(())
}

#[test]
fn non_contiguous_inputs_match_stock() -> Result<()> {
    // A transposed view: the kernels copy it to a contiguous layout first.
    let x = uniform(1, &[3, 5, 9, 7], DType::F32)?.transpose(2, 3)?;
    let w = uniform(2, &[4, 5, 3, 3], DType::F32)?.transpose(2, 3)?;
    assert!(!x.is_contiguous() && !w.is_contiguous());
    let fast = conv2d_with(Kernels::Fast, &x, &w, None, 1, true)?;
    let stock = conv2d_with(Kernels::Stock, &x, &w, None, 1, true)?;
    assert_close(&fast, &stock, F32, "transposed input");
    Ok(())
}

#[test]
fn half_precision_falls_back_to_stock() -> Result<()> {
    let x = uniform(1, &[2, 3, 5, 5], DType::F16)?;
    let w = uniform(2, &[4, 3, 3, 3], DType::F16)?;
    let fast = conv2d_with(Kernels::Fast, &x, &w, None, 1, true)?;
    let stock = conv2d_with(Kernels::Stock, &x, &w, None, 1, true)?;
    assert_close(&fast, &stock, F32, "f16");
    Ok(())
}

#[test]
fn rejects_bad_shapes_on_both_paths() -> Result<()> {
    let t = |dims: &[usize]| uniform(0, dims, DType::F32);
    let bad: [(&str, Tensor, Tensor, Option<Tensor>, usize); 6] = [
        ("rank 3 input", t(&[5, 7, 9])?, t(&[4, 5, 3, 3])?, None, 1),
        (
            "non-square kernel",
            t(&[3, 5, 7, 9])?,
            t(&[4, 5, 3, 1])?,
            None,
            1,
        ),
        (
            "channel mismatch",
            t(&[3, 5, 7, 9])?,
            t(&[4, 6, 3, 3])?,
            None,
            1,
        ),
        (
            "bias shape",
            t(&[3, 5, 7, 9])?,
            t(&[4, 5, 3, 3])?,
            Some(t(&[5])?),
            1,
        ),
        (
            "kernel too large",
            t(&[3, 5, 3, 9])?,
            t(&[4, 5, 7, 7])?,
            None,
            1,
        ),
        (
            "dtype mismatch",
            t(&[3, 5, 7, 9])?,
            t(&[4, 5, 3, 3])?.to_dtype(DType::F64)?,
            None,
            1,
        ),
    ];
    for (what, x, w, b, pad) in &bad {
        for kernels in [Kernels::Fast, Kernels::Stock] {
            let r = conv2d_with(kernels, x, w, b.as_ref(), *pad, true);
            assert!(r.is_err(), "{kernels}: {what} accepted");
        }
    }
    Ok(())
}

#[test]
fn kernels_parse_and_display() {
    for k in [Kernels::Fast, Kernels::Stock] {
        assert_eq!(k.to_string().parse::<Kernels>().ok(), Some(k));
    }
    assert_eq!("STOCK".parse::<Kernels>().ok(), Some(Kernels::Stock));
    assert!("cuda".parse::<Kernels>().is_err());
    assert_eq!(Kernels::default(), Kernels::Fast);
}

/// An empty batch is a valid input: the output is empty and the parameter
/// gradients are zero.
#[test]
fn empty_batch_gives_zero_parameter_gradients() -> Result<()> {
    let x = Var::from_tensor(&uniform(1, &[0, 2, 4, 4], DType::F32)?)?;
    let w = Var::from_tensor(&uniform(2, &[3, 2, 3, 3], DType::F32)?)?;
    let b = Var::from_tensor(&uniform(3, &[3], DType::F32)?)?;
    let y = conv2d_relu_with(Kernels::Fast, &x, &w, Some(&b), 1, true)?;
    assert_eq!(y.dims(), &[0, 3, 4, 4]);
    let grads = y.sum_all()?.backward()?;
    for v in [&w, &b] {
        let g = grads.get(v).expect("parameter gradient");
        assert_eq!(g.dims(), v.dims());
        assert_eq!(g.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
    }
    Ok(())
}
