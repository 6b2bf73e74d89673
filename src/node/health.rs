//! Health: this node's own status (what it publishes upstream), the statuses its subtree
//! publishes (kept only for units under the sending peer's certificate), and the view of every
//! unit below this node that `status`, the status page and `/metrics` show.
//!
//! Reads the store and the node's certificate; never touches the network and never prints.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::admin::{PeerStatus, CERT_FILE};
use super::{now_ms, Node, NodeError, Result, KEY_FILE};
use crate::proto::wire::{self, StatusEntry, StatusPeer};
use crate::store::status::PeerLive;
use crate::store::sync::Scope;
use crate::trust::{self, ChangeSigner, NodeKey, PeerIdentity};
use crate::units::{is_within, Role};

/// How often an open session records that it is still open and when it last heard the peer
/// (one small write per session).
pub const LIVE_BEAT: Duration = Duration::from_secs(10);
/// A session whose last beat is older than this is gone: the process that ran it was killed.
const LIVE_FRESH_MS: i64 = 35_000;
/// A status dated further than this past this node's clock is refused: kept as "newest", it
/// would hide every real status of that unit until the clocks caught up.
const STATUS_FUTURE_MS: i64 = 5 * 60_000;
/// A peer silent this long, or a change undelivered this long, needs attention (`--stale`
/// overrides it).
pub const STALE_DEFAULT: Duration = Duration::from_secs(3600);
/// A certificate that expires within this needs attention.
const CERT_WARN_MS: i64 = 30 * 86_400_000;
/// Less free disk than this on a node needs attention.
const DISK_FREE_WARN_BYTES: u64 = 1 << 30;
/// Units listed by one status at most (bounds memory whatever the unit tree holds).
const UNITS_LISTED_MAX: usize = 100_000;

/// Which units a status lists.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only this unit and the units below it.
    pub unit: Option<String>,
    /// Only units not connected and not heard from for this long (or never); also the age past
    /// which silence or an undelivered change is a problem.
    pub stale: Option<Duration>,
    /// Only units with a problem.
    pub problems_only: bool,
}

/// One unit below this node (or above it: its upstream), as this node knows it.
#[derive(Debug, Clone, Serialize)]
pub struct UnitHealth {
    pub unit: String,
    pub name: String,
    pub role: Role,
    /// A session with the unit's node is open now: here for a direct peer, at the relay (as it
    /// last reported, while the relay itself is connected) for a unit further down.
    pub connected: bool,
    /// Last frame received from the unit's node (RFC 3339), null if never.
    pub last_seen: Option<String>,
    #[serde(skip)]
    pub last_seen_ms: Option<i64>,
    /// Age of the oldest change not yet delivered to it.
    pub lag_s: Option<i64>,
    /// What is still to be delivered to it: documents, and their bytes plus the scans they
    /// reference, except scans the unit's node sent (it holds them).
    pub pending_docs: i64,
    pub pending_bytes: i64,
    pub last_error: Option<String>,
    /// Its node's certificate is revoked: it is cut off on purpose, and its lag is no problem.
    pub revoked: bool,
    /// The relay below this node that serves it, when this node does not talk to it directly.
    pub via: Option<String>,
    /// Assignments of the unit past their deadline and not done.
    pub overdue_assignments: i64,
    /// The unit's own status, as it last published it, and its age.
    pub reported: Option<StatusEntry>,
    pub reported_age_s: Option<i64>,
    /// What needs attention, in words; empty when nothing does.
    pub problems: Vec<String>,
}

/// One line per district: how its communes are doing.
#[derive(Debug, Clone, Serialize)]
pub struct DistrictSummary {
    pub unit: String,
    pub units: usize,
    pub connected: usize,
    pub with_problems: usize,
    pub revoked: usize,
    pub pending_docs: i64,
    /// The longest silence among its units not connected (RFC 3339 of the oldest last contact).
    pub oldest_last_seen: Option<String>,
    #[serde(skip)]
    pub oldest_last_seen_ms: Option<i64>,
    pub never_seen: usize,
}

/// The health part of `status`.
#[derive(Debug, Clone, Serialize)]
pub struct Health {
    /// What this node publishes upstream about itself.
    pub own: StatusEntry,
    /// This node's own problems (its certificate, its disk).
    pub own_problems: Vec<String>,
    /// The units above this node it syncs with.
    pub upstream: Vec<UnitHealth>,
    /// Every unit below this node (as filtered).
    pub units: Vec<UnitHealth>,
    pub summary: Vec<DistrictSummary>,
    /// Listed units with a problem, plus this node's and its upstream's problems: what the
    /// exit code reports.
    pub attention: usize,
}

/// Counters of the serving process for `/metrics`: they start at zero with `serve`.
#[derive(Debug, Clone, Default)]
pub struct Counters(Arc<Mutex<CounterValues>>);

