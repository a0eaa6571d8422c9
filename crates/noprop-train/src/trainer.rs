//! The one training skeleton: configuration, device, clock, optimizers, the
//! epoch loop, evaluation and its tally, checkpoints and resume, around a
//! [`Method`] that supplies only its variables, its step and its prediction.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{Device, Tensor};
use noprop_core::{Inference, NoiseRng, Stream};
use noprop_data::Dataset;

use crate::checkpoint::{first_non_finite, load_safetensors, ModelRecord, OptimizerRecord};
use crate::collective::Collective;
use crate::config::{Config, InferenceChange, RawConfig};
use crate::data::DeviceData;
use crate::error::TrainError;
use crate::groups::Optimizers;
use crate::method::{DeterministicRun, Method};
use crate::observer::{EvalReport, Event, Observer, PassMetrics};

/// A method's model with its optimizers and training clock: everything a
/// checkpoint holds.
pub struct Trainer<M = Box<dyn Method>> {
    cfg: Config,
    device: Device,
    method: M,
    optims: Optimizers,
    epochs_done: usize,
    train_seconds: f64,
    /// The most device memory seen in use after a step since the last
    /// [`Trainer::take_peak_device_bytes`] (CUDA only).
    peak_device_bytes: Option<u64>,
    /// In a parallel run, the lanes this worker trains (`None`: all).
    owned: Option<Vec<usize>>,
    /// Bytes received from other workers since the last
    /// [`Trainer::take_received_bytes`].
    received_bytes: u64,
}

/// A model checkpoint and an optimizer checkpoint, in memory.
pub struct CheckpointData {
    /// The model's tensors.
    pub model: BTreeMap<String, Tensor>,
    /// What the model checkpoint's metadata says.
    pub record: ModelRecord,
    /// The optimizers' moments.
    pub optimizer: BTreeMap<String, Tensor>,
    /// What the optimizer checkpoint's metadata says.
    pub optimizer_record: OptimizerRecord,
}

/// A trainer for the configured method. `train` is the training set, used
/// to initialise prototype embeddings (pass `None` when weights will be loaded).
pub fn build_trainer(
    cfg: Config,
    device: Device,
    train: Option<&Dataset>,
) -> Result<Trainer, TrainError> {
    let method = cfg.method.build(&cfg.setup(), &device, train)?;
    Trainer::new(cfg, device, method)
}

/// A trainer restored from a model checkpoint file alone (weights and the
/// config in its metadata), for evaluation; optimizer state is not loaded.
pub fn load_for_eval(path: &Path, device: &Device) -> Result<Trainer, TrainError> {
    let (tensors, meta) = load_safetensors(path, device)?;
    let record = ModelRecord::from_metadata(path, &meta)?;
    let mut trainer = build_trainer(record.config.clone().validate()?, device.clone(), None)?;
    trainer.load_weights(&tensors, &record)?;
    Ok(trainer)
}

