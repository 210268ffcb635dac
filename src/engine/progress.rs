use std::sync::atomic::{AtomicBool, Ordering};

use super::error::EngineError;

/// One progress update: the phase running now and how far through it the scan is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub phase: Phase,
    pub step: u64,
    pub total: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Load,
    Evaluate,
    Salience,
    Identify,
    Purify,
    Recover,
    Save,
    Train,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Load => "load",
            Phase::Evaluate => "evaluate",
            Phase::Salience => "salience",
            Phase::Identify => "identify",
            Phase::Purify => "purify",
            Phase::Recover => "recover",
            Phase::Save => "save",
            Phase::Train => "train",
        }
    }
}

/// Where the engine sends progress and learns it should stop. The engine checks
/// `cancelled` between steps, never in the middle of one.
pub struct Monitor<'a> {
    on_progress: &'a mut dyn FnMut(&Progress),
    cancel: Option<&'a AtomicBool>,
}

impl<'a> Monitor<'a> {
    pub fn new(on_progress: &'a mut dyn FnMut(&Progress), cancel: Option<&'a AtomicBool>) -> Self {
        Monitor {
            on_progress,
            cancel,
        }
    }

    /// Reports a step and returns `Err(Cancelled)` if the caller asked to stop.
    pub fn step(&mut self, phase: Phase, step: u64, total: u64) -> Result<(), EngineError> {
        (self.on_progress)(&Progress { phase, step, total });
        if self.cancel.is_some_and(|flag| flag.load(Ordering::Relaxed)) {
            return Err(EngineError::Cancelled);
        }
        Ok(())
    }
}
