//! Progress reporting: the trainer calls an [`Observer`] and never prints.

use serde::Serialize;

/// Mean losses of one pass of one block over the data.
#[derive(Debug, Clone, Serialize)]
pub struct PassMetrics {
    /// Epoch, from 1.
    pub epoch: usize,
    /// Block `t`, from 1.
    pub block: usize,
    /// Mean total loss `L_t`.
    pub loss: f64,
    /// Mean cross-entropy term.
    pub ce: f64,
    /// Mean KL term.
    pub kl: f64,
    /// Mean weighted denoising term.
    pub denoise: f64,
    /// Minibatches in the pass.
    pub batches: usize,
    /// Seconds the pass took.
    pub seconds: f64,
}

impl PassMetrics {
    /// The record as 8 numbers, exactly (JSON text would round some).
    pub fn to_numbers(&self) -> [f64; 8] {
        [
            self.epoch as f64,
            self.block as f64,
            self.loss,
            self.ce,
            self.kl,
            self.denoise,
            self.batches as f64,
            self.seconds,
        ]
    }

    /// The record [`Self::to_numbers`] returned.
    pub fn from_numbers(n: [f64; 8]) -> Self {
        Self {
            epoch: n[0] as usize,
            block: n[1] as usize,
            loss: n[2],
            ce: n[3],
            kl: n[4],
            denoise: n[5],
            batches: n[6] as usize,
            seconds: n[7],
        }
    }
}

/// Accuracies after an epoch, in percent.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// Epoch, from 1.
    pub epoch: usize,
    /// Mean test accuracy over the stochastic inference runs.
    pub test_acc: f64,
    /// Standard error of that mean over the runs.
    pub test_acc_se: f64,
    /// Test accuracy of each stochastic run.
    pub test_acc_runs: Vec<f64>,
    /// Test accuracy of deterministic inference (eps = 0), if measured.
    pub test_acc_deterministic: Option<f64>,
    /// Accuracy (one stochastic run) on a fixed subset of the training set, if measured.
    pub train_acc: Option<f64>,
    /// Seconds the evaluation took.
    pub seconds: f64,
}

/// What the trainer reports as it goes.
#[derive(Debug)]
pub enum Event<'a> {
    /// Training starts (or resumes) at `first_epoch`.
    Start {
        /// First epoch this call will run, from 1.
        first_epoch: usize,
        /// Last epoch.
        epochs: usize,
        /// Blocks per epoch.
        blocks: usize,
        /// Minibatches per pass.
        batches: usize,
    },
    /// A pass of block `block` over the data begins.
    PassStart {
        /// Epoch.
        epoch: usize,
        /// Block.
        block: usize,
    },
    /// One minibatch was trained.
    Step {
        /// Loss of that minibatch.
        loss: f64,
    },
    /// A pass ended.
    PassEnd(&'a PassMetrics),
    /// Evaluation begins.
    EvalStart {
        /// Epoch.
        epoch: usize,
    },
    /// Evaluation ended.
    EvalEnd(&'a EvalReport),
    /// A checkpoint was written.
    Checkpoint {
        /// Epoch.
        epoch: usize,
        /// Its folder.
        path: &'a std::path::Path,
    },
}

/// Receives [`Event`]s. The default implementation ignores them.
pub trait Observer {
    /// Called for each event.
    fn on_event(&mut self, _event: &Event<'_>) {}
}

/// An observer that ignores everything.
pub struct Silent;
impl Observer for Silent {}
