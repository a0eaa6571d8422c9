//! Times the fast kernels against candle's stock ops on the convolutional part
//! of NoProp's Figure-6 block, printing median milliseconds and GFLOP/s.
//!
//! ```text
//! cargo run -p noprop-kernels --release --example bench_ops [mnist|cifar] [batch]
//! ```
//!
//! Each convolution is timed as conv + bias + ReLU (candle's stock path runs
//! those as three ops), then its backward pass from a gradient of ones; the
//! first convolution's input is data and gets no gradient.

use candle_core::{Device, Result, Tensor, Var};
use noprop_kernels::{conv2d_flops, conv2d_relu_with, max_pool2x2_with, Kernels};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::{Duration, Instant};

// The allocator the `noprop` binary ships with, so that both paths pay what
// they would pay in training (glibc's malloc would add page faults to every
// fresh multi-megabyte tensor).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Stop sampling an op after this many runs or this much time, whichever
/// comes first (but never before three runs).
const MAX_RUNS: usize = 15;
const TIME_BUDGET: Duration = Duration::from_secs(4);

fn uniform(rng: &mut ChaCha8Rng, dims: &[usize]) -> Result<Tensor> {
    let len = dims.iter().product();
    let v: Vec<f32> = (0..len).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, dims, &Device::Cpu)
}

/// Median forward and backward milliseconds of `op` applied to `x`. The
/// backward pass starts from `y.backward()`, whose seed gradient is a tensor
/// of ones: the cheapest seed candle offers, the same on both paths.
fn time_op(x: &Tensor, op: impl Fn(&Tensor) -> Result<Tensor>) -> Result<(f64, f64)> {
    let (mut fwd, mut bwd) = (Vec::new(), Vec::new());
    let started = Instant::now();
    // The first run warms caches, thread pools and scratch buffers.
    for run in 0..=MAX_RUNS {
        let t0 = Instant::now();
        let y = op(x)?;
        let t1 = Instant::now();
        let grads = y.backward()?;
        let t2 = Instant::now();
        drop(grads);
        if run > 0 {
            fwd.push((t1 - t0).as_secs_f64() * 1e3);
            bwd.push((t2 - t1).as_secs_f64() * 1e3);
        }
        if run >= 3 && started.elapsed() > TIME_BUDGET {
            break;
        }
    }
    Ok((median(&mut fwd), median(&mut bwd)))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One convolution of the block: input dims, output channels, and whether its
/// input needs a gradient.
struct Conv {
    name: &'static str,
    x: [usize; 4],
    cout: usize,
    input_grad: bool,
}

fn row(name: &str, fast: (f64, f64), stock: (f64, f64), flops: Option<(f64, f64)>) {
    let gflops = |ms: f64, f: f64| f / (ms * 1e6);
    let cell = |ms: f64, f: Option<f64>| match f {
        Some(f) => format!("{ms:9.2} {:6.1}", gflops(ms, f)),
        None => format!("{ms:9.2} {:>6}", "-"),
    };
    println!(
        "{name:<22} fwd {} | {}  x{:4.1}   bwd {} | {}  x{:4.1}",
        cell(fast.0, flops.map(|f| f.0)),
        cell(stock.0, flops.map(|f| f.0)),
        stock.0 / fast.0,
        cell(fast.1, flops.map(|f| f.1)),
        cell(stock.1, flops.map(|f| f.1)),
        stock.1 / fast.1,
    );
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let dataset = args.next().unwrap_or_else(|| "mnist".into());
    let batch: usize = args.next().and_then(|b| b.parse().ok()).unwrap_or(128);
    let (cin, size) = match dataset.as_str() {
        "cifar" => (3, 32),
        _ => (1, 28),
    };
    let half = size / 2;
    let convs = [
        Conv {
            name: "conv1+relu",
            x: [batch, cin, size, size],
            cout: 32,
            input_grad: false,
        },
        Conv {
            name: "conv2+relu",
            x: [batch, 32, half, half],
            cout: 64,
            input_grad: true,
        },
        Conv {
            name: "conv3+relu",
            x: [batch, 64, half, half],
            cout: 128,
            input_grad: true,
        },
    ];
    let pools = [
        ("maxpool1", [batch, 32, size, size]),
        ("maxpool2", [batch, 128, half, half]),
    ];

    println!(
        "{dataset} batch {batch}, {} rayon threads; median ms and GFLOP/s, fast | stock, speed-up",
        rayon::current_num_threads()
    );
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut totals = [(0.0, 0.0); 2];
    let mut total_flops = 0.0;
    for c in &convs {
        let x_data = uniform(&mut rng, &c.x)?;
        // A variable input makes the backward pass compute its gradient.
        let x = if c.input_grad {
            Var::from_tensor(&x_data)?.as_tensor().clone()
        } else {
            x_data
        };
        let w_dims = [c.cout, c.x[1], 3, 3];
        let w = Var::from_tensor(&(uniform(&mut rng, &w_dims)? * 0.1)?)?;
        let b = Var::from_tensor(&uniform(&mut rng, &[c.cout])?)?;
        let mut times = [(0.0, 0.0); 2];
        for (i, kernels) in [Kernels::Fast, Kernels::Stock].into_iter().enumerate() {
            times[i] = time_op(&x, |x| {
                conv2d_relu_with(kernels, x, &w, Some(&b), 1, c.input_grad)
            })?;
            totals[i].0 += times[i].0;
            totals[i].1 += times[i].1;
        }
        let f = conv2d_flops(c.x, w_dims, 1);
        let bwd_flops = if c.input_grad { 2.0 * f } else { f };
        total_flops += f + bwd_flops;
        row(c.name, times[0], times[1], Some((f, bwd_flops)));
    }
    let (fast, stock) = (totals[0].0 + totals[0].1, totals[1].0 + totals[1].1);
    println!(
        "{:<22} fwd+bwd {fast:9.2} {:6.1} | {stock:9.2} {:6.1}  x{:4.1}",
        "three convs",
        total_flops / (fast * 1e6),
        total_flops / (stock * 1e6),
        stock / fast,
    );
    for (name, dims) in pools {
        let x = Var::from_tensor(&uniform(&mut rng, &dims)?)?;
        let fast = time_op(&x, |x| max_pool2x2_with(Kernels::Fast, x))?;
        let stock = time_op(&x, |x| max_pool2x2_with(Kernels::Stock, x))?;
        row(name, fast, stock, None);
    }
    // For reference: candle's own `max_pool2d`, whose gradient is wrong.
    let x = Var::from_tensor(&uniform(&mut rng, &pools[0].1)?)?;
    let candle = time_op(&x, |x| x.max_pool2d(2))?;
    let fast = time_op(&x, |x| max_pool2x2_with(Kernels::Fast, x))?;
    row("maxpool1 vs max_pool2d", fast, candle, None);
    Ok(())
}
