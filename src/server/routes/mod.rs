//! One router per resource.

pub mod blobs;
pub mod jobs;
pub mod scans;
pub mod system;
