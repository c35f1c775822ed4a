//! `GgufFile::open` on arbitrary bytes. The reader maps a path, so every input is written to one
//! file per process first. A file that opens must hand out every tensor's bytes in full.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use hopscotch::gguf::reader::GgufFile;
use libfuzzer_sys::fuzz_target;

fn input_path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("hopscotch-fuzz-gguf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the fuzz input folder");
        dir.join("input.gguf")
    })
}

fuzz_target!(|data: &[u8]| {
    let path = input_path();
    std::fs::write(path, data).expect("write the fuzz input");
    let result = GgufFile::open(path);
    if std::env::var_os("HOPSCOTCH_FUZZ_DEBUG").is_some() {
        eprintln!("{result:?}");
    }
    if let Ok(g) = result {
        for t in g.tensors() {
            assert_eq!(g.tensor_data(t).len(), t.nbytes, "tensor {}", t.name);
            let _ = t.shape();
        }
        for (k, _) in g.metadata() {
            let _ = g.get(k);
        }
        let _ = g.get_str("general.architecture");
    }
});
