//! The fit: train the Hopscotch scalars on task batches and choose the attention blocks to skip.
//!
//! [`scales`] trains the four scalars per layer for a fixed skip mask and scores a mask by the
//! mean training loss, the inner step of the paper's greedy, re-scored search; [`data`] turns a
//! task into batches; [`linear`] fits linear stand-ins for skipped blocks by least squares
//! (`--linear-attention`); [`search`] runs the rounds, the baselines and the whole
//! `hopscotch fit`; [`plan`] is what a fit writes; [`parallel`] spreads the independent pieces
//! of work over the CPU's threads.

pub mod data;
pub mod linear;
pub mod parallel;
pub mod plan;
pub mod progress;
pub mod scales;
pub mod search;
