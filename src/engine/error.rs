use super::bundle::BundleError;

/// Why a scan did not complete. The split matters to callers: a client mistake is exit
/// code 2 on the command line and a 4xx over HTTP; an internal failure is exit 3 / 5xx.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    InvalidInput(String),
    #[error("scan cancelled")]
    Cancelled,
    #[error("internal error: {0}")]
    Internal(String),
    /// The training loss stopped being a number. Purification restarts at a lower rate
    /// and fails with this, naming the rates, only when the last rate diverges too.
    /// Not a bug on our side: the model, data and rates together do not train, and a
    /// lower rate is the caller's to choose, so it is reported as theirs to act on
    /// (exit 2, job error code `diverged`) rather than as an internal failure.
    #[error("training diverged: {0}")]
    Diverged(String),
}

impl EngineError {
    pub fn input(what: &str, err: impl std::fmt::Display) -> Self {
        EngineError::InvalidInput(format!("{what}: {err}"))
    }

    /// Whether the caller can fix it (other files or settings) rather than us.
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            EngineError::InvalidInput(_) | EngineError::Diverged(_)
        )
    }
}

impl From<tch::TchError> for EngineError {
    /// Failures inside libtorch after the inputs were validated are ours to explain.
    fn from(err: tch::TchError) -> Self {
        EngineError::Internal(format!("libtorch: {}", first_line(&err.to_string())))
    }
}

/// libtorch errors carry a multi-line C++ backtrace; the first line says what happened.
pub fn first_line(message: &str) -> &str {
    message
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or(message)
}

/// Wraps a bundle problem with which bundle it was, for a one-line message.
pub fn bundle_error(role: &str, err: BundleError) -> EngineError {
    EngineError::InvalidInput(format!("{role} bundle: {err}"))
}
