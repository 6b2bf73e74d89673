//! `/metrics`: the node's figures in Prometheus' text exposition format (version 0.0.4).
//!
//! Gauges come from the store at each scrape; counters (sync rounds, refusals) from the serving
//! process, so they start at zero when `serve` starts, as Prometheus expects of a counter.

use std::fmt::Write as _;

use crate::node::health::{is_alive, CounterValues, Filter};
use crate::node::{Node, Result};

/// A label value with `\`, `"` and line feeds escaped, as the format requires.
fn label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Writes one metric family: its help, its type and its samples (labels, value).
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {value}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    }
}

pub fn render(node: &Node, counters: &CounterValues) -> Result<String> {
    let status = node.status_filtered(&Filter::default())?;
    let mut out = String::new();
    let one = |v: f64| vec![(String::new(), v)];
    family(
        &mut out,
        "communesync_documents",
        "gauge",
        "Documents this node holds.",
        &one(status.documents as f64),
    );
    family(
        &mut out,
        "communesync_feed_seq",
        "gauge",
        "Position of this node's change feed.",
        &one(status.feed_seq as f64),
    );
    family(
        &mut out,
        "communesync_scans_missing",
        "gauge",
        "Scans referenced here and not held yet.",
        &one(status.scans_missing as f64),
    );
    family(
        &mut out,
        "communesync_scan_bytes_missing",
        "gauge",
        "Bytes of the scans referenced here and not held yet.",
        &one(status.scan_bytes_missing as f64),
    );
    family(
        &mut out,
        "communesync_scans_in_flight",
        "gauge",
        "Scans partly received (under way or to resume).",
        &one(status.health.own.scans_in_flight as f64),
    );
    if let Some(free) = status.health.own.disk_free_bytes {
        family(
            &mut out,
            "communesync_disk_free_bytes",
            "gauge",
            "Free bytes on the data directory's file system.",
            &one(free as f64),
        );
    }
    if let Some(expires) = status.health.own.cert_expires_ms {
        family(
            &mut out,
            "communesync_certificate_expiry_timestamp_seconds",
            "gauge",
            "When this node's certificate expires.",
            &one((expires / 1000) as f64),
        );
    }

    // Direct peers, one series per peer node.
    let direct: Vec<_> = status
        .peers
        .iter()
        .filter_map(|p| Some((p, p.sync.as_ref()?)))
        .collect();
    let peer_labels =
        |unit: &str, node: &str| format!("unit=\"{}\",node=\"{}\"", label(unit), label(node));
    let lives = node.store.peer_lives()?;
    let now = crate::node::now_ms();
    let connected: Vec<(String, f64)> = direct
        .iter()
        .map(|(p, s)| {
            let up = lives
                .iter()
                .any(|l| l.node_id == s.node_id && is_alive(l, now));
            (peer_labels(&p.unit, &s.node_id), f64::from(u8::from(up)))
        })
        .collect();
    let connected_count = connected.iter().filter(|(_, v)| *v > 0.0).count();
    family(
        &mut out,
        "communesync_peer_connected",
        "gauge",
        "1 while a session with the peer node is open.",
        &connected,
    );
    family(
        &mut out,
        "communesync_connected_peers",
        "gauge",
        "Peer nodes with a session open now.",
        &one(connected_count as f64),
    );
    let per_peer = |f: &dyn Fn(
        &crate::node::admin::PeerStatus,
        &crate::store::sync::PeerSync,
    ) -> Option<f64>|
     -> Vec<(String, f64)> {
        direct
            .iter()
            .filter_map(|(p, s)| Some((peer_labels(&p.unit, &s.node_id), f(p, s)?)))
            .collect()
    };
    family(
        &mut out,
        "communesync_peer_last_seen_timestamp_seconds",
        "gauge",
        "When the peer node was last heard from.",
        &per_peer(&|_, s| {
            lives
                .iter()
                .find(|l| l.node_id == s.node_id)
                .and_then(|l| l.last_seen_at_ms)
                .or(s.last_contact_at_ms)
                .map(|t| (t / 1000) as f64)
        }),
    );
    family(
        &mut out,
        "communesync_peer_pending_documents",
        "gauge",
        "Documents the peer has not acknowledged yet.",
        &per_peer(&|p, _| Some(p.pending_out.docs as f64)),
    );
    family(
        &mut out,
        "communesync_peer_pending_bytes",
        "gauge",
        "Bytes of those documents and of the scans they reference that the peer lacks.",
        &per_peer(&|p, _| Some(p.pending_out.bytes as f64)),
    );
    family(
        &mut out,
        "communesync_peer_lag_seconds",
        "gauge",
        "Age of the oldest change not yet delivered to the peer.",
        &per_peer(&|p, _| p.lag_ms.map(|l| (l / 1000) as f64)),
    );
    family(
        &mut out,
        "communesync_peer_sent_bytes_total",
        "counter",
        "UDP bytes sent to the peer node, all sessions.",
        &per_peer(&|_, s| Some(s.bytes_sent as f64)),
    );
    family(
        &mut out,
        "communesync_peer_received_bytes_total",
        "counter",
        "UDP bytes received from the peer node, all sessions.",
        &per_peer(&|_, s| Some(s.bytes_received as f64)),
    );
    family(
        &mut out,
        "communesync_peer_documents_refused",
        "gauge",
        "Documents refused: in = the peer's refused here, out = ours the peer refuses.",
        &{
            let mut samples = Vec::new();
            for (node_id, by_peer, n) in node.store.refusal_counts()? {
                let unit = direct
                    .iter()
                    .find(|(_, s)| s.node_id == node_id)
                    .map_or("", |(p, _)| p.unit.as_str());
                let direction = if by_peer { "out" } else { "in" };
                samples.push((
                    format!("{},direction=\"{direction}\"", peer_labels(unit, &node_id)),
                    n as f64,
                ));
            }
            samples
        },
    );

    // Sync rounds and refusals since `serve` started.
    let rounds: Vec<(String, f64)> = counters
        .rounds
        .iter()
        .map(|(unit, (n, _))| (format!("unit=\"{}\"", label(unit)), *n as f64))
        .collect();
    family(
        &mut out,
        "communesync_sync_rounds_total",
        "counter",
        "Sync rounds completed (both sides hold everything) per peer unit.",
        &rounds,
    );
    let _ = writeln!(out, "# HELP communesync_sync_round_seconds Time from a change to both sides holding everything again.");
    let _ = writeln!(out, "# TYPE communesync_sync_round_seconds summary");
    for (unit, (n, secs)) in &counters.rounds {
        let _ = writeln!(
            out,
            "communesync_sync_round_seconds_sum{{unit=\"{}\"}} {secs}",
            label(unit)
        );
        let _ = writeln!(
            out,
            "communesync_sync_round_seconds_count{{unit=\"{}\"}} {n}",
            label(unit)
        );
    }
    let refused: Vec<(String, f64)> = counters
        .refused
        .iter()
        .map(|(reason, n)| (format!("reason=\"{reason}\""), *n as f64))
        .collect();
    family(&mut out, "communesync_refused_total", "counter", "Connections and status frames refused, by reason (busy, handshake, handshakes, identity, retry, revoked, status).", &refused);

    // Every unit below this node, as `status` shows it.
    let units = &status.health.units;
    family(
        &mut out,
        "communesync_unit_connected",
        "gauge",
        "1 when the unit's node is connected (here, or at its relay).",
        &units
            .iter()
            .map(|h| {
                (
                    format!("unit=\"{}\"", label(&h.unit)),
                    f64::from(u8::from(h.connected)),
                )
            })
            .collect::<Vec<_>>(),
    );
    family(
        &mut out,
        "communesync_unit_last_seen_timestamp_seconds",
        "gauge",
        "When the unit's node was last heard from.",
        &units
            .iter()
            .filter_map(|h| {
                Some((
                    format!("unit=\"{}\"", label(&h.unit)),
                    (h.last_seen_ms? / 1000) as f64,
                ))
            })
            .collect::<Vec<_>>(),
    );
    family(
        &mut out,
        "communesync_unit_overdue_assignments",
        "gauge",
        "Assignments of the unit past their deadline and not done.",
        &units
            .iter()
            .filter(|h| h.overdue_assignments > 0)
            .map(|h| {
                (
                    format!("unit=\"{}\"", label(&h.unit)),
                    h.overdue_assignments as f64,
                )
            })
            .collect::<Vec<_>>(),
    );
    family(
        &mut out,
        "communesync_units_needing_attention",
        "gauge",
        "Units (and this node) with a problem `communesync status` names.",
        &one(status.health.attention as f64),
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_cannot_break_out_of_their_quotes_or_line() {
        assert_eq!(label("qn/a\"b\\c\nd"), "qn/a\\\"b\\\\c\\nd");
        let mut out = String::new();
        family(
            &mut out,
            "x_total",
            "counter",
            "X.",
            &[(format!("unit=\"{}\"", label("a\nb")), 2.0)],
        );
        assert_eq!(out.lines().last(), Some("x_total{unit=\"a\\nb\"} 2"));
    }
}
