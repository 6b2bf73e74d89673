//! Rendering results: JSON for scripts (`--json`), aligned plain text for people.

use anyhow::Result;
use serde::Serialize;

use crate::model::assignment::AssignmentView;
use crate::model::dispatch::DispatchView;
use crate::model::dossier::DossierView;
use crate::model::{AuditEntry, Conflict};
use crate::net::SessionReport;
use crate::node::bundle::{ExportReport, ImportReport};
use crate::node::sync::{IssueReport, Status};
use crate::node::{AttachmentReport, CheckReport, DispatchDetail, InitReport, Node, ReceiveReport};
use crate::store::index::{AssignmentRow, DispatchRow, DossierRow};
use crate::store::sync::Peer;
use crate::store::User;
use crate::trust::{IssuedRecord, PeerIdentity};
use crate::units::Unit;

pub struct Out {
    json: bool,
}

/// A timestamp as local wall time at the node's offset, e.g. `2026-11-26 14:05:09 +07`.
pub fn when(ms: i64, node: &Node) -> String {
    let offset = node.config.node.utc_offset();
    let format = time::macros::format_description!(
        "[year]-[month]-[day] [hour]:[minute]:[second] [offset_hour sign:mandatory]"
    );
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .map(|t| t.to_offset(offset).format(&format).unwrap_or_default())
        .unwrap_or_else(|_| ms.to_string())
}

/// "3d 4h", "5h 2m", "12m", "40s".
fn format_age(ms: i64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86_400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    }
}

fn conflicts(list: &[Conflict]) {
    for c in list {
        println!(
            "  CONFLICT {}: {} (set concurrently; set it again to resolve)",
            c.field,
            c.values.join(" | ")
        );
    }
}

impl Out {
    pub fn new(json: bool) -> Self {
        Out { json }
    }

    pub fn is_json(&self) -> bool {
        self.json
    }

    /// Prints `value` as JSON when asked, else runs `human`.
    fn emit<T: Serialize>(&self, value: &T, human: impl FnOnce()) -> Result<()> {
        if self.json {
            println!("{}", serde_json::to_string_pretty(value)?);
        } else {
            human();
        }
        Ok(())
    }

    pub fn init(&self, r: &InitReport) -> Result<()> {
        self.emit(r, || {
            println!(
                "initialised {} node {} for unit {}",
                r.role, r.node_id, r.unit
            );
            println!("data directory: {}", r.data_dir.display());
            println!("default user: {}", r.user);
        })
    }

    pub fn user(&self, u: &User) -> Result<()> {
        self.emit(u, || println!("user {} added", u.name))
    }

    pub fn users(&self, users: &[User]) -> Result<()> {
        self.emit(&users, || {
            for u in users {
                println!("{:<20} {}", u.name, u.title.as_deref().unwrap_or(""));
            }
        })
    }

    pub fn dispatch(&self, d: &DispatchView, node: &Node) -> Result<()> {
        self.emit(d, || print_dispatch(d, node))
    }

    pub fn dispatch_detail(&self, d: &DispatchDetail, node: &Node) -> Result<()> {
        self.emit(d, || {
            print_dispatch(&d.dispatch, node);
            if !d.assignments.is_empty() {
                println!("assignments: {}", d.assignments.join(", "));
            }
            if !d.missing_scans.is_empty() {
                println!("scans not yet on this node: {}", d.missing_scans.len());
            }
        })
    }

    pub fn dispatch_rows(&self, rows: &[DispatchRow], node: &Node) -> Result<()> {
        self.emit(&rows, || {
            for r in rows {
                println!(
                    "{}  {:<16} {:<11} {:<9} {:<24} {}/{} received  {} scan(s)  {}  {}",
                    r.id,
                    r.ref_no,
                    r.priority,
                    r.kind,
                    r.issuer,
                    r.received,
                    r.recipients,
                    r.scans,
                    when(r.created_at_ms, node),
                    r.summary
                );
            }
            if rows.is_empty() {
                println!("no dispatches");
            }
        })
    }

