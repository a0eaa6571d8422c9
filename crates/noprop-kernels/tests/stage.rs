//! `conv_stage`: the fused conv + bias + ReLU + max-pool + dropout op, with
//! each convolution algorithm, against the composition of candle's stock ops
//! in f32 and against central finite differences in f64.

mod common;

use candle_core::{DType, Result, Tensor, Var};
use common::{assert_close, numeric_grad, uniform, weighted_sum, Tolerance, F32, FINITE_DIFF};
use noprop_kernels::{conv_stage_with, ConvAlgo, ConvStage, Kernels};

/// One stage to test: input `[batch, cin, h, w]`, `cout` filters of `k x k`.
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
    fn out(&self, pool: bool) -> [usize; 4] {
        let o = |s: usize| {
            let c = s + 2 * self.pad + 1 - self.k;
            if pool {
                c / 2
            } else {
                c
            }
        };
        [self.x[0], self.cout, o(self.x[2]), o(self.x[3])]
    }
}

/// The Winograd method sums in another order and through its transforms;
/// its outputs reach a few hundred products of unit scale.
const WINOGRAD_F32: Tolerance = Tolerance {
    abs: 3e-4,
    rel: 3e-4,
};

/// Runs a stage with fresh variables and returns the output and the gradients
/// of `sum(y * r)` with respect to x, w and b.
fn run(
    kernels: Kernels,
    case: &Case,
    stage: &ConvStage,
    dtype: DType,
) -> Result<(Tensor, [Option<Tensor>; 3])> {
    let x = Var::from_tensor(&uniform(1, &case.x, dtype)?)?;
    let w = Var::from_tensor(&uniform(2, &case.w(), dtype)?)?;
    let b = Var::from_tensor(&(uniform(3, &[case.cout], dtype)? * 0.3)?)?;
    let r = uniform(4, &case.out(stage.pool), dtype)?;
    let y = conv_stage_with(kernels, &x, &w, &b, stage)?;
    let grads = weighted_sum(&y, &r)?.backward()?;
    let grad = |v: &Var| grads.get(v).cloned();
    Ok((y, [grad(&x), grad(&w), grad(&b)]))
}

fn compare(case: &Case, stage: &ConvStage, tol: Tolerance) -> Result<()> {
    let what = format!("{case:?} {stage:?}");
    let (y_fast, g_fast) = run(Kernels::Fast, case, stage, DType::F32)?;
    let (y_stock, g_stock) = run(Kernels::Stock, case, stage, DType::F32)?;
    assert_close(&y_fast, &y_stock, tol, &format!("{what}: output"));
    for (name, (f, s)) in ["x", "w", "b"].iter().zip(g_fast.iter().zip(&g_stock)) {
        match (f, s) {
            (Some(f), Some(s)) => assert_close(f, s, tol, &format!("{what}: grad {name}")),
            (None, None) => {}
            _ => panic!("{what}: grad {name} present on one path only"),
        }
    }
    Ok(())
}

/// Every combination of pooling and dropout, on shapes that take the im2col
/// and direct paths (odd sizes, 1x1 and 5x5 kernels, one input channel) and
/// the Winograd path (even sizes, forced on few channels), with batches that
/// cross the kernels' chunk and group boundaries.
#[test]
fn matches_stock_composition() -> Result<()> {
    let im2col = [
        Case {
            x: [3, 5, 7, 9],
            cout: 4,
            k: 3,
            pad: 1,
        },
        Case {
            x: [2, 3, 6, 5],
            cout: 3,
            k: 1,
            pad: 0,
        },
        Case {
            x: [2, 2, 7, 6],
            cout: 3,
            k: 5,
            pad: 2,
        },
        Case {
            x: [9, 1, 8, 8],
            cout: 5,
            k: 3,
            pad: 1,
        },
        Case {
            x: [3, 4, 6, 6],
            cout: 2,
            k: 3,
            pad: 0,
        },
    ];
    let winograd = [
        Case {
            x: [3, 3, 6, 4],
            cout: 5,
            k: 3,
            pad: 1,
        },
        Case {
            x: [11, 9, 4, 6],
            cout: 7,
            k: 3,
            pad: 1,
        },
        Case {
            x: [17, 2, 2, 2],
            cout: 3,
            k: 3,
            pad: 1,
        },
    ];
    for (cases, algo, tol) in [
        (&im2col[..], ConvAlgo::Im2col, F32),
        (&im2col[..], ConvAlgo::Direct, F32),
        (&winograd[..], ConvAlgo::Winograd, WINOGRAD_F32),
    ] {
        for case in cases {
            for pool in [false, true] {
                for dropout in [0.0, 0.3] {
                    let stage = ConvStage {
                        padding: case.pad,
                        pool,
                        dropout,
                        seed: 7,
                        input_grad: true,
                        algo,
                    };
                    compare(case, &stage, tol)?;
                }
            }
        }
    }
    Ok(())
}

