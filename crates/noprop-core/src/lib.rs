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
//! It does no I/O, parses no arguments and installs no logger. It holds no
//! network parameters and has no optimiser: your network and its update are
//! yours. The one exception is [`LearnableSchedule`], the paper's learnable
//! CT noise schedule, whose parameters are candle [`Var`](candle_core::Var)s
//! that it hands to your optimiser through [`LearnableSchedule::vars`].
//!
//! **To train your own network, read the [`guide`]**: one NoProp-DT training
//! step (which latent goes into block `t`, and where `abar_0` and the loss
//! weight come from), the NoProp-CT and NoProp-FM equivalents, and sampling.
//! A complete program that trains and samples all three on synthetic data
//! with a hand-written network and optimiser is the `noprop-core-example`
//! crate in `examples/own-denoiser/` of the repository.
//!
//! # candle
//!
//! Tensors in this API are [`candle_core::Tensor`]s, so your crate must use
//! the *same* candle-core as this one (0.11.x); a second, different version
//! would give types with the same names that do not fit. Either depend on
//! `candle-core = "0.11.1"` yourself, or use the copy re-exported here,
//! [`noprop_core::candle_core`](candle_core), which is always the right one:
//!
//! ```
//! use noprop_core::candle_core::{DType, Device, Tensor};
//! let x = Tensor::zeros((2, 3), DType::F32, &Device::Cpu)?;
//! # Ok::<(), noprop_core::candle_core::Error>(())
//! ```
//!
//! [`CoreError`] converts into `candle_core::Error` (and back), so `?` works
//! on this crate's functions inside a [`Denoiser::denoise`] that returns
//! `candle_core::Result`.
//!
//! # Cargo features
//!
//! - `serde` (off by default): derives `Serialize` and `Deserialize` for the
//!   configuration types [`ScheduleSpec`], [`ClassProbability`],
//!   [`LearnableScheduleConfig`], [`Inference`] and [`OdeSolver`], so they
//!   can be read from a config file. Enums use `snake_case` names (the
//!   structured ones are internally tagged, `kind = "cosine"`), unknown
//!   fields are rejected, and fields for which the paper or spec gives a
//!   default (the cosine schedule's `s` and `abar_max`, the radial `sigma`,
//!   every field of `LearnableScheduleConfig`) may be omitted. Enable it with
//!   `noprop-core = { version = "0.1", features = ["serde"] }`. Nothing else
//!   changes with it.
//!
//! # A first look
//!
//! ```
//! use noprop_core::candle_core::{DType, Device, Tensor};
//! use noprop_core::{q_sample, DiscreteSchedule, NoiseRng};
//!
//! let sched = DiscreteSchedule::cosine(10, 0.008, 1.0 - 1e-4)?;
//! assert!(sched.alpha_bar(0)? < 1e-6 && sched.alpha_bar(10)? > 0.999);
//! let u = Tensor::eye(10, DType::F32, &Device::Cpu)?; // one-hot embeddings
//! let mut rng = NoiseRng::new(0);
//! let z = q_sample(&u, sched.alpha_bar(5)?, &mut rng)?;
//! assert_eq!(z.dims(), &[10, 10]);
//! // Indices are checked: there is no block 11, and no panic either.
//! assert!(sched.coefficients(11).is_err());
//! # Ok::<(), noprop_core::CoreError>(())
//! ```

pub use candle_core;

mod adjoint;
mod class_probs;
mod continuous;
mod ct;
mod error;
mod fm;
pub mod guide;
pub mod loss;
mod ode;
mod rng;
mod sample;
mod schedule;
mod stream;

pub use adjoint::{adjoint_euler, odeint_euler, AdjointGradients};
pub use class_probs::{radial_log_probs, ClassProbability};
pub use continuous::{
    ContinuousSchedule, FixedLinearGamma, LearnableSchedule, LearnableScheduleConfig, SchedulePoint,
};
pub use ct::{
    ct_denoise_loss, ct_denoise_terms, ct_loss, kl_prior_tensor, q_sample_ct, q_sample_ct_at_gamma,
    q_sample_ct_with, sample_ct_eq3, sample_ct_ode, sample_t, sample_t_stratified,
    ContinuousDenoiser, CtLoss,
};
pub use error::{CoreError, Result, ScheduleError};
pub use fm::{
    fm_extrapolate, fm_interpolate, fm_interpolate_with, fm_loss, fm_target, nearest_embedding,
    sample_fm, VelocityField,
};
pub use loss::{cross_entropy, denoise_loss, dt_loss, kl_prior, log_softmax, DtLoss};
pub use ode::OdeSolver;
pub use rng::{sub_seed, NoiseRng};
pub use sample::{dt_step, eq3_update, q_sample, q_sample_with, sample_dt, Denoiser, Inference};
pub use schedule::{coefficients_between, DiscreteSchedule, Eq3Coefficients, ScheduleSpec};
pub use stream::Stream;
