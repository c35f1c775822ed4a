//! GGUF: constants, a validating mmap reader, a streaming v3 writer, tokenizer metadata.
//! Spec: <https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>

pub mod value;

pub use value::{Value, ValueType};
