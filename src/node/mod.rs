//! One node: its data directory, config, key, store and unit tree, and the operations on them.
//!
//! The CLI calls this layer; it never parses flags or prints.

pub mod admin;
mod authors;
pub mod blobsink;
pub mod bundle;
pub mod config;
pub mod health;
mod local;
pub mod replica;
pub mod restore;
pub mod scans;
#[cfg(test)]
mod simtest;
pub mod tree;

use std::path::{Path, PathBuf};

use automerge::ActorId;

use crate::model::{Author, ModelError};
use crate::store::{Store, StoreError};
use crate::trust::{NodeId, NodeKey, TrustError};
use crate::units::{Role, UnitError, UnitTree};

pub use authors::{AuditLine, Authors, Signature};
pub use config::{Config, ConfigError};
pub use local::*;

pub const DB_FILE: &str = "node.db";
/// Unix datagram socket in the data directory on which `serve` hears of local writes.
pub const WAKE_SOCKET: &str = "serve.wake";
pub const KEY_FILE: &str = "node.key";
/// The unit tree given to `init --units-file`, kept in the data directory.
pub const UNITS_FILE: &str = "units.toml";

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{0} is already a communesync node; nothing was changed (use another --data directory to create a new node)")]
    AlreadyInitialised(PathBuf),
    #[error("no communesync node in {0}: run `communesync init --unit PATH --role ROLE` first, or pass --data DIR")]
    NotInitialised(PathBuf),
    #[error("unknown user {0:?}: add it with `communesync user add {0}`")]
    UnknownUser(String),
    #[error("no acting user: pass --as USER or set node.default_user in the config")]
    NoUser,
    #[error("{0}")]
    Invalid(String),
    /// A named object other than a document or user (a scan, an attachment, a peer) is not here.
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Unit(#[from] UnitError),
    #[error(transparent)]
    Trust(#[from] TrustError),
    #[error("{path}: {source}{}", crate::store::fault::io_advice(.source, .path))]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl NodeError {
    /// Whether the error is about something that does not exist (exit code 3 in the CLI).
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            NodeError::Store(StoreError::NotFound(_))
                | NodeError::UnknownUser(_)
                | NodeError::NotFound(_)
        )
    }
}

pub type Result<T, E = NodeError> = std::result::Result<T, E>;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// An open node.
pub struct Node {
    dir: PathBuf,
    pub config: Config,
    pub tree: UnitTree,
    /// This node's unit as the tree now names it: `config.node.unit` (the unit its certificate
    /// was issued for), or the unit's new path once the province moved it.
    unit: String,
    /// Units the last tree installed here moved: (old path, new path).
    moves: Vec<(String, String)>,
    /// The province's signed tree, when sync (or `unit publish`) brought one: `tree` is its.
    signed_tree: Option<crate::trust::SignedTree>,
    pub store: Store,
    node_id: NodeId,
    actor: ActorId,
    /// Authors of changes handed to the peer of a session, whose certificates go ahead of them.
    authors_out: authors::AuthorsOut,
    /// CPU time the session's peer has cost since `session_cpu_since`, and the most it may
    /// ([`replica::SESSION_CPU_MAX`] per [`replica::SESSION_CPU_WINDOW`]).
    session_cpu: std::time::Duration,
    session_cpu_since: std::time::Instant,
    session_cpu_max: std::time::Duration,
}

/// What `init` created.
#[derive(Debug, serde::Serialize)]
pub struct InitReport {
    pub data_dir: PathBuf,
    pub unit: String,
    pub role: Role,
    pub node_id: String,
    pub user: String,
}

impl Node {
    /// Creates a node in `dir` (which must be absent or empty); on failure leaves nothing behind.
    /// Creates a node on the embedded sample unit tree; see [`Node::init_with_tree`].
    pub fn init(dir: &Path, unit: &str, role: Role, user: &str) -> Result<InitReport> {
        Self::init_with_tree(dir, unit, role, user, None)
    }

