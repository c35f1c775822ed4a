//! Checkpoint + plan -> slim GGUF for stock llama.cpp, with an Ollama Modelfile beside it.
//!
//! The plan's scalars are folded into the weights ([`crate::fold`]). With attention blocks
//! skipped the file uses llama.cpp's `deci` architecture (built for Nemotron-51B): per-layer
//! `deci.attention.head_count` / `head_count_kv` arrays with 0 for an attention-free layer,
//! whose attention tensors are absent and which gets no KV cache. A skipped block with a linear
//! stand-in keeps its heads and gets 0 KV heads, deci's "linear attention" (`attn_norm` and an
//! `n_embd x n_embd` `attn_output` only, no KV cache either). `deci` ropes q/k as `llama`
//! does (interleaved pairs), so q/k weights and biases get `llama`'s row permutation whatever the
//! family; Qwen2's q/k/v biases are optional tensors there. With nothing skipped the file is a
//! plain `llama`/`qwen2` one, as `convert` writes it.
//!
//! llama.cpp facts (vendored `src/models/deci.cpp`, `src/llama-model.cpp`): the head size comes
//! from layer 0 (`n_embd / n_head(0)`), so layer 0 keeps its attention; per-layer arrays must be
//! exactly `block_count` long and at most `LLAMA_MAX_LAYERS` entries.
//! Ollama's Modelfile: <https://github.com/ollama/ollama/blob/main/docs/modelfile.md>.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::arch::{permute_rope_rows, Family};
use crate::checkpoint::Checkpoint;
use crate::fold::{fold_values, Fold, FoldError};
use crate::gguf::consts::arch_key;
use crate::gguf::vocab::Vocab;
use crate::gguf::{GgmlType, Value};
use crate::output::{check_overwrite, AtomicFile, OutputError};
use crate::plan::{Plan, PlanError};
use crate::quantize::original_attn_v_types;
use crate::write::{
    checkpoint_kvs, convert_plain, encode_f32, float_out_type, gguf_tensor_bytes, rope_freqs_job,
    rope_heads, write_gguf, write_typed, FloatType, TensorJob, WriteError, WriteOptions,
    WriteSummary,
};

/// llama.cpp's `LLAMA_MAX_LAYERS` (`src/llama-hparams.h`): per-layer arrays hold at most this
/// many entries.
pub const LLAMA_MAX_LAYERS: usize = 512;

/// The GGUF architecture of a file with attention blocks skipped.
pub const DECI_ARCH: &str = "deci";

/// Errors exporting a slim GGUF.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The plan is invalid or was fitted on another model.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// The plan's scalars cannot be folded.
    #[error("{plan}: {source}")]
    Fold {
        /// The plan file.
        plan: PathBuf,
        /// What is wrong with the scalars.
        source: FoldError,
    },
    /// The model has more layers than llama.cpp's per-layer arrays hold.
    #[error("{model}: {n_layer} layers, but llama.cpp's per-layer head counts hold at most {max}")]
    TooManyLayers {
        /// The model.
        model: String,
        /// Its layers.
        n_layer: usize,
        /// llama.cpp's limit.
        max: usize,
    },
    /// Writing the GGUF (or quantizing it) failed.
    #[error(transparent)]
    Write(#[from] WriteError),
    /// The Modelfile could not be written.
    #[error(transparent)]
    Output(#[from] OutputError),
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct ExportSummary {
    /// The GGUF written.
    pub gguf: WriteSummary,
    /// The Ollama Modelfile written beside it.
    pub modelfile: PathBuf,
    /// The GGUF architecture (`deci` when blocks are skipped, else `llama` or `qwen2`).
    pub gguf_arch: &'static str,
    /// The skipped attention blocks, ascending.
    pub skipped_blocks: Vec<usize>,
    /// Layers in the model.
    pub n_layer: usize,
    /// Smallest and largest factor the folded residual stream is divided by.
    pub residual_range: (f64, f64),
    /// The chat template as translated for Ollama, if it could be.
    pub chat_template: Option<ChatTemplate>,
}

impl std::fmt::Display for ExportSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let skipped = if self.skipped_blocks.is_empty() {
            "none".to_string()
        } else {
            format!("{:?}", self.skipped_blocks)
        };
        writeln!(
            f,
            "wrote {} ({}, {} of {} attention blocks skipped: {skipped})",
            self.gguf,
            self.gguf_arch,
            self.skipped_blocks.len(),
            self.n_layer,
        )?;
        write!(
            f,
            "wrote {} (chat template: {}); residual scale of the folded stream {:.3}..{:.3}",
            self.modelfile.display(),
            self.chat_template
                .as_ref()
                .map_or("not translated", |t| t.name()),
            self.residual_range.0,
            self.residual_range.1
        )
    }
}

