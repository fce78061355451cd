//! A rank's `VarStore` and optimizer, saved and resumed under a [`Plan`]:
//! where each variable this rank holds lies in its global tensor.
//!
//! A step stores the variables as `model/<name>`, the optimizer's state
//! tensors as `optimizer/<name>` (each in the place of its parameter) and
//! the optimizer's kind and hyper-parameters as [`OPTIMIZER_JSON`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use tch::nn::VarStore;
use tch::Tensor;

use super::{optimizer_json, optimizer_state, GlobalManifest, Part, Place, Rank, Region, ShardedIo, Want, OPTIMIZER_JSON};
use crate::error::{Error, Result};
use crate::handle::OptimizerResume;
use crate::optim::Optimizer;
use crate::tensors::shape_of;

/// Where each variable of a rank's `VarStore` lies in its global tensor.
/// A variable the plan does not name is replicated: whole and the same on
/// every rank, so rank 0 saves it and every rank loads it whole.
///
/// ```ignore
/// // Rank r of 4 holds rows of `fc1.weight` (column-parallel) and columns
/// // of `fc2.weight` (row-parallel); the rest is replicated.
/// let plan = Plan::new()
///     .rows("fc1.weight", 256 * r, 1024)
///     .boxed("fc2.weight", &[0, 256 * r], &[512, 1024]);
/// ```
#[derive(Debug, Clone, Default)]
pub struct Plan {
    places: BTreeMap<String, Place>,
}

impl Plan {
    /// Every variable replicated.
    pub fn new() -> Plan {
        Plan::default()
    }

    /// `var` is whole on this rank alone (a pipeline stage's layer): this
    /// rank saves it.
    #[must_use]
    pub fn own(mut self, var: &str) -> Plan {
        self.places.insert(var.into(), Place::Whole);
        self
    }

    /// `var` holds rows `[row_offset, row_offset + rows)` of a tensor of
    /// `global_rows` rows, whole in every other dimension.
    #[must_use]
    pub fn rows(mut self, var: &str, row_offset: usize, global_rows: usize) -> Plan {
        self.places.insert(var.into(), Place::Rows { offset: row_offset, global_rows });
        self
    }

    /// `var` is the box at `offset` (one per dimension) of a tensor of shape
    /// `global`, its size the variable's shape.
    #[must_use]
    pub fn boxed(mut self, var: &str, offset: &[usize], global: &[usize]) -> Plan {
        self.places.insert(var.into(), Place::Box { offset: offset.to_vec(), global: global.to_vec() });
        self
    }

    /// Every variable the plan names must be in `vars`: a typo would
    /// otherwise save a split variable as replicated.
    fn check(&self, vars: &BTreeMap<String, Tensor>) -> Result<()> {
        match self.places.keys().find(|name| !vars.contains_key(*name)) {
            None => Ok(()),
            Some(name) => Err(Error::Argument {
                arg: "the plan".into(),
                value: format!("variable `{name}`"),
                allowed: format!("variables the VarStore holds ({})", vars.keys().cloned().collect::<Vec<_>>().join(", ")),
            }),
        }
    }
}

/// One tensor of a save: the tensor, its name, its box of the global
/// tensor and the global shape.
#[derive(Debug)]
pub(super) struct Item {
    pub name: String,
    pub tensor: Tensor,
    pub region: Region,
    pub global: Vec<usize>,
}

