//! `hopscotch convert`: a checkpoint to a GGUF of any type ([`to_gguf`]), or to a Hugging Face
//! folder ([`to_hf`]); a DeciLM folder to a `deci` GGUF ([`deci_to_gguf`]). Tensors stream one at a time from the mmap to the output.

use std::path::Path;

use crate::checkpoint::{Checkpoint, DeciCheckpoint};
use crate::export::write_slim;
use crate::fold::Fold;
use crate::gguf::consts::gguf_to_hf_name;
use crate::gguf::GgmlType;
use crate::hf_write::{write_hf_folder, HfTensor};
use crate::write::{
    checkpoint_jobs, checkpoint_kvs, convert_plain, write_gguf, write_typed, FloatType, TensorJob,
    WriteError, WriteOptions, WriteSummary,
};

/// Converts a checkpoint to a GGUF at `target` as `opts` say.
pub fn to_gguf(
    ck: &Checkpoint,
    target: &Path,
    opts: &WriteOptions<'_>,
    progress: &indicatif::ProgressBar,
) -> Result<WriteSummary, WriteError> {
    let arch_name = ck.arch.gguf_arch();
    write_typed(
        target,
        opts,
        &[],
        progress,
        |path, float, bar| {
            let kvs = checkpoint_kvs(ck, arch_name, float.file_type());
            write_gguf(path, true, kvs, checkpoint_jobs(ck, float), bar)
        },
        FloatType::intermediate_for(ck),
    )
}

/// Converts a DeciLM folder to a `deci` GGUF at `target` as `opts` say, through the writer
/// `export` uses for a slim model: the folder's layers are a fold with every multiplier 1.
pub fn deci_to_gguf(
    deci: &DeciCheckpoint,
    target: &Path,
    opts: &WriteOptions<'_>,
    progress: &indicatif::ProgressBar,
) -> Result<WriteSummary, WriteError> {
    let fold = Fold::identity(&deci.attention);
    write_slim(&deci.checkpoint, &fold, target, opts, progress)
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
    let mut tensors = Vec::new();
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
        tensors.push(HfTensor {
            job: TensorJob {
                name: hf_name,
                shape: e.shape.clone(),
                dtype: out,
                produce: Box::new(move || {
                    convert_plain(e.dtype, &ck.hf_bytes(e), e.n_elements(), out).map_err(
                        |message| WriteError::Tensor {
                            name: e.name.clone(),
                            message,
                        },
                    )
                }),
            },
            shard: 0,
        });
    }
    let v = &ck.vocab;
    let config = crate::checkpoint::config_json(&ck.arch, v.bos_id, v.eos_id);
    write_hf_folder(target, force, tensors, &config, v, progress)
}
