//! The node's TOML config: a typed struct with documented defaults, validated once at load.
//!
//! Precedence: command-line flags override the file; the file overrides the defaults here.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::units::{Role, UnitTree};

pub const CONFIG_FILE: &str = "config.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub node: NodeSection,
    #[serde(default)]
    pub store: StoreSection,
    #[serde(default)]
    pub sync: SyncSection,
    #[serde(default)]
    pub http: HttpSection,
    #[serde(default)]
    pub scans: ScansSection,
}

/// Where the scans' bytes are kept (their metadata is always in the database).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScansSection {
    /// "local": files in `blobs/` beside the database; "s3": the bucket of `[scans.s3]`.
    #[serde(default)]
    pub store: ScanBackend,
    #[serde(default)]
    pub s3: Option<S3Section>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScanBackend {
    #[default]
    Local,
    S3,
}

/// An S3-compatible bucket for scans. The credentials are never in config.toml: they come
/// from `credentials_file` (mode 0600) or the environment.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Section {
    /// "http://HOST:PORT" or "https://HOST".
    pub endpoint: String,
    pub bucket: String,
    #[serde(default = "default_s3_region")]
    pub region: String,
    /// Key prefix of this node's chunks, e.g. "qn"; "" for the bucket's root.
    #[serde(default)]
    pub prefix: String,
    /// A TOML file with `access_key_id` and `secret_access_key`, readable by the owner only;
    /// unset: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY. Relative to the data directory.
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
}

fn default_s3_region() -> String {
    "us-east-1".into()
}

/// The credentials file of `[scans.s3]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct S3Credentials {
    access_key_id: String,
    secret_access_key: String,
}

impl S3Section {
    /// Checks the values that need no file or network.
    fn check(&self) -> Result<(), String> {
        let host = self
            .endpoint
            .strip_prefix("http://")
            .or_else(|| self.endpoint.strip_prefix("https://"));
        if host.is_none_or(|h| h.is_empty() || h.contains(char::is_whitespace)) {
            return Err(format!(
                "scans.s3.endpoint = {:?} is not \"http://HOST:PORT\" or \"https://HOST\"",
                self.endpoint
            ));
        }
        if self.bucket.is_empty() || self.bucket.contains(['/', ' ']) {
            return Err(format!(
                "scans.s3.bucket = {:?} is not a bucket name",
                self.bucket
            ));
        }
        if self.prefix.starts_with('/') || self.prefix.ends_with('/') || self.prefix.contains("//")
        {
            return Err(format!(
                "scans.s3.prefix = {:?}: give it without a leading or trailing \"/\", e.g. \"qn\"",
                self.prefix
            ));
        }
        Ok(())
    }

    /// The bucket's settings with its credentials, read from the file or the environment.
    pub fn settings(&self, dir: &Path) -> Result<crate::store::scanstore::S3Settings, String> {
        let (access_key_id, secret_access_key) = match &self.credentials_file {
            Some(file) => {
                use std::os::unix::fs::MetadataExt;
                let file = dir.join(file);
                let name = file.display();
                let meta = std::fs::metadata(&file)
                    .map_err(|e| format!("scans.s3.credentials_file {name}: {e}"))?;
                if meta.mode() & 0o077 != 0 {
                    return Err(format!(
                        "scans.s3.credentials_file {name} is readable by others (mode {:o}): run `chmod 600 {name}`",
                        meta.mode() & 0o777
                    ));
                }
                let text = std::fs::read_to_string(&file)
                    .map_err(|e| format!("scans.s3.credentials_file {name}: {e}"))?;
                let creds: S3Credentials = toml::from_str(&text).map_err(|e| {
                    format!(
                        "scans.s3.credentials_file {name}: {}; it holds access_key_id = \"...\" and secret_access_key = \"...\"",
                        e.message()
                    )
                })?;
                (creds.access_key_id, creds.secret_access_key)
            }
            None => match (
                std::env::var("AWS_ACCESS_KEY_ID"),
                std::env::var("AWS_SECRET_ACCESS_KEY"),
            ) {
                (Ok(id), Ok(secret)) => (id, secret),
                _ => {
                    return Err(
                        "scans.store = \"s3\" needs credentials: set scans.s3.credentials_file, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
                            .into(),
                    )
                }
            },
        };
        Ok(crate::store::scanstore::S3Settings {
            endpoint: self.endpoint.clone(),
            bucket: self.bucket.clone(),
            region: self.region.clone(),
            prefix: self.prefix.clone(),
            access_key_id,
            secret_access_key,
        })
    }
}

