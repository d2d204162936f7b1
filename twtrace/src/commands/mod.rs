pub mod check;
pub mod trace;
