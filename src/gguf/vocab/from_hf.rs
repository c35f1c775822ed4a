//! An HF tokenizer read as `convert_hf_to_gguf.py` reads it: `tokenizer.json`,
//! `tokenizer_config.json` (or a chat template beside it), and the special token ids of
//! `config.json`.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::str::FromStr;

use serde_json::{Map, Value as Json};
use tokenizers::{Model, Tokenizer};

use super::token_type::{BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED};
use super::{detect_pre_tokenizer, split_merge, Vocab, VocabError, SPIECE_UNDERLINE};

/// Score the converter gives added and padding tokens (`_create_vocab_sentencepiece`, `LlamaHfVocab`).
const ADDED_TOKEN_SCORE: f32 = -1000.0;

impl Vocab {
    /// Reads an HF tokenizer as `convert_hf_to_gguf.py` does for a model whose `config.json` says
    /// `vocab_size`: token ids past the tokenizer's are padded with `[PAD{id}]` tokens of type unused.
    ///
    /// A BPE `tokenizer.json` with `byte_fallback` and a `Sequence` decoder is read as `LlamaHfVocab`
    /// does (model `llama`); any other BPE as `get_vocab_base` does (model `gpt2`, pre-tokenizer found
    /// by [`detect_pre_tokenizer`]). Special token ids, `add_bos`/`add_eos` and the chat template
    /// follow gguf-py's `SpecialVocab`, which reads a `chat_template.jinja` or `chat_template.json`
    /// beside `tokenizer_config.json` when that file has no `chat_template`.
    pub fn from_hf_files(
        tokenizer_json: &Path,
        tokenizer_config_json: Option<&Path>,
        vocab_size: usize,
    ) -> Result<Vocab, VocabError> {
        from_hf_files_with(
            tokenizer_json,
            tokenizer_config_json,
            vocab_size,
            &detect_pre_tokenizer,
        )
    }

    /// Fills the special token ids still unset from `config.json`'s `{bos,eos,unk,pad}_token_id`
    /// (or its `text_config`), as `SpecialVocab._try_load_from_config_json` does after the tokenizer
    /// files. Ids that are not integers (a list of EOS ids) or not below the token count are skipped.
    pub fn fill_special_ids_from_config_json(&mut self, config_json: &Json) {
        let n_tokens = self.tokens.len();
        let lookup = |typ: &str| -> Option<u32> {
            let key = format!("{typ}_token_id");
            let v = config_json
                .get(&key)
                .filter(|v| !v.is_null())
                .or_else(|| config_json.get("text_config").and_then(|t| t.get(&key)))?;
            let id = u32::try_from(v.as_u64()?).ok()?;
            ((id as usize) < n_tokens).then_some(id)
        };
        for (slot, typ) in [
            (&mut self.bos_id, "bos"),
            (&mut self.eos_id, "eos"),
            (&mut self.unk_id, "unk"),
            (&mut self.pad_id, "pad"),
        ] {
            if slot.is_none() {
                *slot = lookup(typ);
            }
        }
    }
}

type PreDetector<'a> = &'a dyn Fn(&Tokenizer) -> Result<String, VocabError>;