/// Where `serve` shows its read-only status page and `/metrics`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSection {
    /// HOST:PORT, or "" for none. Unset: 127.0.0.1:8377 on districts and the province, none on
    /// communes.
    #[serde(default)]
    pub listen: Option<String>,
}

/// Where districts and the province serve the status page unless `http.listen` says otherwise.
pub const HTTP_LISTEN_DEFAULT: &str = "127.0.0.1:8377";

/// How this node talks to its peers. Defaults suit slow, lossy, high-latency links
/// (docs/architecture.md explains each choice).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncSection {
    /// Address `serve` listens on.
    pub listen: String,
    /// Local address this node dials peers from (an office PC with two links picks one);
    /// unset: any, as the system routes.
    pub source: Option<String>,
    /// Name of the peer (see `peer add`) that `serve` keeps syncing with; unset on the province.
    pub upstream: Option<String>,
    /// A connection silent this long is dropped (then resumed by reconnecting).
    pub idle_timeout_s: u64,
    /// Keep-alive period, well under the idle timeout, so NATs and the peer keep the path open.
    pub keep_alive_s: u64,
    /// A one-shot `sync` gives up on a peer it has heard nothing from for this long, or for 8
    /// round trips of the path if that is longer (exit 5; the next sync resumes). 10 s was too
    /// short on 2G: a scan's first burst overfilling the link's queue left a live peer silent
    /// for over 10 s while QUIC recovered.
    pub peer_silence_s: u64,
    /// RTT assumed before the first measurement: high, since 2G and VSAT links run at 0.6–1.5 s.
    pub initial_rtt_ms: u64,
    /// Congestion controller: "bbr" (holds its rate under random loss) or "cubic".
    pub congestion: String,
    /// Longest wait between reconnection attempts to the upstream.
    pub reconnect_max_s: u64,
    /// Most peer connections `serve` accepts at once.
    pub connections_max: usize,
    /// Seconds between checks for new local changes to push while connected.
    pub push_interval_ms: u64,
    /// Seconds between the statuses a node sends upstream while connected (one at each
    /// session's start).
    pub status_interval_s: u64,
    /// Limits on scans sent to peers, by unit (the most specific entry covering a peer applies).
    #[serde(rename = "limit")]
    pub limits: Vec<PeerLimit>,
}

/// Caps on the scans this node sends to the peers at or below `unit`. Documents are never held
/// back: they are small and what people wait for.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PeerLimit {
    pub unit: String,
    /// Scan bytes per second to such a peer, in kbit/s (unset: as fast as the link allows).
    #[serde(default)]
    pub rate_kbps: Option<u64>,
    /// Local time window in which scans may be sent, "HH:MM-HH:MM" (may wrap midnight).
    #[serde(default)]
    pub scans_window: Option<String>,
}

impl PeerLimit {
    /// Parses the window into minutes after midnight (start, end).
    pub fn window_minutes(&self) -> Result<Option<(u32, u32)>, String> {
        let Some(w) = &self.scans_window else {
            return Ok(None);
        };
        let bad = || {
            format!(
                "sync.limit for {}: scans_window = {w:?} is not \"HH:MM-HH:MM\"",
                self.unit
            )
        };
        let (a, b) = w.split_once('-').ok_or_else(bad)?;
        let minutes = |t: &str| -> Option<u32> {
            let (h, m) = t.trim().split_once(':')?;
            let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
            (h < 24 && m < 60).then_some(h * 60 + m)
        };
        Ok(Some((
            minutes(a).ok_or_else(bad)?,
            minutes(b).ok_or_else(bad)?,
        )))
    }

    /// Whether `minute` (after local midnight) falls in the window.
    pub fn window_open(&self, minute: u32) -> bool {
        match self.window_minutes() {
            Ok(Some((start, end))) if start <= end => (start..end).contains(&minute),
            Ok(Some((start, end))) => minute >= start || minute < end,
            _ => true,
        }
    }
}

