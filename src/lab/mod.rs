//! The attack lab: makes backdoored models from clean data, reproducibly, so the defense
//! can be measured. `badnets` poisons data; `train` trains a TorchScript architecture on
//! it; `demo` puts the pieces together on the committed MNIST fixture.

pub mod badnets;
pub mod demo;
pub mod train;
