//! `hopscotch convert`: a checkpoint to a GGUF of any type ([`to_gguf`]), or to a Hugging Face
//! folder ([`to_hf`]). Tensors stream one at a time from the mmap to the output.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::checkpoint::{Checkpoint, CheckpointError};
use crate::gguf::consts::{gguf_to_hf_name, QuantType};
use crate::gguf::imatrix::Imatrix;
use crate::gguf::GgmlType;
use crate::output::{AtomicFile, OutputError};
use crate::write::{
    checkpoint_jobs, checkpoint_kvs, convert_plain, write_gguf, write_typed, FloatType, WriteError,
    WriteSummary,
};

/// Converts a checkpoint to a GGUF of quant type `qtype` at `target`.
pub fn to_gguf(
    ck: &Checkpoint,
    target: &Path,
    qtype: QuantType,
    force: bool,
    threads: usize,
    imatrix: Option<&Imatrix>,
    progress: &indicatif::ProgressBar,
) -> Result<WriteSummary, WriteError> {
    let arch_name = ck.arch.gguf_arch();
    write_typed(
        target,
        qtype,
        force,
        threads,
        imatrix,
        &[],
        progress,
        |path, float, bar| {
            let kvs = checkpoint_kvs(ck, arch_name, float.file_type());
            write_gguf(path, true, kvs, checkpoint_jobs(ck, float), bar)
        },
        FloatType::intermediate_for(ck),
    )
}

/// Writes a Hugging Face folder (model.safetensors, config.json, tokenizer.json,
/// tokenizer_config.json, generation_config.json) from a checkpoint. Plain float tensors keep
/// their type; quantized ones are dequantized to f32.
pub fn to_hf(
    ck: &Checkpoint,
    target: &Path,
    force: bool,
    progress: &indicatif::ProgressBar,
) -> Result<WriteSummary, WriteError> {
    if target.exists() && !force {
        return Err(OutputError::Exists(target.to_path_buf()).into());
    }
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let tmp_dir = target.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| WriteError::Io { path, source }
    };
    std::fs::create_dir_all(&tmp_dir).map_err(io(&tmp_dir))?;
    crate::output::register_temp(&tmp_dir);
    let result = write_hf_files(ck, &tmp_dir, progress).and_then(|n| {
        if target.exists() {
            std::fs::remove_dir_all(target).map_err(io(target))?;
        }
        std::fs::rename(&tmp_dir, target).map_err(io(target))?;
        Ok(n)
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp_dir);
    }
    crate::output::unregister_temp(&tmp_dir);
    let n_tensors = result?;
    let file_bytes = std::fs::read_dir(target)
        .map(|d| {
            d.filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0);
    Ok(WriteSummary {
        path: target.to_path_buf(),
        n_tensors,
        file_bytes,
    })
}

fn write_hf_files(
    ck: &Checkpoint,
    dir: &Path,
    progress: &indicatif::ProgressBar,
) -> Result<usize, WriteError> {
    let io = |path: PathBuf| move |source| WriteError::Io { path, source };
    // safetensors: header first (all shapes are known), then each tensor streamed.
    let mut entries = Vec::new();
    for (name, _) in ck.arch.expected_tensors() {
        let e = ck.require(&name)?;
        let hf_name = gguf_to_hf_name(&name).ok_or_else(|| WriteError::Tensor {
            name: name.clone(),
            message: "has no Hugging Face name".into(),
        })?;
        let out = match e.dtype {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => e.dtype,
            _ => GgmlType::F32,
        };
        entries.push((e, hf_name, out));
    }
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut offset = 0usize;
    for (e, hf_name, out) in &entries {
        let n = out.tensor_bytes(&e.shape).unwrap_or(0);
        let dtype = match out {
            GgmlType::F16 => "F16",
            GgmlType::BF16 => "BF16",
            _ => "F32",
        };
        header.insert(
            hf_name.clone(),
            serde_json::json!({"dtype": dtype, "shape": e.shape, "data_offsets": [offset, offset + n]}),
        );
        offset += n;
    }
    let mut header_bytes = serde_json::to_vec(&header).expect("JSON of plain values");
    while !header_bytes.len().is_multiple_of(8) {
        header_bytes.push(b' ');
    }
    progress.set_length(offset as u64);
    let st_path = dir.join("model.safetensors");
    let mut f = AtomicFile::create(&st_path, true)?;
    let werr = io(st_path.clone());
    f.write_all(&(header_bytes.len() as u64).to_le_bytes())
        .and_then(|_| f.write_all(&header_bytes))
        .map_err(werr)?;
    for (e, _, out) in &entries {
        let bytes =
            convert_plain(e.dtype, &ck.hf_bytes(e), e.n_elements(), *out).map_err(|message| {
                WriteError::Tensor {
                    name: e.name.clone(),
                    message,
                }
            })?;
        f.write_all(&bytes).map_err(io(st_path.clone()))?;
        progress.inc(bytes.len() as u64);
    }
    f.commit()?;
    progress.finish_and_clear();

    let v = &ck.vocab;
    let json_files = [
        (
            "config.json",
            crate::checkpoint::config_json(&ck.arch, v.bos_id, v.eos_id),
        ),
        (
            "tokenizer.json",
            v.to_tokenizer_json().map_err(CheckpointError::from)?,
        ),
        ("tokenizer_config.json", v.to_tokenizer_config_json()),
        ("generation_config.json", {
            let mut g = serde_json::json!({});
            if let Some(b) = v.bos_id {
                g["bos_token_id"] = b.into();
            }
            if let Some(e) = v.eos_id {
                g["eos_token_id"] = e.into();
            }
            g
        }),
    ];
    for (file, json) in json_files {
        let path = dir.join(file);
        let text = serde_json::to_string_pretty(&json).expect("JSON of plain values");
        std::fs::write(&path, text).map_err(io(path.clone()))?;
    }
    Ok(entries.len())
}
