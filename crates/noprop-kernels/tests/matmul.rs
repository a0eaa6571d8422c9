//! `matmul`: bit for bit what candle's matmul gives where the summed
//! dimension is at most 512 (one block on every CPU), the block sums added
//! in order beyond it, for any strided view; gradients through the same op.
//! That the results do not depend on the CPU's caches is checked end to end
//! by noprop-cli's golden test, which emulates other CPUs' caches.

mod common;

use candle_core::{DType, Result, Tensor, Var};
use common::{assert_close, uniform, weighted_sum, F32};
use noprop_kernels::{matmul, matmul_with, Kernels};

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

/// The blocks the summed dimension is cut into: at most 512 long, equal
/// but the last.
fn blocks(k: usize) -> Vec<(usize, usize)> {
    let len = k.div_ceil(k.div_ceil(512));
    (0..k).step_by(len).map(|s| (s, len.min(k - s))).collect()
}

/// `a · b` as candle's matmul of each block, added in order.
fn blockwise(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let k = a.dim(1)?;
    let mut acc: Option<Tensor> = None;
    for (s, len) in blocks(k) {
        let p = a.narrow(1, s, len)?.matmul(&b.narrow(0, s, len)?)?;
        acc = Some(match acc {
            None => p,
            Some(acc) => (acc + p)?,
        });
    }
    Ok(acc.unwrap())
}

/// (m, k, n) around every path of the `gemm` crate: tiny products, a single
/// row or column (its matrix-vector paths), products with m, n <= 64 and
/// larger ones, summed dimensions of one block, exactly 512, just over, and
/// several blocks.
const SHAPES: &[(usize, usize, usize)] = &[
    (3, 5, 4),
    (1, 700, 130),
    (130, 700, 1),
    (10, 784, 10),
    (16, 1300, 24),
    (100, 512, 70),
    (100, 513, 70),
    (128, 1100, 90),
    (70, 3072, 100),
    (12, 2, 9),
];

#[test]
fn equals_candle_per_block_for_every_layout() -> Result<()> {
    for (i, &(m, k, n)) in SHAPES.iter().enumerate() {
        let seed = i as u64 * 7;
        let a = uniform(seed, &[m, k], DType::F32)?;
        let b = uniform(seed + 1, &[k, n], DType::F32)?;
        // The same values as contiguous, transposed and narrowed views.
        let at = uniform(seed, &[k, m], DType::F32)?.t()?;
        let bt = uniform(seed + 1, &[n, k], DType::F32)?.t()?;
        let wide = uniform(seed + 2, &[m, k + 6], DType::F32)?.narrow(1, 3, k)?;
        for (an, a) in [("a", &a), ("aᵀ", &at), ("narrow a", &wide)] {
            for (bn, b) in [("b", &b), ("bᵀ", &bt)] {
                let got = matmul(a, b)?;
                assert_eq!(got.dims(), &[m, n]);
                // A single row or column takes gemm's matrix-vector paths,
                // which sum each block on top of the destination rather
                // than adding a block's sum to it; the same on every CPU.
                if m > 1 && n > 1 {
                    let want = blockwise(a, b)?;
                    assert_eq!(bits(&got), bits(&want), "{m}x{k}x{n}, {an} · {bn}");
                }
                if k <= 512 {
                    assert_eq!(
                        bits(&got),
                        bits(&a.matmul(b)?),
                        "{m}x{k}x{n}, {an} · {bn}: candle"
                    );
                }
                assert_close(&got, &matmul_with(Kernels::Stock, a, b)?, F32, "stock");
            }
        }
    }
    Ok(())
}

#[test]
fn gradients_match_candles() -> Result<()> {
    for &(m, k, n) in &[(9, 40, 7), (70, 600, 80)] {
        let a = Var::from_tensor(&uniform(3, &[m, k], DType::F32)?)?;
        let b = Var::from_tensor(&uniform(4, &[k, n], DType::F32)?)?;
        let r = uniform(5, &[m, n], DType::F32)?;
        let fast = weighted_sum(&matmul(a.as_tensor(), b.as_tensor())?, &r)?.backward()?;
        let stock = weighted_sum(&a.as_tensor().matmul(b.as_tensor())?, &r)?.backward()?;
        for (v, name) in [(&a, "a"), (&b, "b")] {
            assert_close(fast.get(v).unwrap(), stock.get(v).unwrap(), F32, name);
        }
        // The gradients go through the same blocking: dL/da = r · bᵀ.
        let da = fast.get(&a).unwrap();
        assert_eq!(bits(da), bits(&blockwise(&r, &b.as_tensor().t()?)?));
    }
    Ok(())
}

#[test]
fn other_ranks_and_devices_fall_back_and_bad_shapes_fail() -> Result<()> {
    let a = uniform(1, &[2, 3, 4], DType::F32)?;
    let b = uniform(2, &[2, 4, 5], DType::F32)?;
    assert_eq!(matmul(&a, &b)?.dims(), &[2, 3, 5]);
    let a = uniform(1, &[3, 4], DType::F64)?;
    let b = uniform(2, &[4, 2], DType::F64)?;
    assert_close(&matmul(&a, &b)?, &a.matmul(&b)?, F32, "f64");
    let bad = uniform(2, &[5, 2], DType::F32)?;
    assert!(matmul(&uniform(1, &[3, 4], DType::F32)?, &bad).is_err());
    Ok(())
}
