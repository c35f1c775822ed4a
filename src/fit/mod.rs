//! The fit: train the Hopscotch scalars on task batches and choose the attention blocks to skip.
//!
//! [`scales`] trains the four scalars per layer for a fixed skip mask and scores a mask by the
//! mean training loss, the inner step of the paper's greedy, re-scored search.

pub mod plan;
pub mod scales;
