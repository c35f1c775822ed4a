//! The vendored llama.cpp (through `llama-cpp-2`): one process-wide backend with its logging
//! silenced, model loading that checks the file with our own GGUF reader first, and logits.

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;

/// Errors from llama.cpp.
#[derive(Debug, thiserror::Error)]
pub enum LlamaError {
    /// The file is not a GGUF our reader accepts (checked before llama.cpp sees it).
    #[error(transparent)]
    Gguf(#[from] crate::gguf::reader::GgufError),
    /// llama.cpp refused to load the model.
    #[error("{path}: llama.cpp could not load the model: {message}")]
    Load {
        /// The file.
        path: PathBuf,
        /// llama.cpp's error.
        message: String,
    },
    /// A context or a decode failed.
    #[error("{path}: llama.cpp {what} failed: {message}")]
    Run {
        /// The model file.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// llama.cpp's error.
        message: String,
    },
}

/// The process-wide llama.cpp backend, initialised once with its logs turned off.
pub fn backend() -> &'static LlamaBackend {
    static BACKEND: OnceLock<LlamaBackend> = OnceLock::new();
    BACKEND.get_or_init(|| {
        llama_cpp_2::send_logs_to_tracing(
            llama_cpp_2::LogOptions::default().with_logs_enabled(false),
        );
        LlamaBackend::init().expect("llama.cpp backend is initialised only here")
    })
}

/// A model loaded in llama.cpp, with its path for messages.
pub struct LoadedModel {
    /// The model.
    pub model: LlamaModel,
    /// Its file.
    pub path: PathBuf,
}

impl LoadedModel {
    /// Loads a GGUF on the CPU after checking it with our own reader.
    pub fn load(path: &Path) -> Result<LoadedModel, LlamaError> {
        crate::gguf::reader::GgufFile::open(path)?;
        let model = LlamaModel::load_from_file(backend(), path, &LlamaModelParams::default())
            .map_err(|e| LlamaError::Load {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        Ok(LoadedModel {
            model,
            path: path.to_path_buf(),
        })
    }

    /// Tokenizes text as llama.cpp does (`add_bos` adds the model's BOS when it wants one).
    pub fn tokenize(&self, text: &str, add_bos: bool) -> Vec<u32> {
        self.model
            .vocab()
            .tokenize(text.as_bytes(), add_bos, false)
            .into_iter()
            .map(|t| t.0 as u32)
            .collect()
    }

    /// Vocabulary size.
    pub fn n_vocab(&self) -> usize {
        self.model.n_vocab().max(0) as usize
    }

    /// A context of `n_ctx` tokens that returns logits for every batch position asked for,
    /// with llama.cpp's default f16 KV cache.
    pub fn context(&self, n_ctx: usize, threads: usize) -> Result<Ctx<'_>, LlamaError> {
        self.context_with(n_ctx, threads, false)
    }

    /// As [`LoadedModel::context`], with an f32 KV cache when `f32_kv` (for exact comparisons:
    /// the default f16 cache rounds keys and values to 11 bits).
    pub fn context_with(
        &self,
        n_ctx: usize,
        threads: usize,
        f32_kv: bool,
    ) -> Result<Ctx<'_>, LlamaError> {
        use llama_cpp_2::context::params::KvCacheType;
        let n_ctx = n_ctx.max(1) as u32;
        let kv = if f32_kv {
            KvCacheType::F32
        } else {
            KvCacheType::F16
        };
        let mut params = LlamaContextParams::default()
            .with_type_k(kv)
            .with_type_v(kv)
            .with_n_ctx(NonZeroU32::new(n_ctx))
            .with_n_batch(n_ctx)
            .with_n_ubatch(n_ctx.min(512))
            .with_n_threads(threads as i32)
            .with_n_threads_batch(threads as i32)
            // One KV cache for all sequences: several fill the context together, and a token
            // can belong to several (a shared prefix).
            .with_n_seq_max(n_ctx.min(MAX_SEQS as u32))
            .with_kv_unified(true);
        if f32_kv {
            // llama.cpp's CPU flash attention rounds queries to f16 whatever the cache type.
            params =
                params.with_flash_attention_policy(llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_DISABLED);
        }
        let ctx = self
            .model
            .new_context(backend(), params)
            .map_err(|e| LlamaError::Run {
                path: self.path.clone(),
                what: "context creation",
                message: e.to_string(),
            })?;
        Ok(Ctx {
            ctx,
            path: &self.path,
            n_ctx: n_ctx as usize,
            cached: 0,
        })
    }
}