/// Exports `ck` slimmed by `plan` (read from `plan_path`, named in messages) to `target` as
/// `opts.qtype`, with an Ollama Modelfile beside it ([`modelfile_path`]). Refuses a plan fitted
/// on another model. Both files are written whole or not at all; existing ones are replaced
/// only with `opts.force`.
pub fn export(
    ck: &Checkpoint,
    plan: &Plan,
    plan_path: &Path,
    target: &Path,
    opts: &WriteOptions<'_>,
    progress: &indicatif::ProgressBar,
) -> Result<ExportSummary, ExportError> {
    let force = opts.force;
    let fold = fold_for(ck, plan, plan_path)?;
    let n_layer = ck.arch.n_layer;
    let skip = plan.skip_mask();
    let modelfile = modelfile_path(target);
    check_overwrite(target, force)?;
    check_overwrite(&modelfile, force)?;
    let slim = skip.iter().any(|&s| s);
    let gguf_arch = if slim { DECI_ARCH } else { ck.arch.gguf_arch() };
    let gguf = write_slim(ck, &fold, target, opts, progress)?;

    let skipped_blocks: Vec<usize> = (0..n_layer).filter(|&l| skip[l]).collect();
    let chat_template = ck
        .vocab
        .chat_template
        .as_deref()
        .and_then(translate_chat_template);
    let note = format!(
        "{} with {} of {n_layer} attention blocks skipped ({}) and the plan's scalars folded in, by hopscotch {}",
        ck.display_path(),
        skipped_blocks.len(),
        if skipped_blocks.is_empty() {
            "none".to_string()
        } else {
            join(&skipped_blocks)
        },
        env!("CARGO_PKG_VERSION"),
    );
    let gguf_name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let text = modelfile_text(&gguf_name, &ck.vocab, chat_template.as_ref(), &note);
    let mut f = AtomicFile::create(&modelfile, force)?;
    f.write_all(text.as_bytes())
        .map_err(|source| OutputError::Io {
            path: modelfile.clone(),
            source,
        })?;
    f.commit()?;

    Ok(ExportSummary {
        gguf,
        modelfile,
        gguf_arch,
        skipped_blocks,
        n_layer,
        residual_range: fold.residual_range(),
        chat_template,
    })
}

/// The fold of `plan` (read from `plan_path`, named in messages) into `ck`: refuses an invalid
/// plan, one fitted on another model, and a model with more layers than llama.cpp's per-layer
/// arrays hold.
pub fn fold_for(ck: &Checkpoint, plan: &Plan, plan_path: &Path) -> Result<Fold, ExportError> {
    plan.validate().map_err(|message| PlanError::Invalid {
        path: plan_path.display().to_string(),
        message,
    })?;
    plan.check_model(ck, plan_path)?;
    let n_layer = ck.arch.n_layer;
    if n_layer > LLAMA_MAX_LAYERS {
        return Err(ExportError::TooManyLayers {
            model: ck.display_path(),
            n_layer,
            max: LLAMA_MAX_LAYERS,
        });
    }
    Fold::new(n_layer, ck.arch.n_embd, &plan.skip_mask(), &plan.scales).map_err(|source| {
        ExportError::Fold {
            plan: plan_path.to_path_buf(),
            source,
        }
    })
}