impl SyncSection {
    /// The limit that applies to a peer of `unit`: the deepest entry whose unit covers it.
    pub fn limit_for(&self, unit: &str) -> Option<&PeerLimit> {
        self.limits
            .iter()
            .filter(|l| crate::units::is_within(unit, &l.unit))
            .max_by_key(|l| l.unit.len())
    }
}

impl Default for SyncSection {
    fn default() -> Self {
        SyncSection {
            listen: "0.0.0.0:7410".into(),
            source: None,
            upstream: None,
            idle_timeout_s: 120,
            keep_alive_s: 10,
            peer_silence_s: 30,
            initial_rtt_ms: 750,
            congestion: "bbr".into(),
            reconnect_max_s: 300,
            connections_max: 256,
            push_interval_ms: 250,
            status_interval_s: 60,
            limits: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// This node's unit path, e.g. "qn/binhlieu/tinhhuc".
    pub unit: String,
    pub role: Role,
    /// Who acts when `--as` is not given.
    #[serde(default)]
    pub default_user: Option<String>,
    /// The unit tree to use until the province's arrives by sync; unset means the embedded
    /// Quảng Ninh sample. A relative path is relative to the data directory.
    #[serde(default)]
    pub units_file: Option<PathBuf>,
    /// Hours east of UTC for calendar dates (deadlines, "overdue"); Vietnam is UTC+7.
    #[serde(default = "default_utc_offset_hours")]
    pub utc_offset_hours: i8,
}

impl NodeSection {
    /// The node's UTC offset for calendar dates and scan windows.
    pub fn utc_offset(&self) -> time::UtcOffset {
        time::UtcOffset::from_hms(self.utc_offset_hours, 0, 0).unwrap_or(time::UtcOffset::UTC)
    }
}

/// `node.utc_offset_hours` when the config does not set it (Vietnam).
pub fn default_utc_offset_hours() -> i8 {
    7
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// Documents kept parsed in memory (least recently used are dropped first).
    #[serde(default = "default_doc_cache_entries")]
    pub doc_cache_entries: usize,
}

fn default_doc_cache_entries() -> usize {
    256
}

impl Default for StoreSection {
    fn default() -> Self {
        StoreSection {
            doc_cache_entries: default_doc_cache_entries(),
        }
    }
}

/// Largest document cache accepted: bounds memory on a province.
const DOC_CACHE_ENTRIES_MAX: usize = 100_000;

impl Config {
    pub fn new(unit: &str, role: Role, default_user: &str) -> Self {
        Config {
            node: NodeSection {
                unit: unit.to_string(),
                role,
                default_user: Some(default_user.to_string()),
                units_file: None,
                utc_offset_hours: default_utc_offset_hours(),
            },
            store: StoreSection::default(),
            sync: SyncSection::default(),
            http: HttpSection::default(),
            scans: ScansSection::default(),
        }
    }

    /// The address of the status page: `http.listen`, else the role's default.
    pub fn http_listen(&self) -> Option<std::net::SocketAddr> {
        match self.http.listen.as_deref() {
            Some("") => None,
            Some(addr) => addr.parse().ok(),
            None if self.node.role == Role::Commune => None,
            None => HTTP_LISTEN_DEFAULT.parse().ok(),
        }
    }

    /// Reads and validates `DIR/config.toml`, returning it with the unit tree it names.
    pub fn load(dir: &Path) -> Result<(Config, UnitTree), ConfigError> {
        let path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Io {
            path: path.clone(),
            source,
        })?;
        let invalid = |message: String| ConfigError::Invalid {
            path: path.clone(),
            message,
        };
        let config = Config::parse(&text).map_err(invalid)?;
        let tree = config
            .validate(dir)
            .map_err(|message| invalid(with_line(&text, message)))?;
        Ok((config, tree))
    }

    /// Reads the TOML of a config file, without checking values against a unit tree; the
    /// error names the key and the line.
    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| describe(text, &e))
    }

    /// Checks every value; returns the unit tree it names.
    pub fn validate(&self, dir: &Path) -> Result<UnitTree, String> {
        let tree = self.load_tree(dir)?;
        self.check(&tree)?;
        Ok(tree)
    }

    /// The unit tree the config names: the file, or the embedded sample.
    pub fn load_tree(&self, dir: &Path) -> Result<UnitTree, String> {
        Ok(match &self.node.units_file {
            None => UnitTree::sample(),
            Some(file) => {
                let file = dir.join(file);
                let text = std::fs::read_to_string(&file)
                    .map_err(|e| format!("node.units_file {}: {e}", file.display()))?;
                UnitTree::parse(&text)
                    .map_err(|e| format!("node.units_file {}: {e}", file.display()))?
            }
        })
    }

    /// Checks every value against the unit tree.
    pub fn check(&self, tree: &UnitTree) -> Result<(), String> {
        let unit = tree
            .get(&self.node.unit)
            .map_err(|e| format!("node.unit: {e}"))?;
        if unit.role != self.node.role {
            return Err(format!(
                "node.role is {} but {} is a {} in the unit tree",
                self.node.role, unit.path, unit.role
            ));
        }
        if !(-12..=14).contains(&self.node.utc_offset_hours) {
            return Err(format!(
                "node.utc_offset_hours = {} is not a UTC offset (-12 to 14)",
                self.node.utc_offset_hours
            ));
        }
        if !(1..=DOC_CACHE_ENTRIES_MAX).contains(&self.store.doc_cache_entries) {
            return Err(format!(
                "store.doc_cache_entries = {} must be between 1 and {DOC_CACHE_ENTRIES_MAX}",
                self.store.doc_cache_entries
            ));
        }
        let sync = &self.sync;
        sync.listen.parse::<std::net::SocketAddr>().map_err(|_| {
            format!(
                "sync.listen = {:?} is not an address like 0.0.0.0:7410",
                sync.listen
            )
        })?;
        if let Some(source) = &sync.source {
            source.parse::<std::net::IpAddr>().map_err(|_| {
                format!("sync.source = {source:?} is not an IP address like 192.168.1.20")
            })?;
        }
        if !(5..=86_400).contains(&sync.idle_timeout_s) {
            return Err(format!(
                "sync.idle_timeout_s = {} must be between 5 and 86400",
                sync.idle_timeout_s
            ));
        }
        if sync.keep_alive_s == 0 || sync.keep_alive_s >= sync.idle_timeout_s {
            return Err(format!(
                "sync.keep_alive_s = {} must be at least 1 and below sync.idle_timeout_s",
                sync.keep_alive_s
            ));
        }
        if !(3..=86_400).contains(&sync.peer_silence_s) {
            return Err(format!(
                "sync.peer_silence_s = {} must be between 3 and 86400",
                sync.peer_silence_s
            ));
        }
        if !(10..=10_000).contains(&sync.initial_rtt_ms) {
            return Err(format!(
                "sync.initial_rtt_ms = {} must be between 10 and 10000",
                sync.initial_rtt_ms
            ));
        }
        if !matches!(sync.congestion.as_str(), "bbr" | "cubic") {
            return Err(format!(
                "sync.congestion = {:?}: use \"bbr\" or \"cubic\"",
                sync.congestion
            ));
        }
        if !(1..=86_400).contains(&sync.reconnect_max_s) {
            return Err(format!(
                "sync.reconnect_max_s = {} must be between 1 and 86400",
                sync.reconnect_max_s
            ));
        }
        if !(1..=10_000).contains(&sync.connections_max) {
            return Err(format!(
                "sync.connections_max = {} must be between 1 and 10000",
                sync.connections_max
            ));
        }
        if !(50..=60_000).contains(&sync.push_interval_ms) {
            return Err(format!(
                "sync.push_interval_ms = {} must be between 50 and 60000",
                sync.push_interval_ms
            ));
        }
        if !(1..=86_400).contains(&sync.status_interval_s) {
            return Err(format!(
                "sync.status_interval_s = {} must be between 1 and 86400",
                sync.status_interval_s
            ));
        }
        if let Some(addr) = self.http.listen.as_deref().filter(|a| !a.is_empty()) {
            addr.parse::<std::net::SocketAddr>().map_err(|_| {
                format!("http.listen = {addr:?} is not an address like 127.0.0.1:8377 (or \"\" for no status page)")
            })?;
        }
        for limit in &sync.limits {
            tree.get(&limit.unit)
                .map_err(|e| format!("sync.limit unit: {e}"))?;
            limit.window_minutes()?;
            if limit.rate_kbps == Some(0) {
                return Err(format!(
                    "sync.limit for {}: rate_kbps must be at least 1",
                    limit.unit
                ));
            }
        }
        match (self.scans.store, &self.scans.s3) {
            (ScanBackend::S3, None) => {
                return Err(
                    "scans.store = \"s3\" needs a [scans.s3] section with endpoint and bucket"
                        .into(),
                )
            }
            (_, Some(s3)) => s3.check()?,
            (ScanBackend::Local, None) => {}
        }
        Ok(())
    }

    /// The annotated file `init` writes. Text values are written as TOML strings, escaped:
    /// a user or peer name with a quote in it must not make a file that does not load.
    pub fn to_toml_annotated(&self) -> String {
        let user = quoted(self.node.default_user.as_deref().unwrap_or("admin"));
        format!(
            "# communesync node configuration. Every key is documented in config/{role}.toml of the\n\
             # source tree; unknown keys are refused. Flags on the command line override this file.\n\n\
             [node]\n\
             # This node's unit path and role; must match the unit tree.\n\
             unit = {unit}\n\
             role = \"{role}\"\n\
             # Who acts when --as is not given.\n\
             default_user = {user}\n\
             # Unit tree file until the province's arrives by sync (default: the embedded sample).\n\
             {units_file}\n\
             # Hours east of UTC for deadlines and \"overdue\".\n\
             utc_offset_hours = {offset}\n\n\
             [store]\n\
             # Documents kept parsed in memory.\n\
             doc_cache_entries = {cache}\n\n\
             [sync]\n\
             # Address `communesync serve` listens on.\n\
             listen = {listen}\n\
             # Peer (see `communesync peer add`) that `serve` keeps syncing with.\n\
             {upstream}\n\
             # Transport tuned for slow, lossy links; see config/{role}.toml for every key.\n\
             idle_timeout_s = {idle}\n\
             keep_alive_s = {keep}\n\
             initial_rtt_ms = {rtt}\n\
             congestion = {cc}\n",
            role = self.node.role,
            unit = quoted(&self.node.unit),
            offset = self.node.utc_offset_hours,
            cache = self.store.doc_cache_entries,
            listen = quoted(&self.sync.listen),
            units_file = match &self.node.units_file {
                Some(f) => format!("units_file = {}", quoted(&f.display().to_string())),
                None => "# units_file = \"units.toml\"".to_string(),
            },
            upstream = match &self.sync.upstream {
                Some(u) => format!("upstream = {}", quoted(u)),
                None => "# upstream = \"district\"".to_string(),
            },
            idle = self.sync.idle_timeout_s,
            keep = self.sync.keep_alive_s,
            rtt = self.sync.initial_rtt_ms,
            cc = quoted(&self.sync.congestion),
        )
    }
}

