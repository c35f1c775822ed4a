//! Test fixtures: tiny random-weight Hugging Face folders (real safetensors, config.json and the
//! SmolLM2 tokenizer from tests/fixtures), and paths to the real model and data.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use serde_json::json;

use hopscotch::plan::{
    FitSettings, LinearAttention, LossTokens, ModelFingerprint, Plan, PlanTask, ScaleValues,
    TaskRef,
};

/// Element type of the safetensors a fixture is written in.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Dtype {
    F32,
    F16,
    BF16,
}

/// The shape of a tiny model.
#[derive(Clone, Debug)]
pub struct Tiny {
    pub arch: &'static str,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub tie: bool,
    pub dtype: Dtype,
    pub seed: u64,
    pub shards: usize,
    pub rope_scaling: Option<serde_json::Value>,
}

impl Tiny {
    pub fn llama() -> Tiny {
        Tiny {
            arch: "LlamaForCausalLM",
            n_layer: 4,
            n_embd: 64,
            n_ff: 128,
            n_head: 4,
            n_head_kv: 2,
            tie: true,
            dtype: Dtype::F32,
            seed: 7,
            shards: 1,
            rope_scaling: None,
        }
    }

    pub fn qwen2() -> Tiny {
        Tiny {
            arch: "Qwen2ForCausalLM",
            tie: false,
            seed: 11,
            ..Tiny::llama()
        }
    }
}

pub const VOCAB: usize = 49152;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn encode(values: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Dtype::F16 => values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
        Dtype::BF16 => values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect(),
    }
}

/// Writes a tiny random model as a Hugging Face folder under `dir` and returns its path.
pub fn write_tiny(dir: &Path, t: &Tiny) -> PathBuf {
    let out = dir.join(format!("tiny-{}-{:?}", t.arch, t.dtype).to_lowercase());
    std::fs::create_dir_all(&out).unwrap();
    let head_dim = t.n_embd / t.n_head;
    let mut rng = rand::rngs::StdRng::seed_from_u64(t.seed);
    let mut tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)> = BTreeMap::new();
    let mut add = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
        let n: usize = shape.iter().product();
        let v = (0..n)
            .map(|_| offset + scale * (rng.gen::<f32>() * 2.0 - 1.0))
            .collect();
        tensors.insert(name, (shape, v));
    };
    let (e, q, kv, ff) = (
        t.n_embd,
        t.n_head * head_dim,
        t.n_head_kv * head_dim,
        t.n_ff,
    );
    add("model.embed_tokens.weight".into(), vec![VOCAB, e], 1.0, 0.0);
    for i in 0..t.n_layer {
        let p = |s: &str| format!("model.layers.{i}.{s}");
        add(p("input_layernorm.weight"), vec![e], 0.2, 1.0);
        add(p("self_attn.q_proj.weight"), vec![q, e], 0.25, 0.0);
        add(p("self_attn.k_proj.weight"), vec![kv, e], 0.25, 0.0);
        add(p("self_attn.v_proj.weight"), vec![kv, e], 0.25, 0.0);
        if t.arch == "Qwen2ForCausalLM" {
            add(p("self_attn.q_proj.bias"), vec![q], 0.2, 0.0);
            add(p("self_attn.k_proj.bias"), vec![kv], 0.2, 0.0);
            add(p("self_attn.v_proj.bias"), vec![kv], 0.2, 0.0);
        }
        add(p("self_attn.o_proj.weight"), vec![e, q], 0.15, 0.0);
        add(p("post_attention_layernorm.weight"), vec![e], 0.2, 1.0);
        add(p("mlp.gate_proj.weight"), vec![ff, e], 0.2, 0.0);
        add(p("mlp.up_proj.weight"), vec![ff, e], 0.2, 0.0);
        add(p("mlp.down_proj.weight"), vec![e, ff], 0.15, 0.0);
    }
    add("model.norm.weight".into(), vec![e], 0.2, 1.0);
    if !t.tie {
        add("lm_head.weight".into(), vec![VOCAB, e], 0.2, 0.0);
    }
    write_safetensors(&out, &tensors, t.dtype, t.shards);

    let mut config = json!({
        "architectures": [t.arch],
        "model_type": if t.arch == "Qwen2ForCausalLM" { "qwen2" } else { "llama" },
        "hidden_size": e,
        "intermediate_size": ff,
        "num_hidden_layers": t.n_layer,
        "num_attention_heads": t.n_head,
        "num_key_value_heads": t.n_head_kv,
        "vocab_size": VOCAB,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": t.tie,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
    });
    if let Some(rs) = &t.rope_scaling {
        config["rope_scaling"] = rs.clone();
    }
    std::fs::write(
        out.join("config.json"),
        serde_json::to_string_pretty(&config).unwrap(),
    )
    .unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixtures().join("smollm2-tokenizer").join(f), out.join(f)).unwrap();
    }
    out
}

