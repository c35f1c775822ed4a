//! GGUF: constants, a validating mmap reader, a streaming v3 writer, tokenizer metadata.
//! Spec: <https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>

pub mod value;

pub use value::{Value, ValueType};
pub mod types;

pub use types::GgmlType;
pub mod consts;
pub mod imatrix;
pub mod reader;
pub mod writer;

pub use consts::{QuantType, UnknownQuantType};
pub use reader::{GgufError, GgufFile, TensorInfo};
pub use writer::{GgufWriteError, GgufWriter, Step};
pub mod vocab;