/// One line naming the key a TOML error concerns, what is wrong, and where, e.g.
/// `store.doc_cache_entries: invalid type: string "many", expected usize (line 17)`.
/// `text` as a TOML string value, quoted and escaped.
fn quoted(text: &str) -> String {
    toml::Value::String(text.to_string()).to_string()
}

/// `message` from [`Config::check`], which starts with the key it is about ("sync.listen =
/// ..."), with the line of that key in `text` added at the end, when the key is there.
fn with_line(text: &str, message: String) -> String {
    let key = message
        .split([' ', ':'])
        .next()
        .and_then(|k| k.split_once('.'));
    match key.and_then(|(section, key)| line_of(text, section, key)) {
        Some(line) => format!("{message} (line {line})"),
        None => message,
    }
}

/// The line (from 1) on which `key` is set in table `[section]` of a TOML text, if it is set
/// there as `key = ...` (the form `init` writes and the samples use).
pub fn line_of(text: &str, section: &str, key: &str) -> Option<usize> {
    let mut current = "";
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if let Some(header) = line.strip_prefix('[') {
            current = header.trim_matches(|c| c == '[' || c == ']' || c == ' ');
        } else if current == section
            && line
                .strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        {
            return Some(n + 1);
        }
    }
    None
}

fn describe(text: &str, err: &toml::de::Error) -> String {
    // toml keeps the key path private; without the input, its Display prints it as a last
    // line "in `store.doc_cache_entries`" instead of a multi-line snippet.
    let mut bare = err.clone();
    bare.set_input(None);
    let rendered = bare.to_string();
    let key = rendered
        .lines()
        .find_map(|l| l.strip_prefix("in `")?.strip_suffix('`'))
        .map(|k| format!("{k}: "))
        .unwrap_or_default();
    format!("{key}{}{}", err.message(), location(text, err.span()))
}

