//! The fitted values a plan carries: which attention blocks are skipped, the four scalars per
//! layer and the linear stand-ins of skipped blocks. Plain data with their checks and JSON form;
//! the candle model turns them into variables (`crate::model::Scales`).

use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// A layer index past the model's last layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("layer {layer} does not exist (the model has {n_layer} layers)")]
pub struct NoSuchLayer {
    /// The layer named.
    pub layer: usize,
    /// The number of layers.
    pub n_layer: usize,
}

/// A vector of scalars whose length is not the number of layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("scalar vector {name} has {found} entries, the model has {expected} layers")]
pub struct ScalesLength {
    /// Which vector (`b_att`, `s_att`, `b_mlp`, `s_mlp`).
    pub name: &'static str,
    /// The number of layers.
    pub expected: usize,
    /// The vector's length.
    pub found: usize,
}

/// Which attention blocks are skipped: one flag per layer, `true` for skipped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkipMask(pub Vec<bool>);

impl SkipMask {
    /// No block skipped.
    pub fn none(n_layer: usize) -> Self {
        Self(vec![false; n_layer])
    }

    /// The listed layers skipped; fails on a layer index not below `n_layer`.
    pub fn from_layers(n_layer: usize, layers: &[usize]) -> Result<Self, NoSuchLayer> {
        let mut mask = vec![false; n_layer];
        for &layer in layers {
            *mask.get_mut(layer).ok_or(NoSuchLayer { layer, n_layer })? = true;
        }
        Ok(Self(mask))
    }

    /// The skipped layers, ascending.
    pub fn skipped(&self) -> Vec<usize> {
        (0..self.0.len()).filter(|&l| self.0[l]).collect()
    }

    /// The flags as a slice, as the model's forward pass takes them.
    pub fn as_slice(&self) -> &[bool] {
        &self.0
    }
}

/// A linear stand-in for a skipped attention block, as llama.cpp's `deci` runs it ("linear
/// attention", a layer with heads but no KV heads, as in Nemotron-51B): the block's output becomes
/// `W · RMSNorm(x)`, one `n_embd x n_embd` matrix per token, with no KV cache and no look at other
/// positions. Beyond the paper: fitted by least squares to what the block it replaces computes
/// (`crate::fit::linear`), and folded like `attn_output`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinearAttention {
    /// The layer whose attention block it stands in for.
    pub layer: usize,
    /// `W`, row-major `(n_embd out, n_embd in)`; in a plan, base64 of little-endian f32.
    /// Shared: cloning a stand-in (or the [`ScaleValues`] holding it) does not copy `W`.
    #[serde(with = "f32_base64")]
    pub weight: Arc<[f32]>,
}

/// What is wrong with one linear stand-in.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("linear stand-in of layer {layer}: {message}")]
pub struct StandInError {
    /// Its layer.
    pub layer: usize,
    /// What is wrong.
    pub message: String,
}

impl LinearAttention {
    /// Fails unless the stand-ins name distinct layers below `n_layer`, each with
    /// `n_embd * n_embd` finite numbers.
    pub fn check_all(
        stand_ins: &[LinearAttention],
        n_layer: usize,
        n_embd: usize,
    ) -> Result<(), StandInError> {
        let mut seen = vec![false; n_layer];
        for a in stand_ins {
            let bad = |message: String| StandInError {
                layer: a.layer,
                message,
            };
            if a.layer >= n_layer {
                return Err(bad(format!("the model has {n_layer} layers")));
            }
            if std::mem::replace(&mut seen[a.layer], true) {
                return Err(bad("listed twice".into()));
            }
            if a.weight.len() != n_embd * n_embd {
                return Err(bad(format!(
                    "{} values, expected {n_embd} x {n_embd}",
                    a.weight.len()
                )));
            }
            if let Some(i) = a.weight.iter().position(|x| !x.is_finite()) {
                return Err(bad(format!("value {i} is not finite")));
            }
        }
        Ok(())
    }
}

