//! Optimizers whose state modelio can save.
//!
//! tch's optimizers keep their state inside libtorch where it cannot be read,
//! so a run could never resume exactly. These keep every state tensor in Rust,
//! follow `torch.optim`'s single-tensor algorithms, and implement the public
//! [`Optimizer`] trait, which any other optimizer can implement too.
//!
//! Each `step` first waits on the staging [`Fence`]: a save copies the
//! parameters in the background, and they must not change before the copy lands.

use std::collections::BTreeMap;

use serde_json::json;
use tch::{nn::VarStore, Tensor};

use crate::error::{Error, Result};
use crate::staging::Fence;

/// Optimizer state as stored in an archive.
#[derive(Debug)]
pub struct OptimizerState {
    /// Kind, e.g. "adamw".
    pub kind: String,
    /// Hyper-parameters and step counts.
    pub json: serde_json::Value,
    /// State tensors by name (e.g. `"layer.weight.exp_avg"`).
    pub tensors: BTreeMap<String, Tensor>,
}

/// An optimizer whose state can be saved and loaded.
pub trait Optimizer {
    /// Short kind name stored in the archive ("sgd", "adam", "adamw", ...).
    fn kind(&self) -> &str;
    /// Hyper-parameters and step counts as JSON.
    fn state_json(&self) -> serde_json::Value;
    /// Named state tensors (shallow clones: no copy is made).
    fn state_tensors(&self) -> Vec<(String, Tensor)>;
    /// Replace the state by a loaded one.
    ///
    /// # Errors
    /// [`Error::OptimizerKind`] when the state is of another kind,
    /// [`Error::OptimizerTensor`] when a state tensor is missing or does not
    /// fit its parameter, [`Error::OptimizerJson`] when its JSON lacks a field.
    fn load_state(&mut self, state: &OptimizerState) -> Result<()>;
}

/// What every optimizer here shares: its parameters (the trainable
/// variables of a store, sorted by name) and the fence its steps wait on.
struct Params {
    named: Vec<(String, Tensor)>,
    fence: Option<Fence>,
}

impl Params {
    fn of(vs: &VarStore) -> Params {
        let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        Params { named, fence: None }
    }

    fn zero_grad(&self) {
        for (_, p) in &self.named {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.f_zero_();
            }
        }
    }

    /// Before a step: wait until no deferred save copy is reading the parameters.
    fn wait_fence(&self) {
        if let Some(f) = &self.fence {
            f.wait();
        }
    }
}

fn check_kind(want: &str, state: &OptimizerState) -> Result<()> {
    if state.kind != want {
        return Err(Error::OptimizerKind { stored: state.kind.clone(), expected: want.into() });
    }
    Ok(())
}

fn steps_of(state: &OptimizerState) -> Result<u64> {
    state.json.get("step").and_then(|v| v.as_u64()).ok_or(Error::OptimizerJson { field: "step" })
}

fn take_state(state: &OptimizerState, name: &str, like: &Tensor) -> Result<Tensor> {
    let t = state.tensors.get(name).ok_or_else(|| Error::OptimizerTensor {
        tensor: name.into(),
        expected: format!("{:?} {:?}", like.kind(), like.size()),
        found: "none".into(),
    })?;
    if t.size() != like.size() || t.kind() != like.kind() {
        return Err(Error::OptimizerTensor {
            tensor: name.into(),
            expected: format!("{:?} {:?}", like.kind(), like.size()),
            found: format!("{:?} {:?}", t.kind(), t.size()),
        });
    }
    Ok(t.f_to_device(like.device())?.f_detach_copy()?)
}

/// SGD with momentum, dampening, Nesterov and weight decay (as `torch.optim.SGD`).
pub struct Sgd {
    params: Params,
    pub lr: f64,
    pub momentum: f64,
    pub dampening: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
    buffers: Vec<Option<Tensor>>,
    steps: u64,
}