fn location(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(span) => format!(
            " (line {})",
            text[..span.start.min(text.len())].lines().count().max(1)
        ),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &str) -> Result<(Config, UnitTree), ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CONFIG_FILE), text).unwrap();
        Config::load(dir.path())
    }

    /// The shipped samples say "every key below shows its default": they must.
    #[test]
    fn the_sample_configs_show_the_defaults() {
        for (name, text) in [
            ("commune", include_str!("../../config/commune.toml")),
            ("district", include_str!("../../config/district.toml")),
            ("province", include_str!("../../config/province.toml")),
        ] {
            let sample = Config::parse(text).unwrap();
            let defaults = Config::new(&sample.node.unit, sample.node.role, "admin");
            let shown = |c: &Config| {
                serde_json::to_string(&(&c.node, &c.store, &c.sync, &c.scans))
                    .expect("serializable")
            };
            assert_eq!(shown(&sample), shown(&defaults), "config/{name}.toml");
        }
    }

    #[test]
    fn a_value_out_of_range_is_named_with_its_line() {
        let mut text =
            Config::new("qn/binhlieu/tinhhuc", Role::Commune, "admin").to_toml_annotated();
        text = text.replace(
            "keep_alive_s = 10",
            "keep_alive_s = 10\npush_interval_ms = 5",
        );
        let line = text
            .lines()
            .position(|l| l.starts_with("push_interval_ms"))
            .unwrap()
            + 1;
        let err = load_text(&text).unwrap_err().to_string();
        assert!(
            err.contains("sync.push_interval_ms = 5 must be between 50 and 60000")
                && err.ends_with(&format!("(line {line})")),
            "{err}"
        );
    }

    #[test]
    fn issue14_a_scan_bucket_is_checked_at_load() {
        let base = Config::new("qn", Role::Province, "admin").to_toml_annotated();
        let err = |extra: &str| {
            load_text(&format!("{base}\n{extra}"))
                .unwrap_err()
                .to_string()
        };
        assert!(
            err("[scans]\nstore = \"s3\"\n").contains("needs a [scans.s3] section"),
            "{}",
            err("[scans]\nstore = \"s3\"\n")
        );
        let bucket = |endpoint: &str, prefix: &str| {
            format!(
                "[scans.s3]\nendpoint = \"{endpoint}\"\nbucket = \"b\"\nprefix = \"{prefix}\"\n"
            )
        };
        assert!(err(&bucket("s3.example", "qn")).contains("scans.s3.endpoint"));
        assert!(err(&bucket("https://s3.example", "/qn/")).contains("scans.s3.prefix"));
        assert!(err("[scans]\nstore = \"nfs\"\n").contains("scans.store"));
        let ok = load_text(&format!("{base}\n{}", bucket("http://10.0.0.5:9000", "qn")))
            .unwrap()
            .0;
        assert_eq!(ok.scans.store, ScanBackend::Local);
    }

    #[test]
    fn written_config_loads_back() {
        let c = Config::new("qn/binhlieu/tinhhuc", Role::Commune, "admin");
        let (loaded, tree) = load_text(&c.to_toml_annotated()).unwrap();
        assert_eq!(loaded.node.unit, "qn/binhlieu/tinhhuc");
        assert!(tree.get("qn/binhlieu/hucdong").is_ok());
    }

    #[test]
    fn scan_windows_wrap_midnight() {
        let limit = PeerLimit {
            unit: "qn".into(),
            rate_kbps: None,
            scans_window: Some("18:00-07:00".into()),
        };
        assert!(
            limit.window_open(18 * 60) && limit.window_open(2 * 60) && !limit.window_open(12 * 60)
        );
        let day = PeerLimit {
            scans_window: Some("08:30-17:00".into()),
            ..limit.clone()
        };
        assert!(day.window_open(9 * 60) && !day.window_open(17 * 60));
        let bad = PeerLimit {
            scans_window: Some("25:00-07:00".into()),
            ..limit
        };
        assert!(bad.window_minutes().is_err());
        let sync = SyncSection {
            limits: vec![
                PeerLimit {
                    unit: "qn".into(),
                    rate_kbps: Some(1),
                    scans_window: None,
                },
                PeerLimit {
                    unit: "qn/binhlieu".into(),
                    rate_kbps: Some(2),
                    scans_window: None,
                },
            ],
            ..SyncSection::default()
        };
        assert_eq!(
            sync.limit_for("qn/binhlieu/tinhhuc").unwrap().rate_kbps,
            Some(2)
        );
        assert_eq!(sync.limit_for("qn/halong").unwrap().rate_kbps, Some(1));
    }

    #[test]
    fn shipped_examples_are_valid() {
        for role in ["commune", "district", "province"] {
            let path = format!("{}/config/{role}.toml", env!("CARGO_MANIFEST_DIR"));
            let (config, _) = load_text(&std::fs::read_to_string(&path).unwrap())
                .unwrap_or_else(|e| panic!("{path}: {e}"));
            assert_eq!(config.node.role.as_str(), role);
        }
    }

    #[test]
    fn unknown_and_malformed_keys_are_named() {
        let base = Config::new("qn/binhlieu/tinhhuc", Role::Commune, "admin").to_toml_annotated();
        let err = load_text(&format!("{base}\ncolour = 3\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("colour"), "{err}");
        let err =
            load_text(&base.replace("doc_cache_entries = 256", "doc_cache_entries = \"many\""))
                .unwrap_err()
                .to_string();
        assert!(err.contains("store.doc_cache_entries"), "{err}");
        let err = load_text(&base.replace("role = \"commune\"", "role = \"district\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("node.role"), "{err}");
        let err = load_text(&base.replace("qn/binhlieu/tinhhuc", "qn/nowhere"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("qn/nowhere"), "{err}");
    }

    /// Found by the issue 11 property test: `init` wrote names unescaped, so a quote or a
    /// backslash in the user's or the upstream peer's name made a config that did not load.
    #[test]
    fn issue11_names_with_quotes_write_a_config_that_loads() {
        let mut config = Config::new("qn/binhlieu/tinhhuc", Role::Commune, "Lê \"Ba\" \\ 2");
        config.sync.upstream = Some("district \"a\"".into());
        let back = Config::parse(&config.to_toml_annotated()).unwrap();
        assert_eq!(back.node.default_user.as_deref(), Some("Lê \"Ba\" \\ 2"));
        assert_eq!(back.sync.upstream.as_deref(), Some("district \"a\""));
    }

    // Issue 11: the fuzz target's properties (fuzz/fuzz_targets/config_files.rs), in the
    // default test run.
    mod issue11_props {
        use super::*;
        use proptest::collection::vec;
        use proptest::prelude::*;
        use proptest::sample::Index;

        const SHIPPED: [&str; 3] = [
            include_str!("../../config/commune.toml"),
            include_str!("../../config/district.toml"),
            include_str!("../../config/province.toml"),
        ];

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(128))]

            /// Shipped config files with characters replaced: parsing and checking never panic,
            /// and an error names a key or a line.
            #[test]
            fn issue11_mutated_config_files_are_read_safely(
                which in 0..SHIPPED.len(),
                edits in vec((any::<Index>(), any::<char>()), 1..4),
                noise in "\\PC{0,200}",
            ) {
                let _ = Config::parse(&noise);
                let mut text: Vec<char> = SHIPPED[which].chars().collect();
                for (at, c) in edits {
                    let at = at.index(text.len());
                    text[at] = c;
                }
                let text: String = text.into_iter().collect();
                match Config::parse(&text) {
                    Ok(config) => {
                        let _ = config.check(&UnitTree::sample());
                    }
                    Err(e) => prop_assert!(!e.is_empty()),
                }
            }

            /// What `init` writes loads back as what it was given, whatever the user's name
            /// and the upstream peer's.
            #[test]
            fn issue11_written_configs_load_back(
                user in "\\PC{0,30}",
                upstream in proptest::option::of("\\PC{0,30}"),
            ) {
                let mut config = Config::new("qn/binhlieu/tinhhuc", Role::Commune, &user);
                config.sync.upstream = upstream.clone();
                let back = Config::parse(&config.to_toml_annotated()).unwrap();
                prop_assert_eq!(back.node.default_user.as_deref(), Some(user.as_str()));
                prop_assert_eq!(&back.sync.upstream, &upstream);
                prop_assert!(back.check(&UnitTree::sample()).is_ok());
            }
        }
    }
}