pub(super) fn from_hf_files_with(
    tokenizer_json: &Path,
    tokenizer_config_json: Option<&Path>,
    vocab_size: usize,
    detect: PreDetector,
) -> Result<Vocab, VocabError> {
    let (text, tj) = read_json(tokenizer_json)?;
    let config = match tokenizer_config_json {
        Some(path) => {
            let (_, config) = read_json(path)?;
            if !config.is_object() {
                return Err(malformed(path, "a JSON object"));
            }
            Some(config)
        }
        None => None,
    };
    let model = tj
        .get("model")
        .filter(|m| m.is_object())
        .ok_or_else(|| malformed(tokenizer_json, "a \"model\" object"))?;
    let model_type = match model.get("type").and_then(Json::as_str) {
        Some(t) => t,
        // Files from before tokenizers wrote the type: a BPE model is the one with merges.
        None if model.get("merges").is_some() => "BPE",
        None => "unknown",
    };
    if model_type != "BPE" {
        return Err(VocabError::UnsupportedModel {
            path: tokenizer_json.to_path_buf(),
            found: model_type.to_string(),
        });
    }
    let tok = Tokenizer::from_str(&text).map_err(|source| VocabError::Tokenizers {
        what: tokenizer_json.display().to_string(),
        source,
    })?;
    let merges = hf_merges(model, tokenizer_json)?;
    let byte_fallback = model.get("byte_fallback").and_then(Json::as_bool) == Some(true);
    let sequence_decoder = tj.pointer("/decoder/type").and_then(Json::as_str) == Some("Sequence");
    let llama = byte_fallback && sequence_decoder;

    let (tokens, token_types, scores, pre) = if llama {
        let (tokens, types, scores) = llama_hf_tokens(
            &tok,
            model,
            config.as_ref(),
            &merges,
            tokenizer_json,
            vocab_size,
        )?;
        (tokens, types, Some(scores), Some("default".to_string()))
    } else {
        let (tokens, types) = gpt2_tokens(&tok, tokenizer_json, vocab_size)?;
        (tokens, types, None, Some(detect(&tok)?))
    };
    // SpecialVocab gets n_vocab only from _set_vocab_llama_hf.
    let n_vocab = llama.then_some(tokens.len());
    let config_dir = tokenizer_config_json.and_then(Path::parent);
    let specials = special_vocab(&tj, config.as_ref(), config_dir, n_vocab)?;

    // LlamaModel.set_vocab copies tokenizer_config's add_prefix_space; a SentencePiece-style
    // tokenizer without a prepended "▁" says the same by its normalizer.
    let add_space_prefix = config
        .as_ref()
        .and_then(|c| c.get("add_prefix_space"))
        .and_then(Json::as_bool)
        .or_else(|| (llama && !prepends_space(&tj)).then_some(false));

    Ok(Vocab {
        model: if llama { "llama" } else { "gpt2" }.to_string(),
        pre,
        tokens,
        token_types,
        scores,
        merges,
        bos_id: specials.bos,
        eos_id: specials.eos,
        unk_id: specials.unk,
        pad_id: specials.pad,
        add_bos: specials.add_bos,
        add_eos: specials.add_eos,
        add_space_prefix,
        chat_template: specials.chat_template,
    })
}

/// `get_vocab_base`: ids by the full vocabulary (added tokens included), padded to `vocab_size`.
fn gpt2_tokens(
    tok: &Tokenizer,
    path: &Path,
    vocab_size: usize,
) -> Result<(Vec<String>, Vec<i32>), VocabError> {
    let vocab = tok.get_vocab(true);
    check_vocab_size(vocab.values().copied().max(), path, vocab_size)?;
    let reverse: HashMap<u32, &str> = vocab.iter().map(|(t, &id)| (id, t.as_str())).collect();
    let added = tok.get_added_tokens_decoder();
    let added_by_content: HashMap<&str, &tokenizers::AddedToken> =
        added.values().map(|a| (a.content.as_str(), a)).collect();

    let mut tokens = Vec::with_capacity(vocab_size);
    let mut types = Vec::with_capacity(vocab_size);
    for id in 0..vocab_size {
        let Some(&text) = u32::try_from(id).ok().and_then(|i| reverse.get(&i)) else {
            tokens.push(format!("[PAD{id}]"));
            types.push(UNUSED);
            continue;
        };
        let Some(added_token) = added_by_content.get(text) else {
            tokens.push(text.to_string());
            types.push(NORMAL);
            continue;
        };
        let added_token = added.get(&(id as u32)).unwrap_or(added_token);
        let mut token = text.to_string();
        if !added_token.normalized {
            // llama.cpp expects control and user-defined tokens pre-normalized.
            token = roundtrip_text(tok, &token)?;
        }
        if added_token.special || looks_special(&token) {
            types.push(CONTROL);
        } else {
            token = token.replace(SPIECE_UNDERLINE, " ");
            types.push(USER_DEFINED);
        }
        tokens.push(token);
    }
    Ok((tokens, types))
}

/// Tokens, token types and scores, by id.
type LlamaTokens = (Vec<String>, Vec<i32>, Vec<f32>);

