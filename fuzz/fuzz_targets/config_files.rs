//! Config files: `Config::parse` and its checks against the unit tree, and `UnitTree::parse`.
//! A config that passes its checks writes (`to_toml_annotated`, what `init` writes) a file that
//! parses; a tree that parses holds every unit's parent.
#![no_main]

use communesync::node::Config;
use communesync::units::{parent, UnitTree};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = Config::parse(text) {
        for limit in &config.sync.limits {
            if let Ok(Some((start, end))) = limit.window_minutes() {
                assert!(start < 24 * 60 && end < 24 * 60);
                let _ = limit.window_open(start);
            }
        }
        if config.check(&UnitTree::sample()).is_ok() {
            let written = config.to_toml_annotated();
            assert!(
                Config::parse(&written).is_ok(),
                "init would write a config that does not load:\n{written}"
            );
        }
    }
    if let Ok(tree) = UnitTree::parse(text) {
        for unit in tree.iter() {
            if let Some(p) = parent(&unit.path) {
                assert!(tree.get(p).is_ok(), "unit {} without its parent", unit.path);
            }
        }
    }
});
