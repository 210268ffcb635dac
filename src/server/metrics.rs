//! Counters for `/metrics`, in the Prometheus text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::store::JobState;

/// A Prometheus histogram with fixed upper bounds (seconds), lock-free.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Cumulative-on-render counts per bucket; the last slot is +Inf.
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, seconds: f64) {
        let slot = self
            .bounds
            .iter()
            .position(|&b| seconds <= b)
            .unwrap_or(self.bounds.len());
        self.counts[slot].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add((seconds.max(0.0) * 1e6) as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, count) in self.counts.iter().enumerate() {
            cumulative += count.load(Ordering::Relaxed);
            let le = self
                .bounds
                .get(i)
                .map_or("+Inf".to_string(), |b| b.to_string());
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {cumulative}");
    }
}

/// The job error codes counted one by one; any other is counted as `other`, so a code
/// never seen before cannot add a series.
pub const FAILURE_CODES: [&str; 9] = [
    "invalid_input",
    "diverged",
    "memory_limit",
    "out_of_memory",
    "timed_out",
    "worker_crashed",
    "internal",
    "lease_expired",
    "other",
];

const HTTP_BOUNDS: &[f64] = &[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0];
const JOB_BOUNDS: &[f64] = &[
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];

#[derive(Debug)]
pub struct Metrics {
    /// Time from request to response headers, every route.
    pub http_latency: Histogram,
    /// Claim to finish of jobs this process's workers finished.
    pub job_duration: Histogram,
    pub jobs_submitted: AtomicU64,
    pub blob_bytes_received: AtomicU64,
    pub jobs_succeeded: AtomicU64,
    pub jobs_failed: AtomicU64,
    pub jobs_cancelled: AtomicU64,
    pub leases_reaped: AtomicU64,
    /// Finished jobs this process's reaper deleted past `job_retention`.
    pub jobs_expired: AtomicU64,
    /// HTTP responses by status class: 1xx..5xx.
    pub responses: [AtomicU64; 5],
    /// Failed jobs this process's workers and reaper recorded, by error code
    /// (`FAILURE_CODES`).
    pub failures: [AtomicU64; FAILURE_CODES.len()],
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            http_latency: Histogram::new(HTTP_BOUNDS),
            job_duration: Histogram::new(JOB_BOUNDS),
            jobs_submitted: AtomicU64::default(),
            blob_bytes_received: AtomicU64::default(),
            jobs_succeeded: AtomicU64::default(),
            jobs_failed: AtomicU64::default(),
            jobs_cancelled: AtomicU64::default(),
            leases_reaped: AtomicU64::default(),
            jobs_expired: AtomicU64::default(),
            responses: Default::default(),
            failures: Default::default(),
        }
    }
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

    /// A failed job's error code, counted under `other` when it is none of
    /// [`FAILURE_CODES`].
    pub fn record_failure(&self, code: &str) {
        let slot = FAILURE_CODES
            .iter()
            .position(|known| *known == code)
            .unwrap_or(FAILURE_CODES.len() - 1);
        self.failures[slot].fetch_add(1, Ordering::Relaxed);
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
            (
                "bdscan_jobs_expired_total",
                "Finished jobs this process's reaper deleted past their retention.",
                get(&self.jobs_expired),
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
            "# HELP bdscan_jobs_failed_total Jobs this process's workers failed, by error code.\n\
             # TYPE bdscan_jobs_failed_total counter"
        );
        for (code, counter) in FAILURE_CODES.iter().zip(&self.failures) {
            let _ = writeln!(
                out,
                "bdscan_jobs_failed_total{{code=\"{code}\"}} {}",
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
        self.http_latency.render(
            &mut out,
            "bdscan_http_request_duration_seconds",
            "Time to answer HTTP requests.",
        );
        self.job_duration.render(
            &mut out,
            "bdscan_job_duration_seconds",
            "First claim to finish, for jobs this process finished.",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_counted_by_known_code_and_the_rest_as_other() {
        let metrics = Metrics::default();
        metrics.record_failure("memory_limit");
        metrics.record_failure("memory_limit");
        metrics.record_failure("a code from a newer replica");
        let out = metrics.render(&[]);
        assert!(
            out.contains("bdscan_jobs_failed_total{code=\"memory_limit\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("bdscan_jobs_failed_total{code=\"other\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("bdscan_jobs_failed_total{code=\"timed_out\"} 0\n"),
            "{out}"
        );
    }

    #[test]
    fn histogram_buckets_are_cumulative_with_sum_and_count() {
        let h = Histogram::new(&[0.1, 1.0]);
        h.observe(0.05);
        h.observe(0.5);
        h.observe(7.0);
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"0.1\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"1\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_sum 7.55\nx_count 3"), "{out}");
    }
}