/// Writes tensors as one or several safetensors files (with an index when sharded).
pub fn write_safetensors(
    dir: &Path,
    tensors: &BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    dtype: Dtype,
    shards: usize,
) {
    let names: Vec<&String> = tensors.keys().collect();
    let per = names.len().div_ceil(shards.max(1));
    let mut weight_map = serde_json::Map::new();
    for (s, chunk) in names.chunks(per).enumerate() {
        let file = if shards > 1 {
            format!("model-{:05}-of-{:05}.safetensors", s + 1, shards)
        } else {
            "model.safetensors".to_string()
        };
        let data: Vec<(String, Vec<usize>, Vec<u8>)> = chunk
            .iter()
            .map(|n| {
                let (shape, v) = &tensors[*n];
                ((*n).clone(), shape.clone(), encode(v, dtype))
            })
            .collect();
        let st = match dtype {
            Dtype::F32 => safetensors::Dtype::F32,
            Dtype::F16 => safetensors::Dtype::F16,
            Dtype::BF16 => safetensors::Dtype::BF16,
        };
        let views: Vec<(String, safetensors::tensor::TensorView)> = data
            .iter()
            .map(|(n, shape, bytes)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(st, shape.clone(), bytes).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join(&file)).unwrap();
        for n in chunk {
            weight_map.insert((*n).clone(), json!(file));
        }
    }
    if shards > 1 {
        let index = json!({"metadata": {}, "weight_map": weight_map});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    }
}

/// Path of the real SmolLM2-135M-Instruct GGUF (scripts/fetch-model.sh puts it there).
pub fn real_model() -> PathBuf {
    let p = std::env::var_os("HOPSCOTCH_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch-model.sh first (scripts/test.sh does)",
        p.display()
    );
    p
}

pub fn cache_dir() -> PathBuf {
    std::env::var_os("HOPSCOTCH_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/hopscotch")
        })
}

/// A tiny 4-layer random Llama (real SmolLM2 tokenizer, f32) whose attention blocks at `dead`
/// add nothing: their output projections are all zeros.
pub fn dead_blocks_model(dir: &Path, dead: &[usize]) -> PathBuf {
    let model = write_tiny(dir, &Tiny::llama());
    let file = model.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let zeroed: Vec<String> = dead
        .iter()
        .map(|l| format!("model.layers.{l}.self_attn.o_proj.weight"))
        .collect();
    let mut tensors = BTreeMap::new();
    for (name, view) in st.tensors() {
        let mut values: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        if zeroed.contains(&name) {
            values.iter_mut().for_each(|v| *v = 0.0);
        }
        tensors.insert(name, (view.shape().to_vec(), values));
    }
    write_safetensors(&model, &tensors, Dtype::F32, 1);
    model
}

/// The hopscotch binary built for this test run.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_hopscotch"))
}

/// A real sentence through the real tokenizer, then ids spread over the vocabulary.
pub fn sample_tokens() -> Vec<u32> {
    let tok = tokenizers::Tokenizer::from_file(fixtures().join("smollm2-tokenizer/tokenizer.json"))
        .unwrap();
    let mut ids = tok
        .encode(
            "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife.",
            false,
        )
        .unwrap()
        .get_ids()
        .to_vec();
    ids.extend((0..40u32).map(|i| (i * 1231 + 17) % VOCAB as u32));
    ids
}

