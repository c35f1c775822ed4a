//! The fit: choose the attention blocks to skip for a task and train the Hopscotch scalars,
//! writing a [`crate::plan::Plan`].
//!
//! Data flows down this list: [`data`] turns a task's documents into [`batch`]es (the teacher
//! attached); [`loss`] scores a batch under an objective; [`train`] runs Adam on the scalars;
//! [`search`] runs the greedy rounds and the baselines; [`final_training`] trains the chosen
//! blocks' scalars; [`session`] is a whole `hopscotch fit` (run, resume, report). [`linear`] fits
//! the stand-ins of skipped blocks by least squares, [`memory`] estimates a fit's peak memory
//! and refuses one the machine cannot hold, [`options`] holds the fit's error,
//! and [`parallel`] spreads independent pieces of work over the CPU's threads.

pub mod batch;
pub mod data;
pub mod final_training;
pub mod linear;
pub mod loss;
pub mod memory;
pub mod options;
pub mod parallel;
pub mod search;
pub mod session;
pub mod train;
