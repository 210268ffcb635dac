//! How a job looks to clients.

use serde::Serialize;
use serde_json::Value;

use crate::store::{Job, JobState};

#[derive(Debug, Serialize)]
pub struct JobView {
    pub id: String,
    pub state: JobState,
    pub progress: ProgressView,
    pub inputs: InputsView,
    pub config: Value,
    /// The device the job must run on; `null`: whichever worker slot claims it.
    pub device: Option<String>,
    pub attempts: i64,
    pub max_attempts: i64,
    pub cancel_requested: bool,
    pub error: Option<ErrorView>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub timings: TimingsView,
    pub links: Links,
}

#[derive(Debug, Serialize)]
pub struct ProgressView {
    pub phase: Option<String>,
    pub step: i64,
    pub total: i64,
}

#[derive(Debug, Serialize)]
pub struct InputsView {
    pub model: String,
    pub clean: String,
    pub test: Option<String>,
    pub poison: Option<String>,
    pub target_label: Option<i64>,
}

#[derive(Debug, Serialize)]
pub struct ErrorView {
    pub code: String,
    pub message: String,
}

#[derive(Debug, Serialize)]
pub struct TimingsView {
    /// From creation to the (first) start, or until now while queued.
    pub queued_ms: Option<i64>,
    /// From the first start to the end, or until now while running; none while queued.
    pub running_ms: Option<i64>,
}

#[derive(Debug, Serialize)]
pub struct Links {
    #[serde(rename = "self")]
    pub self_: String,
    pub report: Option<String>,
    pub report_html: Option<String>,
    pub artifact: Option<String>,
}

impl JobView {
    pub fn new(job: &Job) -> JobView {
        let now = crate::store::now_ms();
        let base = format!("/v1/jobs/{}", job.id);
        let done = job.state == JobState::Succeeded;
        let link = |suffix: &str| done.then(|| format!("{base}/{suffix}"));
        // A job that finished with a reason other than a re-queue note shows it.
        let error = match (job.state, &job.error_code, &job.error) {
            (JobState::Failed | JobState::Cancelled, Some(code), Some(message)) => {
                Some(ErrorView {
                    code: code.clone(),
                    message: message.clone(),
                })
            }
            _ => None,
        };
        JobView {
            id: job.id.clone(),
            state: job.state,
            progress: ProgressView {
                phase: job.progress_phase.clone(),
                step: job.progress_step,
                total: job.progress_total,
            },
            inputs: InputsView {
                model: job.model_sha256.clone(),
                clean: job.clean_sha256.clone(),
                test: job.test_sha256.clone(),
                poison: job.poison_sha256.clone(),
                target_label: job.target_label,
            },
            config: serde_json::from_str(&job.config).unwrap_or(Value::Null),
            device: job.device.clone(),
            attempts: job.attempts,
            max_attempts: job.max_attempts,
            cancel_requested: job.cancel_requested,
            error,
            created_at: rfc3339(job.created_at),
            started_at: job.started_at.map(rfc3339),
            finished_at: job.finished_at.map(rfc3339),
            timings: TimingsView {
                queued_ms: match job.started_at {
                    Some(started) => Some((started - job.created_at).max(0)),
                    // Never below zero: the times are the database's clock, `now` this
                    // process's, and the two may disagree.
                    None if job.state == JobState::Queued => Some((now - job.created_at).max(0)),
                    None => None,
                },
                // None while queued, also for a job handed back after it ran: it is
                // not running, and a clock counting on would say it is.
                running_ms: job
                    .started_at
                    .filter(|_| job.state != JobState::Queued)
                    .map(|started| (job.finished_at.unwrap_or(now) - started).max(0)),
            },
            links: Links {
                self_: base.clone(),
                report: link("report"),
                report_html: link("report.html"),
                artifact: link("artifact"),
            },
        }
    }
}

/// Unix milliseconds as an RFC 3339 UTC timestamp.
pub fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let of_day = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        of_day / 3600,
        of_day % 3600 / 60,
        of_day % 60
    )
}

#[cfg(test)]
mod tests {
    use super::rfc3339;

    #[test]
    fn formats_timestamps() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_795_000_000_000), "2026-11-18T11:06:40.000Z");
    }
}
