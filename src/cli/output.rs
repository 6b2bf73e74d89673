//! Rendering results: JSON for scripts (`--json`), aligned plain text for people.
//!
//! Text that came from a peer or a file (summaries, names, comments, notes, refusal reasons)
//! never reaches a terminal raw: plain text shows its control characters as `\u{..}`
//! escapes, and JSON writes them as `\uXXXX` escapes, which decode to the exact text.

use std::borrow::Cow;
use std::fmt::Write as _;

use anyhow::Result;
use serde::Serialize;

use crate::model::assignment::AssignmentView;
use crate::model::dispatch::DispatchView;
use crate::model::dossier::DossierView;
use crate::model::Conflict;
use crate::net::SessionReport;
use crate::node::admin::{IssueReport, Status};
use crate::node::bundle::{ExportReport, ImportReport};
use crate::node::health::Health;
use crate::node::{
    AttachmentReport, AuditLine, CheckReport, DispatchDetail, InitReport, Node, ReceiveReport,
};
use crate::store::index::{AssignmentRow, DispatchRow, DossierRow};
use crate::store::sync::Peer;
use crate::store::User;
use crate::trust::{IssuedRecord, PeerIdentity};
use crate::units::Unit;

pub struct Out {
    json: bool,
}

/// Whether a terminal could act on `c` instead of showing it: C0 and C1 controls and DEL
/// (escape sequences that move the cursor, clear the screen, set the clipboard with OSC 52),
/// line and paragraph separators, and the bidirectional marks, embeddings, overrides and
/// isolates that reorder what is shown. Letters and combining marks (Vietnamese) pass.
fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061C}'
                | '\u{200E}'
                | '\u{200F}'
                | '\u{2028}'
                | '\u{2029}'
                | '\u{202A}'..='\u{202E}'
                | '\u{2066}'..='\u{2069}'
        )
}

/// `text` with every character a terminal would act on shown as a visible escape (`\u{1b}`),
/// for plain-text output of anything a peer, a file or a user wrote.
pub fn safe(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_unsafe) {
        return Cow::Borrowed(text);
    }
    let mut shown = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if is_unsafe(c) {
            let _ = write!(shown, "\\u{{{:x}}}", u32::from(c));
        } else {
            shown.push(c);
        }
    }
    Cow::Owned(shown)
}

/// serde_json's pretty printer, except that the characters [`is_unsafe`] names are written as
/// `\uXXXX` escapes: serde_json escapes C0 controls itself but writes DEL, C1 controls and the
/// bidi marks raw. Every one of them is in the Basic Multilingual Plane, so one escape each.
struct SafeJson(serde_json::ser::PrettyFormatter<'static>);

impl serde_json::ser::Formatter for SafeJson {
    fn write_string_fragment<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        fragment: &str,
    ) -> std::io::Result<()> {
        let mut start = 0;
        for (i, c) in fragment.char_indices() {
            if is_unsafe(c) {
                w.write_all(&fragment.as_bytes()[start..i])?;
                write!(w, "\\u{:04x}", u32::from(c))?;
                start = i + c.len_utf8();
            }
        }
        w.write_all(&fragment.as_bytes()[start..])
    }

    fn begin_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.begin_array(w)
    }

    fn end_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.end_array(w)
    }

    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.0.begin_array_value(w, first)
    }

    fn end_array_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.end_array_value(w)
    }

    fn begin_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.begin_object(w)
    }

    fn end_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.end_object(w)
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.0.begin_object_key(w, first)
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.begin_object_value(w)
    }

    fn end_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.end_object_value(w)
    }
}

