//! Evaluation in llama.cpp: perplexity over a text in windows, and KL divergence and top-1
//! agreement against a reference model on the same tokens (what `llama-perplexity` reports).

pub mod perplexity;
