//! The status page: one server-rendered HTML document, no script. The unit tree with each
//! node's connection state, last contact and lag (colour-coded), backlogs, scans in flight and
//! overdue assignments; the overdue assignments themselves; a dossier lookup by id.
//!
//! Every text that a peer, a user or a file wrote goes through [`esc`]: characters a terminal
//! or a browser would act on are shown as escapes (the CLI's `safe`), then HTML-escaped.

use std::fmt::Write as _;

use crate::node::health::{age, Filter, UnitHealth};
use crate::node::{now_ms, Node, NodeError, Result};

/// Overdue assignments listed on the page at most (the rest are counted).
const OVERDUE_LISTED_MAX: usize = 200;
/// Longest dossier id looked up (ids are a kind prefix and 16 hex digits).
const DOSSIER_ID_BYTES_MAX: usize = 64;
/// Seconds between reloads of the page by the browser.
const REFRESH_S: u32 = 30;

/// `text` safe to place in HTML text or a quoted attribute.
fn esc(text: &str) -> String {
    let shown = crate::cli::safe(text);
    let mut out = String::with_capacity(shown.len());
    for c in shown.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The value of `key` in a query string, percent-decoded.
fn query_value(query: Option<&str>, key: &str) -> Option<String> {
    let raw = query?
        .split('&')
        .find_map(|pair| pair.strip_prefix(key)?.strip_prefix('='))?;
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let digit = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
                match (digit(bytes[i + 1]), digit(bytes[i + 2])) {
                    (Some(high), Some(low)) => {
                        out.push(high << 4 | low);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    Some(String::from_utf8_lossy(&out).trim().to_string())
}

/// A time as the node's local wall time, e.g. `2026-11-26 14:05 +07`.
fn local(ms: i64, node: &Node) -> String {
    let format = time::macros::format_description!(
        "[year]-[month]-[day] [hour]:[minute] [offset_hour sign:mandatory]"
    );
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.to_offset(node.config.node.utc_offset())
                .format(&format)
                .ok()
        })
        .unwrap_or_else(|| ms.to_string())
}

/// The row's state: CSS class and words.
fn state(h: &UnitHealth) -> (&'static str, &'static str) {
    if h.revoked {
        ("revoked", "revoked")
    } else if h.connected {
        ("ok", "connected")
    } else if h.last_seen_ms.is_none() {
        ("down", "never connected")
    } else if h.problems.is_empty() {
        ("late", "offline")
    } else {
        ("down", "offline")
    }
}

fn lag_class(lag_s: Option<i64>) -> &'static str {
    match lag_s {
        None => "ok",
        Some(s) if s < 300 => "ok",
        Some(s) if s < 3600 => "late",
        Some(_) => "down",
    }
}

const STYLE: &str = "body{font-family:sans-serif;margin:1.5em;color:#222}\
table{border-collapse:collapse;margin:0.5em 0 1.5em}\
th,td{border:1px solid #ccc;padding:0.25em 0.6em;text-align:left;vertical-align:top}\
th{background:#f0f0f0}td.n{text-align:right}small{color:#666}\
.ok{background:#dff3df}.late{background:#fff1c9}.down{background:#f8d4d4}.revoked{background:#e4dcef;color:#555}\
span.ok,span.late,span.down,span.revoked{padding:0 0.4em;border-radius:0.3em}\
ul.problems{margin:0;padding-left:1.2em}";

