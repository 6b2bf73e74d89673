//! `communesync demo`: a commune node in a temporary directory walks a dispatch with a scan
//! through receipt, assignment, progress and completion, running the real binary for each step.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::output::Out;

/// A synthetic greyscale scan (PGM): a page of "text lines" on paper noise, like a real scan.
pub fn synthetic_scan(width: usize, height: usize, seed: u64) -> Vec<u8> {
    let mut out = format!("P5\n{width} {height}\n255\n").into_bytes();
    let mut state = seed | 1;
    for y in 0..height {
        for x in 0..width {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let noise = (state % 6) as u8;
            let ink = (y / 12) % 3 != 2
                && (x / 7 + y / 12) % 9 != 0
                && (y % 12) < 8
                && x > 60
                && x < width - 60;
            out.push(if ink && (x + y) % 5 != 0 {
                30 + noise
            } else {
                240 + noise
            });
        }
    }
    out
}

fn step(exe: &Path, data: &Path, title: &str, args: &[&str]) -> Result<String> {
    println!("\n== {title}\n$ communesync {}", args.join(" "));
    let output = Command::new(exe)
        .arg("--data")
        .arg(data)
        .args(args)
        .output()
        .with_context(|| format!("running {}", exe.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    print!("{stdout}");
    if !output.status.success() {
        bail!(
            "demo step {title:?} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(stdout)
}

/// The id in a `--json` object's "id" field.
fn id_of(json: &str) -> Result<String> {
    let value: serde_json::Value =
        serde_json::from_str(json).context("demo: reading JSON output")?;
    value["id"]
        .as_str()
        .map(str::to_string)
        .context("demo: no id in output")
}

pub fn run(keep: bool, out: &Out) -> Result<()> {
    if out.is_json() {
        bail!("the demo prints a walkthrough; run it without --json");
    }
    let exe = std::env::current_exe().context("finding the communesync binary")?;
    let tmp = tempfile::Builder::new()
        .prefix("communesync-demo-")
        .tempdir()
        .context("creating a temporary directory")?;
    let data = tmp.path().join("tinhhuc");
    let scan = tmp.path().join("ke-hoach-phong-chong-lut-bao.pgm");
    std::fs::write(&scan, synthetic_scan(1240, 1754, 7)).context("writing the demo scan")?;
    let scan_text = scan.display().to_string();

    println!(
        "communesync demo: the commune office of Tình Húc (qn/binhlieu/tinhhuc), no network needed"
    );
    step(
        &exe,
        &data,
        "Create the commune node",
        &[
            "init",
            "--unit",
            "qn/binhlieu/tinhhuc",
            "--role",
            "commune",
            "--user",
            "chutich",
        ],
    )?;
    step(
        &exe,
        &data,
        "Add the office staff",
        &["user", "add", "lan", "--title", "van thu (clerk)"],
    )?;
    step(
        &exe,
        &data,
        "",
        &["user", "add", "minh", "--title", "dia chinh (land officer)"],
    )?;
    let created = step(
        &exe,
        &data,
        "The chairman issues an urgent directive with its scan, to the office and the district",
        &[
            "--json",
            "dispatch",
            "new",
            "--ref",
            "15/CT-UBND",
            "--kind",
            "directive",
            "--priority",
            "urgent",
            "--summary",
            "Phòng chống lụt bão mùa mưa 2026",
            "--to",
            "qn/binhlieu/tinhhuc",
            "qn/binhlieu",
            "--attach",
            &scan_text,
        ],
    )?;
    let dispatch = id_of(&created)?;
    step(
        &exe,
        &data,
        "The clerk records its receipt",
        &["--as", "lan", "dispatch", "receive", &dispatch],
    )?;
    let assigned = step(
        &exe,
        &data,
        "The chairman assigns it: Minh leads, Lan coordinates",
        &[
            "--json",
            "assign",
            "new",
            &dispatch,
            "--lead",
            "minh",
            "--co",
            "lan",
            "--deadline",
            "2026-12-15",
        ],
    )?;
    let assignment = id_of(&assigned)?;
    step(
        &exe,
        &data,
        "Minh starts work",
        &[
            "--as",
            "minh",
            "assign",
            "update",
            &assignment,
            "--status",
            "in-progress",
            "--note",
            "surveying the dykes",
        ],
    )?;
    step(
        &exe,
        &data,
        "Minh reports completion",
        &[
            "--as",
            "minh",
            "assign",
            "update",
            &assignment,
            "--status",
            "done",
            "--note",
            "plan filed",
        ],
    )?;
    step(
        &exe,
        &data,
        "The dispatch as the office sees it",
        &["dispatch", "show", &dispatch],
    )?;
    let copy = tmp.path().join("scan-copy.pgm");
    step(
        &exe,
        &data,
        "The scan comes back bit for bit",
        &[
            "dispatch",
            "attachment",
            &dispatch,
            "ke-hoach-phong-chong-lut-bao.pgm",
            "--out",
            &copy.display().to_string(),
        ],
    )?;
    if std::fs::read(&copy)? != std::fs::read(&scan)? {
        bail!("demo: the scan read back differs from the original");
    }
    step(
        &exe,
        &data,
        "The audit trail of the assignment",
        &["audit", &assignment],
    )?;
    println!(
        "\ndemo complete: every step above was committed to {}",
        data.join("node.db").display()
    );
    if keep {
        let kept = tmp.keep();
        println!("kept the demo node in {}", kept.display());
    }
    Ok(())
}