#[derive(Debug, Clone, Default)]
pub struct CounterValues {
    /// Per peer unit: sync rounds completed (both sides converged) and their seconds in all.
    pub rounds: BTreeMap<String, (u64, f64)>,
    /// Connections and frames refused, by reason.
    pub refused: BTreeMap<&'static str, u64>,
}

impl Counters {
    pub fn round(&self, unit: &str, took: Duration) {
        let mut c = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let entry = c.rounds.entry(unit.to_string()).or_default();
        entry.0 += 1;
        entry.1 += took.as_secs_f64();
    }

    pub fn refused(&self, reason: &'static str) {
        let mut c = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *c.refused.entry(reason).or_default() += 1;
    }

    pub fn values(&self) -> CounterValues {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Sends this node's status and its subtree's upstream: at a session's start, then at most
/// once per interval, each subtree status once per session unless it changed, each with the
/// certificate of the node that signed it once per session (the receiver may not have met it).
pub struct StatusSender {
    every: Duration,
    next: Option<Instant>,
    /// Per unit, the `as_of` last sent in this session (at most the units of the subtree).
    sent: HashMap<String, u64>,
    /// Nodes whose certificates went in this session (at most the nodes of the subtree).
    certs_sent: HashSet<String>,
}

/// What a [`StatusSender`] sends at once: certificates first, then the statuses they sign.
#[derive(Debug, Default)]
pub struct StatusOut {
    pub certs: Vec<Vec<u8>>,
    pub entries: Vec<StatusEntry>,
}

impl StatusSender {
    pub fn new(every: Duration) -> StatusSender {
        StatusSender {
            every,
            next: None,
            sent: HashMap::new(),
            certs_sent: HashSet::new(),
        }
    }

    /// The statuses to send now, if it is time.
    pub fn due(&mut self, node: &Node, now: Instant) -> Result<Option<StatusOut>> {
        if self.next.is_some_and(|next| now < next) {
            return Ok(None);
        }
        self.next = Some(now + self.every);
        let mut out = StatusOut {
            certs: Vec::new(),
            entries: vec![node.signed_own_status()?],
        };
        let held = node
            .store
            .node_statuses_within(node.unit(), wire::STATUS_ENTRIES_MAX - 1)?;
        for row in held {
            // Written by this node after the checks; a row that no longer parses is skipped,
            // and so is one stored before statuses were signed (no receiver would keep it).
            let Ok(entry) = serde_json::from_str::<StatusEntry>(&row.body) else {
                continue;
            };
            if entry.unit == node.unit()
                || entry.sig == [0; wire::SIG_BYTES]
                || self.sent.get(&entry.unit) == Some(&entry.as_of_ms)
            {
                continue;
            }
            if !self.certs_sent.contains(&entry.node_id) {
                if let Some(der) = node.store.node_cert(&entry.node_id)? {
                    out.certs.push(der);
                }
                self.certs_sent.insert(entry.node_id.clone());
            }
            self.sent.insert(entry.unit.clone(), entry.as_of_ms);
            out.entries.push(entry);
        }
        Ok(Some(out))
    }
}

/// What became of the statuses of one Status frame.
#[derive(Debug, Default)]
pub struct Accepted {
    /// Newer than what was held: stored.
    pub kept: usize,
    /// Refused, each with why.
    pub refused: Vec<String>,
}

/// `text` cut to at most `bytes_max` bytes, on a character boundary.
fn cut(text: &str, bytes_max: usize) -> String {
    let mut end = text.len().min(bytes_max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

/// Unix milliseconds as RFC 3339 (UTC).
pub fn rfc3339(ms: i64) -> Option<String> {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()?
        .format(&time::format_description::well_known::Rfc3339)
        .ok()
}

/// "3d 4h", "5h 2m", "12m", "40s".
pub fn age(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86_400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// Parses a duration like `90s`, `15m`, `2h` or `3d` (a bare number is seconds).
pub fn parse_duration(text: &str) -> std::result::Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 90s, 15m, 2h or 3d"))?;
    let secs = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "{text:?}: the unit must be s, m, h or d (like 15m)"
            ))
        }
    };
    n.checked_mul(secs)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{text:?} is too long"))
}

/// When the certificate in `file` expires (Unix ms), if it can be read.
fn cert_expires_ms(file: &Path) -> Option<u64> {
    let pem = std::fs::read(file).ok()?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).ok()?;
    let cert = pem.parse_x509().ok()?;
    u64::try_from(cert.validity().not_after.timestamp())
        .ok()?
        .checked_mul(1000)
}

