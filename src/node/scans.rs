//! `scans migrate`: moves a node's scans from local files to the S3-compatible bucket of its
//! `[scans.s3]` config, then switches `scans.store` to "s3". Resumable and verified per chunk;
//! the local files are left in place for the operator to remove once `check` passes.

use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use super::config::{self, Config, ScanBackend};
use super::{NodeError, Result};
use crate::store::scanstore::S3Scans;

/// Scans listed from the database per query.
const SCANS_PER_PAGE: usize = 100;

/// What `scans migrate` did.
#[derive(Debug, Serialize)]
pub struct MigrateReport {
    /// `s3://BUCKET/PREFIX`
    pub bucket: String,
    pub scans: u64,
    /// Chunks PUT by this run, and chunks found already in the bucket (an earlier, cut run).
    pub chunks_copied: u64,
    pub chunks_present: u64,
    pub bytes_copied: u64,
    /// Scans that could not be copied (damaged locally, or the bucket failed): while any is
    /// listed, the config is not switched.
    pub problems: Vec<String>,
    /// Whether `scans.store` is now "s3" in config.toml.
    pub switched: bool,
}

/// Copies every scan of the node in `dir` to its bucket, then switches its config to it.
/// `each` is told how many scans are done as the copy progresses.
pub fn migrate_to_s3(dir: &Path, mut each: impl FnMut(u64)) -> Result<MigrateReport> {
    let (config, _) = Config::load(dir)?;
    let config_path = dir.join(config::CONFIG_FILE);
    let invalid = |message: String| {
        NodeError::Config(config::ConfigError::Invalid {
            path: config_path.clone(),
            message,
        })
    };
    if config.scans.store == ScanBackend::S3 {
        return Err(invalid(
            "scans.store is already \"s3\": this node's scans are in the bucket".into(),
        ));
    }
    let Some(s3_section) = &config.scans.s3 else {
        return Err(invalid(
            "no [scans.s3] section: add endpoint, bucket, prefix and credentials_file (docs/operations.md, \"Moving a province's scans to object storage\")".into(),
        ));
    };
    super::restore::refuse_if_served(dir)?;
    let settings = s3_section.settings(dir).map_err(invalid)?;
    let s3 = Arc::new(S3Scans::new(settings)?);
    s3.probe()?;
    let bucket = format!("s3://{}/{}", s3.settings().bucket, s3.settings().prefix);
    let node = super::Node::open(dir)?;
    let mut report = MigrateReport {
        bucket,
        scans: 0,
        chunks_copied: 0,
        chunks_present: 0,
        bytes_copied: 0,
        problems: Vec::new(),
        switched: false,
    };
    let mut after = Vec::new();
    loop {
        let hashes = node.store.chunked_scans_after(&after, SCANS_PER_PAGE)?;
        let Some(last) = hashes.last() else {
            break;
        };
        after = last.to_vec();
        for hash in hashes {
            report.scans += 1;
            match node.store.copy_scan_to_bucket(&hash, &s3) {
                Ok((copied, present, bytes)) => {
                    report.chunks_copied += copied;
                    report.chunks_present += present;
                    report.bytes_copied += bytes;
                }
                Err(e) => report
                    .problems
                    .push(format!("scan {}: {e}", hex::encode(hash))),
            }
            each(report.scans);
        }
    }
    if report.problems.is_empty() {
        let text = std::fs::read_to_string(&config_path).map_err(|source| {
            NodeError::Config(config::ConfigError::Io {
                path: config_path.clone(),
                source,
            })
        })?;
        let switched = with_s3_store(&text);
        match Config::parse(&switched) {
            Ok(c) if c.scans.store == ScanBackend::S3 => {}
            _ => {
                return Err(invalid(
                    "could not set scans.store = \"s3\" in it: every scan is in the bucket; set it by hand".into(),
                ))
            }
        }
        crate::trust::write_file_atomic(&config_path, switched.as_bytes())?;
        report.switched = true;
    }
    Ok(report)
}

/// `text` (a config file) with `store = "s3"` in its `[scans]` table, every other line kept.
fn with_s3_store(text: &str) -> String {
    let mut out = Vec::new();
    let (mut in_scans, mut done) = (false, false);
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            if in_scans && !done {
                out.push("store = \"s3\"".to_string());
                done = true;
            }
            in_scans = trimmed == "[scans]";
        } else if in_scans && !done && trimmed.split('=').next().map(str::trim) == Some("store") {
            out.push("store = \"s3\"".to_string());
            done = true;
            continue;
        }
        out.push(line.to_string());
    }
    if in_scans && !done {
        out.push("store = \"s3\"".to_string());
        done = true;
    }
    if !done {
        out.push(String::new());
        out.push("[scans]".to_string());
        out.push("store = \"s3\"".to_string());
    }
    let mut joined = out.join("\n");
    joined.push('\n');
    joined
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_line_is_set_in_scans_and_nothing_else_changes() {
        let plain = "[node]\nunit = \"qn\"\n\n[scans.s3]\nbucket = \"b\"\n";
        assert_eq!(
            with_s3_store(plain),
            format!("{plain}\n[scans]\nstore = \"s3\"\n")
        );
        let set = "[scans]\nstore = \"local\"  # files\n[scans.s3]\nstore_note = 1\n";
        assert_eq!(
            with_s3_store(set),
            "[scans]\nstore = \"s3\"\n[scans.s3]\nstore_note = 1\n"
        );
        let unset = "[scans]\n# where\n[sync]\nlisten = \"x\"\n";
        assert_eq!(
            with_s3_store(unset),
            "[scans]\n# where\nstore = \"s3\"\n[sync]\nlisten = \"x\"\n"
        );
    }
}
