//! # Train your own network
//!
//! This page shows how to train and sample a network of your own with
//! NoProp-DT, NoProp-CT and NoProp-FM using nothing but this crate and
//! candle-core. Every snippet below is a doctest that runs. A complete
//! program (synthetic data, a small MLP written with candle [`Var`]s, a
//! hand-written Adam, training and sampling of all three variants with the
//! accuracy printed) is the `noprop-core-example` crate in
//! `examples/own-denoiser/` of the repository: `cargo run -p
//! noprop-core-example`.
//!
//! The crate computes the method's mathematics; your code owns the network,
//! its parameters, the optimiser and the loop over the data.
//!
//! ## Dependencies
//!
//! Use the candle-core that this crate uses (see [the crate
//! docs](crate#candle)): either `candle-core = "0.11.1"` in your
//! `Cargo.toml`, or `use noprop_core::candle_core;`, as the snippets here do.
//!
//! ## NoProp-DT in one paragraph
//!
//! `z_0` is pure noise and `z_T` the (nearly) clean embedding `u_y` of the
//! label `y` (a row of your embedding matrix `W_embed`, `[m, d]`). Block `t`
//! (numbered `1..=T`) is trained *on its own* to map a noisy `z_{t-1}` and
//! the input `x` to an estimate `uhat_t` of `u_y`. Its training input
//! `z_{t-1}` is **not** the previous block's output: it is drawn from the
//! noising process, `z_{t-1} ~ q(z_{t-1}|y) = N(sqrt(abar_{t-1}) u_y,
//! (1 - abar_{t-1}) I)`, with `abar_{t-1} = sched.alpha_bar(t - 1)?`. Its
//! loss `L_t` (eq. 8) has three terms:
//!
//! - cross-entropy of your output head `f_out` on `z_T ~ q(z_T|y)`, drawn
//!   with `sched.alpha_bar(T)?`;
//! - the KL term `KL(q(z_0|y) || N(0, I))`, which needs `abar_0 =
//!   sched.alpha_bar(0)?`;
//! - the denoising term `||uhat_t - u_y||^2` weighted by
//!   `sched.dt_weight(t, eta)? = T eta / 2 (SNR(t) - SNR(t-1))` (`eta = 0.1`
//!   in the paper).
//!
//! [`dt_loss`](crate::dt_loss) adds them up. Gradients reach block `t`'s
//! parameters, the head and (if you learn it) `W_embed`, never another
//! block. Algorithm 1 loops `for epoch { for t in 1..=T { for minibatch {
//! step of block t } } }`; keep optimiser state per block. At inference
//! ([`sample_dt`](crate::sample_dt)) the blocks run in turn from
//! `z_0 ~ N(0, I)` with the eq. 3 update, and the class is
//! `argmax f_out(z_T)`.
//!
//! ## One NoProp-DT training step, and sampling
//!
//! ```
//! use noprop_core::candle_core::{self, DType, Device, Tensor, Var};
//! use noprop_core::{
//!     dt_loss, log_softmax, q_sample, sample_dt, CoreError, Denoiser, DiscreteSchedule, Inference,
//!     NoiseRng,
//! };
//!
//! /// `T` independent blocks. Block `t` is a linear layer on `[z_{t-1}, x]`
//! /// whose softmax weights the class embeddings (spec section 5's output).
//! struct Blocks {
//!     weights: Vec<Var>, // weights[t - 1] belongs to block t, [d + k, m]
//!     w_embed: Tensor,   // [m, d]
//!     d: usize,
//! }
//!
//! impl Denoiser for Blocks {
//!     fn blocks(&self) -> usize {
//!         self.weights.len()
//!     }
//!     fn latent_dim(&self) -> usize {
//!         self.d
//!     }
//!     fn denoise(&self, t: usize, z: &Tensor, x: &Tensor) -> candle_core::Result<Tensor> {
//!         // `?` turns a noprop_core::CoreError into a candle_core::Error.
//!         let w = t
//!             .checked_sub(1)
//!             .and_then(|i| self.weights.get(i))
//!             .ok_or(CoreError::BlockOutOfRange { t, blocks: self.blocks() })?;
//!         let logits = Tensor::cat(&[z, x], 1)?.matmul(w.as_tensor())?;
//!         let probs = log_softmax(&logits)?.exp()?; // a noprop_core::Result, also `?`
//!         probs.matmul(&self.w_embed)
//!     }
//! }
//!
//! let dev = Device::Cpu;
//! let (t_max, m, k, b) = (4, 3, 2, 6); // blocks, classes, input features, batch
//! let d = m; // one-hot embeddings
//! let sched = DiscreteSchedule::cosine(t_max, 0.008, 1.0 - 1e-4)?;
//! let mut rng = NoiseRng::new(0); // one seeded stream for init and noise, for brevity
//! let w_embed = Tensor::eye(m, DType::F32, &dev)?;
//! let mut weights = Vec::new();
//! for _ in 0..t_max {
//!     weights.push(Var::from_tensor(&(rng.randn(&[d + k, m], DType::F32, &dev)? * 0.1)?)?);
//! }
//! let net = Blocks { weights, w_embed: w_embed.clone(), d };
//! let head = Var::from_tensor(&(rng.randn(&[d, m], DType::F32, &dev)? * 0.1)?)?; // f_out
//! let eta = 0.1;
//!
//! // A minibatch: inputs [B, k] and labels [B].
//! let x = rng.randn(&[b, k], DType::F32, &dev)?;
//! let y = Tensor::new(&[0u32, 1, 2, 0, 1, 2], &dev)?;
//!
//! // One training step of block t.
//! let t = 2;
//! let u = w_embed.index_select(&y, 0)?; // u_y, [B, d]
//! let z_prev = q_sample(&u, sched.alpha_bar(t - 1)?, &mut rng)?; // z_{t-1} ~ q(z_{t-1}|y)
//! let uhat = net.denoise(t, &z_prev, &x)?; // uhat_t(z_{t-1}, x)
//! let z_last = q_sample(&u, sched.alpha_bar(sched.blocks())?, &mut rng)?; // z_T ~ q(z_T|y)
//! let logits = z_last.matmul(head.as_tensor())?; // f_out(z_T)
//! let abar0 = sched.alpha_bar(0)?; // for the KL term
//! let weight = sched.dt_weight(t, eta)?; // T eta / 2 (SNR(t) - SNR(t-1))
//! let loss = dt_loss(&logits, &y, &uhat, &u, abar0, weight)?;
//! let grads = loss.total.backward()?;
//!
//! // Block t and the head get gradients; no other block does.
//! assert!(grads.get(net.weights[t - 1].as_tensor()).is_some());
//! assert!(grads.get(head.as_tensor()).is_some());
//! assert!(grads.get(net.weights[0].as_tensor()).is_none());
//!
//! // Plain SGD; use Adam or AdamW with state per block in practice.
//! for var in [&net.weights[t - 1], &head] {
//!     if let Some(g) = grads.get(var.as_tensor()) {
//!         var.set(&(var.as_tensor() - (g * 0.1)?)?)?;
//!     }
//! }
//!
//! // Inference: z_0 ~ N(0, I), then block t = 1..=T with eq. 3; classify z_T.
//! let z_t = sample_dt(&net, &sched, &x, Inference::Stochastic, &mut rng)?;
//! let predicted = z_t.matmul(head.as_tensor())?.argmax(1)?; // [B], u32
//! assert_eq!(predicted.dims(), &[b]);
//! # Ok::<(), CoreError>(())
//! ```
//!
//! Errors from candle convert into [`CoreError`](crate::CoreError), so a
//! function returning `noprop_core::Result` can use `?` on both.
//!
//! ## NoProp-CT
//!
//! One network `uhat(z, x, t)` serves every `t` in `[0, 1]`
//! ([`ContinuousDenoiser`](crate::ContinuousDenoiser)); the schedule is a
//! [`ContinuousSchedule`](crate::ContinuousSchedule), fixed
//! ([`FixedLinearGamma`](crate::FixedLinearGamma)) or learnable
//! ([`LearnableSchedule`](crate::LearnableSchedule), whose
//! [`vars`](crate::LearnableSchedule::vars) you add to your optimiser). Each
//! row gets its own `t_i ~ U(0, 1)` and `z_i ~ q(z_{t_i}|y_i)`; the
//! denoising weight is `SNR'(t_i)` and the KL term needs `abar(0)`, both as
//! tensors so that a learnable schedule receives gradients (eq. 9).
//!
//! ```
//! use noprop_core::candle_core::{self, DType, Device, Tensor, Var};
//! use noprop_core::{
//!     ct_loss, log_softmax, q_sample_ct, sample_ct_eq3, sample_ct_ode, sample_t, ContinuousDenoiser,
//!     ContinuousSchedule, CoreError, FixedLinearGamma, Inference, NoiseRng, OdeSolver,
//! };
//!
//! /// One linear layer on `[z, x, t]`, softmax-weighting the class embeddings.
//! struct Net {
//!     w: Var, // [d + k + 1, m]
//!     w_embed: Tensor,
//!     d: usize,
//! }
//!
//! impl ContinuousDenoiser for Net {
//!     fn latent_dim(&self) -> usize {
//!         self.d
//!     }
//!     fn denoise(&self, z: &Tensor, x: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
//!         let input = Tensor::cat(&[z, x, &t.unsqueeze(1)?], 1)?;
//!         let probs = log_softmax(&input.matmul(self.w.as_tensor())?)?.exp()?;
//!         probs.matmul(&self.w_embed)
//!     }
//! }
//!
//! let dev = Device::Cpu;
//! let (m, k, b) = (3, 2, 6);
//! let d = m;
//! let mut rng = NoiseRng::new(0);
//! let w_embed = Tensor::eye(m, DType::F32, &dev)?;
//! let net = Net {
//!     w: Var::from_tensor(&(rng.randn(&[d + k + 1, m], DType::F32, &dev)? * 0.1)?)?,
//!     w_embed: w_embed.clone(),
//!     d,
//! };
//! let head = Var::from_tensor(&(rng.randn(&[d, m], DType::F32, &dev)? * 0.1)?)?;
//! let sched = FixedLinearGamma::new(-4.0, 4.0)?; // gamma(1) = -4 (clean), gamma(0) = 4 (noisy)
//! let x = rng.randn(&[b, k], DType::F32, &dev)?;
//! let y = Tensor::new(&[0u32, 1, 2, 0, 1, 2], &dev)?;
//!
//! // One training step.
//! let u = w_embed.index_select(&y, 0)?;
//! let t = sample_t(b, DType::F32, &dev, &mut rng)?; // t_i ~ U(0, 1), [B]
//! let z_t = q_sample_ct(&sched, &u, &t, &mut rng)?; // z_i ~ q(z_{t_i}|y_i)
//! let uhat = net.denoise(&z_t, &x, &t)?;
//! let z_1 = q_sample_ct(&sched, &u, &Tensor::ones(b, DType::F32, &dev)?, &mut rng)?; // z_1 ~ q(z_1|y)
//! let logits = z_1.matmul(head.as_tensor())?;
//! let snr_prime = sched.snr_derivative(&t)?; // SNR'(t_i) >= 0, [B]
//! let abar0 = sched.alpha_bar(&Tensor::zeros(1, DType::F32, &dev)?)?; // abar(0), [1]
//! let loss = ct_loss(&logits, &y, &uhat, &u, &snr_prime, &abar0, 1.0)?; // eta = 1
//! let grads = loss.total.backward()?;
//! for var in [&net.w, &head] {
//!     if let Some(g) = grads.get(var.as_tensor()) {
//!         var.set(&(var.as_tensor() - (g * 0.01)?)?)?;
//!     }
//! }
//!
//! // Inference: eq. 3 on a grid of `steps` points (the paper's: 1000), or the
//! // probability-flow ODE with fewer steps; classify z_1 with the head.
//! let z1 = sample_ct_eq3(&net, &sched, &x, 100, Inference::Stochastic, &mut rng)?;
//! let z1_ode = sample_ct_ode(&net, &sched, &x, 20, OdeSolver::Heun, &mut rng)?;
//! let predicted = z1.matmul(head.as_tensor())?.argmax(1)?;
//! assert_eq!(predicted.dims(), &[b]);
//! assert_eq!(z1_ode.dims(), &[b, d]);
//! # Ok::<(), CoreError>(())
//! ```
//!
//! ## NoProp-FM
//!
//! The network is a velocity field `v(z, x, t)`
//! ([`VelocityField`](crate::VelocityField)) trained to match `z_1 - z_0`
//! on the straight path from noise `z_0 ~ N(0, I)` to `z_1 = u_y` (eq. 10-11).
//! With a learnable `W_embed`, add the anchor term of eq. 12:
//! [`cross_entropy`](crate::cross_entropy) of the head on
//! [`fm_extrapolate`](crate::fm_extrapolate)`(z_t, v, t)`. Inference
//! integrates `dz/dt = v` and takes the nearest embedding.
//!
//! ```
//! use noprop_core::candle_core::{self, DType, Device, Tensor, Var};
//! use noprop_core::{
//!     fm_interpolate, fm_loss, nearest_embedding, sample_fm, sample_t, CoreError, NoiseRng, OdeSolver,
//!     VelocityField,
//! };
//!
//! /// One linear layer on `[z, x, t]` whose outputs weight the class
//! /// embeddings without a softmax (spec section 5's FM output).
//! struct Field {
//!     w: Var, // [d + k + 1, m]
//!     w_embed: Tensor,
//!     d: usize,
//! }
//!
//! impl VelocityField for Field {
//!     fn latent_dim(&self) -> usize {
//!         self.d
//!     }
//!     fn velocity(&self, z: &Tensor, x: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
//!         let input = Tensor::cat(&[z, x, &t.unsqueeze(1)?], 1)?;
//!         input.matmul(self.w.as_tensor())?.matmul(&self.w_embed)
//!     }
//! }
//!
//! let dev = Device::Cpu;
//! let (m, k, b) = (3, 2, 6);
//! let d = m;
//! let mut rng = NoiseRng::new(0);
//! let w_embed = Tensor::eye(m, DType::F32, &dev)?;
//! let field = Field {
//!     w: Var::from_tensor(&(rng.randn(&[d + k + 1, m], DType::F32, &dev)? * 0.1)?)?,
//!     w_embed: w_embed.clone(),
//!     d,
//! };
//! let x = rng.randn(&[b, k], DType::F32, &dev)?;
//! let y = Tensor::new(&[0u32, 1, 2, 0, 1, 2], &dev)?;
//!
//! // One training step.
//! let z1 = w_embed.index_select(&y, 0)?; // z_1 = u_y
//! let z0 = rng.randn(&[b, d], DType::F32, &dev)?; // z_0 ~ N(0, I)
//! let t = sample_t(b, DType::F32, &dev, &mut rng)?;
//! let z_t = fm_interpolate(&z0, &z1, &t, 0.0, &mut rng)?; // sigma = 0, the default
//! let v = field.velocity(&z_t, &x, &t)?;
//! let loss = fm_loss(&v, &z0, &z1)?;
//! let before = loss.to_scalar::<f32>()?;
//! let grads = loss.backward()?;
//! if let Some(g) = grads.get(field.w.as_tensor()) {
//!     field.w.set(&(field.w.as_tensor() - (g * 0.01)?)?)?;
//! }
//! // A small gradient step on the same batch lowers the loss.
//! let after = fm_loss(&field.velocity(&z_t, &x, &t)?, &z0, &z1)?.to_scalar::<f32>()?;
//! assert!(after < before);
//!
//! // Inference: Euler (or Heun) steps of dz/dt = v from t = 0 to 1 (the
//! // paper's: 1000 Euler steps), then the nearest class embedding.
//! let z1_hat = sample_fm(&field, &x, 50, OdeSolver::Euler, &mut rng)?;
//! let predicted = nearest_embedding(&z1_hat, &w_embed)?; // [B], u32
//! assert_eq!(predicted.dims(), &[b]);
//! # Ok::<(), CoreError>(())
//! ```
//!
//! ## Mistakes that are reported, not hidden
//!
//! - Indices are checked: `sched.alpha_bar(t)` needs `t` in `0..=T`,
//!   `sched.coefficients(t)` and `sched.dt_weight(t, eta)` need a block
//!   index in `1..=T`; anything else is an error, never a panic.
//! - A denoiser whose `blocks()` differs from the schedule's `T` is
//!   rejected by [`sample_dt`](crate::sample_dt) before any block runs.
//! - The samplers draw the latents in the input's dtype, so integer input
//!   (raw `u8` pixels) is an error: convert `x` to the float dtype your
//!   network computes in first.
//!
//! ```
//! use noprop_core::candle_core::{self, DType, Device, Tensor};
//! use noprop_core::{sample_dt, CoreError, Denoiser, DiscreteSchedule, Inference, NoiseRng};
//!
//! /// A stand-in network with 5 blocks that always predicts 0.
//! struct FiveBlocks;
//! impl Denoiser for FiveBlocks {
//!     fn blocks(&self) -> usize {
//!         5
//!     }
//!     fn latent_dim(&self) -> usize {
//!         3
//!     }
//!     fn denoise(&self, _t: usize, z: &Tensor, _x: &Tensor) -> candle_core::Result<Tensor> {
//!         z.zeros_like()
//!     }
//! }
//!
//! let mut rng = NoiseRng::new(0);
//! let x = Tensor::zeros((2, 4), DType::F32, &Device::Cpu)?;
//! let ten = DiscreteSchedule::cosine(10, 0.008, 1.0 - 1e-4)?;
//! let err = sample_dt(&FiveBlocks, &ten, &x, Inference::Stochastic, &mut rng).unwrap_err();
//! assert!(matches!(err, CoreError::BlockCountMismatch { denoiser: 5, schedule: 10 }));
//!
//! let five = DiscreteSchedule::cosine(5, 0.008, 1.0 - 1e-4)?;
//! let pixels = Tensor::zeros((2, 4), DType::U8, &Device::Cpu)?;
//! let err = sample_dt(&FiveBlocks, &five, &pixels, Inference::Stochastic, &mut rng).unwrap_err();
//! assert!(matches!(err, CoreError::NotFloat { .. }));
//! let z = sample_dt(&FiveBlocks, &five, &pixels.to_dtype(DType::F32)?, Inference::Stochastic, &mut rng)?;
//! assert_eq!(z.dims(), &[2, 3]);
//!
//! assert!(matches!(ten.dt_weight(0, 0.1), Err(CoreError::BlockOutOfRange { t: 0, blocks: 10 })));
//! assert!(matches!(ten.alpha_bar(11), Err(CoreError::TimeOutOfRange { t: 11, blocks: 10 })));
//! # Ok::<(), CoreError>(())
//! ```
//!
//! [`Var`]: candle_core::Var
