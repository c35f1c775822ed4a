//! Replays the inputs the fuzzer (scripts/fuzz.sh, targets in fuzz/fuzz_targets/) found, without
//! the fuzzer: every file under tests/fixtures/fuzz/<target>/ goes to that target's reader, which
//! must return Ok or an error, never panic. Files named `valid-*` are small valid inputs (the
//! fuzz harness's fixtures) and must open.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use hopscotch::checkpoint::Checkpoint;
use hopscotch::gguf::reader::GgufFile;
use hopscotch::plan::Plan;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The files of tests/fixtures/fuzz/<target>, sorted; none when the folder does not exist.
fn inputs(target: &str) -> Vec<PathBuf> {
    let dir = fixtures().join("fuzz").join(target);
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(entries) => entries
            .map(|e| e.expect("list fuzz fixtures").path())
            .filter(|p| p.is_file())
            .collect(),
        Err(_) => Vec::new(),
    };
    files.sort();
    files
}

/// Feeds every input of `target` to `read` (which returns whether the reader said Ok, and the
/// error text otherwise); fails listing every input that panicked, and every `valid-*` input
/// that did not open.
fn replay(target: &str, read: impl Fn(&Path) -> Result<(), String>) {
    let mut failures = Vec::new();
    let files = inputs(target);
    for file in &files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        match catch_unwind(AssertUnwindSafe(|| read(file))) {
            Err(_) => failures.push(format!("{name}: panicked")),
            Ok(Err(e)) if name.starts_with("valid-") => {
                failures.push(format!("{name}: a valid input was refused: {e}"))
            }
            Ok(_) => {}
        }
    }
    assert!(
        failures.is_empty(),
        "{target}: {} of {} inputs failed:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
}

#[test]
fn gguf_inputs_do_not_panic() {
    replay("gguf", |path| {
        let g = GgufFile::open(path).map_err(|e| e.to_string())?;
        for t in g.tensors() {
            assert_eq!(g.tensor_data(t).len(), t.nbytes, "tensor {}", t.name);
        }
        Ok(())
    });
}

#[test]
fn checkpoint_inputs_do_not_panic() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("tiny-llama");
    std::fs::create_dir(&dir).expect("mkdir");
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(fixtures().join("tiny-llama-hf").join(f), dir.join(f)).expect("copy");
    }
    replay("checkpoint", |path| {
        std::fs::copy(path, dir.join("model.safetensors")).expect("copy input");
        let ck = Checkpoint::open(&dir).map_err(|e| e.to_string())?;
        for e in &ck.tensors {
            assert_eq!(ck.stored_bytes(e).len(), e.n_bytes(), "tensor {}", e.name);
            let values = ck.f32_values(e).map_err(|e| e.to_string())?;
            assert_eq!(values.len(), e.n_elements(), "tensor {}", e.name);
        }
        Ok(())
    });
}

#[test]
fn task_inputs_do_not_panic() {
    replay("task", |path| {
        hopscotch::task::load(path)
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
}

#[test]
fn plan_inputs_do_not_panic() {
    replay("plan", |path| {
        let plan = Plan::load(path).map_err(|e| e.to_string())?;
        assert_eq!(plan.skip_mask().len(), plan.model.n_layer);
        Ok(())
    });
}
