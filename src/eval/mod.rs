//! Evaluation in llama.cpp: perplexity over a text in windows, and KL divergence and top-1
//! agreement against a reference model on the same tokens (what `llama-perplexity` reports);
//! multiple-choice task accuracy, paired against a reference on the same documents.

pub mod perplexity;
pub mod speed;
pub mod task;
