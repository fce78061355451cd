//! The state file `<name>_state.json` and the backup rule.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Session {
    pub id: String,
    /// RFC 3339 start time.
    pub started: String,
    /// The batch size the application trained with (see
    /// `ModelIo::set_batch_size`), when it said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<u64>,
    /// Iterations trained in this session.
    pub iterations: u64,
}

/// What `<name>_state.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub model_name: String,
    pub total_iterations: u64,
    pub sessions: Vec<Session>,
    /// Lowest average loss between two saves; 0 means unset.
    pub lowest_average_loss: f64,
    /// The configuration the model was trained with (modelio's and the model's own).
    pub config: serde_json::Value,
}

impl State {
    /// A fresh state for a model never saved.
    pub fn new(model_name: &str) -> State {
        State {
            model_name: model_name.into(),
            total_iterations: 0,
            sessions: Vec::new(),
            lowest_average_loss: 0.0,
            config: serde_json::Value::Null,
        }
    }

    /// Read a state file.
    ///
    /// # Errors
    /// [`Error::Io`] when unreadable, [`Error::DamagedState`] when not valid JSON.
    pub fn read(path: &Path) -> Result<State> {
        let bytes = crate::folder::durable::read_regular(path)?;
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let model = name.strip_suffix(".bk").unwrap_or(&name);
        let model = model.strip_suffix("_state.json").unwrap_or(model).to_string();
        serde_json::from_slice(&bytes).map_err(|e| Error::DamagedState { path: path.to_path_buf(), name: model, detail: e.to_string() })
    }

    /// Start a new session (one per training run).
    pub fn start_session(&mut self, batch_size: Option<u64>) {
        self.sessions.push(Session {
            id: uuid::Uuid::new_v4().to_string(),
            started: chrono::Utc::now().to_rfc3339(),
            batch_size,
            iterations: 0,
        });
    }

    /// Count one trained iteration.
    pub fn count_iteration(&mut self) {
        self.total_iterations += 1;
        if let Some(s) = self.sessions.last_mut() {
            s.iterations += 1;
        }
    }

    /// The state as pretty JSON bytes, as the state file holds it: sessions
    /// that trained no iteration are left out (as the reference does).
    pub fn to_json(&self) -> Vec<u8> {
        let mut written = self.clone();
        written.sessions.retain(|s| s.iterations > 0);
        // A struct of strings, numbers and a JSON value always serializes.
        serde_json::to_vec_pretty(&written).unwrap_or_default()
    }
}

/// What one save decides about backups.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BackupDecision {
    /// Mean of the losses since the last save (0 when none).
    pub average: f64,
    /// Make `.bk` copies of this save.
    pub backup: bool,
    /// The lowest average to store from now on.
    pub lowest: f64,
}

/// The reference's backup rule: the first non-zero average only sets the
/// lowest; after that a strictly lower, non-zero average backs up and becomes
/// the lowest.
pub fn backup_rule(history: &[f64], lowest: f64) -> BackupDecision {
    let average = if history.is_empty() { 0.0 } else { history.iter().sum::<f64>() / history.len() as f64 };
    if lowest == 0.0 {
        BackupDecision { average, backup: false, lowest: average }
    } else if average != 0.0 && average < lowest {
        BackupDecision { average, backup: true, lowest: average }
    } else {
        BackupDecision { average, backup: false, lowest }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backup_rule_table() {
        // (history, stored lowest) -> (average, backup, new lowest)
        let cases: [(&[f64], f64, f64, bool, f64); 7] = [
            (&[2.0, 4.0], 0.0, 3.0, false, 3.0), // first save sets the lowest
            (&[1.0, 2.0], 3.0, 1.5, true, 1.5),  // lower: back up
            (&[3.0], 3.0, 3.0, false, 3.0),      // equal: no
            (&[5.0], 3.0, 5.0, false, 3.0),      // higher: no
            (&[0.0, 0.0], 3.0, 0.0, false, 3.0), // zero average: never
            (&[], 3.0, 0.0, false, 3.0),         // empty history
            (&[], 0.0, 0.0, false, 0.0),         // empty history, unset lowest
        ];
        for (history, lowest, average, backup, new_lowest) in cases {
            let d = backup_rule(history, lowest);
            assert_eq!(d, BackupDecision { average, backup, lowest: new_lowest }, "{history:?} lowest {lowest}");
        }
    }

    #[test]
    fn sessions_count_iterations() {
        let mut s = State::new("m");
        s.start_session(Some(8));
        s.count_iteration();
        s.count_iteration();
        s.start_session(Some(8));
        s.count_iteration();
        assert_eq!(s.total_iterations, 3);
        assert_eq!(s.sessions.iter().map(|x| x.iterations).collect::<Vec<_>>(), [2, 1]);
        assert_ne!(s.sessions[0].id, s.sessions[1].id);
        s.start_session(Some(8));
        let written: State = serde_json::from_slice(&s.to_json()).unwrap();
        assert_eq!(written.sessions.len(), 2, "an empty session is not written");
    }
}