    pub fn receipt(&self, r: &ReceiveReport) -> Result<()> {
        self.emit(r, || {
            if r.recorded {
                println!("{} received by {}", r.id, r.unit);
            } else {
                println!(
                    "{} was already received by {}; nothing changed",
                    r.id, r.unit
                );
            }
        })
    }

    pub fn attachment(&self, a: &AttachmentReport) -> Result<()> {
        self.emit(a, || {
            println!(
                "wrote {} ({} bytes, blake3 {}) to {}",
                a.name,
                a.size,
                a.hash,
                a.out.display()
            )
        })
    }

    pub fn assignment(&self, a: &AssignmentView, node: &Node) -> Result<()> {
        self.emit(a, || {
            println!("{}  status {}  deadline {}", a.id, a.status, a.deadline);
            println!("  dispatch {}  unit {}", a.dispatch_id, a.unit);
            println!(
                "  lead {}{}",
                a.lead,
                if a.co.is_empty() {
                    String::new()
                } else {
                    format!("  co-handlers {}", a.co.join(", "))
                }
            );
            conflicts(&a.conflicts);
            println!("  history:");
            for t in &a.history {
                let note = t
                    .note
                    .as_deref()
                    .map(|n| format!(" — {n}"))
                    .unwrap_or_default();
                println!(
                    "    {}  {:<12} by {}@{}{}",
                    when(t.at_ms, node),
                    t.status,
                    t.by,
                    t.unit,
                    note
                );
            }
        })
    }

    pub fn assignment_rows(&self, rows: &[AssignmentRow]) -> Result<()> {
        self.emit(&rows, || {
            for r in rows {
                let flag = if r.conflicted { "  CONFLICT" } else { "" };
                println!(
                    "{}  {}  {:<12} lead {:<12} dispatch {}{}",
                    r.id, r.deadline, r.status, r.lead, r.dispatch_id, flag
                );
            }
            if rows.is_empty() {
                println!("no assignments");
            }
        })
    }

    pub fn dossier(&self, d: &DossierView, node: &Node) -> Result<()> {
        self.emit(d, || {
            println!("{}  {} — {}", d.id, d.applicant, d.procedure);
            println!(
                "  at step \"{}\" since {}, held by {}",
                d.step,
                when(d.since_ms, node),
                d.holder
            );
            conflicts(&d.conflicts);
            println!("  route:");
            for s in &d.route {
                println!(
                    "    {}  {:<24} {:<28} by {}",
                    when(s.at_ms, node),
                    s.step,
                    s.unit,
                    s.by
                );
            }
        })
    }

    pub fn dossier_rows(&self, rows: &[DossierRow], node: &Node) -> Result<()> {
        self.emit(&rows, || {
            for r in rows {
                println!(
                    "{}  {:<20} {:<24} step {:<20} at {} since {}",
                    r.id,
                    r.applicant,
                    r.procedure,
                    r.step,
                    r.holder,
                    when(r.since_ms, node)
                );
            }
            if rows.is_empty() {
                println!("no dossiers");
            }
        })
    }

    pub fn audit(&self, entries: &[AuditEntry], node: &Node) -> Result<()> {
        self.emit(&entries, || {
            for e in entries {
                println!(
                    "{}  {}@{}  node {}  {}",
                    when(e.at_ms, node),
                    e.user,
                    e.unit,
                    &e.node[..e.node.len().min(12)],
                    e.what
                );
            }
        })
    }

    /// A spinner on a terminal (and not with --json); None elsewhere, where logs suffice.
    pub fn spinner(&self, what: &str) -> Option<indicatif::ProgressBar> {
        use std::io::IsTerminal;
        if self.json || !std::io::stderr().is_terminal() {
            return None;
        }
        let bar = indicatif::ProgressBar::new_spinner().with_message(what.to_string());
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        Some(bar)
    }

