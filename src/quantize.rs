//! llama.cpp's own quantizer (`llama_model_quantize` from the vendored llama.cpp): every type
//! `llama-quantize` accepts, written whole-or-nothing.

use std::ffi::CString;
use std::path::{Path, PathBuf};

use crate::gguf::consts::QuantType;
use crate::output::{check_overwrite, register_temp, temp_path_for, unregister_temp, OutputError};

/// Errors from quantization.
#[derive(Debug, thiserror::Error)]
pub enum QuantizeError {
    /// The output may not be written.
    #[error(transparent)]
    Output(#[from] OutputError),
    /// The input is not a GGUF our reader accepts.
    #[error(transparent)]
    Gguf(#[from] crate::gguf::reader::GgufError),
    /// A path cannot be passed to llama.cpp.
    #[error("{0}: path is not valid UTF-8 or holds a NUL byte")]
    Path(PathBuf),
    /// llama.cpp's quantizer returned an error code.
    #[error("llama.cpp could not quantize {input} to {qtype} (error code {code})")]
    Failed {
        /// The input file.
        input: PathBuf,
        /// The requested type.
        qtype: String,
        /// llama.cpp's return value.
        code: u32,
    },
    /// Renaming the finished file failed.
    #[error("{path}: {source}")]
    Io {
        /// The target.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

fn c_path(p: &Path) -> Result<CString, QuantizeError> {
    p.to_str()
        .and_then(|s| CString::new(s).ok())
        .ok_or_else(|| QuantizeError::Path(p.to_path_buf()))
}

/// Quantizes `input` (a GGUF) to `qtype` at `output`, through a temporary file that is renamed
/// when llama.cpp has finished. Quantized inputs are allowed (requantized).
pub fn quantize_file(
    input: &Path,
    output: &Path,
    qtype: QuantType,
    threads: usize,
    force: bool,
) -> Result<(), QuantizeError> {
    check_overwrite(output, force)?;
    crate::gguf::reader::GgufFile::open(input)?;
    crate::llamacpp::backend();
    let tmp = temp_path_for(output);
    register_temp(&tmp);
    let cin = c_path(input)?;
    let cout = c_path(&tmp)?;
    // SAFETY: both paths are valid NUL-terminated strings that outlive the call; the params
    // struct comes from llama.cpp's own defaults with plain fields changed.
    let code = unsafe {
        let mut params = llama_cpp_sys_2::llama_model_quantize_default_params();
        params.ftype = qtype.ftype_id() as _;
        params.nthread = threads as i32;
        params.allow_requantize = true;
        llama_cpp_sys_2::llama_model_quantize(cin.as_ptr(), cout.as_ptr(), &params)
    };
    let result = if code != 0 {
        Err(QuantizeError::Failed {
            input: input.to_path_buf(),
            qtype: qtype.name().to_string(),
            code,
        })
    } else {
        std::fs::rename(&tmp, output).map_err(|source| QuantizeError::Io {
            path: output.to_path_buf(),
            source,
        })
    };
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    unregister_temp(&tmp);
    result
}
