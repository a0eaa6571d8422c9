//! The mathematics of NoProp (Li, Teh, Pascanu, 2025), independent of any network.
//!
//! NoProp trains each block of a network on its own to denoise a noisy label
//! embedding; at inference the blocks run in turn from pure noise `z_0` to the
//! (nearly) clean `z_T` with the update of eq. 3. This crate holds what any
//! implementation needs and nothing that ties it to ours: noise schedules and
//! their coefficients, q-sampling, the loss terms, the sampler, a seeded host
//! random stream, and the [`Denoiser`] trait that a user's own network
//! implements.
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

mod error;
pub mod loss;
mod rng;
mod sample;
mod schedule;

pub use error::{CoreError, Result, ScheduleError};
pub use loss::{cross_entropy, denoise_loss, dt_loss, kl_prior, log_softmax, DtLoss};
pub use rng::{sub_seed, NoiseRng};
pub use sample::{dt_step, q_sample, q_sample_with, sample_dt, Denoiser, Inference};
pub use schedule::{DiscreteSchedule, Eq3Coefficients, ScheduleSpec};