/// `LlamaHfVocab`, without its assumption that ids are contiguous: tokens of the BPE model are byte,
/// control (special ids), or normal; added tokens outside it are control or user-defined.
///
/// Two departures, both so that llama.cpp tokenizes as HF does: the model's `unk_token` is typed
/// unknown (the converter makes it control), and scores follow merge rank (the first merge producing
/// a token gives it `-rank`; other pieces rank after every merge) where the converter writes -1000
/// for all, which leaves llama.cpp's SentencePiece merging no order.
fn llama_hf_tokens(
    tok: &Tokenizer,
    model: &Json,
    config: Option<&Json>,
    merges: &[String],
    path: &Path,
    vocab_size: usize,
) -> Result<LlamaTokens, VocabError> {
    let model_vocab = tok.get_model().get_vocab();
    let reverse: HashMap<u32, &str> = model_vocab
        .iter()
        .map(|(t, &id)| (id, t.as_str()))
        .collect();
    let added = tok.get_added_tokens_decoder();
    let max_id = model_vocab.values().chain(added.keys()).copied().max();
    check_vocab_size(max_id, path, vocab_size)?;

    let mut special_ids: HashSet<u32> = added
        .iter()
        .filter(|(_, a)| a.special)
        .map(|(&id, _)| id)
        .collect();
    if let Some(config) = config {
        let mut names: Vec<&Json> = ["bos", "eos", "unk", "sep", "pad", "cls", "mask"]
            .iter()
            .filter_map(|typ| config.get(format!("{typ}_token")))
            .collect();
        if let Some(Json::Array(extra)) = config.get("additional_special_tokens") {
            names.extend(extra);
        }
        special_ids.extend(
            names
                .into_iter()
                .filter_map(token_content)
                .filter_map(|c| tok.token_to_id(c)),
        );
    }
    let unk = model.get("unk_token").and_then(Json::as_str);
    let mut first_rank: HashMap<String, usize> = HashMap::new();
    for (rank, merge) in merges.iter().enumerate() {
        let (l, r) = split_merge(merge);
        first_rank.entry(format!("{l}{r}")).or_insert(rank);
    }
    let n_merges = merges.len();

    let mut tokens = Vec::with_capacity(vocab_size);
    let mut types = Vec::with_capacity(vocab_size);
    let mut scores = Vec::with_capacity(vocab_size);
    for id in 0..vocab_size {
        let id32 = id as u32;
        let in_model = reverse.get(&id32).copied();
        match (added.get(&id32), in_model) {
            (Some(a), m) if m != Some(a.content.as_str()) => {
                tokens.push(a.content.clone());
                types.push(if special_ids.contains(&id32) {
                    CONTROL
                } else {
                    USER_DEFINED
                });
                scores.push(ADDED_TOKEN_SCORE);
            }
            (_, Some(text)) => {
                let ty = if is_byte_token(text) {
                    BYTE
                } else if Some(text) == unk {
                    UNKNOWN
                } else if special_ids.contains(&id32) {
                    CONTROL
                } else {
                    NORMAL
                };
                let score = match first_rank.get(text) {
                    Some(&rank) => 0.0 - rank as f32,
                    None => 0.0 - (n_merges + id) as f32,
                };
                tokens.push(text.to_string());
                types.push(ty);
                scores.push(score);
            }
            _ => {
                tokens.push(format!("[PAD{id}]"));
                types.push(UNUSED);
                scores.push(ADDED_TOKEN_SCORE);
            }
        }
    }
    Ok((tokens, types, scores))
}

/// What gguf-py's `SpecialVocab` takes from tokenizer.json and tokenizer_config.json.
#[derive(Debug, Default)]
struct Specials {
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    pad: Option<u32>,
    add_bos: Option<bool>,
    add_eos: Option<bool>,
    chat_template: Option<String>,
}

