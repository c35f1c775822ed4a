//! Writing a Hugging Face folder: safetensors (one file, or shards with
//! `model.safetensors.index.json`), config.json, tokenizer.json, tokenizer_config.json and
//! generation_config.json. The folder is written under a temporary name beside the target and
//! renamed when whole; each tensor streams from its producer to the file.
//! Safetensors format: <https://github.com/huggingface/safetensors#format>.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use serde_json::{json, Value as Json};

use crate::checkpoint::CheckpointError;
use crate::gguf::vocab::Vocab;
use crate::gguf::GgmlType;
use crate::output::{AtomicFile, OutputError};
use crate::write::{TensorJob, WriteError, WriteSummary};

/// The index file of a sharded folder.
pub const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";

/// One tensor of the folder: its job (named by its Hugging Face name, producing bytes in
/// Hugging Face layout) and the shard it goes to.
pub struct HfTensor<'a> {
    /// Name, shape, type and bytes.
    pub job: TensorJob<'a>,
    /// The shard (any number; shards keep their order and empty ones are left out).
    pub shard: usize,
}

/// safetensors' name of a plain float type.
fn safetensors_dtype(t: GgmlType) -> Result<&'static str, String> {
    match t {
        GgmlType::F32 => Ok("F32"),
        GgmlType::F16 => Ok("F16"),
        GgmlType::BF16 => Ok("BF16"),
        other => Err(format!("{other} has no safetensors type")),
    }
}

/// The file name of shard `i` (from 0) of `n`: `model.safetensors` alone, else
/// `model-0000i-of-0000n.safetensors` as `transformers` names them.
fn shard_name(i: usize, n: usize) -> String {
    if n == 1 {
        "model.safetensors".into()
    } else {
        format!("model-{:05}-of-{n:05}.safetensors", i + 1)
    }
}

/// Writes the folder `target` (replacing it only with `force`): the tensors in their shards,
/// `config`, the tokenizer files from `vocab`, and a generation_config.json with its BOS and
/// EOS ids.
pub fn write_hf_folder(
    target: &Path,
    force: bool,
    tensors: Vec<HfTensor<'_>>,
    config: &Json,
    vocab: &Vocab,
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
    std::fs::create_dir_all(&tmp_dir).map_err(io(&tmp_dir))?;
    crate::output::register_temp(&tmp_dir);
    let n_tensors = tensors.len();
    let result = write_files(&tmp_dir, tensors, config, vocab, progress).and_then(|()| {
        if target.exists() {
            std::fs::remove_dir_all(target).map_err(io(target))?;
        }
        std::fs::rename(&tmp_dir, target).map_err(io(target))
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp_dir);
    }
    crate::output::unregister_temp(&tmp_dir);
    result?;
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

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> WriteError {
    let path = path.to_path_buf();
    move |source| WriteError::Io { path, source }
}

fn write_files(
    dir: &Path,
    tensors: Vec<HfTensor<'_>>,
    config: &Json,
    vocab: &Vocab,
    progress: &indicatif::ProgressBar,
) -> Result<(), WriteError> {
    let mut shards: BTreeMap<usize, Vec<TensorJob<'_>>> = BTreeMap::new();
    for t in tensors {
        shards.entry(t.shard).or_default().push(t.job);
    }
    let total: u64 = shards
        .values()
        .flatten()
        .map(|j| j.dtype.tensor_bytes(&j.shape).unwrap_or(0) as u64)
        .sum();
    progress.set_length(total);
    let n = shards.len().max(1);
    let mut weight_map = serde_json::Map::new();
    for (i, jobs) in shards.values().enumerate() {
        let file = shard_name(i, n);
        write_safetensors(&dir.join(&file), jobs, progress)?;
        for j in jobs {
            weight_map.insert(j.name.clone(), Json::String(file.clone()));
        }
    }
    if n > 1 {
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        write_json(&dir.join(SAFETENSORS_INDEX), &index)?;
    }
    progress.finish_and_clear();

    let mut generation = json!({});
    if let Some(b) = vocab.bos_id {
        generation["bos_token_id"] = b.into();
    }
    if let Some(e) = vocab.eos_id {
        generation["eos_token_id"] = e.into();
    }
    let tokenizer = vocab.to_tokenizer_json().map_err(CheckpointError::from)?;
    for (file, value) in [
        ("config.json", config),
        ("tokenizer.json", &tokenizer),
        ("tokenizer_config.json", &vocab.to_tokenizer_config_json()),
        ("generation_config.json", &generation),
    ] {
        write_json(&dir.join(file), value)?;
    }
    Ok(())
}

fn write_json(path: &Path, value: &Json) -> Result<(), WriteError> {
    let text = serde_json::to_string_pretty(value).expect("JSON of plain values");
    std::fs::write(path, text).map_err(io(path))
}

/// Writes one safetensors file: the header (every shape and type is known up front), then
/// each tensor's bytes as its job produces them.
fn write_safetensors(
    path: &Path,
    jobs: &[TensorJob<'_>],
    progress: &indicatif::ProgressBar,
) -> Result<(), WriteError> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0usize;
    let mut sizes = Vec::with_capacity(jobs.len());
    for j in jobs {
        let terr = |message: String| WriteError::Tensor {
            name: j.name.clone(),
            message,
        };
        let n = j
            .dtype
            .tensor_bytes(&j.shape)
            .ok_or_else(|| terr(format!("shape {:?} overflows", j.shape)))?;
        let dtype = safetensors_dtype(j.dtype).map_err(terr)?;
        header.insert(
            j.name.clone(),
            json!({"dtype": dtype, "shape": j.shape, "data_offsets": [offset, offset + n]}),
        );
        offset += n;
        sizes.push(n);
    }
    let mut header_bytes = serde_json::to_vec(&header).expect("JSON of plain values");
    // the data starts 8-byte aligned, as the safetensors writer pads its header
    while !header_bytes.len().is_multiple_of(8) {
        header_bytes.push(b' ');
    }
    let mut f = AtomicFile::create(path, true)?;
    f.write_all(&(header_bytes.len() as u64).to_le_bytes())
        .and_then(|_| f.write_all(&header_bytes))
        .map_err(io(path))?;
    for (j, n) in jobs.iter().zip(sizes) {
        let bytes = (j.produce)()?;
        if bytes.len() != n {
            return Err(WriteError::Tensor {
                name: j.name.clone(),
                message: format!("produced {} bytes where its header says {n}", bytes.len()),
            });
        }
        f.write_all(&bytes).map_err(io(path))?;
        progress.inc(n as u64);
    }
    f.commit()?;
    Ok(())
}