/// The most sequences one decode holds, and so the most a batch token can belong to; a context
/// of fewer tokens holds as many sequences as tokens (llama.cpp reserves a logits row per
/// sequence and at most one per batch token). The rows are reserved up front, so this stays well
/// below llama.cpp's `LLAMA_MAX_SEQ` (256).
pub const MAX_SEQS: usize = 64;

/// Sequences decoded together that begin with the same tokens: the prefix enters the batch once,
/// seen by every sequence of the group, and each sequence's own tokens follow it.
pub struct SharedPrefix<'a> {
    /// The tokens every sequence of the group starts with.
    pub prefix: &'a [u32],
    /// Each sequence's tokens after the prefix, with the positions whose logits are wanted
    /// (indices into prefix + suffix).
    pub suffixes: Vec<(&'a [u32], Vec<usize>)>,
}

/// The sequence that holds a prefix cached by [`Ctx::cache_prefix`]; the sequences of
/// [`Ctx::logits_after_prefix`] are numbered after it.
pub const PREFIX_SEQ: i32 = 0;

/// A llama.cpp context over one model.
pub struct Ctx<'m> {
    ctx: LlamaContext<'m>,
    path: &'m Path,
    n_ctx: usize,
    /// Tokens of the prefix held in [`PREFIX_SEQ`] (0: none; any other decode drops it).
    cached: usize,
}

