//! The handle's side of the remote tier without the `remote` feature: the
//! calls of `remote.rs`, which do nothing.

use std::sync::Arc;

use crate::actors::Rider;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::folder::snapshot::Pinned;
use crate::folder::ModelPaths;

/// No remote tier.
#[derive(Default)]
pub(super) struct Seam;

impl Seam {
    pub fn connect(_: &Config) -> Result<Seam> {
        Ok(Seam)
    }

    pub fn restore_if_fresh(&mut self, _: &Config, _: &ModelPaths, _: bool, _: impl Fn() -> Result<bool>) -> Result<()> {
        Ok(())
    }

    pub fn rider(&mut self, _: &Config, _: &ModelPaths) -> Option<Arc<dyn Rider>> {
        None
    }

    pub fn catch_up(&self, _: u64, _: impl Fn() -> Result<Vec<Pinned>>) {}

    pub async fn drain(&self) -> Option<Error> {
        None
    }

    pub fn drain_blocking(&self) -> Option<Error> {
        None
    }
}
