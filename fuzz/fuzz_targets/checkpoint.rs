//! `hopscotch::checkpoint::Checkpoint::open` on a Hugging Face folder whose config.json and
//! tokenizer.json are fixed and valid (tests/fixtures/tiny-llama-hf: a one-layer Llama of width
//! 4 with a 6-token SentencePiece-style BPE tokenizer, small so that each run is cheap) and whose
//! model.safetensors is the fuzz input. A checkpoint that opens must hand out every tensor's
//! bytes and decode them to f32.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use hopscotch::checkpoint::Checkpoint;
use libfuzzer_sys::fuzz_target;

const CONFIG_JSON: &str = include_str!("../../tests/fixtures/tiny-llama-hf/config.json");

const TOKENIZER_JSON: &str = include_str!("../../tests/fixtures/tiny-llama-hf/tokenizer.json");

/// The folder, with config.json and tokenizer.json written once per process.
fn folder() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir()
            .join(format!("hopscotch-fuzz-checkpoint-{}", std::process::id()))
            .join("tiny-llama");
        std::fs::create_dir_all(&dir).expect("create the fuzz folder");
        std::fs::write(dir.join("config.json"), CONFIG_JSON).expect("write config.json");
        std::fs::write(dir.join("tokenizer.json"), TOKENIZER_JSON).expect("write tokenizer.json");
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    let dir = folder();
    std::fs::write(dir.join("model.safetensors"), data).expect("write the fuzz input");
    let result = Checkpoint::open(dir);
    if std::env::var_os("HOPSCOTCH_FUZZ_DEBUG").is_some() {
        eprintln!("{:?}", result.as_ref().map(|c| c.tensors.len()).map_err(|e| e.to_string()));
    }
    if let Ok(ck) = result {
        for e in &ck.tensors {
            assert_eq!(ck.stored_bytes(e).len(), e.n_bytes(), "tensor {}", e.name);
            let values = ck.f32_values(e).expect("a tensor that opened decodes");
            assert_eq!(values.len(), e.n_elements(), "tensor {}", e.name);
        }
    }
});
