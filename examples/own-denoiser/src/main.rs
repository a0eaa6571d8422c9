//! Trains NoProp-DT, NoProp-CT and NoProp-FM on 2-D Gaussian blobs with a
//! hand-written MLP and Adam, using noprop-core alone, and prints the test
//! accuracy of each. `cargo run -p noprop-core-example [steps] [seed]`.

use std::process::ExitCode;
use std::time::Instant;

use noprop_core_example::{train_ct, train_dt, train_fm, Config};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut cfg = Config::default();
    let mut args = std::env::args().skip(1);
    if let Some(steps) = args.next() {
        cfg.steps = steps.parse().map_err(|e| format!("steps {steps:?}: {e}"))?;
    }
    if let Some(seed) = args.next() {
        cfg.seed = seed.parse().map_err(|e| format!("seed {seed:?}: {e}"))?;
    }
    println!(
        "{} classes (chance {:.0}%), {} minibatches of {}, seed {}",
        cfg.classes,
        100.0 / cfg.classes as f64,
        cfg.steps,
        cfg.batch,
        cfg.seed
    );

    let start = Instant::now();
    let dt = train_dt(&cfg, 5)?;
    println!(
        "NoProp-DT (T = 5): test accuracy {:.1}% stochastic, {:.1}% deterministic ({:.1} s)",
        100.0 * dt.stochastic,
        100.0 * dt.deterministic,
        start.elapsed().as_secs_f64()
    );

    let start = Instant::now();
    let ct = train_ct(&cfg)?;
    println!(
        "NoProp-CT: test accuracy {:.1}% (eq. 3, 100 steps), {:.1}% (ODE, 20 Heun steps) ({:.1} s)",
        100.0 * ct.eq3,
        100.0 * ct.ode,
        start.elapsed().as_secs_f64()
    );

    let start = Instant::now();
    let fm = train_fm(&cfg)?;
    println!(
        "NoProp-FM: test accuracy {:.1}% (20 Euler steps) ({:.1} s)",
        100.0 * fm,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
