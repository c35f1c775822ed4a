//! hopscotch: skip the attention blocks a task does not need (Hopscotch, Eyceoz et al. 2025),
//! fold the fitted scalars into the weights, and ship a slim GGUF that stock llama.cpp runs.
//!
//! The pipeline, data flowing one way:
//!
//! ```text
//! checkpoint (HF folder | GGUF) -> model (candle, with the scalars) -> fit -> Plan (JSON)
//! checkpoint + Plan -> fold -> GGUF writer -> llama.cpp quantizer -> llama.cpp evaluation -> report
//! ```

pub mod arch;
pub mod budget;
pub mod checkpoint;
pub mod convert;
pub mod deci;
pub mod eval;
pub mod export;
pub mod export_hf;
pub mod fit;
pub mod fold;
pub mod gguf;
pub mod hf_write;
pub mod imatrix;
pub mod inspect;
pub mod llamacpp;
pub mod model;
pub mod output;
pub mod pipeline;
pub mod plan;
pub mod progress;
pub mod quantize;
pub mod report;
pub mod sweep;
pub mod task;
pub mod write;