/// Logits at every position from candle on `source` with `scales` and the skip mask.
pub fn candle_logits(
    source: &dyn hopscotch::checkpoint::TensorSource,
    scales: &hopscotch::plan::ScaleValues,
    skip: &[bool],
    toks: &[u32],
) -> Vec<Vec<f32>> {
    use candle_core::{Device, Tensor};
    let model = hopscotch::model::Model::load(source, &Device::Cpu).unwrap();
    let ids = Tensor::new(toks, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let sc = model.scales(scales).unwrap();
    let h = model.forward_hidden_no_grad(&ids, &sc, skip).unwrap();
    let pos: Vec<u32> = (0..toks.len() as u32).collect();
    let pos = Tensor::new(pos.as_slice(), &Device::Cpu).unwrap();
    model.logits_at(&h, &pos).unwrap().to_vec2::<f32>().unwrap()
}

/// Logits at every position from llama.cpp, with an f32 KV cache and flash attention off.
pub fn llama_logits(gguf: &Path, toks: &[u32]) -> Vec<Vec<f32>> {
    let m = hopscotch::llamacpp::LoadedModel::load(gguf).unwrap();
    let mut ctx = m.context_with(toks.len(), 2, true).unwrap();
    let want: Vec<usize> = (0..toks.len()).collect();
    ctx.logits(toks, &want).unwrap()
}

/// Max |a - b| and max |a|.
pub fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> (f32, f32) {
    let (mut d, mut scale) = (0f32, 0f32);
    for (ra, rb) in a.iter().zip(b) {
        assert_eq!(ra.len(), rb.len());
        for (x, y) in ra.iter().zip(rb) {
            d = d.max((x - y).abs());
            scale = scale.max(x.abs());
        }
    }
    (d, scale)
}

/// Twelve three-choice questions of common facts (question, choices, gold), for
/// [`write_choice_task`].
pub fn facts() -> Vec<(String, Vec<String>, usize)> {
    [
        (
            "The capital of France is",
            [" Paris.", " Rome.", " Oslo."],
            0,
        ),
        (
            "Water freezes at",
            [" zero degrees.", " ninety degrees.", " ten degrees."],
            0,
        ),
        ("The sun rises in the", [" west.", " east.", " north."], 1),
        (
            "A week has",
            [" five days.", " nine days.", " seven days."],
            2,
        ),
        ("Cats are", [" animals.", " rocks.", " numbers."], 0),
        ("Two plus two is", [" three.", " four.", " five."], 1),
        ("Snow is usually", [" green.", " white.", " red."], 1),
        ("The opposite of hot is", [" cold.", " warm.", " loud."], 0),
        ("Birds can", [" swim only.", " fly.", " read."], 1),
        ("Ice is made of", [" water.", " sand.", " iron."], 0),
        (
            "A year has",
            [" ten months.", " twelve months.", " six months."],
            1,
        ),
        (
            "The moon orbits the",
            [" sun only.", " earth.", " mars."],
            1,
        ),
    ]
    .map(|(q, c, g)| (q.to_string(), c.map(String::from).to_vec(), g))
    .to_vec()
}

/// Writes a multiple-choice task of `docs` (question, choices, gold) to `dir/name.jsonl`, one
/// log-likelihood request per choice as evaluation harnesses publish them.
pub fn write_choice_task(dir: &Path, name: &str, docs: &[(String, Vec<String>, usize)]) -> PathBuf {
    let mut lines = String::new();
    for (d, (q, choices, gold)) in docs.iter().enumerate() {
        for (i, c) in choices.iter().enumerate() {
            let line = json!({
                "request": {"context": format!("Question: {q}\nAnswer:"), "continuation": c},
                "doc_id": d, "idx": i, "label": gold,
                "doc": {"query": q, "choices": choices, "gold": gold},
            });
            lines.push_str(&line.to_string());
            lines.push('\n');
        }
    }
    let path = dir.join(format!("{name}.jsonl"));
    std::fs::write(&path, lines).unwrap();
    path
}

/// A plan for `ck` skipping `skipped`, with scalars drawn uniformly from 0.7..1.3 (the attention
/// scalars of skipped layers stay 1, as the fit leaves them).
pub fn plan_for(ck: &hopscotch::checkpoint::Checkpoint, skipped: &[usize], seed: u64) -> Plan {
    let n = ck.arch.n_layer;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut draw = |skip: bool| -> Vec<f32> {
        (0..n)
            .map(|l| {
                if skip && skipped.contains(&l) {
                    1.0
                } else {
                    rng.gen_range(0.7..1.3)
                }
            })
            .collect()
    };
    let scales = ScaleValues {
        b_att: draw(true),
        s_att: draw(true),
        b_mlp: draw(false),
        s_mlp: draw(false),
        linear: vec![],
    };
    Plan {
        tool_version: env!("CARGO_PKG_VERSION").into(),
        model: ModelFingerprint::of(ck),
        first_task: PlanTask {
            task: TaskRef {
                path: "test.jsonl".into(),
                sha256: "0".repeat(64),
                format: "test".into(),
            },
            fit_doc_ids: vec![],
            final_doc_ids: vec![],
            validation_doc_ids: vec![],
            test_doc_ids: vec![],
        },
        other_tasks: vec![],
        skipped_blocks: skipped.to_vec(),
        scales,
        rounds: vec![],
        final_loss_history: vec![],
        final_loss: None,
        final_loss_untrained: None,
        attn_importance: None,
        settings: FitSettings {
            skip: skipped.len(),
            fit_docs: 0,
            candidate_steps: Some(0),
            final_steps: Some(0),
            batch_size: 1,
            max_seq_len: 64,
            seed,
            exhaustive: true,
            shortlist: 0,
            screen_batches: 0,
            rescreen: 0,
            teacher_top_k: 0,
            loss_tokens: LossTokens::Targets,
            ..FitSettings::default()
        },
    }
}

/// Linear stand-ins for `layers`, entries drawn uniformly from -0.2..0.2, with the layers'
/// attention scalars drawn as a kept block's are (the fit trains them).
pub fn add_stand_ins(
    ck: &hopscotch::checkpoint::Checkpoint,
    plan: &mut Plan,
    layers: &[usize],
    seed: u64,
) {
    let d = ck.arch.n_embd;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for &layer in layers {
        plan.scales.b_att[layer] = rng.gen_range(0.7..1.3);
        plan.scales.s_att[layer] = rng.gen_range(0.7..1.3);
        plan.scales.linear.push(LinearAttention {
            layer,
            weight: (0..d * d)
                .map(|_| rng.gen_range(-0.2..0.2))
                .collect::<Vec<f32>>()
                .into(),
        });
    }
}