/// The MNIST block's second and third stages at a reduced batch, where
/// `Auto` picks Winograd.
#[test]
fn mnist_sized_stages_match_stock() -> Result<()> {
    for (case, pool) in [
        (
            Case {
                x: [12, 32, 14, 14],
                cout: 64,
                k: 3,
                pad: 1,
            },
            false,
        ),
        (
            Case {
                x: [12, 64, 14, 14],
                cout: 128,
                k: 3,
                pad: 1,
            },
            true,
        ),
        (
            Case {
                x: [12, 1, 28, 28],
                cout: 32,
                k: 3,
                pad: 1,
            },
            true,
        ),
    ] {
        let stage = ConvStage {
            padding: 1,
            pool,
            dropout: 0.2,
            seed: 3,
            input_grad: case.x[1] > 1,
            algo: ConvAlgo::Auto,
        };
        compare(&case, &stage, WINOGRAD_F32)?;
    }
    Ok(())
}

/// Every gradient against central differences in f64, both algorithms.
#[test]
fn gradients_match_finite_differences() -> Result<()> {
    let cases = [
        (
            Case {
                x: [2, 2, 5, 3],
                cout: 3,
                k: 3,
                pad: 1,
            },
            ConvAlgo::Im2col,
        ),
        (
            Case {
                x: [2, 2, 5, 3],
                cout: 11,
                k: 3,
                pad: 1,
            },
            ConvAlgo::Direct,
        ),
        (
            Case {
                x: [1, 1, 4, 5],
                cout: 3,
                k: 3,
                pad: 0,
            },
            ConvAlgo::Direct,
        ),
        (
            Case {
                x: [3, 2, 4, 4],
                cout: 3,
                k: 3,
                pad: 1,
            },
            ConvAlgo::Winograd,
        ),
        (
            Case {
                x: [1, 3, 2, 6],
                cout: 2,
                k: 3,
                pad: 1,
            },
            ConvAlgo::Winograd,
        ),
    ];
    for (case, algo) in cases {
        for (pool, dropout) in [(false, 0.0), (true, 0.0), (true, 0.25), (false, 0.25)] {
            let stage = ConvStage {
                padding: case.pad,
                pool,
                dropout,
                seed: 5,
                input_grad: true,
                algo,
            };
            let what = format!("{case:?} {stage:?}");
            let x = uniform(11, &case.x, DType::F64)?;
            let w = uniform(12, &case.w(), DType::F64)?;
            let b = (uniform(13, &[case.cout], DType::F64)? * 0.3)?;
            let r = uniform(14, &case.out(pool), DType::F64)?;
            let loss = |x: &Tensor, w: &Tensor, b: &Tensor| {
                weighted_sum(&conv_stage_with(Kernels::Fast, x, w, b, &stage)?, &r)
            };
            let scalar = |t: Tensor| t.to_scalar::<f64>();
            let (xv, wv, bv) = (
                Var::from_tensor(&x)?,
                Var::from_tensor(&w)?,
                Var::from_tensor(&b)?,
            );
            let grads = loss(&xv, &wv, &bv)?.backward()?;
            let analytic = |v: &Var| grads.get(v).cloned().expect("gradient present");
            let eps = 1e-6;
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

/// Outputs and gradients are bit-identical for one thread and for several:
/// partial gradients are summed per fixed chunk, in chunk order.
#[test]
fn results_do_not_depend_on_thread_count() -> Result<()> {
    let case = Case {
        x: [19, 8, 6, 6],
        cout: 5,
        k: 3,
        pad: 1,
    };
    let bits = |t: &Tensor| -> Result<Vec<u32>> {
        Ok(t.flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .map(|v| v.to_bits())
            .collect())
    };
    for algo in [ConvAlgo::Im2col, ConvAlgo::Direct, ConvAlgo::Winograd] {
        let stage = ConvStage {
            padding: 1,
            pool: true,
            dropout: 0.2,
            seed: 1,
            input_grad: true,
            algo,
        };
        let on = |threads: usize| -> Result<Vec<Vec<u32>>> {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("thread pool");
            pool.install(|| {
                let (y, g) = run(Kernels::Fast, &case, &stage, DType::F32)?;
                let mut out = vec![bits(&y)?];
                for t in g.iter().flatten() {
                    out.push(bits(t)?);
                }
                Ok(out)
            })
        };
        assert_eq!(on(1)?, on(3)?, "{algo:?}");
    }
    Ok(())
}

#[test]
fn input_grad_false_gives_no_input_gradient() -> Result<()> {
    for kernels in [Kernels::Fast, Kernels::Stock] {
        for algo in [ConvAlgo::Im2col, ConvAlgo::Direct, ConvAlgo::Winograd] {
            let x = Var::from_tensor(&uniform(1, &[3, 8, 4, 4], DType::F32)?)?;
            let w = Var::from_tensor(&uniform(2, &[4, 8, 3, 3], DType::F32)?)?;
            let b = Var::from_tensor(&uniform(3, &[4], DType::F32)?)?;
            let stage = ConvStage {
                pool: true,
                input_grad: false,
                algo,
                ..ConvStage::default()
            };
            let grads = conv_stage_with(kernels, &x, &w, &b, &stage)?
                .sum_all()?
                .backward()?;
            assert!(
                grads.get(&x).is_none(),
                "{kernels} {algo:?}: x has a gradient"
            );
            assert!(
                grads.get(&w).is_some() && grads.get(&b).is_some(),
                "{kernels} {algo:?}: missing parameter gradient"
            );
        }
    }
    Ok(())
}

#[test]
fn rejects_what_it_cannot_compute() -> Result<()> {
    let t = |dims: &[usize]| uniform(0, dims, DType::F32);
    let (x, w, b) = (t(&[2, 3, 5, 6])?, t(&[4, 3, 3, 3])?, t(&[4])?);
    // Winograd on an odd height, on both paths so that they accept the same inputs.
    let odd = ConvStage {
        algo: ConvAlgo::Winograd,
        ..ConvStage::default()
    };
    // Pooling a 1-pixel-high output.
    let tiny = ConvStage {
        pool: true,
        padding: 0,
        ..ConvStage::default()
    };
    let bad_p = ConvStage {
        dropout: 1.0,
        ..ConvStage::default()
    };
    for kernels in [Kernels::Fast, Kernels::Stock] {
        assert!(
            conv_stage_with(kernels, &x, &w, &b, &odd).is_err(),
            "{kernels}: odd Winograd"
        );
        assert!(
            conv_stage_with(kernels, &t(&[2, 3, 3, 6])?, &w, &b, &tiny).is_err(),
            "{kernels}: tiny pool"
        );
        assert!(
            conv_stage_with(kernels, &x, &w, &b, &bad_p).is_err(),
            "{kernels}: p = 1"
        );
        assert!(
            conv_stage_with(kernels, &x, &w, &t(&[3])?, &ConvStage::default()).is_err(),
            "{kernels}: bias shape"
        );
    }
    Ok(())
}

/// Half precision and other devices take the stock path.
#[test]
fn half_precision_falls_back_to_stock() -> Result<()> {
    let x = uniform(1, &[2, 8, 4, 4], DType::F16)?;
    let w = uniform(2, &[3, 8, 3, 3], DType::F16)?;
    let b = uniform(3, &[3], DType::F16)?;
    let stage = ConvStage {
        pool: true,
        ..ConvStage::default()
    };
    let fast = conv_stage_with(Kernels::Fast, &x, &w, &b, &stage)?;
    let stock = conv_stage_with(Kernels::Stock, &x, &w, &b, &stage)?;
    assert_close(&fast, &stock, F32, "f16");
    Ok(())
}

/// The loops compiled for the baseline target (SSE2) and for AVX2 with FMA
/// round identically lane by lane (the FMA of the direct method is a fused
/// multiply-add in both), so they agree bit for bit.
#[test]
fn baseline_and_avx2_loops_agree_exactly() -> Result<()> {
    let bits = |t: &Tensor| -> Result<Vec<u32>> {
        Ok(t.flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .map(|v| v.to_bits())
            .collect())
    };
    let cases = [
        (
            Case {
                x: [9, 1, 8, 6],
                cout: 12,
                k: 3,
                pad: 1,
            },
            ConvAlgo::Direct,
            true,
        ),
        (
            Case {
                x: [9, 16, 6, 8],
                cout: 12,
                k: 3,
                pad: 1,
            },
            ConvAlgo::Winograd,
            true,
        ),
        (
            Case {
                x: [9, 16, 6, 8],
                cout: 12,
                k: 3,
                pad: 1,
            },
            ConvAlgo::Winograd,
            false,
        ),
        (
            Case {
                x: [5, 3, 5, 7],
                cout: 4,
                k: 3,
                pad: 1,
            },
            ConvAlgo::Im2col,
            true,
        ),
    ];
    for (case, algo, pool) in cases {
        let stage = ConvStage {
            padding: case.pad,
            pool,
            dropout: 0.3,
            seed: 2,
            input_grad: true,
            algo,
        };
        let collect = |baseline: bool| -> Result<Vec<Vec<u32>>> {
            noprop_kernels::use_baseline_simd(baseline);
            let r = run(Kernels::Fast, &case, &stage, DType::F32);
            noprop_kernels::use_baseline_simd(false);
            let (y, g) = r?;
            let mut out = vec![bits(&y)?];
            for t in g.iter().flatten() {
                out.push(bits(t)?);
            }
            Ok(out)
        };
        assert_eq!(
            collect(true)?,
            collect(false)?,
            "{case:?} {algo:?} pool={pool}"
        );
    }
    Ok(())
}