/// Writes `ck` folded by `fold` to `target` as `opts.qtype`: a `deci` GGUF when the fold skips an
/// attention block, else a plain `llama`/`qwen2` one. The kept attention blocks' `attn_v` get
/// the types llama.cpp's preset gives them in the whole model.
pub fn write_slim(
    ck: &Checkpoint,
    fold: &Fold,
    target: &Path,
    opts: &WriteOptions<'_>,
    progress: &indicatif::ProgressBar,
) -> Result<WriteSummary, WriteError> {
    let qtype = opts.qtype;
    let slim = fold.layers.iter().any(|l| l.attn_skipped);
    let gguf_arch = if slim { DECI_ARCH } else { ck.arch.gguf_arch() };
    let interleave = slim || ck.arch.family == Family::Llama;
    // the kept attention blocks get the types the original's would, whatever their new index
    let overrides = if slim {
        let kept: Vec<usize> = (0..fold.layers.len())
            .filter(|&l| !fold.layers[l].attn_skipped)
            .collect();
        original_attn_v_types(qtype, &ck.arch, &kept)
    } else {
        Vec::new()
    };
    write_typed(
        target,
        opts,
        &overrides,
        progress,
        |path, float, bar| {
            let kvs = if slim {
                deci_kvs(ck, fold, float.file_type())
            } else {
                checkpoint_kvs(ck, gguf_arch, float.file_type())
            };
            write_gguf(
                path,
                true,
                kvs,
                folded_jobs(ck, fold, float, interleave),
                bar,
            )
        },
        FloatType::intermediate_for(ck),
    )
}

fn join(v: &[usize]) -> String {
    v.iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The metadata of a `deci` file: the plain metadata under `deci.*`, with the head counts as
/// per-layer INT32 arrays (0 for a skipped attention block; a linear stand-in has heads and 0 KV
/// heads) and the MLP width per layer, every
/// array `block_count` long; `vocab_size` and `rope.dimension_count` as `DeciModel` writes them.
pub fn deci_kvs(ck: &Checkpoint, fold: &Fold, file_type: u32) -> Vec<(String, Value)> {
    let a = &ck.arch;
    // A linear stand-in is a layer with heads and no KV heads: deci's "linear attention".
    let counts: Vec<(usize, usize)> = fold
        .attention_kinds()
        .iter()
        .map(|k| k.head_counts(a))
        .collect();
    let heads = Value::i32s(counts.iter().map(|&(h, _)| h as i32));
    let kv_heads = Value::i32s(counts.iter().map(|&(_, kv)| kv as i32));
    let k = |s: &str| arch_key(DECI_ARCH, s);
    let arrays = [
        (k("attention.head_count"), heads),
        (k("attention.head_count_kv"), kv_heads),
        (
            k("feed_forward_length"),
            Value::i32s(fold.layers.iter().map(|_| a.n_ff as i32)),
        ),
        (k("vocab_size"), Value::U32(a.vocab_size as u32)),
        (k("rope.dimension_count"), Value::U32(a.head_dim as u32)),
    ];
    let mut kvs = checkpoint_kvs(ck, DECI_ARCH, file_type);
    for (key, value) in arrays {
        match kvs.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => kvs.push((key, value)),
        }
    }
    kvs
}

/// The tensor jobs of the folded model: the tensors `fold` keeps, each multiplied by its fold
/// factor, q/k rows (and biases) in `llama`'s interleaved rope order when `interleave_rope`.
pub fn folded_jobs<'a>(
    ck: &'a Checkpoint,
    fold: &'a Fold,
    target: FloatType,
    interleave_rope: bool,
) -> Vec<TensorJob<'a>> {
    let mut jobs: Vec<TensorJob<'a>> = rope_freqs_job(&ck.arch).into_iter().collect();
    for (name, shape) in fold.kept_tensors(&ck.arch) {
        let dtype = float_out_type(&shape, target);
        let rows = shape.first().copied().unwrap_or(1).max(1);
        jobs.push(TensorJob {
            name: name.clone(),
            shape,
            dtype,
            produce: Box::new(move || {
                if !fold.alters(&name) {
                    return gguf_tensor_bytes(ck, ck.require(&name)?, dtype, interleave_rope);
                }
                let bytes = folded_hf_bytes(ck, fold, &name, dtype)?;
                Ok(match rope_heads(&ck.arch, &name) {
                    Some(n_head) if interleave_rope => {
                        permute_rope_rows(&bytes, bytes.len() / rows, n_head, true)
                    }
                    _ => bytes,
                })
            }),
        });
    }
    jobs
}