/// `SpecialVocab._try_load_from_tokenizer_json`, kept to what the GGUF keys here need. Values are
/// compared as JSON, as Python compares them: a config's `{"content": ...}` token is not equal to
/// the plain string of a post-processor template.
fn special_vocab(
    tj: &Json,
    config: Option<&Json>,
    config_dir: Option<&Path>,
    n_vocab: Option<usize>,
) -> Result<Specials, VocabError> {
    let mut cfg: Option<Map<String, Json>> = config.and_then(|c| c.as_object().cloned());
    let has_cfg = cfg.as_ref().is_some_and(|m| !m.is_empty());
    let cfg_get = |cfg: &Option<Map<String, Json>>, key: &str| {
        cfg.as_ref()
            .and_then(|m| m.get(key))
            .cloned()
            .unwrap_or(Json::Null)
    };
    let mut special_bos = cfg_get(&cfg, "bos_token");
    let special_cls = cfg_get(&cfg, "cls_token");
    let mut special_eos = cfg_get(&cfg, "eos_token");
    let special_sep = cfg_get(&cfg, "sep_token");
    if let Some(m) = cfg.as_mut().filter(|_| has_cfg) {
        if !truthy(&special_bos) && truthy(&special_cls) {
            m.insert("bos_token".into(), special_cls.clone());
            special_bos = special_cls.clone();
        }
        if !truthy(&special_eos) && truthy(&special_sep) {
            m.insert("eos_token".into(), special_sep.clone());
            special_eos = special_sep;
        }
    }

    let mut out = Specials::default();
    if let Some(post) = tj.get("post_processor").filter(|p| truthy(p)) {
        let processors: Vec<&Json> = match post.get("processors") {
            Some(Json::Array(list)) => list.iter().collect(),
            _ => vec![post],
        };
        for processor in processors {
            match processor.get("type").and_then(Json::as_str) {
                Some("RobertaProcessing") => {
                    out.add_bos = Some(true);
                    out.add_eos = Some(true);
                }
                Some("TemplateProcessing") => {
                    let single = processor
                        .get("single")
                        .and_then(Json::as_array)
                        .map_or(&[][..], Vec::as_slice);
                    if single.len() <= 1 {
                        continue;
                    }
                    let special_id = |piece: &Json| {
                        piece
                            .pointer("/SpecialToken/id")
                            .filter(|id| truthy(id))
                            .cloned()
                    };
                    if let Some(first) = special_id(&single[0]) {
                        if !has_cfg {
                            special_bos = first.clone();
                        }
                        out.add_bos = Some(first == special_bos || first == special_cls);
                    }
                    if let Some(last) = special_id(&single[single.len() - 1]) {
                        if !has_cfg {
                            special_eos = last.clone();
                        } else if last != special_eos {
                            // The converter moves the config's EOS to EOT and takes the template's.
                            if let Some(m) = cfg.as_mut() {
                                m.insert("eos_token".into(), last.clone());
                            }
                            special_eos = last.clone();
                        }
                        out.add_eos = Some(last == special_eos);
                    }
                }
                _ => {}
            }
        }
    }
    let Some(cfg) = cfg.filter(|_| has_cfg) else {
        return Ok(out);
    };

    let template = match cfg.get("chat_template") {
        Some(t) => t.clone(),
        None => chat_template_beside(config_dir)?.unwrap_or(Json::Null),
    };
    out.chat_template = match template {
        Json::String(s) => Some(s),
        Json::Array(list) => list.iter().find_map(|choice| {
            let name: String = choice
                .get("name")
                .and_then(Json::as_str)
                .unwrap_or("")
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect();
            let template = choice.get("template").and_then(Json::as_str)?;
            (name == "default").then(|| template.to_string())
        }),
        _ => None,
    };

    let added_tokens = tj
        .get("added_tokens")
        .and_then(Json::as_array)
        .map_or(&[][..], Vec::as_slice);
    let n_vocab = n_vocab.unwrap_or(usize::MAX);
    for typ in ["bos", "eos", "unk", "pad"] {
        let add = cfg.get(&format!("add_{typ}_token")).and_then(Json::as_bool);
        match (typ, add) {
            ("bos", Some(b)) => out.add_bos = Some(b),
            ("eos", Some(b)) => out.add_eos = Some(b),
            _ => {}
        }
        let Some(content) = cfg.get(&format!("{typ}_token")).and_then(token_content) else {
            continue;
        };
        let id = added_tokens
            .iter()
            .find(|a| a.get("content").and_then(Json::as_str) == Some(content))
            .and_then(|a| a.get("id"))
            .and_then(Json::as_u64)
            .and_then(|id| u32::try_from(id).ok())
            .filter(|&id| (id as usize) < n_vocab);
        let slot = match typ {
            "bos" => &mut out.bos,
            "eos" => &mut out.eos,
            "unk" => &mut out.unk,
            _ => &mut out.pad,
        };
        *slot = id;
    }
    Ok(out)
}

/// The chat template of `chat_template.jinja`, else of `chat_template.json`, in `dir`.
fn chat_template_beside(dir: Option<&Path>) -> Result<Option<Json>, VocabError> {
    let Some(dir) = dir else { return Ok(None) };
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        let text = std::fs::read_to_string(&jinja).map_err(|source| VocabError::Io {
            path: jinja.clone(),
            source,
        })?;
        return Ok(Some(Json::String(text)));
    }
    let json_path = dir.join("chat_template.json");
    if json_path.is_file() {
        let (_, value) = read_json(&json_path)?;
        return Ok(value.get("chat_template").cloned());
    }
    Ok(None)
}

