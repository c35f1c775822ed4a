//! `hopscotch speed`: prompt processing speed of several GGUF files, measured in turns.

mod common;

use std::process::Command;

use common::{bin, write_tiny, Tiny};

#[test]
fn speed_reports_every_file_and_refuses_a_missing_one() {
    let dir = tempfile::tempdir().unwrap();
    let hf = write_tiny(dir.path(), &Tiny::llama());
    let gguf = dir.path().join("tiny.gguf");
    let out = Command::new(bin())
        .args([
            "convert",
            hf.to_str().unwrap(),
            "-o",
            gguf.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = dir.path().join("text.txt");
    std::fs::write(&text, "It is a truth universally acknowledged. ".repeat(20)).unwrap();
    let speed = |models: &[&std::path::Path]| {
        let mut cmd = Command::new(bin());
        cmd.arg("speed");
        for m in models {
            cmd.arg(m);
        }
        cmd.args(["--text", text.to_str().unwrap()])
            .args([
                "--ctx",
                "32",
                "--windows",
                "1",
                "--rounds",
                "2",
                "--threads",
                "1",
                "--json",
            ])
            .output()
            .unwrap()
    };
    let out = speed(&[&gguf, &gguf]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for r in rows {
        let s = r["prompt_tokens_per_s"].as_f64().unwrap();
        assert!(s.is_finite() && s > 0.0, "{r}");
    }
    let missing = dir.path().join("missing.gguf");
    let out = speed(&[&gguf, &missing]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing.gguf"), "{err}");
}