/// Tensor `name` (GGUF name) of the folded model as `dtype` bytes in Hugging Face layout: a
/// linear stand-in's matrix from the plan, every other tensor from `ck`, times its fold
/// factor; a tensor the fold leaves alone is converted as stored.
pub fn folded_hf_bytes(
    ck: &Checkpoint,
    fold: &Fold,
    name: &str,
    dtype: GgmlType,
) -> Result<Vec<u8>, WriteError> {
    let mut values = match fold.linear_weight(name) {
        Some(w) => w.to_vec(),
        None => {
            let e = ck.require(name)?;
            if !fold.alters(name) {
                return convert_plain(e.dtype, &ck.hf_bytes(e), e.n_elements(), dtype).map_err(
                    |message| WriteError::Tensor {
                        name: name.to_string(),
                        message,
                    },
                );
            }
            ck.f32_values(e)?
        }
    };
    fold_values(fold, name, &mut values);
    Ok(encode_f32(&values, dtype))
}

/// The Modelfile beside a GGUF: `slim.gguf` -> `slim.Modelfile` (so several exports can share a
/// folder; `ollama create NAME -f slim.Modelfile` reads it).
pub fn modelfile_path(gguf: &Path) -> PathBuf {
    let stem = gguf
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    gguf.with_file_name(format!("{stem}.Modelfile"))
}

/// A chat template family that translates to Ollama's Go template language.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatTemplate {
    /// ChatML (`<|im_start|>role\n...<|im_end|>\n`): SmolLM2, Qwen2. `default_system` is the
    /// system prompt the Jinja template inserts when the conversation has none.
    ChatMl {
        /// The built-in system prompt, if the template has one.
        default_system: Option<String>,
    },
    /// Llama 3 (`<|start_header_id|>role<|end_header_id|>\n\n...<|eot_id|>`).
    Llama3,
}

/// Ollama's template for ChatML: system messages are in `.Messages` (Ollama adds the Modelfile's
/// `SYSTEM` as one when the conversation has none), each rendered as the Jinja template does.
const CHATML_TEMPLATE: &str = "{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
";

/// Ollama's template for Llama 3 (the BOS token is added by the tokenizer, as in llama.cpp).
const LLAMA3_TEMPLATE: &str =
    "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- end }}<|start_header_id|>assistant<|end_header_id|>

";

impl ChatTemplate {
    /// The template in Ollama's Go template language.
    pub fn ollama_template(&self) -> &'static str {
        match self {
            ChatTemplate::ChatMl { .. } => CHATML_TEMPLATE,
            ChatTemplate::Llama3 => LLAMA3_TEMPLATE,
        }
    }

    /// The end-of-turn markers generation stops at.
    pub fn end_of_turn(&self) -> &'static [&'static str] {
        match self {
            ChatTemplate::ChatMl { .. } => &["<|im_end|>"],
            ChatTemplate::Llama3 => &["<|eot_id|>", "<|eom_id|>"],
        }
    }

    /// A short name for messages.
    pub fn name(&self) -> &'static str {
        match self {
            ChatTemplate::ChatMl { .. } => "ChatML",
            ChatTemplate::Llama3 => "Llama 3",
        }
    }
}

/// Recognises a Jinja chat template's family by its markers; `None` when it is none of those
/// [`ChatTemplate`] knows.
pub fn translate_chat_template(jinja: &str) -> Option<ChatTemplate> {
    if jinja.contains("<|im_start|>") && jinja.contains("<|im_end|>") {
        Some(ChatTemplate::ChatMl {
            default_system: chatml_default_system(jinja),
        })
    } else if jinja.contains("<|start_header_id|>") && jinja.contains("<|eot_id|>") {
        Some(ChatTemplate::Llama3)
    } else {
        None
    }
}

