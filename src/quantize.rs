//! llama.cpp's own quantizer (`llama_model_quantize` from the vendored llama.cpp): every type
//! `llama-quantize` accepts, written whole-or-nothing.

use std::ffi::CString;
use std::path::{Path, PathBuf};

use crate::gguf::consts::QuantType;
use crate::imatrix::{Imatrix, ImatrixError};
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
    /// The type cannot be quantized without an importance matrix and none was given.
    #[error("{qtype} needs an importance matrix, as llama-quantize does: give one with --imatrix FILE (`hopscotch imatrix` makes it from a task's documents, llama.cpp's llama-imatrix from text); `hopscotch run --imatrix` makes its own")]
    NeedsImatrix {
        /// The requested type.
        qtype: String,
    },
    /// An importance matrix was given for a float type, which the quantizer never sees.
    #[error("an importance matrix only applies to quantized types; {qtype} is written without the quantizer")]
    ImatrixUnused {
        /// The requested type.
        qtype: String,
    },
    /// The importance matrix does not fit the model.
    #[error(transparent)]
    Imatrix(Box<ImatrixError>),
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

impl From<ImatrixError> for QuantizeError {
    fn from(e: ImatrixError) -> Self {
        QuantizeError::Imatrix(Box::new(e))
    }
}

fn c_path(p: &Path) -> Result<CString, QuantizeError> {
    p.to_str()
        .and_then(|s| CString::new(s).ok())
        .ok_or_else(|| QuantizeError::Path(p.to_path_buf()))
}

/// Refuses, before any work, a type that needs an importance matrix when there is none, and an
/// importance matrix for a float type (written without the quantizer, so it would be ignored).
pub fn require_imatrix(qtype: QuantType, has_imatrix: bool) -> Result<(), QuantizeError> {
    let qname = || qtype.name().to_string();
    if qtype.needs_imatrix() && !has_imatrix {
        return Err(QuantizeError::NeedsImatrix { qtype: qname() });
    }
    if has_imatrix && matches!(qtype, QuantType::F32 | QuantType::F16 | QuantType::Bf16) {
        return Err(QuantizeError::ImatrixUnused { qtype: qname() });
    }
    Ok(())
}

/// Quantizes `input` (a GGUF) to `qtype` at `output`, through a temporary file that is renamed
/// when llama.cpp has finished. Quantized inputs are allowed (requantized). With `imatrix` the
/// quantizer weights each column's rounding error by its importance (`llama-quantize
/// --imatrix`); it is checked against `input`'s tensors first.
pub fn quantize_file(
    input: &Path,
    output: &Path,
    qtype: QuantType,
    threads: usize,
    force: bool,
    imatrix: Option<&Imatrix>,
) -> Result<(), QuantizeError> {
    check_overwrite(output, force)?;
    require_imatrix(qtype, imatrix.is_some())?;
    let gguf = crate::gguf::reader::GgufFile::open(input)?;
    if let Some(im) = imatrix {
        im.check_model(&gguf, qtype.needs_imatrix().then(|| qtype.name()))?;
    }
    drop(gguf);
    // llama.cpp's view of the importance matrix: (name, values, count) rows ending in a null
    // name; the names and values below outlive the call.
    let entries: Vec<(CString, Vec<f32>)> = imatrix
        .map(|im| {
            im.entries
                .iter()
                .filter_map(|(name, e)| Some((CString::new(name.as_str()).ok()?, e.values())))
                .collect()
        })
        .unwrap_or_default();
    let mut rows: Vec<llama_cpp_sys_2::llama_model_imatrix_data> = entries
        .iter()
        .map(|(name, values)| llama_cpp_sys_2::llama_model_imatrix_data {
            name: name.as_ptr(),
            data: values.as_ptr(),
            size: values.len(),
        })
        .collect();
    rows.push(llama_cpp_sys_2::llama_model_imatrix_data {
        name: std::ptr::null(),
        data: std::ptr::null(),
        size: 0,
    });
    crate::llamacpp::backend();
    let tmp = temp_path_for(output);
    register_temp(&tmp);
    let cin = c_path(input)?;
    let cout = c_path(&tmp)?;
    // SAFETY: both paths are valid NUL-terminated strings that outlive the call; the params
    // struct comes from llama.cpp's own defaults with plain fields changed; the importance
    // matrix rows point into `entries`, which outlives the call, and end in a null name as
    // llama.cpp reads them.
    let code = unsafe {
        let mut params = llama_cpp_sys_2::llama_model_quantize_default_params();
        params.ftype = qtype.ftype_id() as _;
        params.nthread = threads as i32;
        params.allow_requantize = true;
        if imatrix.is_some() {
            params.imatrix = rows.as_ptr();
        }
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
