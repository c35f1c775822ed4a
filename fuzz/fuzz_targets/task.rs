//! `hopscotch::task::load` on arbitrary bytes (plain JSON lines, or gzip when the bytes start
//! with the gzip magic), written to one file per process first.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

fn input_path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("hopscotch-fuzz-task-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the fuzz input folder");
        dir.join("input.jsonl")
    })
}

fuzz_target!(|data: &[u8]| {
    let path = input_path();
    std::fs::write(path, data).expect("write the fuzz input");
    let result = hopscotch::task::load(path);
    if std::env::var_os("HOPSCOTCH_FUZZ_DEBUG").is_some() {
        eprintln!("{:?}", result.as_ref().map(|t| (t.format, t.docs.len())));
    }
    if let Ok(task) = result {
        let _ = hopscotch::task::split(&task.docs, task.docs.len() / 2, 0);
    }
});
