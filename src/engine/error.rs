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
        EngineError::Internal(format!("libtorch: {}", cause_line(&err.to_string())))
    }
}

/// The line of a libtorch error that says what went wrong. Errors carry a multi-line
/// C++ backtrace after their first line, and one raised inside a model's TorchScript
/// starts with "The following operation failed in the TorchScript interpreter." and a
/// traceback, and only its last Python-style line (`RuntimeError: …`, or the model's own
/// `raise`) names the cause: that line is the one to report, not the first.
pub fn cause_line(message: &str) -> &str {
    let mut lines = message.lines().map(str::trim).filter(|l| !l.is_empty());
    let Some(first) = lines.next() else {
        return message;
    };
    if !first.contains("failed in the TorchScript interpreter") {
        return first;
    }
    lines.rfind(|line| is_exception_line(line)).unwrap_or(first)
}

/// `RuntimeError: …`, `builtins.ValueError: …`, `Exception: …`: a dotted name ending in
/// Error or Exception, then a colon.
fn is_exception_line(line: &str) -> bool {
    let Some((name, _)) = line.split_once(':') else {
        return false;
    };
    (name.ends_with("Error") || name.ends_with("Exception"))
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
}

/// Wraps a bundle problem with which bundle it was, for a one-line message.
pub fn bundle_error(role: &str, err: BundleError) -> EngineError {
    EngineError::InvalidInput(format!("{role} bundle: {err}"))
}

#[cfg(test)]
mod tests {
    use super::cause_line;

    #[test]
    fn a_torchscript_failure_is_reported_by_its_cause_not_its_preamble() {
        let interpreter = "The following operation failed in the TorchScript interpreter.\n\
            Traceback of TorchScript, serialized code (most recent call last):\n  \
            File \"code/__torch__.py\", line 11, in forward\n    \
            hog = torch.ones([8589934592], dtype=0)\n          ~~~~~~~~~~ <--- HERE\n\n\
            RuntimeError: DefaultCPUAllocator: can't allocate memory: you tried to allocate \
            8589934592 bytes.\nException raised from alloc_cpu at alloc_cpu.cpp:127\n\
            frame #0: c10::Error::Error(c10::SourceLocation, std::string) + 0x9c\n";
        assert_eq!(
            cause_line(interpreter),
            "RuntimeError: DefaultCPUAllocator: can't allocate memory: you tried to allocate \
             8589934592 bytes."
        );
        let raised = "The following operation failed in the TorchScript interpreter.\n\
            Traceback of TorchScript (most recent call last):\n  File \"m.py\", line 3\n\
            builtins.ValueError: no: refused\n";
        assert_eq!(cause_line(raised), "builtins.ValueError: no: refused");
        // Without an exception line the preamble is all there is.
        let bare = "The following operation failed in the TorchScript interpreter.\nframe #0: x\n";
        assert_eq!(
            cause_line(bare),
            "The following operation failed in the TorchScript interpreter."
        );
        // Any other error: its first line, the backtrace dropped.
        assert_eq!(
            cause_line("\n shape mismatch: [2] vs [3]\nException raised from x\nframe #0: y"),
            "shape mismatch: [2] vs [3]"
        );
    }
}