/// Serde for an `Arc<[f32]>` as one base64 string of its little-endian bytes (a 576 x 576 matrix
/// takes 1.77 MB instead of about 3.5 MB of JSON numbers, and reads back bit for bit).
mod f32_base64 {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::sync::Arc;

    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    pub fn serialize<S: Serializer>(values: &[f32], s: S) -> Result<S::Ok, S::Error> {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        s.serialize_str(&encode(&bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<[f32]>, D::Error> {
        let text = String::deserialize(d)?;
        let bytes = decode(&text).map_err(serde::de::Error::custom)?;
        if bytes.len() % 4 != 0 {
            return Err(serde::de::Error::custom(format!(
                "{} bytes of base64 are not whole f32 values",
                bytes.len()
            )));
        }
        Ok(bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    pub(crate) fn encode(bytes: &[u8]) -> String {
        let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
        for chunk in bytes.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    pub(crate) fn decode(text: &str) -> Result<Vec<u8>, String> {
        let text = text.trim_end_matches('=');
        let mut out = Vec::with_capacity(text.len() * 3 / 4);
        let (mut acc, mut bits) = (0u32, 0u32);
        for (i, c) in text.bytes().enumerate() {
            let v = match c {
                b'A'..=b'Z' => c - b'A',
                b'a'..=b'z' => c - b'a' + 26,
                b'0'..=b'9' => c - b'0' + 52,
                b'+' => 62,
                b'/' => 63,
                _ => return Err(format!("character {i} ({:?}) is not base64", c as char)),
            };
            acc = (acc << 6) | u32::from(v);
            bits += 6;
            if bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
                acc &= (1 << bits) - 1;
            }
        }
        Ok(out)
    }
}

/// The four scalars per layer as plain numbers (the fit's result, the plan's content) and the
/// linear stand-ins of skipped blocks when there are any.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScaleValues {
    /// Weight of the attention output, per layer.
    pub b_att: Vec<f32>,
    /// Weight of the residual around attention, per layer.
    pub s_att: Vec<f32>,
    /// Weight of the MLP output, per layer.
    pub b_mlp: Vec<f32>,
    /// Weight of the residual around the MLP, per layer.
    pub s_mlp: Vec<f32>,
    /// Linear stand-ins, used where their layer's attention block is skipped (none: a skipped
    /// block adds nothing).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub linear: Vec<LinearAttention>,
}

impl ScaleValues {
    /// All scalars 1.0: the original model.
    pub fn ones(n_layer: usize) -> Self {
        Self {
            b_att: vec![1.0; n_layer],
            s_att: vec![1.0; n_layer],
            b_mlp: vec![1.0; n_layer],
            s_mlp: vec![1.0; n_layer],
            linear: Vec::new(),
        }
    }

    /// The four vectors with their names, in the order `b_att, s_att, b_mlp, s_mlp`.
    pub fn named(&self) -> [(&'static str, &[f32]); 4] {
        [
            ("b_att", &self.b_att),
            ("s_att", &self.s_att),
            ("b_mlp", &self.b_mlp),
            ("s_mlp", &self.s_mlp),
        ]
    }

    /// Fails unless every vector has `n_layer` entries.
    pub fn check_len(&self, n_layer: usize) -> Result<(), ScalesLength> {
        for (name, v) in self.named() {
            if v.len() != n_layer {
                return Err(ScalesLength {
                    name,
                    expected: n_layer,
                    found: v.len(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stand_in_weights_round_trip_through_base64_and_bad_text_is_refused() {
        // every tail length of the 3-byte groups, against a known encoding
        assert_eq!(f32_base64::encode(b""), "");
        assert_eq!(f32_base64::encode(b"f"), "Zg==");
        assert_eq!(f32_base64::encode(b"fo"), "Zm8=");
        assert_eq!(f32_base64::encode(b"foo"), "Zm9v");
        assert_eq!(f32_base64::encode(b"foob"), "Zm9vYg==");
        for n in 0..7usize {
            let bytes: Vec<u8> = (0..n as u8).map(|b| b.wrapping_mul(97)).collect();
            let text = f32_base64::encode(&bytes);
            assert_eq!(f32_base64::decode(&text).unwrap(), bytes);
        }
        let a = LinearAttention {
            layer: 2,
            weight: vec![1.5, -0.0, f32::MIN_POSITIVE, 3.0e38, -1e-30].into(),
        };
        let json = serde_json::to_string(&a).unwrap();
        let back: LinearAttention = serde_json::from_str(&json).unwrap();
        assert_eq!(
            back.weight.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            a.weight.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        let err = serde_json::from_str::<LinearAttention>(r#"{"layer":1,"weight":"AAA*"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("character 3 ('*') is not base64"), "{err}");
        let err = serde_json::from_str::<LinearAttention>(r#"{"layer":1,"weight":"AAAA"}"#)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("3 bytes of base64 are not whole f32 values"),
            "{err}"
        );
    }
}
