//! llama.cpp's own quantizer (`llama_model_quantize` from the vendored llama.cpp): every type
//! `llama-quantize` accepts, written whole-or-nothing.

use std::ffi::CString;
use std::path::{Path, PathBuf};

use crate::arch::{Arch, Family};
use crate::gguf::consts::QuantType;
use crate::gguf::imatrix::{Imatrix, ImatrixFileError};
use crate::gguf::types::GgmlType;
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
    Imatrix(Box<ImatrixFileError>),
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

impl From<ImatrixFileError> for QuantizeError {
    fn from(e: ImatrixFileError) -> Self {
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

/// One tensor given its own type, as `llama-quantize --tensor-type` does, instead of the one the
/// preset's mixture would choose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeOverride {
    /// The tensor's name in the GGUF.
    pub tensor: String,
    /// Its type.
    pub ggml_type: GgmlType,
}

/// The types the `qtype` mixture gives the original model's `attn_v` tensors in `attn_layers`,
/// for a slim file that keeps only those: what llama.cpp's quantizer (`llama-quant.cpp`,
/// `llama_tensor_get_type_impl`) chooses for attn_v depends, in q3_k_m, q4_k_s, q4_k_m and
/// q5_k_m, on the tensor's index among the file's attn_v tensors and on their count. In a
/// file with attention blocks skipped both shift, and the kept layers would get other types
/// than the same layers of the original (in q4_k_m on 30 layers with four skipped, 12 of the 26
/// swap between 6-bit and 4-bit), so the slim file's quantization noise would differ from the
/// original's for no reason. Replicates those rules for the original's layer count (index = layer,
/// as every layer of a Llama or Qwen2 model has attention), with the 70B bump that follows
/// them; other presets do not depend on the index and get no overrides.
pub fn original_attn_v_types(
    qtype: QuantType,
    arch: &Arch,
    attn_layers: &[usize],
) -> Vec<TypeOverride> {
    if !matches!(
        qtype,
        QuantType::Q3KM | QuantType::Q4KS | QuantType::Q4KM | QuantType::Q5KM
    ) {
        return Vec::new();
    }
    let n = arch.n_layer as i64;
    let use_more_bits = |i: i64| i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2;
    // llama.cpp's model type 70B: Llama with grouped-query attention or Qwen2, at 80 layers
    let is_70b =
        arch.n_layer == 80 && (arch.family == Family::Qwen2 || arch.n_head != arch.n_head_kv);
    attn_layers
        .iter()
        .map(|&layer| {
            let i = layer as i64;
            let mut t = match qtype {
                QuantType::Q3KM if i < 2 => GgmlType::Q5_K,
                QuantType::Q3KM => GgmlType::Q4_K,
                QuantType::Q4KS if i < 4 => GgmlType::Q5_K,
                QuantType::Q4KM | QuantType::Q5KM if use_more_bits(i) => GgmlType::Q6_K,
                QuantType::Q5KM => GgmlType::Q5_K,
                _ => GgmlType::Q4_K,
            };
            if is_70b && matches!(t, GgmlType::Q3_K | GgmlType::Q4_K) {
                t = GgmlType::Q5_K;
            }
            TypeOverride {
                tensor: format!("blk.{layer}.attn_v.weight"),
                ggml_type: t,
            }
        })
        .collect()
}

/// Quantizes `input` (a GGUF) to `qtype` at `output`, through a temporary file that is renamed
/// when llama.cpp has finished. Quantized inputs are allowed (requantized). With `imatrix` the
/// quantizer weights each column's rounding error by its importance (`llama-quantize
/// --imatrix`); it is checked against `input`'s tensors first. `overrides` give tensors their
/// own types (then fitted to their shape as llama.cpp does for every type).
pub fn quantize_file(
    input: &Path,
    output: &Path,
    qtype: QuantType,
    threads: usize,
    force: bool,
    imatrix: Option<&Imatrix>,
    overrides: &[TypeOverride],
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
    // the overrides as llama.cpp reads them: (pattern, type) rows ending in a null pattern; each
    // pattern is a regular expression matching the one tensor's whole name
    let patterns: Vec<(CString, GgmlType)> = overrides
        .iter()
        .filter_map(|o| {
            let pattern = format!("^{}$", o.tensor.replace('.', "\\."));
            Some((CString::new(pattern).ok()?, o.ggml_type))
        })
        .collect();
    let mut type_rows: Vec<llama_cpp_sys_2::llama_model_tensor_override> = patterns
        .iter()
        .map(
            |(pattern, t)| llama_cpp_sys_2::llama_model_tensor_override {
                pattern: pattern.as_ptr(),
                type_: t.id() as _,
            },
        )
        .collect();
    type_rows.push(llama_cpp_sys_2::llama_model_tensor_override {
        pattern: std::ptr::null(),
        type_: 0,
    });
    crate::llamacpp::backend();
    let tmp = temp_path_for(output);
    register_temp(&tmp);
    let cin = c_path(input)?;
    let cout = c_path(&tmp)?;
    // SAFETY: both paths are valid NUL-terminated strings that outlive the call; the params
    // struct comes from llama.cpp's own defaults with plain fields changed; the importance
    // matrix rows point into `entries`, which outlives the call, and end in a null name as
    // llama.cpp reads them; the override rows likewise point into `patterns` and end in a null
    // pattern.
    let code = unsafe {
        let mut params = llama_cpp_sys_2::llama_model_quantize_default_params();
        params.ftype = qtype.ftype_id() as _;
        params.nthread = threads as i32;
        params.allow_requantize = true;
        if imatrix.is_some() {
            params.imatrix = rows.as_ptr();
        }
        if !overrides.is_empty() {
            params.tt_overrides = type_rows.as_ptr();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::tiny_arch;

    fn types(qtype: QuantType, arch: &Arch, layers: &[usize]) -> Vec<&'static str> {
        original_attn_v_types(qtype, arch, layers)
            .iter()
            .map(|o| o.ggml_type.name())
            .collect()
    }

    #[test]
    fn attn_v_types_follow_the_original_layer_count() {
        let arch = Arch {
            n_layer: 30,
            ..tiny_arch()
        };
        // llama.cpp's q4_k_m on SmolLM2's 30 layers (read from a file it wrote): 6 bits in
        // layers 0-2, every third from 5 and the last four
        let all: Vec<usize> = (0..30).collect();
        let more: Vec<usize> = (0..30)
            .filter(|&l| types(QuantType::Q4KM, &arch, &all)[l] == "q6_K")
            .collect();
        assert_eq!(
            more,
            vec![0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
        );
        // a kept layer gets its own type, not the one of its index among the kept
        let kept = [0, 1, 2, 3, 4, 5, 8, 9, 10, 11];
        let overrides = original_attn_v_types(QuantType::Q4KM, &arch, &kept);
        assert_eq!(overrides[6].tensor, "blk.8.attn_v.weight");
        assert_eq!(types(QuantType::Q4KM, &arch, &kept)[6], "q6_K");
        assert_eq!(types(QuantType::Q5KM, &arch, &[7, 8]), ["q5_K", "q6_K"]);
        assert_eq!(types(QuantType::Q3KM, &arch, &[1, 2]), ["q5_K", "q4_K"]);
        assert_eq!(types(QuantType::Q4KS, &arch, &[3, 4]), ["q5_K", "q4_K"]);
        // presets whose attn_v type does not depend on the index get no overrides
        for q in [
            QuantType::Q4_0,
            QuantType::Q8_0,
            QuantType::Q2K,
            QuantType::Q6K,
        ] {
            assert!(original_attn_v_types(q, &arch, &all).is_empty());
        }
        // 70B (80 layers, grouped-query attention): 4-bit attn_v becomes 5-bit
        let big = Arch {
            n_layer: 80,
            ..tiny_arch()
        };
        assert_eq!(types(QuantType::Q4KM, &big, &[10, 12]), ["q5_K", "q6_K"]);
        let mha = Arch {
            n_head_kv: big.n_head,
            ..big
        };
        assert_eq!(types(QuantType::Q4KM, &mha, &[10, 12]), ["q4_K", "q6_K"]);
    }
}