/// What a rank saves of `vs` and `optimizer` under `plan`.
pub(super) fn items(vs: &VarStore, optimizer: Option<&dyn Optimizer>, plan: &Plan, rank: Rank) -> Result<Vec<Item>> {
    let vars: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    plan.check(&vars)?;
    let mut out = Vec::new();
    let mut push = |name: String, tensor: Tensor, place: Option<&Place>| -> Result<()> {
        let shape = shape_of(&tensor);
        let (region, global) = match place {
            // Replicated: rank 0 saves it.
            None if rank.rank != 0 => return Ok(()),
            None => (Region::whole(&shape), shape),
            Some(place) => Part { name: &name, tensor: &tensor, place: place.clone() }.region(&shape)?,
        };
        out.push(Item { name, tensor, region, global });
        Ok(())
    };
    for (name, t) in &vars {
        push(format!("model/{name}"), t.shallow_clone(), plan.places.get(name))?;
    }
    if let Some(opt) = optimizer {
        for (name, t) in opt.state_tensors() {
            let param = param_of(&name, &vars);
            let place = param.and_then(|p| plan.places.get(p));
            if let (Some(p), Some(_)) = (param, place) {
                let (state, of) = (shape_of(&t), shape_of(&vars[p]));
                if state != of {
                    return Err(Error::Argument {
                        arg: format!("optimizer state `{name}`"),
                        value: format!("shape {state:?}"),
                        allowed: format!("the shape of its parameter `{p}`, {of:?}, to be split as it is"),
                    });
                }
            }
            push(format!("optimizer/{name}"), t, place)?;
        }
        push(OPTIMIZER_JSON.into(), optimizer_json(opt)?, None)?;
    }
    Ok(out)
}

/// The parameter an optimizer state tensor belongs to: the longest variable
/// name it extends with `.` (`fc1.weight.exp_avg` is `fc1.weight`'s).
fn param_of<'a>(state: &str, vars: &'a BTreeMap<String, Tensor>) -> Option<&'a str> {
    let mut name = state;
    while let Some((head, _)) = name.rsplit_once('.') {
        if let Some((key, _)) = vars.get_key_value(head) {
            return Some(key);
        }
        name = head;
    }
    None
}

/// What a rank of this launch loads of stored tensor `name`, held as
/// `place` with the local `shape`.
fn want(name: &str, place: Option<&Place>, shape: &[usize]) -> Want {
    match place {
        None | Some(Place::Whole) => Want::whole(name),
        Some(Place::Rows { offset, .. }) => Want::rows(name, *offset, offset.saturating_add(shape.first().copied().unwrap_or(0))),
        Some(Place::Box { offset, .. }) => Want::boxed(name, offset, shape),
    }
}

/// What [`ShardedIo::resume`] loaded.
#[derive(Debug, Clone)]
pub struct ShardResumed {
    /// The step loaded: the next save continues after it.
    pub iterations: u64,
    pub optimizer: OptimizerResume,
    pub manifest: GlobalManifest,
}

impl ShardedIo {
    /// Load the newest committed step into this rank's `vs` and, when given,
    /// `optimizer`, each variable as `plan` places it, whatever number of
    /// ranks saved it and however they split it (bitwise, each piece read
    /// checked against its CRC-32C). `None` when no step is committed yet.
    /// Blocks on the store.
    ///
    /// # Errors
    /// [`Error::Mismatch`] naming a variable missing from the step or
    /// stored with another dtype or shape; [`Error::Argument`] for a plan
    /// that does not fit `vs`; as [`ShardedIo::load`]; the optimizer's
    /// [`Error::OptimizerKind`] or [`Error::OptimizerTensor`].
    pub fn resume(&self, vs: &VarStore, optimizer: Option<&mut dyn Optimizer>, plan: &Plan) -> Result<Option<ShardResumed>> {
        match self.latest()? {
            Some(m) => self.resume_from(&m, vs, optimizer, plan).map(Some),
            None => Ok(None),
        }
    }

