//! Neural ODEs `dz/dt = f(z, t)` on `t` in `[0, 1]`, integrated with Euler
//! steps, and their gradients by the adjoint sensitivity method (Chen et al.
//! 2018), the baseline that NoProp-CT and NoProp-FM are compared against.
//!
//! The adjoint method never keeps the forward trajectory. Starting from
//! `z(1)` and `a(1) = dL/dz(1)`, it solves the augmented system
//!
//! ```text
//! dz/dt = f(z, t),   da/dt = -a^T df/dz,   dg/dt = -a^T df/dtheta
//! ```
//!
//! backward from `t = 1` to `t = 0` with the same number of Euler steps,
//! reconstructing `z` as it goes; each step costs one evaluation of `f` and
//! one vector-Jacobian product, and memory stays that of a single step. The
//! gradients agree with back-propagation through the discretised forward
//! solver up to the solver's error, `O(1 / steps)`.

use candle_core::{Tensor, Var};

use crate::ode::check_steps;
use crate::Result;

/// `z(1)` from `z(0)` by `steps` Euler steps `z += f(z, t_k) / steps` at
/// `t_k = k / steps`, `k = 0..steps`. No autograd graph is kept between steps.
/// `steps = 0` is a [`CoreError::BadArgument`](crate::CoreError::BadArgument).
pub fn odeint_euler<F>(mut f: F, z0: &Tensor, steps: usize) -> Result<Tensor>
where
    F: FnMut(&Tensor, f64) -> candle_core::Result<Tensor>,
{
    check_steps(steps)?;
    let h = 1.0 / steps as f64;
    let mut z = z0.detach();
    for k in 0..steps {
        let dz = f(&z, k as f64 * h)?;
        z = (z + (dz * h)?)?.detach();
    }
    Ok(z)
}

/// What [`adjoint_euler`] returns.
#[derive(Debug, Clone)]
pub struct AdjointGradients {
    /// `dL/dz(0)`.
    pub z0: Tensor,
    /// The reconstructed `z(0)` (it drifts from the true one by the solver's error).
    pub z0_reconstructed: Tensor,
    /// `dL/dp` for each of the `params` passed in, in that order; `None` for a
    /// parameter that `f` does not depend on.
    pub params: Vec<Option<Tensor>>,
}

