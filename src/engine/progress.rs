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

    /// Runs `work` as pass `pass` (from 0) of `passes` equal passes through one phase:
    /// its steps are reported as a share of all of them, so that a phase run twice
    /// (salience on clean images, then towards a shortcut) does not start over at step 1.
    pub fn as_pass<T>(
        &mut self,
        pass: u64,
        passes: u64,
        work: impl FnOnce(&mut Monitor) -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        let outer = &mut *self.on_progress;
        let mut scaled = |p: &Progress| {
            outer(&Progress {
                phase: p.phase,
                step: pass * p.total + p.step,
                total: passes * p.total,
            })
        };
        work(&mut Monitor::new(&mut scaled, self.cancel))
    }

    /// `Err(Cancelled)` if the caller asked to stop, without reporting anything: for work
    /// between steps that can take long (the shortcut search's classes).
    pub fn check_cancelled(&self) -> Result<(), EngineError> {
        if self.cancel.is_some_and(|flag| flag.load(Ordering::Relaxed)) {
            return Err(EngineError::Cancelled);
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_report_a_share_of_all_of_them_and_still_see_cancellation() {
        let mut seen = Vec::new();
        let cancel = AtomicBool::new(false);
        let mut record = |p: &Progress| seen.push((p.step, p.total));
        let mut monitor = Monitor::new(&mut record, Some(&cancel));
        for pass in 0..2 {
            monitor
                .as_pass(pass, 2, |m| {
                    (1..=3).try_for_each(|step| m.step(Phase::Salience, step, 3))
                })
                .unwrap();
        }
        cancel.store(true, Ordering::Relaxed);
        let stopped = monitor.as_pass(1, 2, |m| m.step(Phase::Salience, 1, 3));
        assert!(matches!(stopped, Err(EngineError::Cancelled)));
        assert_eq!(
            seen,
            [(1, 6), (2, 6), (3, 6), (4, 6), (5, 6), (6, 6), (4, 6)]
        );
    }
}