impl Sgd {
    pub fn new(vs: &VarStore, lr: f64, momentum: f64, dampening: f64, weight_decay: f64, nesterov: bool) -> Sgd {
        let params = Params::of(vs);
        let buffers = params.named.iter().map(|_| None).collect();
        Sgd { params, lr, momentum, dampening, weight_decay, nesterov, buffers, steps: 0 }
    }

    /// Make `step` wait for in-flight save copies (see [`crate::ModelIo::fence`]).
    pub fn with_fence(mut self, fence: Fence) -> Self {
        self.params.fence = Some(fence);
        self
    }

    pub fn zero_grad(&mut self) {
        self.params.zero_grad();
    }

    /// One update from the gradients.
    ///
    /// # Errors
    /// [`Error::Torch`] when libtorch fails.
    pub fn step(&mut self) -> Result<()> {
        self.params.wait_fence();
        tch::no_grad(|| -> Result<()> {
            for ((_, p), buf) in self.params.named.iter().zip(self.buffers.iter_mut()) {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let mut g = if self.weight_decay != 0.0 { g.f_add(&(p * self.weight_decay))? } else { g };
                if self.momentum != 0.0 {
                    let b = match buf.take() {
                        None => g.f_detach_copy()?,
                        Some(mut b) => {
                            let _ = b.f_mul_scalar_(self.momentum)?;
                            let _ = b.f_add_(&(&g * (1.0 - self.dampening)))?;
                            b
                        }
                    };
                    g = if self.nesterov { g.f_add(&(&b * self.momentum))? } else { b.shallow_clone() };
                    *buf = Some(b);
                }
                let mut p = p.shallow_clone();
                let _ = p.f_add_(&(g * -self.lr))?;
            }
            Ok(())
        })?;
        self.steps += 1;
        Ok(())
    }
}

impl Optimizer for Sgd {
    fn kind(&self) -> &str {
        "sgd"
    }
    fn state_json(&self) -> serde_json::Value {
        json!({"lr": self.lr, "momentum": self.momentum, "dampening": self.dampening,
               "weight_decay": self.weight_decay, "nesterov": self.nesterov, "step": self.steps})
    }
    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        self.params
            .named
            .iter()
            .zip(&self.buffers)
            .filter_map(|((n, _), b)| b.as_ref().map(|b| (format!("{n}.momentum_buffer"), b.shallow_clone())))
            .collect()
    }
    fn load_state(&mut self, state: &OptimizerState) -> Result<()> {
        check_kind("sgd", state)?;
        let steps = steps_of(state)?;
        let mut buffers = Vec::with_capacity(self.params.named.len());
        for (n, p) in &self.params.named {
            let key = format!("{n}.momentum_buffer");
            buffers.push(if state.tensors.contains_key(&key) { Some(take_state(state, &key, p)?) } else { None });
        }
        self.buffers = buffers;
        self.steps = steps;
        Ok(())
    }
}

/// Adam, or AdamW with decoupled weight decay (as `torch.optim.Adam`/`AdamW`).
pub struct Adam {
    params: Params,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    decoupled: bool,
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
    steps: u64,
}

impl Adam {
    /// `torch.optim.Adam(lr, betas, eps, weight_decay)`.
    #[allow(clippy::self_named_constructors)]
    pub fn adam(vs: &VarStore, lr: f64, betas: (f64, f64), eps: f64, weight_decay: f64) -> Result<Adam> {
        Adam::new(vs, lr, betas, eps, weight_decay, false)
    }

    /// `torch.optim.AdamW(lr, betas, eps, weight_decay)`.
    pub fn adamw(vs: &VarStore, lr: f64, betas: (f64, f64), eps: f64, weight_decay: f64) -> Result<Adam> {
        Adam::new(vs, lr, betas, eps, weight_decay, true)
    }

