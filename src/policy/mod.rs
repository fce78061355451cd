//! The policies: when to save ([`schedule`]), when a save becomes the
//! backup (the rule in [`state`], beside the state file it reads), and which
//! snapshots to keep ([`retention`]).

pub mod retention;
pub mod schedule;
pub mod state;
