//! Progress bars on stderr (hidden when stderr is not a terminal) and one
//! summary line per evaluation.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use noprop_train::{EvalReport, Event, Observer};

pub struct Progress {
    bar: Option<ProgressBar>,
    terminal: bool,
    epochs: usize,
    blocks: usize,
    batches: usize,
    loss: f64,
    steps: usize,
}

impl Progress {
    pub fn new(terminal: bool) -> Self {
        Self {
            bar: None,
            terminal,
            epochs: 0,
            blocks: 0,
            batches: 0,
            loss: 0.0,
            steps: 0,
        }
    }

    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }

    fn new_bar(&self, len: u64, msg: String) -> ProgressBar {
        let target = if self.terminal {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let bar = ProgressBar::with_draw_target(Some(len), target);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} {per_sec} eta {eta} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix(msg);
        bar
    }
}

pub fn describe_eval(r: &EvalReport) -> String {
    let mut s = format!(
        "epoch {}: test {:.2}% ± {:.2} (mean of {} stochastic runs)",
        r.epoch,
        r.test_acc,
        r.test_acc_se,
        r.test_acc_runs.len()
    );
    if let Some(d) = r.test_acc_deterministic {
        s += &format!(", deterministic {d:.2}%");
    }
    if let Some(t) = r.train_acc {
        s += &format!(", train subset {t:.2}%");
    }
    s += &format!(" [{:.1}s]", r.seconds);
    s
}

impl Observer for Progress {
    fn on_event(&mut self, event: &Event<'_>) {
        match event {
            Event::Start {
                first_epoch,
                epochs,
                blocks,
                batches,
            } => {
                self.epochs = *epochs;
                self.blocks = *blocks;
                self.batches = *batches;
                if *blocks > 1 {
                    eprintln!("training epochs {first_epoch}..={epochs}, {blocks} blocks x {batches} minibatches per epoch");
                } else {
                    eprintln!(
                        "training epochs {first_epoch}..={epochs}, {batches} minibatches per epoch"
                    );
                }
            }
            Event::PassStart { epoch, block } => {
                self.finish();
                self.loss = 0.0;
                self.steps = 0;
                let msg = if self.blocks > 1 && *block == 0 {
                    // NoProp-DT's fused order trains every block in one pass.
                    format!("epoch {epoch}/{} all {} blocks", self.epochs, self.blocks)
                } else if self.blocks > 1 {
                    format!(
                        "epoch {epoch}/{} block {block:>2}/{}",
                        self.epochs, self.blocks
                    )
                } else {
                    format!("epoch {epoch}/{}", self.epochs)
                };
                self.bar = Some(self.new_bar(self.batches as u64, msg));
            }
            Event::Step { loss } => {
                self.loss += loss;
                self.steps += 1;
                if let Some(bar) = &self.bar {
                    bar.inc(1);
                    if self.steps.is_multiple_of(20) {
                        bar.set_message(format!("loss {:.4}", self.loss / self.steps as f64));
                    }
                }
            }
            Event::PassEnd(p) => {
                self.finish();
                if !self.terminal {
                    eprintln!(
                        "epoch {} block {:>2}: loss {:.4} (ce {:.4}, denoise {:.4}) in {:.1}s",
                        p.epoch, p.block, p.loss, p.ce, p.denoise, p.seconds
                    );
                }
            }
            Event::EvalStart { epoch } => {
                if self.terminal {
                    let bar = ProgressBar::new_spinner();
                    bar.set_message(format!("evaluating epoch {epoch}"));
                    bar.enable_steady_tick(std::time::Duration::from_millis(200));
                    self.bar = Some(bar);
                }
            }
            Event::EvalEnd(r) => {
                self.finish();
                eprintln!("{}", describe_eval(r));
            }
            Event::Checkpoint { .. } => {}
        }
    }
}
