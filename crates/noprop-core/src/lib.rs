//! The mathematics of NoProp (Li, Teh, Pascanu, 2025), independent of any network.
//!
//! NoProp trains each block of a network on its own to denoise a noisy label
//! embedding; at inference the blocks run in turn from pure noise `z_0` to the
//! (nearly) clean `z_T` with the update of eq. 3. This crate holds what any
//! implementation needs and nothing that ties it to ours: noise schedules and
//! their coefficients, q-sampling, the loss terms, the samplers, a seeded host
//! random stream, and the traits that a user's own network implements:
//! [`Denoiser`] for NoProp-DT, [`ContinuousDenoiser`] for NoProp-CT (with a
//! fixed or learnable [`ContinuousSchedule`]) and [`VelocityField`] for
//! NoProp-FM.
//!
//! It does no I/O, parses no arguments and installs no logger.
//!
//! ```
//! use noprop_core::{DiscreteSchedule, NoiseRng, q_sample};
//! use candle_core::{Device, Tensor};
//!
//! let sched = DiscreteSchedule::cosine(10, 0.008, 1.0 - 1e-4)?;
//! assert!(sched.alpha_bar(0) < 1e-6 && sched.alpha_bar(10) > 0.999);
//! let u = Tensor::eye(10, candle_core::DType::F32, &Device::Cpu)?; // one-hot embeddings
//! let mut rng = NoiseRng::new(0);
//! let z = q_sample(&u, sched.alpha_bar(5), &mut rng)?;
//! assert_eq!(z.dims(), &[10, 10]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod adjoint;
mod class_probs;
mod continuous;
mod ct;
mod error;
mod fm;
pub mod loss;
mod ode;
mod rng;
mod sample;
mod schedule;

pub use adjoint::{adjoint_euler, odeint_euler, AdjointGradients};
pub use class_probs::{radial_log_probs, ClassProbability};
pub use continuous::{ContinuousSchedule, FixedLinearGamma, LearnableSchedule, LearnableScheduleConfig};
pub use ct::{
    ct_denoise_loss, ct_loss, kl_prior_tensor, q_sample_ct, q_sample_ct_with, sample_ct_eq3, sample_ct_ode, sample_t,
    ContinuousDenoiser, CtLoss,
};
pub use error::{CoreError, Result, ScheduleError};
pub use fm::{
    fm_extrapolate, fm_interpolate, fm_interpolate_with, fm_loss, fm_target, nearest_embedding, sample_fm,
    VelocityField,
};
pub use loss::{cross_entropy, denoise_loss, dt_loss, kl_prior, log_softmax, DtLoss};
pub use ode::OdeSolver;
pub use rng::{sub_seed, NoiseRng};
pub use sample::{dt_step, eq3_update, q_sample, q_sample_with, sample_dt, Denoiser, Inference};
pub use schedule::{coefficients_between, DiscreteSchedule, Eq3Coefficients, ScheduleSpec};
