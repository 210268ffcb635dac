//! bdscan: finds and removes backdoors in neural networks.
//!
//! - [`engine`]: the defense (benign salience, suspect selection, AR purification) —
//!   all libtorch code, synchronous.
//! - [`lab`]: makes backdoored models and bundles to measure the defense on.
//! - [`cli`]: the `bdscan` command line.

pub mod cli;
pub mod engine;
pub mod lab;
pub mod server;
pub mod store;