/// The literal system prompt a ChatML template inserts (`<|im_start|>system\nTEXT<|im_end|>`
/// with no template code in TEXT), newlines written as `\n` in a Jinja string included.
fn chatml_default_system(jinja: &str) -> Option<String> {
    const START: &str = "<|im_start|>system";
    jinja.match_indices(START).find_map(|(i, _)| {
        let rest = &jinja[i + START.len()..];
        let rest = rest
            .strip_prefix('\n')
            .or_else(|| rest.strip_prefix("\\n"))?;
        let text = &rest[..rest.find("<|im_end|>")?];
        let plain = !text.is_empty() && !text.contains(['{', '}', '\'', '"']);
        plain.then(|| text.replace("\\n", "\n"))
    })
}

/// Whether `s` can be written inside a Modelfile's `"..."` or `"""..."""` quotes as it is.
fn quotable(s: &str) -> bool {
    !s.is_empty() && !s.contains('"') && !s.contains('\n')
}

/// The text of an Ollama Modelfile for `gguf_name` (in the same folder): `FROM`, the translated
/// `TEMPLATE` and default `SYSTEM` (or a comment saying none could be translated), and a
/// `PARAMETER stop` for each end-of-turn marker and the EOS token that the vocabulary holds.
/// `note` becomes the opening comment.
pub fn modelfile_text(
    gguf_name: &str,
    vocab: &Vocab,
    template: Option<&ChatTemplate>,
    note: &str,
) -> String {
    let mut out = String::new();
    for line in note.lines() {
        out.push_str(&format!("# {line}\n"));
    }
    out.push_str(&format!("FROM ./{gguf_name}\n"));
    match template {
        Some(t) => {
            out.push_str(&format!("TEMPLATE \"\"\"{}\"\"\"\n", t.ollama_template()));
            if let ChatTemplate::ChatMl {
                default_system: Some(system),
            } = t
            {
                if !system.contains("\"\"\"") {
                    out.push_str(&format!("SYSTEM \"\"\"{system}\"\"\"\n"));
                }
            }
        }
        None => {
            let why = if vocab.chat_template.is_some() {
                "its chat template is not one hopscotch can translate (ChatML, Llama 3)"
            } else {
                "the model has no chat template"
            };
            out.push_str(&format!(
                "# No TEMPLATE: {why}; Ollama will use its default.\n"
            ));
        }
    }
    let mut stops: Vec<&str> = template
        .map(|t| t.end_of_turn().to_vec())
        .unwrap_or_default();
    stops.retain(|m| vocab.tokens.iter().any(|t| t == m));
    if let Some(eos) = vocab.eos_id.and_then(|id| vocab.tokens.get(id as usize)) {
        if !stops.contains(&eos.as_str()) {
            stops.push(eos);
        }
    }
    for s in stops.into_iter().filter(|s| quotable(s)) {
        out.push_str(&format!("PARAMETER stop \"{s}\"\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_system_prompts_are_found_in_both_newline_spellings() {
        let smol = "{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are SmolLM<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}";
        assert_eq!(
            translate_chat_template(smol),
            Some(ChatTemplate::ChatMl {
                default_system: Some("You are SmolLM".into())
            })
        );
        let qwen = r"{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}{%- else %}{{- '<|im_start|>system\nYou are Qwen.\nBe brief.<|im_end|>\n' }}";
        assert_eq!(
            translate_chat_template(qwen),
            Some(ChatTemplate::ChatMl {
                default_system: Some("You are Qwen.\nBe brief.".into())
            })
        );
        let plain =
            "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'}}";
        assert_eq!(
            translate_chat_template(plain),
            Some(ChatTemplate::ChatMl {
                default_system: None
            })
        );
        assert_eq!(
            translate_chat_template("<|start_header_id|>x<|end_header_id|>y<|eot_id|>"),
            Some(ChatTemplate::Llama3)
        );
        assert_eq!(translate_chat_template("[INST] {{ m }} [/INST]"), None);
    }

    #[test]
    fn modelfile_names_follow_the_gguf() {
        assert_eq!(
            modelfile_path(Path::new("/x/slim.gguf")),
            PathBuf::from("/x/slim.Modelfile")
        );
    }
}
