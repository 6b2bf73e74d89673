//! The province's unit tree as its CA signed it: published once at the province, carried by
//! sync to every node, installed only when the signature and the version check out.

use std::path::Path;

use tracing::{info, warn};

use super::admin::CA_FILE;
use super::{Node, NodeError, Result};
use crate::trust::{self, SignedTree};
use crate::units::{is_within, parent, Role, UnitTree};

/// The signed tree a node holds, in its data directory; it takes precedence over `units.toml`
/// and the embedded sample.
pub const SIGNED_UNITS_FILE: &str = "units.signed";
/// Meta key: the tree version whose moves this node last re-indexed and re-offered.
const RESCOPED_META: &str = "units_rescoped_version";

/// Reads the signed tree kept in `dir`, if any. A file that no longer verifies (damaged, or
/// from another province's CA) is set aside with a warning: the node falls back to its
/// configured tree, and the next sync brings the province's again.
pub(super) fn load(dir: &Path) -> Option<(SignedTree, UnitTree)> {
    let path = dir.join(SIGNED_UNITS_FILE);
    let bytes = std::fs::read(&path).ok()?;
    let read = std::fs::read_to_string(dir.join(CA_FILE))
        .map_err(|e| e.to_string())
        .and_then(|ca| trust::verify_tree(&ca, &bytes).map_err(|e| e.to_string()))
        .and_then(|signed| {
            UnitTree::parse(&signed.text)
                .map(|tree| (signed, tree))
                .map_err(|e| e.to_string())
        });
    match read {
        Ok(held) => Some(held),
        Err(e) => {
            // Once per process: a daemon opens the node for every session.
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                warn!(
                "{}: {e}; using the configured unit tree until sync brings the province's again",
                    path.display()
                )
            });
            None
        }
    }
}

impl Node {
    /// The version of the signed unit tree this node holds (0: none, the configured tree).
    pub fn units_version(&self) -> u64 {
        self.signed_tree.as_ref().map_or(0, |s| s.version)
    }

    /// The signed tree this node holds, as sent to peers.
    pub fn units_signed(&self) -> Option<&SignedTree> {
        self.signed_tree.as_ref()
    }

    /// Signs `file` as the province's next unit tree and installs it here; sync carries it to
    /// every node. Province (CA) only. Refused when it drops this node's unit or the unit of a
    /// node still enrolled (revoke that node first, or it could no longer be placed).
    pub fn units_publish(&mut self, file: &Path) -> Result<SignedTree> {
        if self.role() != Role::Province {
            return Err(NodeError::Invalid(
                "`unit publish` runs on the province node, which holds the CA".into(),
            ));
        }
        let text = std::fs::read_to_string(file).map_err(|source| NodeError::Io {
            path: file.to_path_buf(),
            source,
        })?;
        let tree = UnitTree::parse(&text)
            .map_err(|e| NodeError::Invalid(format!("{}: {e}", file.display())))?;
        self.sign_and_keep(&file.display().to_string(), &text, tree)
    }

    /// Moves `unit` (and the units below it) under `new_parent` in the province's tree, each
    /// keeping its old path as `formerly`, and signs and installs the result like
    /// [`Node::units_publish`]: the moved nodes keep their certificates and run as the new
    /// path, and every node re-reads the documents naming the old one under the new one.
    pub fn units_move(&mut self, unit: &str, new_parent: &str) -> Result<SignedTree> {
        if self.role() != Role::Province {
            return Err(NodeError::Invalid(
                "`unit move` runs on the province node, which holds the CA".into(),
            ));
        }
        let unit = self.tree.canonical(unit).to_string();
        let moved = self.tree.moved(&unit, self.tree.canonical(new_parent))?;
        let text = format!(
            "# The unit tree of {}, as `communesync unit move {unit} {new_parent}` wrote it.\n\n{}",
            self.unit(),
            moved.to_toml()
        );
        self.sign_and_keep("the moved tree", &text, moved)
    }

    /// Checks `tree` (from `what`) against this node and the CA's enrolled nodes, then signs
    /// `text` as the next version and installs it.
    fn sign_and_keep(&mut self, what: &str, text: &str, tree: UnitTree) -> Result<SignedTree> {
        self.check_tree(&tree)?;
        let ca = self.ca()?;
        let orphans: Vec<String> = ca
            .issued()?
            .into_iter()
            .filter(|r| r.revoked_at.is_none())
            .filter(|r| tree.get(tree.canonical(&r.unit)).is_err())
            .map(|r| format!("{} (node {})", r.unit, r.node_id))
            .collect();
        if !orphans.is_empty() {
            return Err(NodeError::Invalid(format!(
                "{what}: enrolled nodes' units are missing from it: {}; add them back (or list their old path in `formerly` of the unit they moved to), or revoke those nodes first",
                orphans.join(", ")
            )));
        }
        let signed = ca.sign_tree(self.units_version() + 1, text)?;
        self.keep_tree(signed.clone(), tree)?;
        Ok(signed)
    }

    /// Installs a signed tree from a peer: Ok(true) when it was newer and is now in use,
    /// Ok(false) when this node already holds that version or a newer one.
    pub fn install_units(&mut self, bytes: &[u8]) -> Result<bool> {
        let ca =
            std::fs::read_to_string(self.dir.join(CA_FILE)).map_err(|source| NodeError::Io {
                path: self.dir.join(CA_FILE),
                source,
            })?;
        let signed = trust::verify_tree(&ca, bytes)?;
        if signed.version <= self.units_version() {
            return Ok(false);
        }
        let tree = UnitTree::parse(&signed.text).map_err(|e| {
            NodeError::Invalid(format!(
                "unit tree version {} from the province: {e}",
                signed.version
            ))
        })?;
        self.check_tree(&tree)?;
        info!(
            version = signed.version,
            units = tree.iter().count(),
            "installed the province's unit tree"
        );
        self.keep_tree(signed, tree)?;
        Ok(true)
    }

