//! The live view (`sudo twtrace`): a top-like screen over the aggregator, driven by the kernel
//! or by a recording (`twtrace replay`).

pub mod fit;
mod header;
pub mod keys;
pub mod model;
mod tables;
pub mod time;
pub mod ui;

#[cfg(test)]
mod tests;
