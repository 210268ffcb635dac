//! Counters for `/metrics`, in the Prometheus text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::store::JobState;

#[derive(Debug, Default)]
pub struct Metrics {
    pub jobs_submitted: AtomicU64,
    pub blob_bytes_received: AtomicU64,
    pub jobs_succeeded: AtomicU64,
    pub jobs_failed: AtomicU64,
    pub jobs_cancelled: AtomicU64,
    pub leases_reaped: AtomicU64,
    /// HTTP responses by status class: 1xx..5xx.
    pub responses: [AtomicU64; 5],
}

impl Metrics {
    pub fn record_response(&self, status: u16) {
        if let Some(counter) = self
            .responses
            .get(usize::from(status / 100).wrapping_sub(1))
        {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn record_outcome(&self, state: JobState) {
        let counter = match state {
            JobState::Succeeded => &self.jobs_succeeded,
            JobState::Failed => &self.jobs_failed,
            JobState::Cancelled => &self.jobs_cancelled,
            JobState::Queued | JobState::Running => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The exposition, with the current number of jobs per state from the database.
    pub fn render(&self, jobs_by_state: &[(JobState, i64)]) -> String {
        let mut out = String::new();
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP bdscan_jobs Jobs in the database by state.\n# TYPE bdscan_jobs gauge"
        );
        for state in JobState::ALL {
            let n = jobs_by_state
                .iter()
                .find(|(s, _)| *s == state)
                .map_or(0, |(_, n)| *n);
            let _ = writeln!(out, "bdscan_jobs{{state=\"{}\"}} {n}", state.as_str());
        }
        let counters = [
            (
                "bdscan_jobs_submitted_total",
                "Jobs created by this process.",
                get(&self.jobs_submitted),
            ),
            (
                "bdscan_blob_bytes_received_total",
                "Bytes of uploads stored by this process.",
                get(&self.blob_bytes_received),
            ),
            (
                "bdscan_leases_reaped_total",
                "Expired leases this process's reaper handled.",
                get(&self.leases_reaped),
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP bdscan_jobs_finished_total Jobs this process's workers finished, by outcome.\n\
             # TYPE bdscan_jobs_finished_total counter"
        );
        for (outcome, counter) in [
            ("succeeded", &self.jobs_succeeded),
            ("failed", &self.jobs_failed),
            ("cancelled", &self.jobs_cancelled),
        ] {
            let _ = writeln!(
                out,
                "bdscan_jobs_finished_total{{outcome=\"{outcome}\"}} {}",
                get(counter)
            );
        }
        let _ = writeln!(
            out,
            "# HELP bdscan_http_responses_total HTTP responses by status class.\n\
             # TYPE bdscan_http_responses_total counter"
        );
        for (i, counter) in self.responses.iter().enumerate() {
            let _ = writeln!(
                out,
                "bdscan_http_responses_total{{class=\"{}xx\"}} {}",
                i + 1,
                get(counter)
            );
        }
        out
    }
}
