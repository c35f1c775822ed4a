//! `hopscotch::plan::Plan::load` on arbitrary bytes, written to one file per process first.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use hopscotch::plan::Plan;
use libfuzzer_sys::fuzz_target;

fn input_path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("hopscotch-fuzz-plan-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the fuzz input folder");
        dir.join("plan.json")
    })
}

fuzz_target!(|data: &[u8]| {
    let path = input_path();
    std::fs::write(path, data).expect("write the fuzz input");
    let result = Plan::load(path);
    if std::env::var_os("HOPSCOTCH_FUZZ_DEBUG").is_some() {
        eprintln!("{:?}", result.as_ref().map(|p| &p.skipped_blocks));
    }
    if let Ok(plan) = result {
        assert_eq!(plan.skip_mask().len(), plan.model.n_layer);
    }
});
