//! The attack lab: makes backdoored models from clean data, reproducibly, so the defense
//! can be measured. `attacks` poisons data; `shapes` generates the three-channel dataset;
//! `train` trains a TorchScript architecture on it; `scenario` puts the pieces together
//! for `bdscan lab`; `demo` is the fixed MNIST BadNets scenario of `bdscan demo`.

pub mod attacks;
pub mod demo;
pub mod scenario;
pub mod shapes;
pub mod train;
