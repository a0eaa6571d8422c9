//! Fixed-step ODE integration on the uniform grid `t_k = k / steps` of `[0, 1]`,
//! shared by the NoProp-CT probability-flow sampler and the NoProp-FM sampler.

use candle_core::Tensor;

use crate::error::{CoreError, Result};

/// The fixed-step solver used to integrate `dz/dt = f(z, t)` from `t = 0` to `t = 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum OdeSolver {
    /// Forward Euler, `z += h f(z, t)`: one evaluation per step, error `O(h)`.
    #[default]
    Euler,
    /// Heun's method (explicit trapezoid): an Euler predictor, then
    /// `z += h/2 (f(z, t) + f(z_pred, t + h))`. Two evaluations per step, error `O(h^2)`.
    Heun,
}

/// Checks a step count: at least one step.
pub(crate) fn check_steps(steps: usize) -> Result<()> {
    if steps == 0 {
        return Err(CoreError::BadArgument {
            name: "steps",
            value: 0.0,
            reason: "at least one step is needed",
        });
    }
    Ok(())
}

/// The grid `t_k = k / steps`, `k = 0..=steps`, with the division done in f64.
pub(crate) fn grid(steps: usize) -> Vec<f64> {
    (0..=steps).map(|k| k as f64 / steps as f64).collect()
}

/// Integrates `dz/dt = f(z, k)` over the grid, where `k` indexes [`grid`]
/// (`t = k / steps`), and returns `z` at `t = 1`.
pub(crate) fn integrate<F>(
    mut z: Tensor,
    steps: usize,
    solver: OdeSolver,
    mut f: F,
) -> Result<Tensor>
where
    F: FnMut(&Tensor, usize) -> Result<Tensor>,
{
    check_steps(steps)?;
    let h = 1.0 / steps as f64;
    for k in 0..steps {
        let k1 = f(&z, k)?;
        z = match solver {
            OdeSolver::Euler => (&z + (k1 * h)?)?,
            OdeSolver::Heun => {
                let pred = (&z + (&k1 * h)?)?;
                let k2 = f(&pred, k + 1)?;
                (&z + ((k1 + k2)? * (0.5 * h))?)?
            }
        }
        // No autograd graph across steps (see `sample_ct_eq3`).
        .detach();
    }
    Ok(z)
}