/// Bytes an unprivileged user may still write on the file system holding `dir`.
fn disk_free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a NUL-terminated string and `st` a statvfs the call fills in.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return None;
    }
    #[allow(clippy::unnecessary_cast)] // the field types differ between platforms
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Problems a node's own status shows: its certificate and its disk.
fn reported_problems(entry: &StatusEntry, now: i64) -> Vec<String> {
    let mut problems = Vec::new();
    if let Some(expires) = entry.cert_expires_ms {
        let left = expires as i64 - now;
        if left <= 0 {
            problems.push("certificate expired".to_string());
        } else if left < CERT_WARN_MS {
            problems.push(format!("certificate expires in {}", age(left)));
        }
    }
    if let Some(free) = entry.disk_free_bytes.filter(|f| *f < DISK_FREE_WARN_BYTES) {
        problems.push(format!("only {} MiB of disk free", free >> 20));
    }
    problems
}

/// Whether a session's error is the field's routine: a link that dropped or a peer that could
/// not be reached (net::NetError's `Lost` and `Unreachable` words). Silence past `--stale`
/// judges those; any other error (a refusal, a revoked certificate, a full disk) is a problem.
fn is_routine(error: &str) -> bool {
    (error.starts_with("connection to ") && error.contains(" lost: "))
        || error.starts_with("cannot reach ")
}

/// Whether a session with the peer node of `live` is open at `now`.
pub fn is_alive(live: &PeerLive, now: i64) -> bool {
    live.alive_at_ms.is_some_and(|t| now - t < LIVE_FRESH_MS)
}

impl Node {
    /// Records that a session with `peer` is open (and heard from now).
    pub fn session_opened(&mut self, peer: &PeerIdentity) -> Result<()> {
        let (id, serial) = (peer.node_id.to_string(), hex::encode(&peer.serial));
        Ok(self
            .store
            .write(|tx| tx.peer_live_open(&id, &peer.unit, &serial, now_ms()))?)
    }

    /// Records that the session with `peer` is still open, last heard from at `seen_ms`.
    pub fn session_beat(&mut self, peer: &PeerIdentity, seen_ms: i64) -> Result<()> {
        let id = peer.node_id.to_string();
        Ok(self
            .store
            .write(|tx| tx.peer_live_beat(&id, now_ms(), seen_ms))?)
    }

    /// Records that the session with `peer` ended, last heard from at `seen_ms`.
    pub fn session_closed(&mut self, peer: &PeerIdentity, seen_ms: i64) -> Result<()> {
        let id = peer.node_id.to_string();
        Ok(self.store.write(|tx| tx.peer_live_close(&id, seen_ms))?)
    }

    /// At `serve`'s start: sessions recorded open belong to a process that is gone.
    pub fn sessions_reset(&mut self) -> Result<()> {
        Ok(self.store.write(|tx| tx.peer_live_all_closed())?)
    }

    /// This node's own status, as it publishes it upstream.
    pub fn own_status(&self) -> Result<StatusEntry> {
        let now = now_ms();
        let me = self.unit().to_string();
        let lives: HashMap<String, PeerLive> = self
            .store
            .peer_lives()?
            .into_iter()
            .map(|l| (l.node_id.clone(), l))
            .collect();
        let mut syncs = self.store.peer_syncs()?;
        syncs.sort_by_key(|s| std::cmp::Reverse(s.last_contact_at_ms));
        let upstream = syncs
            .iter()
            .find(|s| super::replica::is_upstream(&s.unit, &me));
        let pending = match upstream {
            Some(up) => self.store.pending(&Scope::All, &up.node_id, up.acked_by)?,
            None => self.store.pending(&Scope::All, "", 0)?,
        };
        let mut peers = Vec::new();
        for sync in syncs.iter().take(wire::STATUS_PEERS_MAX) {
            let scope = super::replica::scope_for(&sync.unit, &me);
            let out = self.store.pending(&scope, &sync.node_id, sync.acked_by)?;
            let live = lives.get(&sync.node_id);
            peers.push(StatusPeer {
                unit: sync.unit.clone(),
                connected: live.is_some_and(|l| is_alive(l, now)),
                last_seen_ms: live
                    .and_then(|l| l.last_seen_at_ms)
                    .or(sync.last_contact_at_ms)
                    .map(|t| t.max(0) as u64),
                pending_docs: out.docs.max(0) as u64,
                pending_bytes: out.bytes.max(0) as u64,
                lag_ms: out.oldest_change_at_ms.map(|t| (now - t).max(0) as u64),
                last_error: cut(
                    sync.last_error.as_deref().unwrap_or(""),
                    wire::STATUS_ERROR_BYTES_MAX,
                ),
            });
        }
        let (scans_missing, _) = self.store.missing_blob_bytes()?;
        Ok(StatusEntry {
            unit: me,
            node_id: self.node_id.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            as_of_ms: now.max(0) as u64,
            cert_expires_ms: cert_expires_ms(&self.dir.join(CERT_FILE)),
            disk_free_bytes: disk_free_bytes(&self.dir),
            pending_docs: pending.docs.max(0) as u64,
            pending_bytes: pending.bytes.max(0) as u64,
            lag_ms: pending.oldest_change_at_ms.map(|t| (now - t).max(0) as u64),
            scans_in_flight: self.store.scans_in_flight()?.max(0) as u64,
            scans_missing: scans_missing.max(0) as u64,
            // The most recent session's error: `syncs` is sorted by last contact.
            last_error: cut(
                syncs
                    .iter()
                    .find_map(|s| s.last_error.as_deref())
                    .unwrap_or(""),
                wire::STATUS_ERROR_BYTES_MAX,
            ),
            peers,
            sig: [0; wire::SIG_BYTES],
        })
    }