/// Gradients of a loss `L(z(1))` with respect to `z(0)` and to `params` by
/// the adjoint method, from `z1 = z(1)` and `dl_dz1 = dL/dz(1)`.
///
/// `f(z, t)` must build its result from `z` and from the tensors in `params`
/// (variables, or tensors standing for inputs that the caller will
/// back-propagate further, such as image features shared by all `t`) so that
/// autograd reaches them; it is called once per step with `z` as a fresh
/// variable. Steps are Euler steps backward in time from `t_k = k / steps`
/// to `t_{k-1}`, `k = steps..1`, each evaluating `f` at `t_{k-1}` as the
/// matching step of [`odeint_euler`] did. `steps = 0` is a
/// [`CoreError::BadArgument`](crate::CoreError::BadArgument).
pub fn adjoint_euler<F>(
    mut f: F,
    z1: &Tensor,
    dl_dz1: &Tensor,
    params: &[&Tensor],
    steps: usize,
) -> Result<AdjointGradients>
where
    F: FnMut(&Tensor, f64) -> candle_core::Result<Tensor>,
{
    check_steps(steps)?;
    let h = 1.0 / steps as f64;
    let mut z = z1.detach();
    let mut a = dl_dz1.detach();
    let mut acc: Vec<Option<Tensor>> = vec![None; params.len()];
    for k in (1..=steps).rev() {
        let zv = Var::from_tensor(&z)?;
        // The step from t_k back to t_{k-1} samples f at t_{k-1}, the time the
        // forward step from t_{k-1} used: with a fast-varying time embedding,
        // sampling at t_k instead would add an error of order h * |df/dt|.
        let fz = f(zv.as_tensor(), (k - 1) as f64 * h)?;
        // One vector-Jacobian product gives a^T df/dz and a^T df/dp at once.
        let grads = fz.mul(&a)?.sum_all()?.backward()?;
        for (slot, p) in acc.iter_mut().zip(params) {
            if let Some(g) = grads.get(p) {
                let g = (g * h)?;
                *slot = Some(match slot.take() {
                    Some(s) => (s + g)?,
                    None => g,
                });
            }
        }
        if let Some(gz) = grads.get(zv.as_tensor()) {
            a = (a + (gz * h)?)?.detach();
        }
        z = (z - (fz.detach() * h)?)?;
    }
    Ok(AdjointGradients {
        z0: a,
        z0_reconstructed: z,
        params: acc,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// f(z, t) = tanh(z W + t c) on a tiny problem, in f64.
    fn problem() -> (Var, Var, Tensor) {
        let dev = Device::Cpu;
        let w = Var::from_tensor(
            &Tensor::new(
                &[[0.3f64, -0.8, 0.1], [0.5, 0.2, -0.4], [-0.6, 0.7, 0.9]],
                &dev,
            )
            .unwrap(),
        )
        .unwrap();
        let c = Var::from_tensor(&Tensor::new(&[0.2f64, -0.3, 0.5], &dev).unwrap()).unwrap();
        let z0 = Tensor::new(&[[1.0f64, -0.5, 0.25], [0.1, 0.2, -0.3]], &dev).unwrap();
        (w, c, z0)
    }

    fn f(z: &Tensor, t: f64, w: &Tensor, c: &Tensor) -> candle_core::Result<Tensor> {
        z.matmul(w)?.broadcast_add(&(c * t)?)?.tanh()
    }

    /// L = sum(z(1)^2) / 2, so dL/dz(1) = z(1).
    fn backprop_reference(w: &Var, c: &Var, z0: &Tensor, steps: usize) -> (Tensor, Tensor, Tensor) {
        let h = 1.0 / steps as f64;
        let zv = Var::from_tensor(z0).unwrap();
        let mut z = zv.as_tensor().clone();
        for k in 0..steps {
            z = (&z + (f(&z, k as f64 * h, w.as_tensor(), c.as_tensor()).unwrap() * h).unwrap())
                .unwrap();
        }
        let g = (z.sqr().unwrap().sum_all().unwrap() * 0.5)
            .unwrap()
            .backward()
            .unwrap();
        (
            g.get(w.as_tensor()).unwrap().clone(),
            g.get(c.as_tensor()).unwrap().clone(),
            g.get(zv.as_tensor()).unwrap().clone(),
        )
    }

    fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
        let num = (a - b)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
            .sqrt();
        let den = b
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
            .sqrt();
        num / den
    }

    fn adjoint(w: &Var, c: &Var, z0: &Tensor, steps: usize) -> AdjointGradients {
        let z1 = odeint_euler(|z, t| f(z, t, w.as_tensor(), c.as_tensor()), z0, steps).unwrap();
        adjoint_euler(
            |z, t| f(z, t, w.as_tensor(), c.as_tensor()),
            &z1,
            &z1,
            &[w.as_tensor(), c.as_tensor()],
            steps,
        )
        .unwrap()
    }

    #[test]
    fn adjoint_gradients_converge_to_backprop_through_the_solver() {
        let (w, c, z0) = problem();
        let mut errs = Vec::new();
        for steps in [25, 100, 400] {
            let (gw, gc, gz) = backprop_reference(&w, &c, &z0, steps);
            let adj = adjoint(&w, &c, &z0, steps);
            let e = [
                rel_err(adj.params[0].as_ref().unwrap(), &gw),
                rel_err(adj.params[1].as_ref().unwrap(), &gc),
                rel_err(&adj.z0, &gz),
                rel_err(&adj.z0_reconstructed, &z0),
            ];
            errs.push(e.iter().cloned().fold(0.0, f64::max));
        }
        eprintln!("relative errors at 25, 100, 400 steps: {errs:?}");
        // First-order agreement: four times the steps, about a quarter of the gap.
        assert!(errs[2] < 1e-2, "errors {errs:?}");
        assert!(
            errs[1] < errs[0] / 3.0 && errs[2] < errs[1] / 3.0,
            "errors {errs:?}"
        );
    }

    #[test]
    fn parameters_outside_f_get_no_gradient() {
        let (w, c, z0) = problem();
        let other = Var::zeros(3, DType::F64, &Device::Cpu).unwrap();
        let z1 = odeint_euler(|z, t| f(z, t, w.as_tensor(), c.as_tensor()), &z0, 10).unwrap();
        let g = adjoint_euler(
            |z, t| f(z, t, w.as_tensor(), c.as_tensor()),
            &z1,
            &z1,
            &[other.as_tensor(), w.as_tensor()],
            10,
        )
        .unwrap();
        assert!(g.params[0].is_none() && g.params[1].is_some());
    }
}