pub fn render(node: &mut Node, query: Option<&str>) -> Result<String> {
    let status = node.status_filtered(&Filter::default())?;
    let health = &status.health;
    let now = now_ms();
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_S}\">\
         <title>communesync {unit}</title><style>{STYLE}</style></head><body>\
         <h1>communesync — {role} {unit}</h1>\
         <p>node <code>{id}</code> · {docs} documents · {missing} scans missing · {flight} scans in flight · as of {at}</p>",
        unit = esc(&status.unit),
        role = status.role,
        id = esc(&status.node_id),
        docs = status.documents,
        missing = status.scans_missing,
        flight = health.own.scans_in_flight,
        at = local(now, node),
    );
    let _ = write!(
        h,
        "<p id=\"attention\" class=\"{}\">{}</p>",
        if health.attention == 0 { "ok" } else { "down" },
        match health.attention {
            0 => "Nothing needs attention.".to_string(),
            1 => "1 unit or link needs attention.".to_string(),
            n => format!("{n} units or links need attention."),
        }
    );
    if !health.own_problems.is_empty() {
        h.push_str("<p>This node: ");
        h.push_str(&esc(&health.own_problems.join("; ")));
        h.push_str("</p>");
    }

    if !health.summary.is_empty() {
        h.push_str("<h2>Districts</h2><table id=\"districts\"><tr><th>District</th><th>Units below</th><th>Connected</th><th>With problems</th><th>Never seen</th><th>Revoked</th><th>Pending documents</th><th>Longest silence</th></tr>");
        for d in &health.summary {
            let _ = write!(
                h,
                "<tr class=\"{class}\"><td>{unit}</td><td class=\"n\">{units}</td><td class=\"n\">{conn}</td><td class=\"n\">{prob}</td><td class=\"n\">{never}</td><td class=\"n\">{rev}</td><td class=\"n\">{pend}</td><td>{oldest}</td></tr>",
                class = if d.with_problems == 0 { "ok" } else { "down" },
                unit = esc(&d.unit),
                units = d.units,
                conn = d.connected,
                prob = d.with_problems,
                never = d.never_seen,
                rev = d.revoked,
                pend = d.pending_docs,
                oldest = d
                    .oldest_last_seen_ms
                    .map(|t| format!("since {} ({})", local(t, node), age(now - t)))
                    .unwrap_or_else(|| "-".into()),
            );
        }
        h.push_str("</table>");
    }

    h.push_str("<h2>Units</h2><table id=\"units\"><tr><th>Unit</th><th>State</th><th>Last contact</th><th>Lag</th><th>Pending</th><th>Scans in flight</th><th>Overdue assignments</th><th>Problems</th></tr>");
    let depth0 = status.unit.matches('/').count();
    for u in health.upstream.iter().chain(&health.units) {
        let (class, words) = state(u);
        let depth = u.unit.matches('/').count().saturating_sub(depth0);
        let contact = match u.last_seen_ms {
            Some(t) => format!("{} <small>({} ago)</small>", local(t, node), age(now - t)),
            None => "never".to_string(),
        };
        let lag = u
            .lag_s
            .map(|s| age(s * 1000))
            .unwrap_or_else(|| "-".to_string());
        let via = u
            .via
            .as_deref()
            .map(|v| format!(" <small>via {}</small>", esc(v)))
            .unwrap_or_default();
        let upstream = if crate::node::replica::is_upstream(&u.unit, &status.unit) {
            " <small>(upstream)</small>"
        } else {
            ""
        };
        let flight = u
            .reported
            .as_ref()
            .map(|r| r.scans_in_flight.to_string())
            .unwrap_or_else(|| "-".to_string());
        let _ = write!(
            h,
            "<tr class=\"{class}\" data-unit=\"{path}\"><td style=\"padding-left:{indent:.1}em\">{name}{upstream}<br><small>{path}</small></td>\
             <td><span class=\"{class}\">{words}</span>{via}</td><td>{contact}</td><td class=\"{lag_class}\">{lag}</td>\
             <td class=\"n\">{docs} docs<br><small>{bytes} bytes</small></td><td class=\"n\">{flight}</td>\
             <td class=\"n{overdue_class}\">{overdue}</td><td>",
            path = esc(&u.unit),
            indent = 0.6 + 1.2 * depth.saturating_sub(1) as f64,
            name = esc(&u.name),
            lag_class = lag_class(u.lag_s),
            docs = u.pending_docs,
            bytes = u.pending_bytes,
            overdue = u.overdue_assignments,
            overdue_class = if u.overdue_assignments > 0 { " down" } else { "" },
        );
        if !u.problems.is_empty() {
            h.push_str("<ul class=\"problems\">");
            for p in &u.problems {
                let _ = write!(h, "<li>{}</li>", esc(p));
            }
            h.push_str("</ul>");
        }
        h.push_str("</td></tr>");
    }
    h.push_str("</table>");

    let overdue = node.assign_list(true, None, OVERDUE_LISTED_MAX + 1)?;
    let _ = write!(h, "<h2>Overdue assignments</h2>");
    if overdue.is_empty() {
        h.push_str("<p id=\"overdue\">None.</p>");
    } else {
        h.push_str("<table id=\"overdue\"><tr><th>Assignment</th><th>Unit</th><th>Deadline</th><th>Lead</th><th>Status</th><th>Dispatch</th></tr>");
        for a in overdue.iter().take(OVERDUE_LISTED_MAX) {
            let _ = write!(
                h,
                "<tr class=\"down\"><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
                esc(&a.id),
                esc(&a.unit),
                esc(&a.deadline),
                esc(&a.lead),
                esc(&a.status),
                esc(&a.dispatch_id)
            );
        }
        h.push_str("</table>");
        if overdue.len() > OVERDUE_LISTED_MAX {
            let _ = write!(
                h,
                "<p>More than {OVERDUE_LISTED_MAX}: see <code>communesync assign list --overdue</code>.</p>"
            );
        }
    }

    let asked = query_value(query, "dossier").filter(|id| !id.is_empty());
    let _ = write!(
        h,
        "<h2>Dossier</h2><form method=\"get\" action=\"/\"><input name=\"dossier\" size=\"28\" maxlength=\"{DOSSIER_ID_BYTES_MAX}\" placeholder=\"dos_…\" value=\"{}\"> <button>Look up</button></form>",
        esc(asked.as_deref().unwrap_or(""))
    );
    if let Some(id) = asked {
        h.push_str(&dossier(node, &id));
    }
    h.push_str("</body></html>\n");
    Ok(h)
}

