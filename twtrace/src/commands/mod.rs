pub mod check;
pub mod compare;
pub mod live;
pub mod record;
pub mod report;
pub mod trace;
