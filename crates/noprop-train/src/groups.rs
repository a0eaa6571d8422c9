//! The optimizer family wired once for every method: a method names its
//! parameter groups, this module gives each group an [`AdamW`] with the
//! configured family (decoupled decay, or Adam's L2 term in the gradient),
//! rate and per-parameter embedding rate, and steps the groups a training
//! step touched.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::error::TrainError;
use crate::optim::{AdamW, AdamWParams};
use crate::sections::{OptimizerKind, RawTrain};

/// The name of a learned `W_embed` in every optimizer and checkpoint.
pub const EMBED: &str = "embed";

/// Variables that one optimizer updates.
pub struct ParamGroup {
    /// Named variables (names are unique across a method's groups).
    pub vars: Vec<(String, Var)>,
    /// Whether weight decay applies (false for, e.g., the back-propagation
    /// baseline's `w_t`, which decay would pull to 0).
    pub decay: bool,
}

struct Group {
    opt: AdamW,
    /// The variables that get Adam's L2 term (empty with AdamW or without decay).
    l2: Vec<(String, Var)>,
}

/// One optimizer per parameter group.
pub struct Optimizers {
    groups: Vec<Group>,
    weight_decay: f64,
}

impl Optimizers {
    /// An optimizer per group, as `train` configures them; with
    /// `own_rate = Some((w, lr))` the variable that is the tensor `w` (a
    /// learned `W_embed`) learns at `lr`.
    pub fn new(
        groups: Vec<ParamGroup>,
        train: &RawTrain,
        own_rate: Option<(&Tensor, f64)>,
    ) -> Result<Self, TrainError> {
        let adam = train.optimizer == OptimizerKind::Adam;
        let groups = groups
            .into_iter()
            .map(|g| {
                // Adam's decay is an L2 term added to the gradients; AdamW's is decoupled.
                let decoupled = if g.decay && !adam {
                    train.weight_decay
                } else {
                    0.0
                };
                let l2 = if g.decay && adam {
                    g.vars.clone()
                } else {
                    vec![]
                };
                let mut opt = AdamW::new(g.vars, AdamWParams::new(train.lr, decoupled))?;
                if let Some((var, lr)) = own_rate {
                    opt.set_lr_of(var, lr);
                }
                Ok(Group { opt, l2 })
            })
            .collect::<Result<Vec<_>, TrainError>>()?;
        Ok(Self {
            groups,
            weight_decay: train.weight_decay,
        })
    }

    /// The number of groups.
    pub fn len(&self) -> usize {
        self.groups.len()
    }

    /// True when there are no groups.
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Adds Adam's L2 term for the variables of `groups` to `grads`, then
    /// steps those groups' optimizers.
    pub fn step(&mut self, grads: &mut GradStore, groups: &[usize]) -> Result<(), TrainError> {
        for &g in groups {
            add_l2(grads, &self.groups[g].l2, self.weight_decay)?;
        }
        for &g in groups {
            self.groups[g].opt.step(grads)?;
        }
        Ok(())
    }

    /// Every group's moments (under the variables' names) and step counts.
    pub fn state(&self) -> (BTreeMap<String, Tensor>, Vec<u64>) {
        let mut tensors = BTreeMap::new();
        let mut steps = Vec::with_capacity(self.groups.len());
        for g in &self.groups {
            tensors.extend(g.opt.state(""));
            steps.push(g.opt.steps());
        }
        (tensors, steps)
    }

    /// The first moment of [`Self::state`] in name order that holds NaN or
    /// infinite values, and how many.
    pub fn first_non_finite(&self) -> Result<Option<(String, usize)>, TrainError> {
        let mut found = Vec::new();
        for g in &self.groups {
            found.extend(g.opt.non_finite()?);
        }
        Ok(found.into_iter().min())
    }

    /// Group `g`'s variables, in the optimizer's (name) order.
    pub fn group_vars(&self, g: usize) -> Vec<Var> {
        self.groups[g].opt.vars().cloned().collect()
    }

    /// Group `g`'s moments (under the variables' names) and step count.
    pub fn group_state(&self, g: usize) -> (BTreeMap<String, Tensor>, u64) {
        (self.groups[g].opt.state(""), self.groups[g].opt.steps())
    }

    /// Restores what [`Self::group_state`] returned for group `g`.
    pub fn load_group_state(
        &mut self,
        g: usize,
        tensors: &BTreeMap<String, Tensor>,
        steps: u64,
    ) -> Result<(), String> {
        self.groups[g].opt.load_state("", tensors, steps)
    }

    /// Restores what [`Self::state`] returned.
    pub fn load_state(
        &mut self,
        tensors: &BTreeMap<String, Tensor>,
        steps: &[u64],
    ) -> Result<(), TrainError> {
        if steps.len() != self.groups.len() {
            return Err(TrainError::Resume {
                reason: format!(
                    "optimizer state has {} step counts, expected {}",
                    steps.len(),
                    self.groups.len()
                ),
            });
        }
        for (g, &s) in self.groups.iter_mut().zip(steps) {
            g.opt
                .load_state("", tensors, s)
                .map_err(|reason| TrainError::Resume { reason })?;
        }
        Ok(())
    }
}

/// Adam's weight decay as PyTorch's `Adam` applies it: `g += wd * p` before
/// the moment updates (an L2 term), for every variable in `vars` that has a
/// gradient.
fn add_l2(grads: &mut GradStore, vars: &[(String, Var)], wd: f64) -> Result<(), TrainError> {
    if wd == 0.0 {
        return Ok(());
    }
    for (_, var) in vars {
        if let Some(g) = grads.get(var.as_tensor()) {
            let g = (g + (var.as_tensor().detach() * wd)?)?;
            grads.insert(var.as_tensor(), g);
        }
    }
    Ok(())
}

/// Named trainable variables of a `VarMap` (BatchNorm buffers excluded).
pub fn trainable(vars: &candle_nn::VarMap) -> Result<Vec<(String, Var)>, TrainError> {
    let data = vars.data().lock().map_err(|_| {
        candle_core::Error::Msg(
            "a model's variable map was poisoned by a panic in another thread".into(),
        )
    })?;
    Ok(data
        .iter()
        .filter(|(k, _)| !noprop_models::layers::is_buffer(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect())
}