/// `value` as pretty JSON with [`SafeJson`]'s escapes.
fn to_safe_json<T: Serialize>(value: &T) -> serde_json::Result<String> {
    let mut bytes = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(
        &mut bytes,
        SafeJson(serde_json::ser::PrettyFormatter::new()),
    );
    value.serialize(&mut ser)?;
    Ok(String::from_utf8(bytes).expect("serde_json writes UTF-8"))
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

/// The health part of `status`: this node's problems, a line per district, then every unit
/// below this node with its state, last contact, lag, backlog and problems.
fn health(h: &Health, node: &Node) {
    for p in &h.own_problems {
        println!("this node: {}", safe(p));
    }
    for u in &h.upstream {
        for p in &u.problems {
            println!("upstream {}: {}", safe(&u.unit), safe(p));
        }
    }
    for d in &h.summary {
        println!(
            "district {}: {} units below, {} connected, {} with problems, {} never seen, {} revoked; {} documents pending{}",
            safe(&d.unit),
            d.units,
            d.connected,
            d.with_problems,
            d.never_seen,
            d.revoked,
            d.pending_docs,
            d.oldest_last_seen_ms
                .map(|t| format!("; silent longest since {}", when(t, node)))
                .unwrap_or_default()
        );
    }
    if !h.units.is_empty() {
        println!(
            "  {:<30} {:<18} {:<34} {:>9} {:>8} {:>12} {:>7}",
            "unit", "state", "last seen", "lag", "out docs", "out bytes", "overdue"
        );
    }
    let now = crate::node::now_ms();
    for u in &h.units {
        let state = if u.revoked {
            "REVOKED".to_string()
        } else if u.connected {
            "connected".to_string()
        } else if u.last_seen_ms.is_none() {
            "never seen".to_string()
        } else {
            "offline".to_string()
        };
        let state = match &u.via {
            Some(_) if !u.revoked => format!("{state} (relay)"),
            _ => state,
        };
        let seen = u
            .last_seen_ms
            .map(|t| format!("{} ({} ago)", when(t, node), format_age(now - t)))
            .unwrap_or_else(|| "-".into());
        println!(
            "  {:<30} {:<18} {:<34} {:>9} {:>8} {:>12} {:>7}",
            safe(&u.unit),
            state,
            seen,
            u.lag_s
                .map(|s| format_age(s * 1000))
                .unwrap_or_else(|| "-".into()),
            u.pending_docs,
            u.pending_bytes,
            u.overdue_assignments
        );
        for p in &u.problems {
            println!("    ! {}", safe(p));
        }
    }
    match h.attention {
        0 => println!("nothing needs attention"),
        n => println!("{n} unit(s) or link(s) need attention"),
    }
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
            safe(&c.field),
            safe(&c.values.join(" | "))
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
            println!("{}", to_safe_json(value)?);
        } else {
            human();
        }
        Ok(())
    }

    pub fn init(&self, r: &InitReport) -> Result<()> {
        self.emit(r, || {
            println!(
                "initialised {} node {} for unit {}",
                r.role,
                r.node_id,
                safe(&r.unit)
            );
            println!(
                "data directory: {}",
                safe(&r.data_dir.display().to_string())
            );
            println!("default user: {}", safe(&r.user));
        })
    }

    pub fn user(&self, u: &User) -> Result<()> {
        self.emit(u, || println!("user {} added", safe(&u.name)))
    }

    pub fn users(&self, users: &[User]) -> Result<()> {
        self.emit(&users, || {
            for u in users {
                println!(
                    "{:<20} {}",
                    safe(&u.name),
                    safe(u.title.as_deref().unwrap_or(""))
                );
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
                println!("assignments: {}", safe(&d.assignments.join(", ")));
            }
            if !d.missing_scans.is_empty() {
                println!("scans not yet on this node: {}", d.missing_scans.len());
            }
        })
    }

    /// When a list stops short of `total`, the line saying so: printed after the rows, or on
    /// stderr with `--json`, whose stdout stays the list of rows.
    fn more_line(&self, shown: usize, total: i64, what: &str) -> Option<String> {
        let shown = shown as i64;
        let more = (total > shown).then(|| {
            format!("{shown} of {total} {what} shown; use --limit {total} to see them all")
        });
        if let (true, Some(more)) = (self.json, &more) {
            eprintln!("{more}");
        }
        more
    }

    pub fn dispatch_rows(&self, rows: &[DispatchRow], total: i64, node: &Node) -> Result<()> {
        let more = self.more_line(rows.len(), total, "dispatches");
        self.emit(&rows, || {
            for r in rows {
                println!(
                    "{}  {:<16} {:<11} {:<9} {:<24} {}/{} received  {} scan(s)  {}  {}",
                    safe(&r.id),
                    safe(&r.ref_no),
                    safe(&r.priority),
                    safe(&r.kind),
                    safe(&r.issuer),
                    r.received,
                    r.recipients,
                    r.scans,
                    when(r.created_at_ms, node),
                    safe(&r.summary)
                );
            }
            if rows.is_empty() {
                println!("no dispatches");
            }
            if let Some(more) = &more {
                println!("{more}");
            }
        })
    }

    pub fn receipt(&self, r: &ReceiveReport) -> Result<()> {
        self.emit(r, || {
            if r.recorded {
                println!("{} received by {}", r.id, safe(&r.unit));
            } else {
                println!(
                    "{} was already received by {}; nothing changed",
                    r.id,
                    safe(&r.unit)
                );
            }
        })
    }

    pub fn attachment(&self, a: &AttachmentReport) -> Result<()> {
        self.emit(a, || {
            println!(
                "wrote {} ({} bytes, blake3 {}) to {}",
                safe(&a.name),
                a.size,
                safe(&a.hash),
                safe(&a.out.display().to_string())
            )
        })
    }

    pub fn assignment(&self, a: &AssignmentView, node: &Node) -> Result<()> {
        self.emit(a, || {
            println!(
                "{}  status {}  deadline {}",
                safe(&a.id),
                safe(&a.status),
                safe(&a.deadline)
            );
            println!(
                "  dispatch {}  unit {}",
                safe(&a.dispatch_id),
                safe(&a.unit)
            );
            println!(
                "  lead {}{}",
                safe(&a.lead),
                if a.co.is_empty() {
                    String::new()
                } else {
                    format!("  co-handlers {}", safe(&a.co.join(", ")))
                }
            );
            conflicts(&a.conflicts);
            println!("  history:");
            for t in &a.history {
                let note = t
                    .note
                    .as_deref()
                    .map(|n| format!(" — {}", safe(n)))
                    .unwrap_or_default();
                println!(
                    "    {}  {:<12} by {}@{}{}",
                    when(t.at_ms, node),
                    safe(&t.status),
                    safe(&t.by),
                    safe(&t.unit),
                    note
                );
            }
        })
    }

    pub fn assignment_rows(&self, rows: &[AssignmentRow], total: i64) -> Result<()> {
        let more = self.more_line(rows.len(), total, "assignments");
        self.emit(&rows, || {
            for r in rows {
                let flag = if r.conflicted { "  CONFLICT" } else { "" };
                println!(
                    "{}  {}  {:<12} lead {:<12} dispatch {}{}",
                    safe(&r.id),
                    safe(&r.deadline),
                    safe(&r.status),
                    safe(&r.lead),
                    safe(&r.dispatch_id),
                    flag
                );
            }
            if rows.is_empty() {
                println!("no assignments");
            }
            if let Some(more) = &more {
                println!("{more}");
            }
        })
    }

    pub fn dossier(&self, d: &DossierView, node: &Node) -> Result<()> {
        self.emit(d, || {
            println!(
                "{}  {} — {}",
                safe(&d.id),
                safe(&d.applicant),
                safe(&d.procedure)
            );
            println!(
                "  at step \"{}\" since {}, held by {}",
                safe(&d.step),
                when(d.since_ms, node),
                safe(&d.holder)
            );
            conflicts(&d.conflicts);
            println!("  route:");
            for s in &d.route {
                println!(
                    "    {}  {:<24} {:<28} by {}",
                    when(s.at_ms, node),
                    safe(&s.step),
                    safe(&s.unit),
                    safe(&s.by)
                );
            }
        })
    }

    pub fn dossier_rows(&self, rows: &[DossierRow], total: i64, node: &Node) -> Result<()> {
        let more = self.more_line(rows.len(), total, "dossiers");
        self.emit(&rows, || {
            for r in rows {
                println!(
                    "{}  {:<20} {:<24} step {:<20} at {} since {}",
                    safe(&r.id),
                    safe(&r.applicant),
                    safe(&r.procedure),
                    safe(&r.step),
                    safe(&r.holder),
                    when(r.since_ms, node)
                );
            }
            if rows.is_empty() {
                println!("no dossiers");
            }
            if let Some(more) = &more {
                println!("{more}");
            }
        })
    }

    pub fn audit(&self, lines: &[AuditLine], node: &Node) -> Result<()> {
        self.emit(&lines, || {
            for line in lines {
                let e = &line.entry;
                println!(
                    "{}  {}@{}  node {}  {}  [signed by {} {}: {}]",
                    when(e.at_ms, node),
                    safe(&e.user),
                    safe(&e.unit),
                    safe(e.node.get(..12).unwrap_or(&e.node)),
                    safe(&e.what),
                    e.actor.get(..12).unwrap_or(&e.actor),
                    safe(line.signer_unit.as_deref().unwrap_or("?")),
                    line.signature.describe()
                );
            }
        })
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
            println!("enrolled node {} as {} {}", v.node_id, v.role, safe(v.unit))
        })
    }

    pub fn issued(&self, r: &IssueReport) -> Result<()> {
        self.emit(r, || println!("issued a certificate for node {} as {} {}; carry {} to the node and run `communesync enrol install`", r.node_id, r.role, safe(&r.unit), safe(&r.out)))
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
                    r.node_id,
                    r.role,
                    safe(&r.unit),
                    r.serial,
                    state
                );
            }
        })
    }

    pub fn revoked(&self, node_id: &str, crl_number: u64) -> Result<()> {
        let v = serde_json::json!({ "node_id": node_id, "crl_number": crl_number });
        self.emit(&v, || {
            println!(
                "revoked node {}; revocation list #{crl_number} spreads to every node by sync",
                safe(node_id)
            )
        })
    }

    pub fn request_written(&self, node_id: &str, file: &std::path::Path) -> Result<()> {
        let v = serde_json::json!({ "node_id": node_id, "out": file });
        self.emit(&v, || println!("wrote the enrolment request of node {} to {}; carry it to the province for `communesync ca issue`", safe(node_id), safe(&file.display().to_string())))
    }

    pub fn peers(&self, peers: &[Peer]) -> Result<()> {
        self.emit(&peers, || {
            for p in peers {
                println!("{:<20} {}", safe(&p.name), safe(&p.addr));
            }
            if peers.is_empty() {
                println!("no peers");
            }
        })
    }

    pub fn removed(&self, name: &str) -> Result<()> {
        let v = serde_json::json!({ "removed": name });
        self.emit(&v, || println!("peer {} removed", safe(name)))
    }

    pub fn sync_report(&self, r: &SessionReport) -> Result<()> {
        self.emit(r, || {
            println!(
                "synced with {}: documents {} sent / {} received, scans {} sent / {} received, {} bytes out / {} bytes in, {} round trips, {:.2} s",
                safe(&r.peer_unit),
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
                println!(
                    "  refused here: document {} from the peer: {}",
                    safe(&doc.id),
                    safe(&doc.reason)
                );
            }
            for doc in &r.docs_refused_by_peer {
                println!(
                    "  refused by the peer: document {}: {}",
                    safe(&doc.id),
                    safe(&doc.reason)
                );
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
                safe(&s.unit),
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
            // Units further down have their own table below.
            for p in s.peers.iter().filter(|p| p.sync.is_some()) {
                let (contact, synced) = match &p.sync {
                    Some(sync) => (
                        sync.last_contact_at_ms
                            .map(|t| when(t, node))
                            .unwrap_or_else(|| "never".into()),
                        sync.last_sync_at_ms
                            .map(|t| when(t, node))
                            .unwrap_or_else(|| "never".into()),
                    ),
                    None => ("never".into(), "never".into()),
                };
                let lag = p.lag_ms.map(format_age).unwrap_or_else(|| "-".into());
                println!(
                    "  {:<26} {:<8} {:<25} {:<25} {:>7} {:>12} {:>8} {:>9}",
                    safe(&p.unit),
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
                            println!("      {} at {}: {}", safe(doc), when(*at, node), safe(why));
                        }
                    }
                }
                if let Some(err) = p.sync.as_ref().and_then(|s| s.last_error.as_deref()) {
                    println!("    last error: {}", safe(err));
                }
            }
            health(&s.health, node);
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
                println!("PROBLEM: {}", safe(p));
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
                    println!(
                        "  {} ({} bytes)",
                        safe(&f.path.display().to_string()),
                        f.bytes
                    );
                }
            }
            if !r.stale_scan_writes.is_empty() {
                let bytes: u64 = r.stale_scan_writes.iter().map(|f| f.bytes).sum();
                println!(
                    "{} unfinished scan write(s) in blobs/ whose process is gone ({bytes} bytes), \
                     left by a `dispatch new` that was killed; safe to delete:",
                    r.stale_scan_writes.len()
                );
                for f in &r.stale_scan_writes {
                    println!(
                        "  {} ({} bytes)",
                        safe(&f.path.display().to_string()),
                        f.bytes
                    );
                }
            }
        })
    }

    pub fn backed_up(&self, file: &std::path::Path) -> Result<()> {
        let v = serde_json::json!({ "backup": file });
        self.emit(&v, || {
            println!(
                "wrote a consistent copy of the database to {}",
                safe(&file.display().to_string())
            )
        })
    }

    pub fn restored(&self, r: &crate::node::restore::RestoreReport) -> Result<()> {
        self.emit(r, || {
            if let Some(aside) = &r.kept_aside {
                println!(
                    "kept the database it replaces as {}",
                    safe(&aside.display().to_string())
                );
            }
            println!(
                "restored {} ({} documents, {} scans) to {}; scan files: {} copied, {} already there",
                safe(&r.from.display().to_string()),
                r.documents,
                r.scans,
                safe(&r.database.display().to_string()),
                r.scan_files_copied,
                r.scan_files_present
            );
            println!("next: `communesync check`, then sync: peers offer again what the node lost since the backup");
        })
    }

    pub fn scans_migrated(&self, r: &crate::node::scans::MigrateReport) -> Result<()> {
        self.emit(r, || {
            println!(
                "{} scans to {}: {} chunks copied ({} bytes), {} already there",
                r.scans,
                safe(&r.bucket),
                r.chunks_copied,
                r.bytes_copied,
                r.chunks_present
            );
            for p in &r.problems {
                println!("  not copied: {}", safe(p));
            }
            if r.switched {
                println!("scans.store = \"s3\" in config.toml: start `serve` again; once `communesync check` passes, blobs/ may be removed");
            }
        })
    }

    pub fn exported(&self, r: &ExportReport) -> Result<()> {
        self.emit(r, || {
            println!(
                "wrote {} documents and {} scans for {} into {} ({} bytes)",
                r.docs,
                r.scans,
                safe(&r.for_unit),
                safe(&r.out),
                r.bytes
            )
        })
    }

    pub fn imported(&self, r: &ImportReport) -> Result<()> {
        self.emit(r, || {
            println!(
                "imported a bundle from {} ({}): {} documents, {} changed here; {} scans stored, {} already held",
                safe(&r.from_unit),
                safe(&r.from_node),
                r.docs,
                r.docs_changed,
                r.scans_stored,
                r.scans_already_held
            );
            for (doc, why) in &r.docs_refused {
                println!("  refused: document {}: {}", safe(doc), safe(why));
            }
        })
    }

    pub fn units(&self, units: &[&Unit], version: u64) -> Result<()> {
        self.emit(&units, || {
            for u in units {
                println!("{:<28} {:<9} {}", safe(&u.path), u.role, safe(&u.name));
            }
            match version {
                0 => println!("(the configured unit tree: no tree from the province yet)"),
                v => println!("(the province's unit tree, version {v})"),
            }
        })
    }

    pub fn units_published(&self, version: u64, units: usize) -> Result<()> {
        #[derive(Serialize)]
        struct Published {
            version: u64,
            units: usize,
        }
        self.emit(&Published { version, units }, || {
            println!(
                "published unit tree version {version} ({units} units), signed by the CA: every node gets it at its next sync"
            )
        })
    }
}