    /// A tree this node can live on: its unit still there, with its role, under its path or
    /// under a new one that lists the enrolled path in `formerly` (the unit moved).
    fn check_tree(&self, tree: &UnitTree) -> Result<()> {
        let enrolled = self.cert_unit();
        match tree.get(tree.canonical(enrolled)) {
            Ok(unit) if unit.role == self.role() => Ok(()),
            Ok(unit) => Err(NodeError::Invalid(format!(
                "the unit tree makes this node's unit {} a {}, but the node is a {}: a node cannot change role, enrol a new one",
                unit.path, unit.role, self.role()
            ))),
            Err(_) => Err(NodeError::Invalid(format!(
                "the unit tree no longer holds this node's unit {enrolled}: a unit that moved lists its old path in `formerly` (`communesync unit move` at the province writes it)"
            ))),
        }
    }

    fn keep_tree(&mut self, signed: SignedTree, tree: UnitTree) -> Result<()> {
        trust::write_file_atomic(self.dir.join(SIGNED_UNITS_FILE), &signed.bytes)?;
        // Units whose path this tree changes: (old path as this node knew it, new path).
        let moved: Vec<(String, String)> = tree
            .aliases()
            .iter()
            .filter(|(former, current)| self.tree.canonical(former) != current.as_str())
            .map(|(former, current)| (self.tree.canonical(former).to_string(), current.clone()))
            .collect();
        let unit = tree.canonical(self.cert_unit()).to_string();
        let own_moved = unit != self.unit;
        if own_moved {
            info!(from = %self.unit, to = %unit, "the province moved this node's unit");
        }
        self.unit = unit;
        self.store.set_aliases(tree.aliases().clone());
        self.tree = tree;
        let version = signed.version;
        self.signed_tree = Some(signed);
        if !moved.is_empty() {
            self.rescope(&moved, version)?;
        }
        self.moves = moved;
        if own_moved {
            self.add_new_parent()?;
        }
        Ok(())
    }

    /// Whether the tree this node installed last moved a unit into the scope of a peer of
    /// `peer_unit` (its current path): a session with it then offers its scope again.
    pub fn scope_grew_for(&self, peer_unit: &str) -> bool {
        scope_grew(&self.moves, peer_unit)
    }

    /// After the province moved this node's unit: records its new parent as the upstream peer
    /// at the `addr` the tree gives (as `peer add NAME --addr ADDR --upstream` would), so that
    /// `serve` dials it without anyone visiting this node. Nothing when a peer already showed
    /// the parent's certificate or has that address, or when the tree gives no address.
    fn add_new_parent(&mut self) -> Result<()> {
        let Some(parent) = parent(&self.unit).map(str::to_string) else {
            return Ok(());
        };
        let Some(addr) = self.tree.get(&parent).ok().and_then(|u| u.addr.clone()) else {
            warn!(parent = %parent, "this node's unit moved, but the unit tree gives no addr for its new parent: add it with `communesync peer add NAME --addr HOST:PORT --upstream`");
            return Ok(());
        };
        let met = self.store.peers_met()?;
        let name = parent.replace('/', "-");
        let known = met.iter().any(|(peer, seen)| {
            peer.addr == addr
                || peer.name == name
                || seen
                    .as_ref()
                    .is_some_and(|(unit, _)| self.tree.canonical(unit) == parent)
        });
        if known {
            return Ok(());
        }
        self.store
            .write(|tx| tx.peer_add(&name, &addr, true, super::now_ms()))?;
        info!(peer = %name, %addr, "this node's unit moved: its new parent is now its upstream peer");
        Ok(())
    }

    /// After units moved: re-indexes the documents naming their old paths under the new ones,
    /// and lowers to zero the checkpoint of every peer whose scope grew (a unit moved into its
    /// subtree), so its next round offers it the documents that came into its scope, older
    /// than what it had acknowledged.
    fn rescope(&mut self, moved: &[(String, String)], version: u64) -> Result<()> {
        // Every open session installs the tree it finds on disk too: the re-indexing finds
        // nothing left to do after the first (or what a session still on the old tree stored
        // meanwhile), but peers are re-offered once per version, as each re-offer costs a peer
        // the ids and heads of its whole scope.
        let docs = self.store.rescope()?;
        let rescoped = self
            .store
            .meta(RESCOPED_META)?
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        if rescoped >= version {
            return Ok(());
        }
        let grew: Vec<String> = self
            .store
            .peer_syncs()?
            .into_iter()
            .filter(|p| scope_grew(moved, self.tree.canonical(&p.unit)))
            .map(|p| p.node_id)
            .collect();
        self.store.write(|tx| {
            for node_id in &grew {
                tx.peer_regressed(node_id, 0)?;
            }
            tx.set_meta(RESCOPED_META, &version.to_string())
        })?;
        info!(
            units = moved.len(),
            docs,
            peers = grew.len(),
            "re-indexed the documents of units that moved; peers whose scope grew get them again"
        );
        Ok(())
    }
}

/// Whether moving units (old path, new path) brings documents into the scope of a peer of
/// `peer` (a current path): a unit moved into its subtree, or the peer itself or a unit above
/// it moved (its documents are indexed under the new path now).
fn scope_grew(moved: &[(String, String)], peer: &str) -> bool {
    moved
        .iter()
        .any(|(old, new)| is_within(new, peer) && (!is_within(old, peer) || is_within(peer, new)))
}