    /// `units_file`: a unit tree to use instead of the embedded sample (copied into the node).
    pub fn init_with_tree(
        dir: &Path,
        unit: &str,
        role: Role,
        user: &str,
        units_file: Option<&Path>,
    ) -> Result<InitReport> {
        let occupied = match std::fs::read_dir(dir) {
            Ok(mut entries) => entries.next().is_some(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(source) => {
                return Err(NodeError::Io {
                    path: dir.to_path_buf(),
                    source,
                })
            }
        };
        if occupied {
            return if dir.join(config::CONFIG_FILE).exists() || dir.join(DB_FILE).exists() {
                Err(NodeError::AlreadyInitialised(dir.to_path_buf()))
            } else {
                Err(NodeError::Invalid(format!(
                    "{} is not empty; choose an empty or new directory for the node",
                    dir.display()
                )))
            };
        }
        local::check_user_name(user)?;
        let mut config = Config::new(unit, role, user);
        let tree_text = match units_file {
            Some(path) => Some(
                std::fs::read_to_string(path).map_err(|source| NodeError::Io {
                    path: path.to_path_buf(),
                    source,
                })?,
            ),
            None => None,
        };
        let tree = match &tree_text {
            Some(text) => UnitTree::parse(text)
                .map_err(|e| NodeError::Invalid(format!("--units-file: {e}")))?,
            None => UnitTree::sample(),
        };
        if tree_text.is_some() {
            config.node.units_file = Some(PathBuf::from(UNITS_FILE));
        }
        // The values come from the command line, not from a config file: bad ones are invalid
        // input (exit 2), and the message must not point at a file that does not exist.
        config
            .check(&tree)
            .map_err(|message| NodeError::Invalid(format!("cannot create the node: {message}")))?;
        // The directory holds every document and scan in clear, and the node's key: only the
        // node's user may enter it, whatever the umask (an empty directory given is tightened).
        crate::trust::fsutil::create_private_dir(dir)
            .and_then(|()| {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            })
            .map_err(|source| NodeError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        let created = Self::init_files(dir, &config, user, tree_text.as_deref());
        if created.is_err() {
            for file in [
                DB_FILE,
                "node.db-wal",
                "node.db-shm",
                KEY_FILE,
                UNITS_FILE,
                config::CONFIG_FILE,
            ] {
                let _ = std::fs::remove_file(dir.join(file));
            }
        }
        let node_id = created?;
        Ok(InitReport {
            data_dir: dir.to_path_buf(),
            unit: unit.to_string(),
            role,
            node_id: node_id.to_string(),
            user: user.to_string(),
        })
    }

    fn init_files(
        dir: &Path,
        config: &Config,
        user: &str,
        tree_text: Option<&str>,
    ) -> Result<NodeId> {
        if let Some(text) = tree_text {
            crate::trust::write_file_atomic(dir.join(UNITS_FILE), text.as_bytes())?;
        }
        let key = NodeKey::generate()?;
        key.save(dir.join(KEY_FILE))?;
        let mut store = Store::create(&dir.join(DB_FILE), config.store.doc_cache_entries)?;
        store.write(|tx| {
            tx.set_meta("node_id", &key.node_id().to_string())?;
            tx.set_meta("unit", &config.node.unit)?;
            tx.set_meta("role", config.node.role.as_str())?;
            tx.add_user(user, Some("administrator"), now_ms())?;
            Ok(())
        })?;
        // The config goes last: its presence is what marks the directory as a node.
        crate::trust::write_file_atomic(
            dir.join(config::CONFIG_FILE),
            config.to_toml_annotated().as_bytes(),
        )?;
        Ok(key.node_id())
    }

    /// Opens the node in `dir`, validating its config and database.
    pub fn open(dir: &Path) -> Result<Node> {
        // A directory this user may not enter is not "no node": say so.
        let config_file = dir.join(config::CONFIG_FILE);
        match config_file.try_exists() {
            Ok(true) => {}
            Ok(false) => return Err(NodeError::NotInitialised(dir.to_path_buf())),
            Err(source) => {
                return Err(NodeError::Io {
                    path: dir.to_path_buf(),
                    source,
                })
            }
        }
        let (config, tree) = Config::load(dir)?;
        use_scan_store(dir, &config)?;
        let store = Store::open(&dir.join(DB_FILE), config.store.doc_cache_entries)?;
        let id_text = store.meta("node_id")?.ok_or_else(|| {
            StoreError::Corrupt("the database does not record this node's id".into())
        })?;
        let node_id: NodeId = id_text.parse()?;
        if store.meta("unit")?.as_deref() != Some(config.node.unit.as_str()) {
            return Err(NodeError::Config(ConfigError::Invalid {
                path: dir.join(config::CONFIG_FILE),
                message: format!(
                    "node.unit = {} but this database belongs to {}; a node cannot change unit: restore the right config.toml, or initialise a new node",
                    config.node.unit,
                    store.meta("unit")?.unwrap_or_default()
                ),
            }));
        }
        let actor = ActorId::from(&node_id.as_bytes()[..]);
        let (signed_tree, tree) = match tree::load(dir) {
            Some((signed, tree)) => (Some(signed), tree),
            None => (None, tree),
        };
        let unit = tree.canonical(&config.node.unit).to_string();
        let mut store = store;
        store.set_aliases(tree.aliases().clone());
        let mut node = Node {
            dir: dir.to_path_buf(),
            config,
            tree,
            unit,
            moves: Vec::new(),
            signed_tree,
            store,
            node_id,
            actor,
            authors_out: Default::default(),
            session_cpu: std::time::Duration::ZERO,
            session_cpu_since: std::time::Instant::now(),
            session_cpu_max: replica::SESSION_CPU_MAX,
        };
        node.start_signing()?;
        Ok(node)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Tells a `serve` daemon on this data directory that a local write was committed, so it
    /// offers it to its peers now rather than at its next push tick. Best effort: with no
    /// daemon running there is no one to tell, and the tick still finds the write.
    pub fn wake_daemon(&self) {
        let socket = self.dir.join(WAKE_SOCKET);
        if let Ok(s) = std::os::unix::net::UnixDatagram::unbound() {
            let _ = s.send_to(b"w", socket);
        }
    }

    /// This node's unit: its current path in the tree (see [`Node::cert_unit`]).
    pub fn unit(&self) -> &str {
        &self.unit
    }

    /// The unit this node was enrolled for, as its config and certificate name it; differs
    /// from [`Node::unit`] once the province moved the unit.
    pub fn cert_unit(&self) -> &str {
        &self.config.node.unit
    }

    pub fn role(&self) -> Role {
        self.config.node.role
    }

    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// The Automerge actor of every change this node makes: its node id.
    pub fn actor(&self) -> &ActorId {
        &self.actor
    }

    /// The author for `--as USER` (or the configured default), checked against the users table.
    pub fn author(&self, user: Option<&str>) -> Result<Author> {
        let user = user
            .or(self.config.node.default_user.as_deref())
            .ok_or(NodeError::NoUser)?;
        if !self.store.user_exists(user)? {
            return Err(NodeError::UnknownUser(user.to_string()));
        }
        Ok(Author {
            user: user.to_string(),
            unit: self.unit().to_string(),
            node: self.node_id.to_string(),
        })
    }

    /// Checks the config keys that name rows of the database: `node.default_user` must be a
    /// user here, or every command without `--as` fails and `serve` loops on errors.
    pub fn check_config_names(&self) -> Result<()> {
        let Some(user) = self.config.node.default_user.as_deref() else {
            return Ok(());
        };
        if self.store.user_exists(user)? {
            return Ok(());
        }
        let path = self.dir.join(config::CONFIG_FILE);
        let line = std::fs::read_to_string(&path)
            .ok()
            .and_then(|text| config::line_of(&text, "node", "default_user"))
            .map(|n| format!(" (line {n})"))
            .unwrap_or_default();
        Err(NodeError::Config(ConfigError::Invalid {
            path,
            message: format!(
                "node.default_user = {user:?} is not a user of this node{line}: add it with `communesync user add {user}`, or set node.default_user to an existing user (`communesync user list`)"
            ),
        }))
    }

    /// Today's date at this node's UTC offset.
    pub fn today(&self) -> time::Date {
        time::OffsetDateTime::now_utc()
            .to_offset(self.config.node.utc_offset())
            .date()
    }
}

/// Registers where the scans of the node in `dir` are, before its store is first opened: every
/// store this process opens on its database (one per scan transfer) then uses that backend.
fn use_scan_store(dir: &Path, config: &Config) -> Result<()> {
    let db = dir.join(DB_FILE);
    match (config.scans.store, &config.scans.s3) {
        (config::ScanBackend::S3, Some(s3)) => {
            let settings = s3.settings(dir).map_err(|message| {
                NodeError::Config(ConfigError::Invalid {
                    path: dir.join(config::CONFIG_FILE),
                    message,
                })
            })?;
            crate::store::scanstore::use_s3_for(&db, settings)?;
        }
        _ => crate::store::scanstore::use_for(&db, crate::store::scanstore::ScanStore::Local),
    }
    Ok(())
}
