//! `communesync demo`: the real binary, step by step, on nodes in temporary directories: a
//! province, a district relay and two communes on loopback (or, with `--local`, one commune
//! office working offline).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::output::Out;

/// A synthetic greyscale scan (PGM): a page of "text lines" on paper noise, like a real scan.
/// Every seed gives different content, so distinct scans never deduplicate.
pub fn synthetic_scan(width: usize, height: usize, seed: u64) -> Vec<u8> {
    let mut out = format!("P5\n{width} {height}\n255\n").into_bytes();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
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
    if !title.is_empty() {
        println!("\n== {title}");
    }
    println!("$ communesync {}", args.join(" "));
    let stdout = quiet(exe, data, args).with_context(|| format!("demo step {title:?} failed"))?;
    print!("{stdout}");
    Ok(stdout)
}

/// Runs a creating step quietly with --json, prints the command and the new id.
fn step_create(exe: &Path, data: &Path, title: &str, args: &[&str]) -> Result<String> {
    println!("\n== {title}\n$ communesync {}", args.join(" "));
    let mut full = vec!["--json"];
    full.extend_from_slice(args);
    let id = id_of(&quiet(exe, data, &full)?)?;
    println!("created {id}");
    Ok(id)
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

/// The binary to run and a fresh temporary directory for the demo's nodes.
fn prepare(out: &Out) -> Result<(std::path::PathBuf, tempfile::TempDir)> {
    if out.is_json() {
        bail!("the demo prints a walkthrough; run it without --json");
    }
    let exe = std::env::current_exe().context("finding the communesync binary")?;
    let tmp = tempfile::Builder::new()
        .prefix("communesync-demo-")
        .tempdir()
        .context("creating a temporary directory")?;
    Ok((exe, tmp))
}

/// Keeps the demo's directory when asked, else lets it be deleted.
fn finish(keep: bool, tmp: tempfile::TempDir) {
    if keep {
        println!("kept the demo data in {}", tmp.keep().display());
    }
}

pub fn run_local(keep: bool, out: &Out) -> Result<()> {
    let (exe, tmp) = prepare(out)?;
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
    finish(keep, tmp);
    Ok(())
}

/// A `serve` daemon for the demo, stopped with SIGTERM (a clean shutdown) when dropped.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        #[cfg(unix)]
        // SAFETY: signalling our own child process by its pid.
        unsafe {
            libc::kill(self.0.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(exe: &Path, data: &Path) -> Result<(Daemon, String)> {
    // An ephemeral port, free a moment ago: good enough for a demo on loopback.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let child = Command::new(exe)
        .arg("--data")
        .arg(data)
        .args(["serve", "--listen", &addr])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting communesync serve")?;
    Ok((Daemon(child), addr))
}

/// Runs a command quietly and returns its stdout.
fn quiet(exe: &Path, data: &Path, args: &[&str]) -> Result<String> {
    let output = Command::new(exe)
        .arg("--data")
        .arg(data)
        .args(args)
        .output()
        .with_context(|| format!("running {}", exe.display()))?;
    if !output.status.success() {
        bail!(
            "communesync {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Polls `args --json` until `done` holds (or 60 s pass).
fn wait_for(
    exe: &Path,
    data: &Path,
    what: &str,
    args: &[&str],
    done: impl Fn(&serde_json::Value) -> bool,
) -> Result<f64> {
    let start = Instant::now();
    let mut full = vec!["--json"];
    full.extend_from_slice(args);
    while start.elapsed() < Duration::from_secs(60) {
        // "Not found" is expected until the document arrives.
        let value = quiet(exe, data, &full)
            .ok()
            .and_then(|out| serde_json::from_str(&out).ok());
        if value.as_ref().is_some_and(&done) {
            return Ok(start.elapsed().as_secs_f64());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("demo: {what} did not happen within 60 s")
}

/// Traffic of each link, as the district relay counted it.
fn print_links(exe: &Path, district: &Path) -> Result<()> {
    // `status` exits 7 when something needs attention; its figures are printed either way.
    let shown = Command::new(exe)
        .arg("--data")
        .arg(district)
        .args(["--json", "status"])
        .output()?;
    let status: serde_json::Value = serde_json::from_slice(&shown.stdout)?;
    println!("bytes each link carried so far (UDP payload, both directions, as counted at the district):");
    for peer in status["peers"].as_array().into_iter().flatten() {
        if let Some(sync) = peer["sync"].as_object() {
            println!(
                "  qn/binhlieu <-> {:<22} {:>10} bytes out  {:>10} bytes in",
                peer["unit"].as_str().unwrap_or("?"),
                sync["bytes_sent"],
                sync["bytes_received"]
            );
        }
    }
    Ok(())
}

pub fn run_tree(keep: bool, out: &Out) -> Result<()> {
    let (exe, tmp) = prepare(out)?;
    let dir = |name: &str| tmp.path().join(name);
    let (province, district, tinhhuc, hucdong) =
        (dir("qn"), dir("binhlieu"), dir("tinhhuc"), dir("hucdong"));
    println!("communesync demo: the province of Quảng Ninh, the Bình Liêu district relay and two of its communes, on loopback");

    println!(
        "\n== Set up four nodes; the province runs the certificate authority and enrols the others"
    );
    quiet(
        &exe,
        &province,
        &["init", "--unit", "qn", "--role", "province"],
    )?;
    quiet(&exe, &province, &["ca", "init"])?;
    for (data, unit, role) in [
        (&district, "qn/binhlieu", "district"),
        (&tinhhuc, "qn/binhlieu/tinhhuc", "commune"),
        (&hucdong, "qn/binhlieu/hucdong", "commune"),
    ] {
        quiet(&exe, data, &["init", "--unit", unit, "--role", role])?;
        let req = data.with_extension("req");
        let crt = data.with_extension("crt");
        quiet(
            &exe,
            data,
            &["enrol", "request", "--out", &req.display().to_string()],
        )?;
        quiet(
            &exe,
            &province,
            &[
                "ca",
                "issue",
                &req.display().to_string(),
                "--unit",
                unit,
                "--role",
                role,
                "--out",
                &crt.display().to_string(),
            ],
        )?;
        print!(
            "{}",
            quiet(
                &exe,
                data,
                &["enrol", "install", &crt.display().to_string()]
            )?
        );
    }
    quiet(
        &exe,
        &tinhhuc,
        &["user", "add", "minh", "--title", "địa chính"],
    )?;

    println!("\n== Start the province and the district relay (communesync serve); the district dials the province, whose certificate shows it is upstream");
    let (_p, province_addr) = serve(&exe, &province)?;
    quiet(
        &exe,
        &district,
        &["peer", "add", "province", "--addr", &province_addr],
    )?;
    let (_d, district_addr) = serve(&exe, &district)?;
    for commune in [&tinhhuc, &hucdong] {
        quiet(
            &exe,
            commune,
            &["peer", "add", "district", "--addr", &district_addr],
        )?;
    }
    println!("province on {province_addr}, district on {district_addr}");

    let scan = dir("chi-thi-15.pgm");
    std::fs::write(&scan, synthetic_scan(1240, 1754, 7)).context("writing the demo scan")?;
    let dispatch = step_create(
        &exe,
        &province,
        "The province issues a flash directive with its scan to both communes (a local write: no network involved)",
        &["dispatch", "new", "--ref", "15/CT-UBND", "--kind", "directive", "--priority", "flash",
          "--summary", "Phòng chống lụt bão mùa mưa 2026", "--to", "qn/binhlieu/tinhhuc", "qn/binhlieu/hucdong",
          "--attach", &scan.display().to_string()],
    )?;

    println!("\n== The district relay receives it from the province, scan included (once, for both communes)");
    let took = wait_for(
        &exe,
        &district,
        "the dispatch reaching the district",
        &["dispatch", "show", &dispatch],
        |v| v["missing_scans"].as_array().is_some_and(|m| m.is_empty()),
    )?;
    println!("at the district after {took:.1} s");

    for (name, commune) in [("Tình Húc", &tinhhuc), ("Húc Động", &hucdong)] {
        step(
            &exe,
            commune,
            &format!("{name} comes online and syncs with its district"),
            &["sync"],
        )?;
    }
    step(
        &exe,
        &hucdong,
        "Húc Động holds the dispatch and its scan",
        &["dispatch", "show", &dispatch],
    )?;

    step(
        &exe,
        &tinhhuc,
        "Tình Húc records receipt",
        &["dispatch", "receive", &dispatch],
    )?;
    let assignment = step_create(
        &exe,
        &tinhhuc,
        "and assigns it to Minh",
        &[
            "assign",
            "new",
            &dispatch,
            "--lead",
            "minh",
            "--deadline",
            "2026-12-15",
        ],
    )?;
    step(
        &exe,
        &tinhhuc,
        "Minh completes it",
        &[
            "--as",
            "minh",
            "assign",
            "update",
            &assignment,
            "--status",
            "done",
            "--note",
            "kế hoạch đã lập",
        ],
    )?;
    step(&exe, &tinhhuc, "Tình Húc syncs again", &["sync"])?;

    println!(
        "\n== The status travels up: district → province, without anyone acting at the district"
    );
    let took = wait_for(
        &exe,
        &province,
        "the assignment reaching the province",
        &["assign", "show", &assignment],
        |v| v["status"] == "done",
    )?;
    println!("at the province after {took:.1} s");
    step(
        &exe,
        &province,
        "What the province sees",
        &["assign", "show", &assignment],
    )?;
    step(&exe, &province, "", &["dispatch", "show", &dispatch])?;
    println!();
    print_links(&exe, &district)?;
    println!(
        "(the {}-byte scan crossed the province–district link once, then once to each commune; on a link as fast as this loopback it travels raw, on a field link compressed at a level chosen for its speed)",
        std::fs::metadata(&scan)?.len()
    );
    println!("\ndemo complete");
    finish(keep, tmp);
    Ok(())
}
