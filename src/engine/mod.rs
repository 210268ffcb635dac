//! The defense engine: everything that touches libtorch, synchronous and free of HTTP,
//! async and storage. It takes file paths and a config and returns a report plus a
//! purified model file, reporting progress and honouring cancellation through a
//! [`Monitor`].

pub mod activation;
pub mod allocator;
pub mod anp;
pub mod archive;
pub mod bundle;
pub mod clp;
pub mod config;
pub mod data;
pub mod error;
pub mod fine_pruning;
pub mod identify;
pub mod layers;
pub mod metrics;
pub mod model;
mod npy;
pub mod patterns;
pub mod progress;
pub mod regularizer;
pub mod report;
pub mod salience;
pub mod scan;
pub mod training;
pub mod unlearn;

pub use config::{Aggregation, Method, Regularizer, ScanConfig};
pub use error::EngineError;
pub use progress::{Monitor, Phase, Progress};
pub use report::ScanReport;
pub use scan::{run_scan, ScanInputs, LIBTORCH_VERSION};