    /// [`ShardedIo::resume`] from step `m` (one of [`ShardedIo::list`],
    /// [`ShardedIo::backup`], [`ShardedIo::snapshots`]).
    ///
    /// # Errors
    /// As [`ShardedIo::resume`].
    pub fn resume_from(
        &self,
        m: &GlobalManifest,
        vs: &VarStore,
        optimizer: Option<&mut dyn Optimizer>,
        plan: &Plan,
    ) -> Result<ShardResumed> {
        let vars: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
        plan.check(&vars)?;
        let at = PathBuf::from(format!("{} step {}", self.location(), m.iterations));
        // A split variable's global shape is the one saved: a plan of another
        // model would otherwise load a box of the wrong tensor.
        for (name, t) in &vars {
            let Some(place) = plan.places.get(name) else { continue };
            let stored = format!("model/{name}");
            let (_, global) = Part { name: &stored, tensor: t, place: place.clone() }.region(&shape_of(t))?;
            if let Some((_, p)) = m.pieces(&stored).first() {
                if p.global_shape != global {
                    return Err(Error::Mismatch {
                        path: at.clone(),
                        tensor: name.clone(),
                        expected: format!("a global shape of {global:?} (the plan's)"),
                        found: format!("{:?}", p.global_shape),
                    });
                }
            }
        }
        let wants: Vec<Want> = vars.iter().map(|(name, t)| want(&format!("model/{name}"), plan.places.get(name), &shape_of(t))).collect();
        let loaded = self.load(m, &wants)?;
        for ((name, var), t) in vars.iter().zip(loaded) {
            if t.kind() != var.kind() || t.size() != var.size() {
                return Err(Error::Mismatch {
                    path: at.clone(),
                    tensor: name.clone(),
                    expected: format!("{:?} {:?}", var.kind(), var.size()),
                    found: format!("{:?} {:?}", t.kind(), t.size()),
                });
            }
            let mut var = var.shallow_clone();
            tch::no_grad(|| var.f_copy_(&t))?;
        }
        let resumed = match optimizer {
            None => OptimizerResume::NotApplicable,
            Some(opt) => {
                let stored: BTreeSet<&str> = m.shards.iter().flat_map(|d| d.pieces.iter().map(|p| p.name.as_str())).collect();
                if stored.contains(OPTIMIZER_JSON) {
                    let names: Vec<&str> = stored.iter().filter_map(|n| n.strip_prefix("optimizer/")).collect();
                    let mut wants = vec![Want::whole(OPTIMIZER_JSON)];
                    for name in &names {
                        let param = param_of(name, &vars);
                        let shape = param.map_or_else(Vec::new, |p| shape_of(&vars[p]));
                        let place = param.and_then(|p| plan.places.get(p));
                        wants.push(want(&format!("optimizer/{name}"), place, &shape));
                    }
                    let mut loaded = self.load(m, &wants)?.into_iter();
                    let json = loaded.next().unwrap_or_else(|| Tensor::from_slice(&[0u8; 0]));
                    opt.load_state(&optimizer_state(&json, names.iter().map(|n| n.to_string()).zip(loaded))?)?;
                    OptimizerResume::Restored
                } else {
                    let why = format!("step {} holds no optimizer state", m.iterations);
                    tracing::warn!(target: "modelio", "{} {why}; the optimizer starts afresh", self.location());
                    OptimizerResume::Missing(why)
                }
            }
        };
        Ok(ShardResumed { iterations: m.iterations, optimizer: resumed, manifest: m.clone() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn optimizer_state_follows_the_longest_parameter_name() {
        let t = || Tensor::zeros([1], (tch::Kind::Float, tch::Device::Cpu));
        let vars: BTreeMap<String, Tensor> = [("fc".to_string(), t()), ("fc.weight".to_string(), t())].into_iter().collect();
        assert_eq!(param_of("fc.weight.exp_avg", &vars), Some("fc.weight"));
        assert_eq!(param_of("fc.bias.exp_avg", &vars), Some("fc"));
        assert_eq!(param_of("step", &vars), None);
    }

    #[test]
    fn a_plan_naming_a_variable_the_store_lacks_is_refused() {
        let vs = VarStore::new(tch::Device::Cpu);
        let _w = vs.root().zeros("w", &[4, 2]);
        let e = items(&vs, None, &Plan::new().rows("v", 0, 8), Rank { rank: 0, world_size: 2 }).unwrap_err().to_string();
        assert!(e.contains("`v`") && e.contains("w"), "{e}");
        // Replicated variables are saved by rank 0 only; its rows by each rank.
        let plan = Plan::new().rows("w", 4, 8);
        let names = |r| items(&vs, None, &plan, Rank { rank: r, world_size: 2 }).unwrap().len();
        assert_eq!((names(0), names(1)), (1, 1));
        let none = |r| items(&vs, None, &Plan::new(), Rank { rank: r, world_size: 2 }).unwrap().len();
        assert_eq!((none(0), none(1)), (1, 0));
    }
}
