//! The live view (`sudo twtrace`): a top-like screen over the aggregator, driven by the kernel
//! or by a recording (`twtrace replay`).

pub mod model;
pub mod ui;

#[cfg(test)]
mod tests;