/// The merges of a tokenizer.json BPE model as gguf-py writes them: `"a b"`, with spaces inside
/// the pieces of the newer `[a, b]` form written as U+0120.
fn hf_merges(model: &Json, path: &Path) -> Result<Vec<String>, VocabError> {
    let Some(list) = model.get("merges").and_then(Json::as_array) else {
        return Ok(Vec::new());
    };
    list.iter()
        .map(|m| match m {
            Json::String(s) => Ok(s.clone()),
            Json::Array(pair) => match pair.as_slice() {
                [Json::String(l), Json::String(r)] => Ok(format!(
                    "{} {}",
                    l.replace(' ', "\u{120}"),
                    r.replace(' ', "\u{120}")
                )),
                _ => Err(malformed(path, "merges as \"a b\" strings or [a, b] pairs")),
            },
            _ => Err(malformed(path, "merges as \"a b\" strings or [a, b] pairs")),
        })
        .collect()
}

/// Whether a tokenizer.json adds SentencePiece's leading "▁" (a Prepend normalizer or a
/// Metaspace pre-tokenizer that prepends).
fn prepends_space(tj: &Json) -> bool {
    fn walk(node: &Json) -> bool {
        match node.get("type").and_then(Json::as_str) {
            Some("Prepend") => true,
            Some("Metaspace") => {
                node.get("add_prefix_space").and_then(Json::as_bool) == Some(true)
                    || matches!(
                        node.get("prepend_scheme").and_then(Json::as_str),
                        Some("first" | "always")
                    )
            }
            Some("Sequence") => ["normalizers", "pretokenizers"]
                .iter()
                .filter_map(|k| node.get(*k).and_then(Json::as_array))
                .flatten()
                .any(walk),
            _ => false,
        }
    }
    ["normalizer", "pre_tokenizer"]
        .iter()
        .filter_map(|k| tj.get(*k))
        .any(walk)
}

/// `does_token_look_special` of the converter: added tokens that some models forget to mark special.
pub(super) fn looks_special(token: &str) -> bool {
    matches!(token, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (token.starts_with("<|") && token.ends_with("|>"))
        || (token.starts_with("<\u{FF5C}") && token.ends_with("\u{FF5C}>"))
        || (token.starts_with("<unused") && token.ends_with('>'))
}

/// `<0xNN>`, a SentencePiece byte token.
pub(super) fn is_byte_token(token: &str) -> bool {
    let b = token.as_bytes();
    b.len() == 6
        && token.starts_with("<0x")
        && b[5] == b'>'
        && b[3].is_ascii_hexdigit()
        && b[4].is_ascii_hexdigit()
}

/// A special token of tokenizer_config.json: a string or `{"content": string}`.
fn token_content(entry: &Json) -> Option<&str> {
    match entry {
        Json::String(s) => Some(s),
        Json::Object(m) => m.get("content").and_then(Json::as_str),
        _ => None,
    }
}

/// `tokenizer.decode(tokenizer.encode(text, add_special_tokens=False))`.
fn roundtrip_text(tok: &Tokenizer, text: &str) -> Result<String, VocabError> {
    let failed = |source| VocabError::Tokenizers {
        what: format!("re-normalizing added token {text:?}"),
        source,
    };
    let encoding = tok.encode(text, false).map_err(failed)?;
    tok.decode(encoding.get_ids(), false).map_err(failed)
}

/// Python truthiness of a JSON value.
fn truthy(v: &Json) -> bool {
    match v {
        Json::Null => false,
        Json::Bool(b) => *b,
        Json::Number(n) => n.as_f64() != Some(0.0),
        Json::String(s) => !s.is_empty(),
        Json::Array(a) => !a.is_empty(),
        Json::Object(o) => !o.is_empty(),
    }
}

fn check_vocab_size(max_id: Option<u32>, path: &Path, vocab_size: usize) -> Result<(), VocabError> {
    match max_id {
        Some(id) if id as usize >= vocab_size => Err(VocabError::VocabSizeTooSmall {
            path: path.to_path_buf(),
            id,
            vocab_size,
        }),
        _ => Ok(()),
    }
}

fn read_json(path: &Path) -> Result<(String, Json), VocabError> {
    let text = std::fs::read_to_string(path).map_err(|source| VocabError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let value = serde_json::from_str(&text).map_err(|source| VocabError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    Ok((text, value))
}

fn malformed(path: &Path, expected: &str) -> VocabError {
    VocabError::Malformed {
        path: path.to_path_buf(),
        expected: expected.to_string(),
    }
}
