//! Rendering results: JSON for scripts (`--json`), aligned plain text for people.

use anyhow::Result;
use serde::Serialize;

use crate::model::assignment::AssignmentView;
use crate::model::dispatch::DispatchView;
use crate::model::dossier::DossierView;
use crate::model::{AuditEntry, Conflict};
use crate::node::{AttachmentReport, DispatchDetail, InitReport, Node, ReceiveReport};
use crate::store::index::{AssignmentRow, DispatchRow, DossierRow};
use crate::store::User;
use crate::units::Unit;

pub struct Out {
    json: bool,
}

/// A timestamp as local wall time at the node's offset, e.g. `2026-11-26 14:05:09 +07`.
pub fn when(ms: i64, node: &Node) -> String {
    let offset = time::UtcOffset::from_hms(node.config.node.utc_offset_hours, 0, 0)
        .unwrap_or(time::UtcOffset::UTC);
    let format = time::macros::format_description!(
        "[year]-[month]-[day] [hour]:[minute]:[second] [offset_hour sign:mandatory]"
    );
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .map(|t| t.to_offset(offset).format(&format).unwrap_or_default())
        .unwrap_or_else(|_| ms.to_string())
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