impl Out {
    pub fn unit_moved(&self, from: &str, to: &str, version: u64) -> Result<()> {
        #[derive(Serialize)]
        struct Moved<'a> {
            from: &'a str,
            to: &'a str,
            version: u64,
        }
        self.emit(&Moved { from, to, version }, || {
            println!(
                "moved {from} to {to} in unit tree version {version}, signed by the CA: every node gets it at its next sync; the unit's nodes keep their certificates"
            )
        })
    }
}

fn print_dispatch(d: &DispatchView, node: &Node) {
    println!(
        "{}  {}  [{} {}]  {}",
        safe(&d.id),
        safe(&d.ref_no),
        safe(&d.priority),
        safe(&d.kind),
        safe(&d.summary)
    );
    println!(
        "  issued by {} ({}) at {}",
        safe(&d.issuer),
        safe(&d.created_by),
        when(d.created_at_ms, node)
    );
    for r in &d.recipients {
        match (r.received_at_ms, &r.received_by) {
            (Some(at), Some(by)) => {
                println!(
                    "  to {:<28} received {} by {}",
                    safe(&r.unit),
                    when(at, node),
                    safe(by)
                )
            }
            _ => println!("  to {:<28} not yet received", safe(&r.unit)),
        }
    }
    for a in &d.attachments {
        println!(
            "  scan {} ({}, {} bytes, blake3 {})",
            safe(&a.name),
            safe(&a.media_type),
            a.size,
            safe(a.hash.get(..16).unwrap_or(&a.hash))
        );
    }
    for c in &d.comments {
        println!(
            "  comment {} {}@{}: {}",
            when(c.at_ms, node),
            safe(&c.by),
            safe(&c.unit),
            safe(&c.text)
        );
    }
    conflicts(&d.conflicts);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_shows_controls_and_bidi_marks_as_escapes_and_keeps_vietnamese() {
        let hostile = "a\u{1b}]52;c;ZWNobw==\u{7}b\u{1b}[2Jc\u{9b}d\u{7f}e\u{202e}f\u{2066}g\nh\ti";
        let shown = safe(hostile);
        assert_eq!(
            shown,
            "a\\u{1b}]52;c;ZWNobw==\\u{7}b\\u{1b}[2Jc\\u{9b}d\\u{7f}e\\u{202e}f\\u{2066}g\\u{a}h\\u{9}i"
        );
        assert!(!shown.chars().any(is_unsafe));
        let vietnamese = "Công văn khẩn: Ủy ban nhân dân xã Tình Húc, huyện Bình Liêu";
        assert!(matches!(safe(vietnamese), Cow::Borrowed(t) if t == vietnamese));
    }

    #[test]
    fn json_escapes_what_serde_json_leaves_raw_and_decodes_to_the_same_text() {
        let value = serde_json::json!({ "summary": "x\u{1b}[2J\u{9b}31m\u{7f}\u{202e}ệ" });
        let text = to_safe_json(&value).unwrap();
        assert!(!text.chars().any(|c| is_unsafe(c) && c != '\n'), "{text}");
        assert!(
            text.contains("\\u001b[2J\\u009b31m\\u007f\\u202eệ"),
            "{text}"
        );
        let back: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back, value);
        // Only string contents change: the layout is serde_json's pretty one.
        let plain = serde_json::json!({ "a": [1, "b"], "c": {} });
        assert_eq!(
            to_safe_json(&plain).unwrap(),
            serde_json::to_string_pretty(&plain).unwrap()
        );
    }
}
