//! Progress on the command line: a bar with phase, step and ETA on a terminal, plain log
//! lines (phase start, every tenth of the phase, end) when stderr is a file or pipe.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

use crate::engine::{Phase, Progress};

pub enum ProgressView {
    Bar {
        bar: ProgressBar,
        phase: Option<Phase>,
    },
    Lines {
        phase: Option<Phase>,
        last_decile: u64,
    },
}

impl ProgressView {
    pub fn for_stderr() -> Self {
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(1);
            bar.set_style(
                ProgressStyle::with_template("{msg:>9} [{bar:32}] {pos}/{len} {elapsed} ETA {eta}")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            ProgressView::Bar { bar, phase: None }
        } else {
            ProgressView::Lines {
                phase: None,
                last_decile: 0,
            }
        }
    }

    pub fn update(&mut self, p: &Progress) {
        match self {
            ProgressView::Bar { bar, phase } => {
                if *phase != Some(p.phase) {
                    *phase = Some(p.phase);
                    bar.reset();
                    bar.set_message(p.phase.as_str());
                }
                // Set on every update: a phase's total can change as it runs (salience
                // runs a second pass when the scan found a shortcut).
                bar.set_length(p.total.max(1));
                bar.set_position(p.step);
            }
            ProgressView::Lines { phase, last_decile } => {
                if *phase != Some(p.phase) {
                    *phase = Some(p.phase);
                    *last_decile = 0;
                    tracing::info!(phase = p.phase.as_str(), total = p.total, "phase started");
                }
                let decile = (p.step * 10).checked_div(p.total).unwrap_or(10);
                if decile > *last_decile {
                    *last_decile = decile;
                    tracing::info!(
                        phase = p.phase.as_str(),
                        step = p.step,
                        total = p.total,
                        "progress"
                    );
                }
            }
        }
    }

    pub fn finish(&self) {
        if let ProgressView::Bar { bar, .. } = self {
            bar.finish_and_clear();
        }
    }
}