impl<M: Method> Trainer<M> {
    /// A trainer around `method`, whose model was built from `cfg`.
    pub fn new(cfg: Config, device: Device, method: M) -> Result<Self, TrainError> {
        let own_rate = cfg.model.embedding.lr().map(|lr| (method.embed(), lr));
        let optims = Optimizers::new(method.param_groups()?, &cfg.train, own_rate)?;
        Ok(Self {
            cfg,
            device,
            method,
            optims,
            epochs_done: 0,
            train_seconds: 0.0,
            peak_device_bytes: None,
            owned: None,
            received_bytes: 0,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }
    /// The device the model lives on.
    pub fn device(&self) -> &Device {
        &self.device
    }
    /// The method and its model.
    pub fn method(&self) -> &M {
        &self.method
    }
    /// Epochs completed so far.
    pub fn epochs_done(&self) -> usize {
        self.epochs_done
    }
    /// Seconds spent in training steps so far (across resumes).
    pub fn train_seconds(&self) -> f64 {
        self.train_seconds
    }

    /// The most device memory in use after any step since the last call
    /// (`memory::device_bytes_in_use`), and a fresh start of that count;
    /// `None` where the device's memory is not measured.
    pub fn take_peak_device_bytes(&mut self) -> Option<u64> {
        self.peak_device_bytes.take()
    }

    /// One update of lane `lane` (block `t` for NoProp-DT, 0 otherwise) on a
    /// minibatch; returns `[total, ce, kl, denoise]`.
    pub fn train_step(
        &mut self,
        lane: usize,
        x: &Tensor,
        y: &Tensor,
        noise: &mut NoiseRng,
        dropout: &mut NoiseRng,
    ) -> Result<[f64; 4], TrainError> {
        let mut step = self.method.gradients(lane, x, y, noise, dropout)?;
        self.sample_device_memory();
        self.optims.step(&mut step.grads, &step.groups)?;
        Ok(step.losses)
    }

    fn sample_device_memory(&mut self) {
        if let Some(used) = crate::memory::device_bytes_in_use(&self.device) {
            self.peak_device_bytes = Some(self.peak_device_bytes.map_or(used, |p| p.max(used)));
        }
    }

    /// Steps the shared group (0) once with the sum, in lane order, of
    /// every lane's gradient for it: `mine` holds this worker's lanes' (in
    /// `store`, one of their gradient stores), the others' arrive through
    /// `comm`. Every worker adds the same tensors in the same order.
    fn step_summed(
        &mut self,
        lanes: &[usize],
        mine: Vec<(usize, Vec<Option<Tensor>>)>,
        mut store: candle_core::backprop::GradStore,
        comm: Option<&dyn Collective>,
    ) -> Result<(), TrainError> {
        let vars = self.optims.group_vars(0);
        let mut by_lane: BTreeMap<usize, Vec<Option<Tensor>>> = BTreeMap::new();
        if let Some(comm) = comm {
            let mut tensors = BTreeMap::new();
            for (lane, grads) in &mine {
                for (i, g) in grads.iter().enumerate() {
                    if let Some(g) = g {
                        tensors.insert(format!("{lane}/{i}"), g.clone());
                    }
                }
            }
            let all =
                comm.all_gather(crate::checkpoint::to_bytes(&tensors, Default::default())?)?;
            self.received_bytes += all
                .iter()
                .enumerate()
                .filter(|&(r, _)| r != comm.rank())
                .map(|(_, b)| b.len() as u64)
                .sum::<u64>();
            for bytes in all {
                let (received, _) = crate::checkpoint::from_bytes(&bytes, &self.device)?;
                for (key, t) in received {
                    let (lane, i) = key
                        .split_once('/')
                        .and_then(|(l, i)| Some((l.parse().ok()?, i.parse::<usize>().ok()?)))
                        .filter(|&(_, i)| i < vars.len())
                        .ok_or_else(|| TrainError::Worker {
                            worker: comm.rank(),
                            reason: format!("received an unknown gradient {key:?}"),
                        })?;
                    by_lane
                        .entry(lane)
                        .or_insert_with(|| vec![None; vars.len()])[i] = Some(t);
                }
            }
        } else {
            by_lane.extend(mine);
        }
        let mut total: Vec<Option<Tensor>> = vec![None; vars.len()];
        for lane in lanes {
            for (acc, g) in total
                .iter_mut()
                .zip(by_lane.remove(lane).unwrap_or_default())
            {
                *acc = match (acc.take(), g) {
                    (Some(a), Some(g)) => Some((a + g)?),
                    (a, g) => a.or(g),
                };
            }
        }
        for (var, g) in vars.iter().zip(total) {
            match g {
                Some(g) => store.insert(var.as_tensor(), g),
                None => store.remove(var.as_tensor()),
            };
        }
        self.optims.step(&mut store, &[0])
    }

    /// Trains epoch `epochs_done() + 1`; returns one entry per lane (block).
    ///
    /// Each pass of the method's plan draws its minibatch order from the
    /// stream keyed by (epoch, pass key); each lane draws q-noise and
    /// dropout from its own (epoch, lane) streams, and steps on every
    /// minibatch of its pass. A pass with several lanes (NoProp-DT's fused
    /// order) reports a step event with the lanes' mean loss and gives each
    /// lane an equal share of the pass's time.
    pub fn train_epoch(
        &mut self,
        data: &DeviceData,
        observer: &mut dyn Observer,
    ) -> Result<Vec<PassMetrics>, TrainError> {
        self.train_epoch_on(data, observer, None)
    }

    /// [`Self::train_epoch`] as one worker of a parallel run: a pass whose
    /// lanes sum their shared gradients exchanges them through `comm`.
    pub fn train_epoch_on(
        &mut self,
        data: &DeviceData,
        observer: &mut dyn Observer,
        comm: Option<&dyn Collective>,
    ) -> Result<Vec<PassMetrics>, TrainError> {
        let epoch = self.epochs_done + 1;
        let (seed, batch) = (self.cfg.train.seed, self.cfg.train.batch_size);
        let mut out = Vec::new();
        for pass in self.method.epoch_plan()? {
            // In a parallel run, the lanes of this pass that this worker trains.
            let mine = pass.lanes.iter().filter(|&&l| self.owns(l)).count();
            if mine > 0 {
                observer.on_event(&Event::PassStart {
                    epoch,
                    block: pass.key,
                });
            }
            let start = Instant::now();
            let stream = noprop_data::pass_stream(epoch as u64, pass.key as u64);
            let batcher = noprop_data::Batcher::new(
                data.len(),
                batch,
                noprop_core::sub_seed(seed, &[Stream::Shuffle.id()]),
                stream,
            )?
            .min_batch_len(2);
            let mut rngs: Vec<(NoiseRng, NoiseRng)> = pass
                .lanes
                .iter()
                .map(|&l| {
                    (
                        NoiseRng::derived(seed, &[Stream::Noise.id(), epoch as u64, l as u64]),
                        NoiseRng::derived(seed, &[Stream::Dropout.id(), epoch as u64, l as u64]),
                    )
                })
                .collect();
            let mut sums = vec![[0.0f64; 4]; pass.lanes.len()];
            let mut count = 0usize;
            for idx in batcher.batches() {
                let (x, y) = data.batch(idx)?;
                let mut total = 0.0;
                let (mut shared, mut store) = (Vec::new(), None);
                for ((&lane, (noise, drop)), sum) in
                    pass.lanes.iter().zip(rngs.iter_mut()).zip(sums.iter_mut())
                {
                    if !self.owns(lane) {
                        if !pass.summed {
                            let mut step = self.method.shared_gradients(lane, &y, noise)?;
                            self.optims.step(&mut step.grads, &step.groups)?;
                        }
                        continue;
                    }
                    let l = if pass.summed {
                        // The block steps now; the shared group after every lane.
                        let mut step = self.method.gradients(lane, &x, &y, noise, drop)?;
                        self.sample_device_memory();
                        let own: Vec<usize> =
                            step.groups.iter().copied().filter(|&g| g != 0).collect();
                        self.optims.step(&mut step.grads, &own)?;
                        let grads = self
                            .optims
                            .group_vars(0)
                            .iter()
                            .map(|v| step.grads.get(v.as_tensor()).cloned())
                            .collect();
                        shared.push((lane, grads));
                        store.get_or_insert(step.grads);
                        step.losses
                    } else {
                        self.train_step(lane, &x, &y, noise, drop)?
                    };
                    if !l[0].is_finite() {
                        return Err(TrainError::Diverged {
                            epoch,
                            block: lane,
                            loss: l[0],
                        });
                    }
                    for (s, v) in sum.iter_mut().zip(l) {
                        *s += v;
                    }
                    total += l[0];
                }
                if let Some(store) = store {
                    self.step_summed(&pass.lanes, shared, store, comm)?;
                }
                count += 1;
                if mine > 0 {
                    observer.on_event(&Event::Step {
                        loss: if mine == 1 {
                            total
                        } else {
                            total / mine as f64
                        },
                    });
                }
            }
            if count == 0 {
                return Err(TrainError::NotEnoughData {
                    what: format!(
                        "{} training example(s) make no minibatch of at least 2",
                        data.len()
                    ),
                });
            }
            let seconds = start.elapsed().as_secs_f64();
            let n = count as f64;
            for (&lane, s) in pass.lanes.iter().zip(&sums) {
                if !self.owns(lane) {
                    continue;
                }
                let p = PassMetrics {
                    epoch,
                    block: lane,
                    loss: s[0] / n,
                    ce: s[1] / n,
                    kl: s[2] / n,
                    denoise: s[3] / n,
                    batches: count,
                    seconds: seconds / mine as f64,
                };
                observer.on_event(&Event::PassEnd(&p));
                out.push(p);
            }
        }
        self.train_seconds += out.iter().map(|p| p.seconds).sum::<f64>();
        self.epochs_done = epoch;
        Ok(out)
    }

    /// Accuracy (percent) over `data` of one inference run per entry of
    /// `modes`, all runs of a batch of images stacked into one pass of at
    /// most `eval.batch_size` rows.
    pub fn accuracy(
        &self,
        data: &DeviceData,
        modes: &[Inference],
        rng: &mut NoiseRng,
    ) -> Result<Vec<f64>, TrainError> {
        let predict = self.method.predictor()?;
        let runs = modes.len();
        let n = data.len();
        let mut correct = vec![0usize; runs];
        let per_batch = (self.cfg.eval.batch_size / runs.max(1)).max(1);
        let mut start = 0;
        while start < n {
            let b = per_batch.min(n - start);
            let pred = predict(&data.images().narrow(0, start, b)?, modes, rng)?;
            let labels = &data.labels_host()[start..start + b];
            for (r, c) in correct.iter_mut().enumerate() {
                *c += pred[r * b..(r + 1) * b]
                    .iter()
                    .zip(labels)
                    .filter(|(p, y)| p == y)
                    .count();
            }
            start += b;
        }
        Ok(correct
            .into_iter()
            .map(|c| 100.0 * c as f64 / n.max(1) as f64)
            .collect())
    }

    /// Test accuracy (mean and standard error over `eval.runs` stochastic
    /// runs, and a deterministic run where the sampler has noise and the
    /// config asks for it), and train accuracy on `train_subset` if given.
    /// Draws come from streams fixed by the seed and `epoch`.
    pub fn evaluate(
        &self,
        test: &DeviceData,
        train_subset: Option<&DeviceData>,
        epoch: usize,
    ) -> Result<EvalReport, TrainError> {
        let start = Instant::now();
        let ev = &self.cfg.eval;
        let seed = self.cfg.train.seed;
        let stream = |k: u64| NoiseRng::derived(seed, &[Stream::Eval.id(), epoch as u64, k]);
        let stochastic = vec![Inference::Stochastic; ev.runs];
        let det_run = if ev.deterministic {
            self.method.deterministic_run()
        } else {
            DeterministicRun::None
        };
        let (runs, det) = match det_run {
            DeterministicRun::Stacked => {
                // The stochastic runs and the deterministic one share each batch's image features.
                let mut modes = stochastic;
                modes.push(Inference::Deterministic);
                let mut runs = self.accuracy(test, &modes, &mut stream(0))?;
                let det = runs.pop();
                (runs, det)
            }
            DeterministicRun::Separate => {
                let runs = self.accuracy(test, &stochastic, &mut stream(0))?;
                (
                    runs,
                    Some(self.accuracy(test, &[Inference::Deterministic], &mut stream(1))?[0]),
                )
            }
            DeterministicRun::None => (self.accuracy(test, &stochastic, &mut stream(0))?, None),
        };
        let (mean, se) =
            noprop_report::mean_se(&runs).map_or((0.0, 0.0), |(m, se)| (m, se.unwrap_or(0.0)));
        let train_acc = match train_subset {
            Some(d) if !d.is_empty() => {
                Some(self.accuracy(d, &[Inference::Stochastic], &mut stream(2))?[0])
            }
            _ => None,
        };
        Ok(EvalReport {
            epoch,
            test_acc: mean,
            test_acc_se: se,
            test_acc_runs: runs,
            test_acc_deterministic: det,
            train_acc,
            seconds: start.elapsed().as_secs_f64(),
        })
    }

    /// The model's tensors (as in the checkpoint).
    pub fn named_tensors(&self) -> BTreeMap<String, Tensor> {
        self.method.tensors()
    }

    /// What the model checkpoint's metadata says now.
    pub fn record(&self) -> ModelRecord {
        let norm = self.cfg.dataset().normalization();
        ModelRecord {
            epoch: self.epochs_done,
            train_seconds: self.train_seconds,
            config: self.cfg.raw().clone(),
            schedule: self.cfg.method.params().alpha_bars(),
            normalization: (norm.mean, norm.std),
            seed_streams: Stream::ALL
                .iter()
                .map(|s| (s.name().to_string(), s.id()))
                .collect(),
        }
    }

    /// The model and optimizer state of the current epoch.
    pub fn checkpoint(&self) -> CheckpointData {
        let (optimizer, steps) = self.optims.state();
        CheckpointData {
            model: self.method.tensors(),
            record: self.record(),
            optimizer,
            optimizer_record: OptimizerRecord {
                epoch: self.epochs_done,
                steps,
            },
        }
    }

    /// The first tensor of the model or the optimizer state (in name order)
    /// that holds NaN or infinite values, and how many.
    pub fn first_non_finite(&self) -> Result<Option<(String, usize)>, TrainError> {
        if let Some(found) = first_non_finite(&self.method.tensors())? {
            return Ok(Some(found));
        }
        self.optims.first_non_finite()
    }

    /// Restores a checkpoint written by [`Self::checkpoint`] (for `--resume`).
    pub fn restore(&mut self, ckpt: &CheckpointData) -> Result<(), TrainError> {
        if ckpt.optimizer_record.epoch != ckpt.record.epoch {
            return Err(TrainError::Resume {
                reason: format!(
                    "model is at epoch {} but optimizer state at {}",
                    ckpt.record.epoch, ckpt.optimizer_record.epoch
                ),
            });
        }
        self.load_weights(&ckpt.model, &ckpt.record)?;
        self.optims
            .load_state(&ckpt.optimizer, &ckpt.optimizer_record.steps)
    }

    /// Loads weights only (for evaluation) and the training clock.
    pub fn load_weights(
        &mut self,
        model: &BTreeMap<String, Tensor>,
        record: &ModelRecord,
    ) -> Result<(), TrainError> {
        self.method.load_tensors(model)?;
        self.epochs_done = record.epoch;
        self.train_seconds = record.train_seconds;
        Ok(())
    }

    /// Changes the inference settings (the model is unchanged).
    pub fn change_inference(&mut self, change: InferenceChange) -> Result<(), TrainError> {
        self.cfg = self.cfg.with_inference(change)?;
        // The same change, already checked, to the parameters the method holds.
        self.method
            .params_mut()
            .set_inference(change.steps, change.sampler)?;
        Ok(())
    }

    /// The configuration as a file would say it.
    pub fn raw_config(&self) -> RawConfig {
        self.cfg.raw().clone()
    }

    /// Makes this trainer worker `rank` of `workers`: it trains its share
    /// of the method's lanes ([`crate::collective::owner`]) and, for the
    /// others, only the shared parameters' part of each step. Returns the
    /// lanes it trains.
    pub fn set_worker(&mut self, rank: usize, workers: usize) -> Result<Vec<usize>, TrainError> {
        let lanes = self
            .method
            .split_lanes()
            .map_err(|reason| TrainError::Worker {
                worker: rank,
                reason,
            })?;
        if workers == 0 || workers > lanes.len() {
            return Err(TrainError::Worker {
                worker: rank,
                reason: format!(
                    "{workers} workers for {} blocks: each worker needs at least one block",
                    lanes.len()
                ),
            });
        }
        let mine: Vec<usize> = lanes
            .iter()
            .enumerate()
            .filter(|&(i, _)| crate::collective::owner(i, lanes.len(), workers) == rank)
            .map(|(_, &l)| l)
            .collect();
        self.owned = (workers > 1).then(|| mine.clone());
        Ok(mine)
    }

    /// Whether this worker trains lane `lane`.
    fn owns(&self, lane: usize) -> bool {
        self.owned.as_ref().is_none_or(|o| o.contains(&lane))
    }

    /// Lane `lane`'s variables (parameters and buffers) and its optimizer's
    /// moments and step count, as safetensors bytes.
    pub fn lane_state(&self, lane: usize) -> Result<Vec<u8>, TrainError> {
        let mut tensors: BTreeMap<String, Tensor> = self
            .method
            .lane_vars(lane)
            .into_iter()
            .map(|(k, v)| (format!("var/{k}"), v.as_tensor().clone()))
            .collect();
        let (moments, steps) = self.optims.group_state(lane);
        tensors.extend(moments.into_iter().map(|(k, v)| (format!("opt/{k}"), v)));
        let meta = [("steps".to_string(), steps.to_string())].into();
        crate::checkpoint::to_bytes(&tensors, meta)
    }

    /// Sets lane `lane` to what [`Self::lane_state`] returned on another worker.
    pub fn set_lane_state(&mut self, lane: usize, bytes: &[u8]) -> Result<(), TrainError> {
        let bad = |reason: String| TrainError::Worker { worker: 0, reason };
        let (tensors, meta) = crate::checkpoint::from_bytes(bytes, &self.device)?;
        for (name, var) in self.method.lane_vars(lane) {
            let t = tensors
                .get(&format!("var/{name}"))
                .ok_or_else(|| bad(format!("block {lane}'s state lacks {name}")))?;
            var.set(t)?;
        }
        let moments: BTreeMap<String, Tensor> = tensors
            .into_iter()
            .filter_map(|(k, v)| k.strip_prefix("opt/").map(|k| (k.to_string(), v)))
            .collect();
        let steps = meta
            .get("steps")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(format!("block {lane}'s state has no step count")))?;
        self.optims
            .load_group_state(lane, &moments, steps)
            .map_err(|reason| bad(format!("block {lane}: {reason}")))
    }

    /// The bytes this worker received from the others during its steps
    /// since the last call (a pass that sums its shared gradients).
    pub fn take_received_bytes(&mut self) -> u64 {
        std::mem::take(&mut self.received_bytes)
    }

    /// Sets the training clock (a parallel run's wall time across workers).
    pub fn set_train_seconds(&mut self, seconds: f64) {
        self.train_seconds = seconds;
    }
}