    fn new(vs: &VarStore, lr: f64, betas: (f64, f64), eps: f64, weight_decay: f64, decoupled: bool) -> Result<Adam> {
        let params = Params::of(vs);
        let zeros = |p: &Tensor| -> Result<Tensor> { Ok(p.f_zeros_like()?) };
        let exp_avg = params.named.iter().map(|(_, p)| zeros(p)).collect::<Result<_>>()?;
        let exp_avg_sq = params.named.iter().map(|(_, p)| zeros(p)).collect::<Result<_>>()?;
        Ok(Adam { params, lr, beta1: betas.0, beta2: betas.1, eps, weight_decay, decoupled, exp_avg, exp_avg_sq, steps: 0 })
    }

    /// Make `step` wait for in-flight save copies (see [`crate::ModelIo::fence`]).
    pub fn with_fence(mut self, fence: Fence) -> Self {
        self.params.fence = Some(fence);
        self
    }

    pub fn zero_grad(&mut self) {
        self.params.zero_grad();
    }

    /// One update from the gradients.
    ///
    /// # Errors
    /// [`Error::Torch`] when libtorch fails.
    pub fn step(&mut self) -> Result<()> {
        self.params.wait_fence();
        let step = self.steps + 1;
        let bias1 = 1.0 - self.beta1.powf(step as f64);
        let bias2_sqrt = (1.0 - self.beta2.powf(step as f64)).sqrt();
        let step_size = self.lr / bias1;
        tch::no_grad(|| -> Result<()> {
            for (((_, p), m), v) in self.params.named.iter().zip(self.exp_avg.iter_mut()).zip(self.exp_avg_sq.iter_mut()) {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let mut p = p.shallow_clone();
                let g = if self.weight_decay == 0.0 {
                    g
                } else if self.decoupled {
                    let _ = p.f_mul_scalar_(1.0 - self.lr * self.weight_decay)?;
                    g
                } else {
                    g.f_add(&(&p * self.weight_decay))?
                };
                let _ = m.f_lerp_(&g, 1.0 - self.beta1)?;
                let _ = v.f_mul_scalar_(self.beta2)?;
                let _ = v.f_addcmul_(&(&g * (1.0 - self.beta2)), &g)?;
                let mut denom = v.f_sqrt()?.f_div_scalar(bias2_sqrt)?;
                let _ = denom.f_add_scalar_(self.eps)?;
                let _ = p.f_addcdiv_(&(&*m * -step_size), &denom)?;
            }
            Ok(())
        })?;
        self.steps = step;
        Ok(())
    }
}

impl Optimizer for Adam {
    fn kind(&self) -> &str {
        if self.decoupled {
            "adamw"
        } else {
            "adam"
        }
    }
    fn state_json(&self) -> serde_json::Value {
        json!({"lr": self.lr, "betas": [self.beta1, self.beta2], "eps": self.eps,
               "weight_decay": self.weight_decay, "step": self.steps})
    }
    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.params.named.len());
        for (((n, _), m), v) in self.params.named.iter().zip(&self.exp_avg).zip(&self.exp_avg_sq) {
            out.push((format!("{n}.exp_avg"), m.shallow_clone()));
            out.push((format!("{n}.exp_avg_sq"), v.shallow_clone()));
        }
        out
    }
    fn load_state(&mut self, state: &OptimizerState) -> Result<()> {
        let kind = self.kind().to_string();
        check_kind(&kind, state)?;
        let steps = steps_of(state)?;
        let mut m = Vec::with_capacity(self.params.named.len());
        let mut v = Vec::with_capacity(self.params.named.len());
        for (n, p) in &self.params.named {
            m.push(take_state(state, &format!("{n}.exp_avg"), p)?);
            v.push(take_state(state, &format!("{n}.exp_avg_sq"), p)?);
        }
        self.exp_avg = m;
        self.exp_avg_sq = v;
        self.steps = steps;
        Ok(())
    }
}
