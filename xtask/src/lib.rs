//! Developer tooling behind `cargo xtask`. The library part is the Postgres bootstrap, kept here
//! so its tests can drive it directly.

pub mod bench;
pub mod pg;
pub mod pyclient;
pub mod stack;