    /// This node's own status, signed with its node key for the nodes above to check.
    pub fn signed_own_status(&self) -> Result<StatusEntry> {
        let mut entry = self.own_status()?;
        let key = NodeKey::load(self.dir.join(KEY_FILE))?;
        entry.sig = ChangeSigner::new(&key)?.sign_status(&wire::status_body(&entry))?;
        Ok(entry)
    }

    /// Why `entry` is not the word of the node it names, if it is not: its signature must be
    /// by the certificate of `entry.node_id` (held here, checked against the CA when it was
    /// learnt), certified for `entry.unit` and not revoked.
    fn status_unsigned(
        &self,
        entry: &StatusEntry,
        crl: Option<&trust::Crl>,
    ) -> Result<Option<String>> {
        let (unit, node) = (&entry.unit, &entry.node_id);
        let key = match self.store.node_cert(node)? {
            Some(der) => trust::AuthorKey::from_cert_der(&der),
            None => {
                return Ok(Some(format!(
                "status of {unit} names node {node}, whose certificate has not reached this node, so its signature cannot be checked"
            )))
            }
        };
        let key = match key {
            Ok(key) => key,
            Err(e) => {
                return Ok(Some(format!(
                    "status of {unit}: node {node}'s certificate held here: {e}"
                )))
            }
        };
        let why = if key.identity.unit != *unit {
            Some(format!(
                "status of {unit} names node {node}, which is certified for {}",
                key.identity.unit
            ))
        } else if crl.is_some_and(|crl| crl.is_revoked(&key.identity.serial)) {
            Some(format!(
                "status of {unit} is by node {node}, whose certificate is revoked"
            ))
        } else if !key.verifies_status(&wire::status_body(entry), &entry.sig) {
            Some(format!(
                "status of {unit} is not signed by its node {node}: forged, or altered on the way"
            ))
        } else {
            None
        };
        Ok(why)
    }

    /// Keeps the statuses `peer` sent that concern its own subtree (its certificate says which)
    /// and that the node they name signed, the newest per unit; refuses the others, each alone
    /// with why (the one held before stays).
    pub fn accept_statuses(
        &mut self,
        peer: &PeerIdentity,
        entries: Vec<StatusEntry>,
    ) -> Result<Accepted> {
        let me = self.unit().to_string();
        if peer.unit == me || !is_within(&peer.unit, &me) {
            return Ok(Accepted {
                kept: 0,
                refused: vec![format!(
                    "{} statuses from {}, which is not below this node ({me}): only nodes below publish statuses here",
                    entries.len(),
                    peer.unit
                )],
            });
        }
        let subtree = self
            .tree
            .iter()
            .filter(|u| is_within(&u.path, &peer.unit))
            .count();
        if entries.len() > subtree {
            return Ok(Accepted {
                kept: 0,
                refused: vec![format!(
                    "{} statuses in one frame, more than the {subtree} units of {}'s subtree",
                    entries.len(),
                    peer.unit
                )],
            });
        }
        let now = now_ms();
        let peer_id = peer.node_id.to_string();
        let crl = self.crl();
        let mut accepted = Accepted::default();
        let mut keep = Vec::new();
        for entry in entries {
            let why = if !is_within(&entry.unit, &peer.unit) {
                Some(format!(
                    "status of {}, outside the sender's subtree {}",
                    entry.unit, peer.unit
                ))
            } else if self.tree.get(&entry.unit).is_err() {
                Some(format!(
                    "status of {}, a unit not in this node's unit tree",
                    entry.unit
                ))
            } else if entry.unit == peer.unit && entry.node_id != peer_id {
                Some(format!(
                    "status of {} claims node {}, but the sender's certificate is node {peer_id}",
                    entry.unit, entry.node_id
                ))
            } else if i64::try_from(entry.as_of_ms).map_or(true, |t| t > now + STATUS_FUTURE_MS) {
                Some(format!(
                    "status of {} dated {} ahead of this node's clock",
                    entry.unit,
                    age(i64::try_from(entry.as_of_ms).unwrap_or(i64::MAX) - now)
                ))
            } else {
                self.status_unsigned(&entry, crl.as_ref())?
            };
            match why {
                Some(why) => accepted.refused.push(why),
                None => keep.push(entry),
            }
        }
        accepted.kept = self.store.write(|tx| {
            let mut kept = 0;
            for entry in &keep {
                let body = serde_json::to_string(entry).expect("a status serializes");
                if tx.node_status_put(
                    &entry.unit,
                    &entry.node_id,
                    entry.as_of_ms as i64,
                    &peer_id,
                    now,
                    &body,
                )? {
                    kept += 1;
                }
            }
            Ok(kept)
        })?;
        Ok(accepted)
    }