/// A dossier's current step and route, or why it cannot be shown.
fn dossier(node: &mut Node, id: &str) -> String {
    if id.len() > DOSSIER_ID_BYTES_MAX {
        return "<p id=\"dossier\">Not a dossier id (too long).</p>".into();
    }
    match node.dossier_track(id) {
        Ok(d) => {
            let mut h = format!(
                "<div id=\"dossier\"><p><code>{}</code>: {} — {}<br>step <b>{}</b> at {} since {}</p><table><tr><th>Step</th><th>Unit</th><th>When</th><th>By</th></tr>",
                esc(&d.id),
                esc(&d.applicant),
                esc(&d.procedure),
                esc(&d.step),
                esc(&d.holder),
                local(d.since_ms, node),
            );
            for s in &d.route {
                let _ = write!(
                    h,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    esc(&s.step),
                    esc(&s.unit),
                    local(s.at_ms, node),
                    esc(&s.by)
                );
            }
            h.push_str("</table></div>");
            h
        }
        Err(e) => {
            let why = match &e {
                e if e.is_not_found() => "No such dossier here.".to_string(),
                NodeError::Invalid(_) | NodeError::Model(_) => format!("Not a dossier id: {e}"),
                e => format!("Cannot read it: {e}"),
            };
            format!("<p id=\"dossier\">{}</p>", esc(&why))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_text_cannot_become_markup_or_reorder_the_page() {
        let shown = esc("<script>alert(1)</script> \"x\" & \u{202e}txt.exe");
        assert!(!shown.contains('<') && !shown.contains('"') && !shown.contains('\u{202e}'));
        assert!(shown.contains("&lt;script&gt;") && shown.contains("\\u{202e}"));
    }

    #[test]
    fn a_looked_up_id_is_percent_decoded() {
        assert_eq!(
            query_value(Some("a=1&dossier=dos_%41b+c"), "dossier").as_deref(),
            Some("dos_Ab c")
        );
        assert_eq!(
            query_value(Some("dossier=%4"), "dossier").as_deref(),
            Some("%4")
        );
        assert_eq!(query_value(Some("x=1"), "dossier"), None);
    }
}