    pub fn enrolled(&self, id: &PeerIdentity) -> Result<()> {
        #[derive(Serialize)]
        struct Enrolled<'a> {
            node_id: String,
            unit: &'a str,
            role: &'a str,
        }
        let v = Enrolled {
            node_id: id.node_id.to_string(),
            unit: &id.unit,
            role: id.role.as_str(),
        };
        self.emit(&v, || {
            println!("enrolled node {} as {} {}", v.node_id, v.role, v.unit)
        })
    }

    pub fn issued(&self, r: &IssueReport) -> Result<()> {
        self.emit(r, || println!("issued a certificate for node {} as {} {}; carry {} to the node and run `communesync enrol install`", r.node_id, r.role, r.unit, r.out))
    }

    pub fn issued_list(&self, list: &[IssuedRecord]) -> Result<()> {
        self.emit(&list, || {
            for r in list {
                let state = if r.revoked_at.is_some() {
                    "REVOKED"
                } else {
                    "valid"
                };
                println!(
                    "{}  {:<9} {:<28} serial {}  {}",
                    r.node_id, r.role, r.unit, r.serial, state
                );
            }
        })
    }

    pub fn revoked(&self, node_id: &str, crl_number: u64) -> Result<()> {
        let v = serde_json::json!({ "node_id": node_id, "crl_number": crl_number });
        self.emit(&v, || println!("revoked node {node_id}; revocation list #{crl_number} spreads to every node by sync"))
    }

    pub fn request_written(&self, node_id: &str, file: &std::path::Path) -> Result<()> {
        let v = serde_json::json!({ "node_id": node_id, "out": file });
        self.emit(&v, || println!("wrote the enrolment request of node {node_id} to {}; carry it to the province for `communesync ca issue`", file.display()))
    }

    pub fn peers(&self, peers: &[Peer]) -> Result<()> {
        self.emit(&peers, || {
            for p in peers {
                println!("{:<20} {}", p.name, p.addr);
            }
            if peers.is_empty() {
                println!("no peers");
            }
        })
    }

    pub fn removed(&self, name: &str) -> Result<()> {
        let v = serde_json::json!({ "removed": name });
        self.emit(&v, || println!("peer {name} removed"))
    }

    pub fn sync_report(&self, r: &SessionReport) -> Result<()> {
        self.emit(r, || {
            println!(
                "synced with {}: documents {} sent / {} received, scans {} sent / {} received, {} bytes out / {} bytes in, {} round trips, {:.2} s",
                r.peer_unit,
                r.docs_sent,
                r.docs_received,
                r.blobs_sent,
                r.blobs_received,
                r.bytes_sent,
                r.bytes_received,
                r.round_trips,
                r.elapsed_ms as f64 / 1000.0
            );
            for (list, direction) in [
                (&r.scans_withheld, "not sent to the peer"),
                (&r.scans_not_received, "not received from the peer"),
            ] {
                for scan in list.iter() {
                    println!("  pending: scan {} {direction}: {}", &scan.hash[..16], scan.why);
                }
            }
            for doc in &r.docs_refused {
                println!("  refused here: document {} from the peer: {}", doc.id, doc.reason);
            }
            for doc in &r.docs_refused_by_peer {
                println!("  refused by the peer: document {}: {}", doc.id, doc.reason);
            }
            if !r.converged {
                println!("not converged: sync again once the cause above has passed");
            }
        })
    }

    pub fn status(&self, s: &Status, node: &Node) -> Result<()> {
        self.emit(s, || {
            println!(
                "node {} — {} {}{}",
                s.node_id,
                s.role,
                s.unit,
                if s.enrolled { "" } else { " (not enrolled)" }
            );
            println!(
                "documents {}  feed {}  scans missing here {} ({} bytes)",
                s.documents, s.feed_seq, s.scans_missing, s.scan_bytes_missing
            );
            println!(
                "  {:<26} {:<8} {:<25} {:<25} {:>7} {:>12} {:>8} {:>9}",
                "peer",
                "role",
                "last contact",
                "last sync",
                "out docs",
                "out bytes",
                "in (feed)",
                "lag"
            );
            for p in &s.peers {
                let (contact, synced) = match &p.sync {
                    Some(sync) => (
                        sync.last_contact_at_ms
                            .map(|t| when(t, node))
                            .unwrap_or_else(|| "never".into()),
                        sync.last_sync_at_ms
                            .map(|t| when(t, node))
                            .unwrap_or_else(|| "never".into()),
                    ),
                    None => match &p.via {
                        Some(via) => (format!("via {via}"), String::new()),
                        None => ("never".into(), "never".into()),
                    },
                };
                let lag = p.lag_ms.map(format_age).unwrap_or_else(|| "-".into());
                println!(
                    "  {:<26} {:<8} {:<25} {:<25} {:>7} {:>12} {:>8} {:>9}",
                    p.unit,
                    p.role,
                    contact,
                    synced,
                    p.pending_out.docs,
                    p.pending_out.bytes,
                    p.pending_in_changes,
                    lag
                );
                for (what, total, list) in [
                    ("refused here from this peer", p.refused_total, &p.refused),
                    (
                        "of ours this peer refuses",
                        p.refused_by_peer_total,
                        &p.refused_by_peer,
                    ),
                ] {
                    if total > 0 {
                        println!("    documents {what}: {total}");
                        for (doc, why, at) in list {
                            println!("      {doc} at {}: {why}", when(*at, node));
                        }
                    }
                }
                if let Some(err) = p.sync.as_ref().and_then(|s| s.last_error.as_deref()) {
                    println!("    last error: {err}");
                }
            }
        })
    }

    pub fn check(&self, r: &CheckReport) -> Result<()> {
        self.emit(r, || {
            println!("database: {}", r.database.join("; "));
            println!(
                "documents checked: {}, scans checked: {}",
                r.documents, r.scans
            );
            for p in &r.problems {
                println!("PROBLEM: {p}");
            }
            if r.problems.is_empty() {
                println!("no problems found");
            }
            if !r.unreferenced_scan_files.is_empty() {
                let bytes: u64 = r.unreferenced_scan_files.iter().map(|f| f.bytes).sum();
                println!(
                    "{} scan file(s) in blobs/ that no scan names ({bytes} bytes), left by a write \
                     cut short by a crash; safe to delete while no other communesync command \
                     or `serve` runs on this node:",
                    r.unreferenced_scan_files.len()
                );
                for f in &r.unreferenced_scan_files {
                    println!("  {} ({} bytes)", f.path.display(), f.bytes);
                }
            }
        })
    }

    pub fn backed_up(&self, file: &std::path::Path) -> Result<()> {
        let v = serde_json::json!({ "backup": file });
        self.emit(&v, || {
            println!(
                "wrote a consistent copy of the database to {}",
                file.display()
            )
        })
    }

    pub fn exported(&self, r: &ExportReport) -> Result<()> {
        self.emit(r, || {
            println!(
                "wrote {} documents and {} scans for {} into {} ({} bytes)",
                r.docs, r.scans, r.for_unit, r.out, r.bytes
            )
        })
    }

    pub fn imported(&self, r: &ImportReport) -> Result<()> {
        self.emit(r, || {
            println!(
                "imported a bundle from {} ({}): {} documents, {} changed here; {} scans stored, {} already held",
                r.from_unit, r.from_node, r.docs, r.docs_changed, r.scans_stored, r.scans_already_held
            )
        })
    }

    pub fn units(&self, units: &[&Unit]) -> Result<()> {
        self.emit(&units, || {
            for u in units {
                println!("{:<28} {:<9} {}", u.path, u.role, u.name);
            }
        })
    }
}

fn print_dispatch(d: &DispatchView, node: &Node) {
    println!(
        "{}  {}  [{} {}]  {}",
        d.id, d.ref_no, d.priority, d.kind, d.summary
    );
    println!(
        "  issued by {} ({}) at {}",
        d.issuer,
        d.created_by,
        when(d.created_at_ms, node)
    );
    for r in &d.recipients {
        match (r.received_at_ms, &r.received_by) {
            (Some(at), Some(by)) => {
                println!("  to {:<28} received {} by {}", r.unit, when(at, node), by)
            }
            _ => println!("  to {:<28} not yet received", r.unit),
        }
    }
    for a in &d.attachments {
        println!(
            "  scan {} ({}, {} bytes, blake3 {})",
            a.name,
            a.media_type,
            a.size,
            &a.hash[..16]
        );
    }
    for c in &d.comments {
        println!(
            "  comment {} {}@{}: {}",
            when(c.at_ms, node),
            c.by,
            c.unit,
            c.text
        );
    }
    conflicts(&d.conflicts);
}