impl Ctx<'_> {
    /// Tokens the context holds.
    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    /// Evaluates one sequence from position 0 (clearing the cache first) and returns the logits
    /// at each position in `want` (indices into `tokens`), row by row.
    pub fn logits(&mut self, tokens: &[u32], want: &[usize]) -> Result<Vec<Vec<f32>>, LlamaError> {
        self.clear();
        let mut batch = LlamaBatch::new(tokens.len().max(1), 1);
        let mut flags = vec![false; tokens.len()];
        for &w in want {
            if let Some(f) = flags.get_mut(w) {
                *f = true;
            }
        }
        for (i, (&t, &f)) in tokens.iter().zip(&flags).enumerate() {
            batch
                .add(LlamaToken(t as i32), i as i32, &[0], f)
                .map_err(|e| self.err("batch", e.to_string()))?;
        }
        self.ctx
            .decode(&mut batch)
            .map_err(|e| self.err("decode", e.to_string()))?;
        Ok(want
            .iter()
            .map(|&w| self.ctx.get_logits_ith(w as i32).to_vec())
            .collect())
    }

    /// Evaluates several independent sequences in one decode (sequence ids 0..n) and returns,
    /// for each, the logits at the positions asked for.
    pub fn logits_multi(
        &mut self,
        seqs: &[(&[u32], Vec<usize>)],
    ) -> Result<Vec<Vec<Vec<f32>>>, LlamaError> {
        self.clear();
        let total: usize = seqs.iter().map(|(t, _)| t.len()).sum();
        let mut batch = LlamaBatch::new(total.max(1), seqs.len().max(1) as i32);
        let mut index = Vec::with_capacity(seqs.len());
        let mut at = 0i32;
        for (s, (tokens, want)) in seqs.iter().enumerate() {
            let mut flags = vec![false; tokens.len()];
            for &w in want {
                if let Some(f) = flags.get_mut(w) {
                    *f = true;
                }
            }
            let base = at;
            for (i, (&t, &f)) in tokens.iter().zip(&flags).enumerate() {
                batch
                    .add(LlamaToken(t as i32), i as i32, &[s as i32], f)
                    .map_err(|e| self.err("batch", e.to_string()))?;
                at += 1;
            }
            index.push(base);
        }
        self.ctx
            .decode(&mut batch)
            .map_err(|e| self.err("decode", e.to_string()))?;
        Ok(seqs
            .iter()
            .zip(index)
            .map(|((_, want), base)| {
                want.iter()
                    .map(|&w| self.ctx.get_logits_ith(base + w as i32).to_vec())
                    .collect()
            })
            .collect())
    }

    /// Evaluates groups of sequences in one decode (clearing the cache first), each group's
    /// prefix entering the batch once for all its sequences, and calls `each(sequence, k, logits)`
    /// for the k-th position asked for of every sequence (numbered across the groups in order, at
    /// most [`MAX_SEQS`] in all, and no more than the context's tokens; the batch must fit the
    /// context).
    pub fn logits_shared(
        &mut self,
        groups: &[SharedPrefix<'_>],
        each: impl FnMut(usize, usize, &[f32]),
    ) -> Result<(), LlamaError> {
        self.clear();
        let n_seqs: usize = groups.iter().map(|g| g.suffixes.len()).sum();
        let most = MAX_SEQS.min(self.n_ctx);
        if n_seqs > most {
            return Err(self.err("batch", format!("{n_seqs} sequences, more than {most}")));
        }
        self.decode_groups(groups, 0, 0, each)
    }

    /// Decodes `tokens` from position 0 (clearing the cache first) into sequence [`PREFIX_SEQ`]
    /// and keeps their keys and values as the prefix that [`Ctx::logits_after_prefix`]
    /// continues, until the next decode of another kind. No logits are computed.
    pub fn cache_prefix(&mut self, tokens: &[u32]) -> Result<(), LlamaError> {
        self.clear();
        if tokens.len() > self.n_ctx {
            return Err(self.err(
                "batch",
                format!(
                    "a prefix of {} tokens, more than the context of {}",
                    tokens.len(),
                    self.n_ctx
                ),
            ));
        }
        if tokens.is_empty() {
            return Ok(());
        }
        let mut batch = LlamaBatch::new(tokens.len(), 1);
        for (i, &t) in tokens.iter().enumerate() {
            batch
                .add(LlamaToken(t as i32), i as i32, &[PREFIX_SEQ], false)
                .map_err(|e| self.err("batch", e.to_string()))?;
        }
        self.ctx
            .decode(&mut batch)
            .map_err(|e| self.err("decode", e.to_string()))?;
        self.cached = tokens.len();
        Ok(())
    }

    /// Tokens of the prefix cached by [`Ctx::cache_prefix`] (0 when none is).
    pub fn cached_prefix(&self) -> usize {
        self.cached
    }

    /// As [`Ctx::logits_shared`], but every sequence continues the prefix cached by
    /// [`Ctx::cache_prefix`], which stays cached: the groups' prefixes and suffixes are the
    /// tokens after it, at positions from its length on, and the positions asked for index into
    /// a group's prefix + suffix (the cached prefix not counted). Each sequence gets the cached
    /// prefix's cells by `llama_memory_seq_cp`, which in the unified KV cache marks the same
    /// cells as belonging to one more sequence (no copy, no extra cells), and loses them again
    /// afterwards. So the cache must hold the cached prefix plus the batch: at most the
    /// context's tokens in all, and at most [`MAX_SEQS`] - 1 sequences (one less than
    /// [`Ctx::logits_shared`]: [`PREFIX_SEQ`] holds the prefix).
    pub fn logits_after_prefix(
        &mut self,
        groups: &[SharedPrefix<'_>],
        each: impl FnMut(usize, usize, &[f32]),
    ) -> Result<(), LlamaError> {
        let cached = self.cached;
        if cached == 0 {
            return Err(self.err("batch", "no prefix is cached".to_string()));
        }
        let n_seqs: usize = groups.iter().map(|g| g.suffixes.len()).sum();
        let most = MAX_SEQS.min(self.n_ctx).saturating_sub(1);
        if n_seqs > most {
            return Err(self.err(
                "batch",
                format!("{n_seqs} sequences after a cached prefix, more than {most}"),
            ));
        }
        let total = batch_tokens(groups);
        if cached + total > self.n_ctx {
            return Err(self.err(
                "batch",
                format!(
                    "{total} tokens after a cached prefix of {cached}, more than the context of {}",
                    self.n_ctx
                ),
            ));
        }
        let ids = PREFIX_SEQ + 1..=PREFIX_SEQ + n_seqs as i32;
        for id in ids.clone() {
            self.ctx
                .copy_kv_cache_seq(PREFIX_SEQ, id, None, None)
                .map_err(|e| self.err("KV cache copy", e.to_string()))?;
        }
        let decoded = self.decode_groups(groups, cached, PREFIX_SEQ + 1, each);
        for id in ids {
            // Whole-sequence removals always succeed; the prefix's cells keep PREFIX_SEQ.
            let removed = self.ctx.clear_kv_cache_seq(Some(id as u32), None, None);
            if !matches!(removed, Ok(true)) {
                self.clear();
                return Err(self.err("KV cache removal", format!("sequence {id}: {removed:?}")));
            }
        }
        decoded
    }

    /// Clears the KV cache, the cached prefix with it.
    fn clear(&mut self) {
        self.ctx.clear_kv_cache();
        self.cached = 0;
    }

    /// Decodes the groups in one batch, their tokens at positions from `start` on and their
    /// sequences numbered from `first_id`, over whatever the cache holds, and calls `each` as
    /// [`Ctx::logits_shared`] does.
    fn decode_groups(
        &mut self,
        groups: &[SharedPrefix<'_>],
        start: usize,
        first_id: i32,
        mut each: impl FnMut(usize, usize, &[f32]),
    ) -> Result<(), LlamaError> {
        let n_seqs: usize = groups.iter().map(|g| g.suffixes.len()).sum();
        let total = batch_tokens(groups);
        let widest = groups.iter().map(|g| g.suffixes.len()).max().unwrap_or(1);
        let mut batch = LlamaBatch::new(total.max(1), widest.max(1) as i32);
        // For every sequence, the batch index of each position asked for.
        let mut rows: Vec<Vec<i32>> = Vec::with_capacity(n_seqs);
        let mut at = 0i32;
        for g in groups.iter().filter(|g| !g.suffixes.is_empty()) {
            let first = first_id + rows.len() as i32;
            let ids: Vec<i32> = (first..first + g.suffixes.len() as i32).collect();
            let p = g.prefix.len();
            let mut flags = vec![false; p];
            for (suffix, want) in &g.suffixes {
                if let Some(&w) = want.iter().find(|&&w| w >= p + suffix.len()) {
                    return Err(self.err(
                        "batch",
                        format!(
                            "logits asked for at {w}, past a sequence of {}",
                            p + suffix.len()
                        ),
                    ));
                }
                for &w in want.iter().filter(|&&w| w < p) {
                    flags[w] = true;
                }
            }
            let prefix_at = at;
            for (i, (&t, &f)) in g.prefix.iter().zip(&flags).enumerate() {
                batch
                    .add(LlamaToken(t as i32), (start + i) as i32, &ids, f)
                    .map_err(|e| self.err("batch", e.to_string()))?;
                at += 1;
            }
            for ((suffix, want), &id) in g.suffixes.iter().zip(&ids) {
                let suffix_at = at;
                for (i, &t) in suffix.iter().enumerate() {
                    batch
                        .add(
                            LlamaToken(t as i32),
                            (start + p + i) as i32,
                            &[id],
                            want.contains(&(p + i)),
                        )
                        .map_err(|e| self.err("batch", e.to_string()))?;
                    at += 1;
                }
                rows.push(
                    want.iter()
                        .map(|&w| match w.checked_sub(p) {
                            Some(s) => suffix_at + s as i32,
                            None => prefix_at + w as i32,
                        })
                        .collect(),
                );
            }
        }
        self.ctx
            .decode(&mut batch)
            .map_err(|e| self.err("decode", e.to_string()))?;
        for (seq, row) in rows.iter().enumerate() {
            for (k, &i) in row.iter().enumerate() {
                each(seq, k, self.ctx.get_logits_ith(i));
            }
        }
        Ok(())
    }

    fn err(&self, what: &'static str, message: String) -> LlamaError {
        LlamaError::Run {
            path: self.path.to_path_buf(),
            what,
            message,
        }
    }
}

/// Tokens a batch of groups holds: each group's prefix once, then its sequences' suffixes.
fn batch_tokens(groups: &[SharedPrefix<'_>]) -> usize {
    groups
        .iter()
        .filter(|g| !g.suffixes.is_empty())
        .map(|g| g.prefix.len() + g.suffixes.iter().map(|(s, _)| s.len()).sum::<usize>())
        .sum()
}

/// log-softmax of one row of logits, in f64 for stable sums.
pub fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = logits
        .iter()
        .map(|&l| (l as f64 - max).exp())
        .sum::<f64>()
        .ln()
        + max;
    logits.iter().map(|&l| l as f64 - lse).collect()
}
