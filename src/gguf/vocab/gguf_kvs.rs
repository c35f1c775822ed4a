//! The GGUF form of a [`Vocab`]: its `tokenizer.*` key-values in the order gguf-py writes them,
//! and read back.

use super::token_type::NORMAL;
use super::{
    check_len, Vocab, VocabError, KEY_ADD_BOS, KEY_ADD_EOS, KEY_ADD_SPACE_PREFIX, KEY_BOS_ID,
    KEY_CHAT_TEMPLATE, KEY_EOS_ID, KEY_MERGES, KEY_MODEL, KEY_PAD_ID, KEY_PRE, KEY_SCORES,
    KEY_TOKENS, KEY_TOKEN_TYPE, KEY_UNK_ID,
};
use crate::gguf::value::Value;

impl Vocab {
    /// The GGUF key-values, in the order gguf-py writes them; unset options are left out.
    pub fn to_gguf_kvs(&self) -> Vec<(String, Value)> {
        let mut kvs = vec![(KEY_MODEL.to_string(), Value::String(self.model.clone()))];
        if let Some(pre) = &self.pre {
            kvs.push((KEY_PRE.to_string(), Value::String(pre.clone())));
        }
        kvs.push((
            KEY_TOKENS.to_string(),
            Value::strings(self.tokens.iter().cloned()),
        ));
        if let Some(scores) = &self.scores {
            kvs.push((KEY_SCORES.to_string(), Value::f32s(scores.iter().copied())));
        }
        kvs.push((
            KEY_TOKEN_TYPE.to_string(),
            Value::i32s(self.token_types.iter().copied()),
        ));
        if !self.merges.is_empty() {
            kvs.push((
                KEY_MERGES.to_string(),
                Value::strings(self.merges.iter().cloned()),
            ));
        }
        for (key, id) in [
            (KEY_BOS_ID, self.bos_id),
            (KEY_EOS_ID, self.eos_id),
            (KEY_UNK_ID, self.unk_id),
            (KEY_PAD_ID, self.pad_id),
        ] {
            if let Some(id) = id {
                kvs.push((key.to_string(), Value::U32(id)));
            }
        }
        for (key, flag) in [
            (KEY_ADD_BOS, self.add_bos),
            (KEY_ADD_EOS, self.add_eos),
            (KEY_ADD_SPACE_PREFIX, self.add_space_prefix),
        ] {
            if let Some(flag) = flag {
                kvs.push((key.to_string(), Value::Bool(flag)));
            }
        }
        if let Some(template) = &self.chat_template {
            kvs.push((
                KEY_CHAT_TEMPLATE.to_string(),
                Value::String(template.clone()),
            ));
        }
        kvs
    }

    /// Reads the tokenizer keys of a GGUF through `get` (key -> value). Token types default to
    /// normal when absent, as llama.cpp does.
    pub fn from_gguf(get: &dyn Fn(&str) -> Option<Value>) -> Result<Vocab, VocabError> {
        let model = match get(KEY_MODEL) {
            Some(v) => gguf_string(KEY_MODEL, v)?,
            None => return Err(VocabError::MissingKey { key: KEY_MODEL }),
        };
        let pre = get(KEY_PRE).map(|v| gguf_string(KEY_PRE, v)).transpose()?;
        let tokens = match get(KEY_TOKENS) {
            Some(v) => gguf_array(KEY_TOKENS, &v, "array of strings", |e| {
                e.as_str().map(str::to_string)
            })?,
            None => return Err(VocabError::MissingKey { key: KEY_TOKENS }),
        };
        let n = tokens.len();
        let token_types = match get(KEY_TOKEN_TYPE) {
            Some(v) => gguf_array(KEY_TOKEN_TYPE, &v, "array of i32", |e| match *e {
                Value::I32(t) => Some(t),
                _ => e.as_u64().and_then(|t| i32::try_from(t).ok()),
            })?,
            None => vec![NORMAL; n],
        };
        check_len(KEY_TOKEN_TYPE, token_types.len(), n)?;
        let scores = get(KEY_SCORES)
            .map(|v| {
                gguf_array(KEY_SCORES, &v, "array of f32", |e| match *e {
                    Value::F32(s) => Some(s),
                    Value::I32(s) => Some(s as f32),
                    _ => None,
                })
            })
            .transpose()?;
        if let Some(s) = &scores {
            check_len(KEY_SCORES, s.len(), n)?;
        }
        let merges = get(KEY_MERGES)
            .map(|v| {
                gguf_array(KEY_MERGES, &v, "array of strings", |e| {
                    e.as_str().map(str::to_string)
                })
            })
            .transpose()?
            .unwrap_or_default();
        let id = |key: &'static str| -> Result<Option<u32>, VocabError> {
            let Some(v) = get(key) else { return Ok(None) };
            let id = v
                .as_u64()
                .and_then(|i| u32::try_from(i).ok())
                .ok_or_else(|| VocabError::WrongType {
                    key,
                    expected: "u32 token id",
                    found: format!("{v:?}"),
                })?;
            if id as usize >= n {
                return Err(VocabError::SpecialIdOutOfRange {
                    key,
                    id,
                    n_tokens: n,
                });
            }
            Ok(Some(id))
        };
        let flag = |key: &'static str| -> Result<Option<bool>, VocabError> {
            get(key)
                .map(|v| {
                    v.as_bool().ok_or_else(|| VocabError::WrongType {
                        key,
                        expected: "bool",
                        found: format!("{v:?}"),
                    })
                })
                .transpose()
        };
        Ok(Vocab {
            model,
            pre,
            tokens,
            token_types,
            scores,
            merges,
            bos_id: id(KEY_BOS_ID)?,
            eos_id: id(KEY_EOS_ID)?,
            unk_id: id(KEY_UNK_ID)?,
            pad_id: id(KEY_PAD_ID)?,
            add_bos: flag(KEY_ADD_BOS)?,
            add_eos: flag(KEY_ADD_EOS)?,
            add_space_prefix: flag(KEY_ADD_SPACE_PREFIX)?,
            chat_template: get(KEY_CHAT_TEMPLATE)
                .map(|v| gguf_string(KEY_CHAT_TEMPLATE, v))
                .transpose()?,
        })
    }
}

fn gguf_string(key: &'static str, v: Value) -> Result<String, VocabError> {
    match v {
        Value::String(s) => Ok(s),
        other => Err(VocabError::WrongType {
            key,
            expected: "string",
            found: format!("{:?}", other.value_type()),
        }),
    }
}

fn gguf_array<T>(
    key: &'static str,
    v: &Value,
    expected: &'static str,
    elem: impl Fn(&Value) -> Option<T>,
) -> Result<Vec<T>, VocabError> {
    let wrong = |found: String| VocabError::WrongType {
        key,
        expected,
        found,
    };
    let Value::Array(ty, items) = v else {
        return Err(wrong(format!("{:?}", v.value_type())));
    };
    items
        .iter()
        .map(|e| elem(e).ok_or_else(|| wrong(format!("array of {ty:?}"))))
        .collect()
}