    /// Every unit below this node (and its upstream), as `peers` (from `status`) and the
    /// statuses held show them.
    pub fn health(&self, peers: &[PeerStatus], filter: &Filter) -> Result<Health> {
        let now = now_ms();
        let me = self.unit().to_string();
        if let Some(unit) = &filter.unit {
            self.tree.get(unit)?;
            if !is_within(unit, &me) {
                return Err(NodeError::Invalid(format!(
                    "--unit {unit} is not at or below this node's unit {me}"
                )));
            }
        }
        let stale_ms = filter.stale.unwrap_or(STALE_DEFAULT).as_millis() as i64;
        let lives = self.store.peer_lives()?;
        let alive_units: HashSet<&str> = lives
            .iter()
            .filter(|l| is_alive(l, now))
            .map(|l| l.unit.as_str())
            .collect();
        let crl = self.crl();
        let revoked_serial = |serial: &str| {
            crl.as_ref()
                .is_some_and(|c| c.is_revoked(&hex::decode(serial).unwrap_or_default()))
        };
        // On the province, the CA's registry knows every node, met or not.
        let mut ca_units: HashMap<String, (bool, bool)> = HashMap::new();
        if self.role() == Role::Province {
            for record in self.ca_list().unwrap_or_default() {
                let e = ca_units.entry(record.unit.clone()).or_default();
                match record.revoked_at {
                    Some(_) => e.1 = true,
                    None => e.0 = true,
                }
            }
        }
        let statuses: HashMap<String, (StatusEntry, i64)> = self
            .store
            .node_statuses_within(&me, UNITS_LISTED_MAX)?
            .into_iter()
            .filter_map(|row| {
                let entry = serde_json::from_str::<StatusEntry>(&row.body).ok()?;
                Some((row.unit, (entry, row.received_at_ms)))
            })
            .collect();
        let overdue: HashMap<String, i64> = self
            .store
            .overdue_by_unit(&self.today().to_string())?
            .into_iter()
            .collect();

        let judge = |unit: &crate::units::Unit| -> UnitHealth {
            let rows: Vec<&PeerStatus> = peers.iter().filter(|p| p.unit == unit.path).collect();
            let direct: Vec<&PeerStatus> =
                rows.iter().copied().filter(|p| p.sync.is_some()).collect();
            let mut h = UnitHealth {
                unit: unit.path.clone(),
                name: unit.name.clone(),
                role: unit.role,
                connected: false,
                last_seen: None,
                last_seen_ms: None,
                lag_s: None,
                pending_docs: 0,
                pending_bytes: 0,
                last_error: None,
                revoked: false,
                via: None,
                overdue_assignments: overdue.get(&unit.path).copied().unwrap_or(0),
                reported: None,
                reported_age_s: None,
                problems: Vec::new(),
            };
            let mut refused = 0;
            let mut lag_ms: Option<i64> = None;
            if !direct.is_empty() {
                let ids: HashSet<&str> = direct
                    .iter()
                    .filter_map(|p| p.sync.as_ref().map(|s| s.node_id.as_str()))
                    .collect();
                let mine: Vec<&PeerLive> = lives
                    .iter()
                    .filter(|l| ids.contains(l.node_id.as_str()))
                    .collect();
                h.connected = mine.iter().any(|l| is_alive(l, now));
                h.last_seen_ms = mine
                    .iter()
                    .filter_map(|l| l.last_seen_at_ms)
                    .chain(
                        direct
                            .iter()
                            .filter_map(|p| p.sync.as_ref()?.last_contact_at_ms),
                    )
                    .max();
                h.revoked = !mine.is_empty() && mine.iter().all(|l| revoked_serial(&l.serial));
                for p in &direct {
                    h.pending_docs = h.pending_docs.max(p.pending_out.docs);
                    h.pending_bytes = h.pending_bytes.max(p.pending_out.bytes);
                    lag_ms = lag_ms.max(p.lag_ms);
                    refused += p.refused_total + p.refused_by_peer_total;
                    if h.last_error.is_none() {
                        h.last_error = p.sync.as_ref().and_then(|s| s.last_error.clone());
                    }
                }
            } else if let Some(p) = rows.first() {
                h.via = p.via.clone();
                h.pending_docs = p.pending_out.docs;
                h.pending_bytes = p.pending_out.bytes;
                lag_ms = p.lag_ms;
                let seen_by_relay = p
                    .via
                    .as_ref()
                    .and_then(|via| statuses.get(via))
                    .and_then(|(relay, _)| relay.peers.iter().find(|x| x.unit == unit.path));
                if let Some(seen) = seen_by_relay {
                    let relay_up = p.via.as_deref().is_some_and(|v| alive_units.contains(v));
                    h.connected = relay_up && seen.connected;
                    h.last_seen_ms = seen.last_seen_ms.map(|t| t as i64);
                    h.pending_docs += seen.pending_docs as i64;
                    h.pending_bytes += seen.pending_bytes as i64;
                    lag_ms = lag_ms.max(seen.lag_ms.map(|t| t as i64));
                    if !seen.last_error.is_empty() {
                        h.last_error = Some(seen.last_error.clone());
                    }
                }
            }
            // Every certificate the CA issued for the unit is revoked.
            if ca_units.get(&unit.path) == Some(&(false, true)) {
                h.revoked = true;
            }
            h.last_seen = h.last_seen_ms.and_then(rfc3339);
            h.lag_s = lag_ms.map(|t| t / 1000);
            if let Some((entry, _)) = statuses.get(&unit.path) {
                if h.last_error.is_none() && !entry.last_error.is_empty() {
                    h.last_error = Some(entry.last_error.clone());
                }
                h.reported_age_s = Some((now - entry.as_of_ms as i64).max(0) / 1000);
                h.reported = Some(entry.clone());
            }
            if !h.revoked {
                if !h.connected {
                    // A unit never seen may have no node yet (or sync by bundles only): the
                    // summary counts those; silence after contact is what needs attention.
                    if let Some(t) = h.last_seen_ms.filter(|t| now - t > stale_ms) {
                        h.problems
                            .push(format!("not heard from for {}", age(now - t)));
                    }
                    if let Some(e) = h.last_error.as_deref().filter(|e| !is_routine(e)) {
                        h.problems.push(format!("last error: {e}"));
                    }
                }
                if refused > 0 {
                    h.problems.push(format!("{refused} documents refused"));
                }
                if let Some(lag) = lag_ms.filter(|l| *l > stale_ms) {
                    h.problems
                        .push(format!("oldest undelivered change {} old", age(lag)));
                }
                if let Some(entry) = &h.reported {
                    h.problems.extend(reported_problems(entry, now));
                }
            }
            h
        };

        let within_filter = |path: &str| filter.unit.as_deref().is_none_or(|u| is_within(path, u));
        let all: Vec<UnitHealth> = self
            .tree
            .iter()
            .filter(|u| u.path != me && is_within(&u.path, &me) && within_filter(&u.path))
            .take(UNITS_LISTED_MAX)
            .map(judge)
            .collect();
        let upstream: Vec<UnitHealth> = self
            .tree
            .iter()
            .filter(|u| {
                filter.unit.is_none()
                    && peers.iter().any(|p| p.unit == u.path && p.sync.is_some())
                    && super::replica::is_upstream(&u.path, &me)
            })
            .map(judge)
            .collect();
        let mut summary = Vec::new();
        for district in self.tree.iter().filter(|u| {
            u.role == Role::District && is_within(&u.path, &me) && within_filter(&u.path)
        }) {
            let below: Vec<&UnitHealth> = all
                .iter()
                .filter(|h| h.unit != district.path && is_within(&h.unit, &district.path))
                .collect();
            let oldest = below
                .iter()
                .filter(|h| !h.connected && !h.revoked)
                .filter_map(|h| h.last_seen_ms)
                .min();
            summary.push(DistrictSummary {
                unit: district.path.clone(),
                units: below.len(),
                connected: below.iter().filter(|h| h.connected).count(),
                with_problems: below.iter().filter(|h| !h.problems.is_empty()).count(),
                revoked: below.iter().filter(|h| h.revoked).count(),
                pending_docs: below.iter().map(|h| h.pending_docs).sum(),
                oldest_last_seen: oldest.and_then(rfc3339),
                oldest_last_seen_ms: oldest,
                never_seen: below
                    .iter()
                    .filter(|h| !h.revoked && h.last_seen_ms.is_none() && !h.connected)
                    .count(),
            });
        }
        let units: Vec<UnitHealth> = all
            .into_iter()
            .filter(|h| {
                filter.stale.is_none_or(|d| {
                    !h.connected
                        && h.last_seen_ms
                            .is_none_or(|t| now - t > d.as_millis() as i64)
                })
            })
            .filter(|h| !filter.problems_only || !h.problems.is_empty())
            .collect();
        let own = self.own_status()?;
        let own_problems = reported_problems(&own, now);
        let attention = units.iter().filter(|h| !h.problems.is_empty()).count()
            + upstream.iter().filter(|h| !h.problems.is_empty()).count()
            + usize::from(filter.unit.is_none() && !own_problems.is_empty());
        Ok(Health {
            own,
            own_problems,
            upstream,
            units,
            summary,
            attention,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(unit: &str, node_id: &str, as_of_ms: i64) -> StatusEntry {
        StatusEntry {
            unit: unit.into(),
            node_id: node_id.into(),
            version: "0.1.0".into(),
            as_of_ms: as_of_ms as u64,
            cert_expires_ms: None,
            disk_free_bytes: Some(5 << 30),
            pending_docs: 0,
            pending_bytes: 0,
            lag_ms: None,
            scans_in_flight: 0,
            scans_missing: 0,
            last_error: String::new(),
            peers: Vec::new(),
            sig: [0; wire::SIG_BYTES],
        }
    }

    /// A node key certified by `province`'s CA for `unit`, whose certificate `province` holds.
    struct Member {
        id: String,
        signer: ChangeSigner,
    }

    impl Member {
        fn enrol(province: &mut Node, dir: &Path, unit: &str, role: Role) -> Member {
            let key = NodeKey::generate().unwrap();
            let name = unit.replace('/', "_");
            let (req, cert) = (
                dir.join(format!("{name}.req")),
                dir.join(format!("{name}.crt")),
            );
            std::fs::write(&req, trust::enrol_request(&key).unwrap()).unwrap();
            province.ca_issue(&req, unit, role, &cert).unwrap();
            let pem = std::fs::read_to_string(&cert).unwrap();
            province
                .learn_cert(&trust::cert_der_from_pem("test", &pem).unwrap())
                .unwrap();
            Member {
                id: key.node_id().to_string(),
                signer: ChangeSigner::new(&key).unwrap(),
            }
        }

        /// Its status of `unit` as of `as_of_ms`, signed.
        fn status(&self, unit: &str, as_of_ms: i64) -> StatusEntry {
            self.sign(entry(unit, &self.id, as_of_ms))
        }

        fn sign(&self, mut entry: StatusEntry) -> StatusEntry {
            entry.sig = self.signer.sign_status(&wire::status_body(&entry)).unwrap();
            entry
        }
    }

    /// A province with its CA, a district and two communes of it enrolled.
    fn province_with_members(dir: &Path) -> (Node, [Member; 3]) {
        let data = dir.join("prov");
        Node::init(&data, "qn", Role::Province, "admin").unwrap();
        let mut node = Node::open(&data).unwrap();
        node.ca_init().unwrap();
        let members = [
            ("qn/binhlieu", Role::District),
            ("qn/binhlieu/tinhhuc", Role::Commune),
            ("qn/binhlieu/hucdong", Role::Commune),
        ]
        .map(|(unit, role)| Member::enrol(&mut node, dir, unit, role));
        (node, members)
    }

    fn identity(member: &Member, unit: &str) -> PeerIdentity {
        PeerIdentity {
            node_id: member.id.parse().unwrap(),
            unit: unit.into(),
            role: Role::District,
            serial: vec![1],
        }
    }

    #[test]
    fn a_peer_publishes_statuses_only_for_its_own_subtree_and_only_newer_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let (mut node, [district, tinhhuc, hucdong]) = province_with_members(dir.path());
        let peer = identity(&district, "qn/binhlieu");
        let now = now_ms();
        let accepted = node
            .accept_statuses(
                &peer,
                vec![
                    district.status("qn/binhlieu", now),
                    tinhhuc.status("qn/binhlieu/tinhhuc", now),
                    tinhhuc.status("qn/halong", now),
                    hucdong.status("qn/binhlieu/hucdong", now + 3_600_000),
                ],
            )
            .unwrap();
        assert_eq!(accepted.kept, 2, "{:?}", accepted.refused);
        assert_eq!(accepted.refused.len(), 2, "{:?}", accepted.refused);
        assert!(accepted.refused[0].contains("outside the sender's subtree"));
        assert!(accepted.refused[1].contains("ahead of this node's clock"));

        // Its own unit is its own node's to report, whatever the frame claims.
        let claimed = node
            .accept_statuses(&peer, vec![tinhhuc.status("qn/binhlieu", now + 1)])
            .unwrap();
        assert_eq!(claimed.kept, 0);
        assert!(
            claimed.refused[0].contains("certificate"),
            "{:?}",
            claimed.refused
        );
        // An older status of a unit does not replace the newer one held.
        let older = node
            .accept_statuses(&peer, vec![tinhhuc.status("qn/binhlieu/tinhhuc", now - 1)])
            .unwrap();
        assert_eq!((older.kept, older.refused.len()), (0, 0));
        // More statuses than the sender's subtree has units: the frame is refused whole.
        let flood = vec![tinhhuc.status("qn/binhlieu/tinhhuc", now + 2); 1_000];
        let flooded = node.accept_statuses(&peer, flood).unwrap();
        assert_eq!(flooded.kept, 0);
        assert!(
            flooded.refused[0].contains("more than the"),
            "{:?}",
            flooded.refused
        );
        // A node above, or of this node's own unit, publishes nothing here.
        let standby = PeerIdentity {
            unit: "qn".into(),
            role: Role::Province,
            ..peer.clone()
        };
        let refused = node
            .accept_statuses(
                &standby,
                vec![tinhhuc.status("qn/binhlieu/tinhhuc", now + 3)],
            )
            .unwrap();
        assert_eq!(refused.kept, 0);
        let held = node.store.node_statuses_within("qn", 100).unwrap();
        let units: Vec<&str> = held.iter().map(|s| s.unit.as_str()).collect();
        assert_eq!(units, ["qn/binhlieu", "qn/binhlieu/tinhhuc"]);
        assert!(held.iter().all(|s| s.via == district.id));
    }

    /// What a hostile district could do with its communes' statuses on their way up: each is
    /// refused alone, the rest of the frame is kept, and the status held before stays.
    #[test]
    fn a_relay_cannot_forge_or_alter_a_status_of_a_node_below_it() {
        let dir = tempfile::tempdir().unwrap();
        let (mut node, [district, tinhhuc, hucdong]) = province_with_members(dir.path());
        let peer = identity(&district, "qn/binhlieu");
        let now = now_ms();
        let mut down = entry("qn/binhlieu/tinhhuc", &tinhhuc.id, now);
        down.last_error = "disk full".into();
        let down = tinhhuc.sign(down);
        let first = node.accept_statuses(&peer, vec![down.clone()]).unwrap();
        assert_eq!((first.kept, first.refused.len()), (1, 0));

        // "No error" in a newer status: its signature no longer matches.
        let mut altered = down.clone();
        altered.as_of_ms += 1_000;
        altered.last_error.clear();
        // Signed by the district itself, naming the commune's node or its own.
        let by_relay = district.sign(entry("qn/binhlieu/tinhhuc", &tinhhuc.id, now + 2_000));
        let relay_named = district.status("qn/binhlieu/tinhhuc", now + 3_000);
        // Unsigned, and by a node this province never met.
        let unsigned = entry("qn/binhlieu/tinhhuc", &tinhhuc.id, now + 4_000);
        let stranger = NodeKey::generate().unwrap().node_id().to_string();
        let unknown = tinhhuc.sign(entry("qn/binhlieu/tinhhuc", &stranger, now + 5_000));
        let honest = hucdong.status("qn/binhlieu/hucdong", now);
        let accepted = node
            .accept_statuses(
                &peer,
                vec![altered, by_relay, relay_named, unsigned, unknown, honest],
            )
            .unwrap();
        assert_eq!(accepted.kept, 1, "{:?}", accepted.refused);
        let r = &accepted.refused;
        assert_eq!(r.len(), 5, "{r:?}");
        assert!(
            r[0].contains("not signed by its node") && r[0].contains("altered"),
            "{r:?}"
        );
        assert!(r[1].contains("not signed by its node"), "{r:?}");
        assert!(r[2].contains("certified for qn/binhlieu"), "{r:?}");
        assert!(r[3].contains("not signed by its node"), "{r:?}");
        assert!(r[4].contains("has not reached this node"), "{r:?}");
        let held = node
            .store
            .node_statuses_within("qn/binhlieu/tinhhuc", 10)
            .unwrap();
        let kept: StatusEntry = serde_json::from_str(&held[0].body).unwrap();
        assert_eq!(kept, down, "the status held before stays");

        // A revoked node's word counts no more.
        node.ca_revoke(&hucdong.id).unwrap();
        let late = node
            .accept_statuses(&peer, vec![hucdong.status("qn/binhlieu/hucdong", now + 1)])
            .unwrap();
        assert!(late.refused[0].contains("revoked"), "{:?}", late.refused);
    }

    #[test]
    fn durations_and_routine_errors_are_read_as_an_administrator_means_them() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("3d"), Ok(Duration::from_secs(3 * 86_400)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        assert!(parse_duration("soon").is_err() && parse_duration("5w").is_err());
        assert!(is_routine("connection to qn/binhlieu lost: timed out"));
        assert!(!is_routine("peer refused the session: revoked"));
    }
}
