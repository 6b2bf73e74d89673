//! The unit tree (province → districts → communes): paths, roles and the scope rules built on them.
//!
//! Pure data: no I/O beyond parsing a TOML text handed in by the caller.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The sample tree of Quảng Ninh, used until a node's config names another or sync brings the province's.
pub const SAMPLE_TREE_TOML: &str = include_str!("../config/units-quang-ninh.toml");

/// Longest accepted unit path, in bytes; paths travel in certificates and on the wire.
pub const UNIT_PATH_BYTES_MAX: usize = 200;
/// Most units a tree may hold (a province has hundreds; this bounds a hostile file).
pub const TREE_UNITS_MAX: usize = 100_000;
/// Most former paths one unit may list: each move adds one, and a commune moves rarely.
pub const FORMERLY_MAX: usize = 16;
/// Longest accepted `addr` (HOST:PORT), in bytes.
pub const ADDR_BYTES_MAX: usize = 255;

/// Former unit path -> the unit's current path (see [`UnitTree::canonical`]).
pub type Aliases = BTreeMap<String, String>;

/// `path` through `aliases`: the current path of a unit that moved, else `path` itself.
pub fn canonical<'a>(aliases: &'a Aliases, path: &'a str) -> &'a str {
    aliases.get(path).map_or(path, String::as_str)
}

#[derive(Debug, thiserror::Error)]
pub enum UnitError {
    #[error("unit path {0:?} is malformed: use lowercase slugs separated by '/', like qn/binhlieu/tinhhuc")]
    BadPath(String),
    #[error("unknown unit {0:?}: it is not in the unit tree (see `communesync unit list`)")]
    Unknown(String),
    #[error("unknown role {0:?}: use commune, district or province")]
    BadRole(String),
    #[error("unit tree: {0}")]
    BadTree(String),
}

/// A node's place in the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Commune,
    District,
    Province,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Commune => "commune",
            Role::District => "district",
            Role::Province => "province",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = UnitError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "commune" => Ok(Role::Commune),
            "district" => Ok(Role::District),
            "province" => Ok(Role::Province),
            other => Err(UnitError::BadRole(other.to_string())),
        }
    }
}

/// Checks the shape of a unit path: 1–3 '/'-separated slugs of [a-z0-9-].
pub fn validate_path(path: &str) -> Result<(), UnitError> {
    let ok = !path.is_empty()
        && path.len() <= UNIT_PATH_BYTES_MAX
        && path.split('/').count() <= 3
        && path.split('/').all(|seg| {
            !seg.is_empty()
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(UnitError::BadPath(path.to_string()))
    }
}

/// True when `path` is `ancestor` itself or lies below it.
pub fn is_within(path: &str, ancestor: &str) -> bool {
    path == ancestor
        || (path.len() > ancestor.len()
            && path.starts_with(ancestor)
            && path.as_bytes()[ancestor.len()] == b'/')
}

/// The parent of a path, or None for the province.
pub fn parent(path: &str) -> Option<&str> {
    path.rfind('/').map(|i| &path[..i])
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Unit {
    pub path: String,
    pub name: String,
    pub role: Role,
    /// Paths this unit had before it moved: certificates, documents and change notes written
    /// under them still name it (see [`UnitTree::canonical`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub formerly: Vec<String>,
    /// Where this unit's nodes listen (HOST:PORT), for districts and the province: a commune
    /// that moved dials its new district there without anyone visiting it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
}

#[derive(Serialize)]
struct TreeFileOut<'a> {
    unit: Vec<&'a Unit>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TreeFile {
    #[serde(default)]
    unit: Vec<Unit>,
}

/// The units a node knows, keyed by path.
#[derive(Debug, Clone)]
pub struct UnitTree {
    units: BTreeMap<String, Unit>,
    aliases: Aliases,
}

impl UnitTree {
    /// Parses and validates a tree: well-formed paths, no duplicates, every parent present,
    /// roles matching depth (province at depth 1, district at 2, commune at 3).
    pub fn parse(text: &str) -> Result<Self, UnitError> {
        let file: TreeFile = toml::from_str(text).map_err(|e| UnitError::BadTree(e.to_string()))?;
        if file.unit.len() > TREE_UNITS_MAX {
            return Err(UnitError::BadTree(format!(
                "{} units, more than the {TREE_UNITS_MAX} allowed",
                file.unit.len()
            )));
        }
        let mut units = BTreeMap::new();
        for unit in file.unit {
            validate_path(&unit.path)?;
            let depth = unit.path.split('/').count();
            let expected = match depth {
                1 => Role::Province,
                2 => Role::District,
                _ => Role::Commune,
            };
            if unit.role != expected {
                return Err(UnitError::BadTree(format!(
                    "unit {} has role {} but a path of depth {depth} is a {expected}",
                    unit.path, unit.role
                )));
            }
            if let Some(previous) = units.insert(unit.path.clone(), unit) {
                return Err(UnitError::BadTree(format!(
                    "unit {} is listed twice",
                    previous.path
                )));
            }
        }
        for path in units.keys() {
            if let Some(p) = parent(path) {
                if !units.contains_key(p) {
                    return Err(UnitError::BadTree(format!(
                        "unit {path} has no parent {p} in the tree"
                    )));
                }
            }
        }
        if units.is_empty() {
            return Err(UnitError::BadTree("no [[unit]] entries".into()));
        }
        let aliases = Self::aliases_of(&units)?;
        Ok(UnitTree { units, aliases })
    }

    /// Checks `formerly` and `addr` and maps every former path to its unit. A former path that
    /// is some unit's current path, or the former path of two units, would make a path name two
    /// units, so it is refused; that also rules out cycles (a former path is never current).
    fn aliases_of(units: &BTreeMap<String, Unit>) -> Result<Aliases, UnitError> {
        let mut aliases = Aliases::new();
        for unit in units.values() {
            if unit.formerly.len() > FORMERLY_MAX {
                return Err(UnitError::BadTree(format!(
                    "unit {} lists {} former paths, more than the {FORMERLY_MAX} allowed",
                    unit.path,
                    unit.formerly.len()
                )));
            }
            for former in &unit.formerly {
                validate_path(former)?;
                if former.split('/').count() != unit.path.split('/').count() {
                    return Err(UnitError::BadTree(format!(
                        "unit {} was formerly {former}, a path of another depth: a unit keeps its role when it moves",
                        unit.path
                    )));
                }
                if units.contains_key(former) {
                    return Err(UnitError::BadTree(format!(
                        "unit {} lists formerly {former}, which is the current path of another unit: a path names one unit",
                        unit.path
                    )));
                }
                if let Some(other) = aliases.insert(former.clone(), unit.path.clone()) {
                    return Err(UnitError::BadTree(format!(
                        "{former} is listed as the former path of both {other} and {}",
                        unit.path
                    )));
                }
            }
            if let Some(addr) = &unit.addr {
                if unit.role == Role::Commune {
                    return Err(UnitError::BadTree(format!(
                        "unit {} is a commune: only districts and the province have an addr (communes dial up, nobody dials them)",
                        unit.path
                    )));
                }
                let port_ok = addr
                    .rsplit_once(':')
                    .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
                if !port_ok || addr.len() > ADDR_BYTES_MAX || addr.contains(char::is_whitespace) {
                    return Err(UnitError::BadTree(format!(
                        "unit {}: addr {addr:?} is not HOST:PORT (like district.example.vn:7800)",
                        unit.path
                    )));
                }
            }
        }
        Ok(aliases)
    }

    /// The tree as TOML, as `unit move` signs it.
    pub fn to_toml(&self) -> String {
        let out = TreeFileOut {
            unit: self.units.values().collect(),
        };
        toml::to_string(&out).expect("a unit tree serializes")
    }

    /// The current path of the unit `path` names: itself, or the unit it was a former path
    /// of. Every path read from a certificate, a change note or a document's fields goes
    /// through here before it is compared.
    pub fn canonical<'a>(&'a self, path: &'a str) -> &'a str {
        canonical(&self.aliases, path)
    }

    /// Every former path and the unit it now names.
    pub fn aliases(&self) -> &Aliases {
        &self.aliases
    }

    /// This tree with `unit` (and the units below it) moved under `new_parent`, each keeping
    /// its old path in `formerly`. Refused when `new_parent` cannot hold a unit of that role,
    /// or the unit is already there, or its new path is taken.
    pub fn moved(&self, unit: &str, new_parent: &str) -> Result<UnitTree, UnitError> {
        let moving = self.get(unit)?;
        let parent_unit = self.get(new_parent)?;
        let holds = match moving.role {
            Role::Commune => Role::District,
            Role::District => Role::Province,
            Role::Province => {
                return Err(UnitError::BadTree(format!(
                    "{unit} is the province: it has no parent to move to"
                )))
            }
        };
        if parent_unit.role != holds {
            return Err(UnitError::BadTree(format!(
                "{new_parent} is a {}, but a {} sits under a {holds}",
                parent_unit.role, moving.role
            )));
        }
        if parent(unit) == Some(new_parent) {
            return Err(UnitError::BadTree(format!(
                "{unit} is already under {new_parent}"
            )));
        }
        let slug = &unit[unit.rfind('/').map_or(0, |i| i + 1)..];
        let new_path = format!("{new_parent}/{slug}");
        if self.units.contains_key(&new_path) {
            return Err(UnitError::BadTree(format!(
                "{new_path} is already a unit: rename one of them first"
            )));
        }
        let mut units = BTreeMap::new();
        for u in self.units.values() {
            let mut u = u.clone();
            if is_within(&u.path, unit) {
                let path = format!("{new_path}{}", &u.path[unit.len()..]);
                validate_path(&path)?;
                u.formerly.push(std::mem::replace(&mut u.path, path));
                // Moving back: the path it returns to is current again, not former.
                let current = u.path.clone();
                u.formerly.retain(|f| *f != current);
            }
            units.insert(u.path.clone(), u);
        }
        let aliases = Self::aliases_of(&units)?;
        Ok(UnitTree { units, aliases })
    }

    pub fn sample() -> Self {
        Self::parse(SAMPLE_TREE_TOML).expect("the embedded sample tree is valid")
    }

    pub fn get(&self, path: &str) -> Result<&Unit, UnitError> {
        validate_path(path)?;
        self.units
            .get(path)
            .ok_or_else(|| UnitError::Unknown(path.to_string()))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Unit> {
        self.units.values()
    }

    /// Direct children of a unit.
    pub fn children<'a>(&'a self, path: &'a str) -> impl Iterator<Item = &'a Unit> + 'a {
        self.units
            .values()
            .filter(move |u| parent(&u.path) == Some(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_tree_parses_and_holds_tinhhuc() {
        let tree = UnitTree::sample();
        let unit = tree.get("qn/binhlieu/tinhhuc").unwrap();
        assert_eq!(unit.role, Role::Commune);
        assert_eq!(tree.get("qn").unwrap().role, Role::Province);
        assert!(tree.children("qn/binhlieu").count() >= 8);
    }

    #[test]
    fn within_respects_segment_boundaries() {
        assert!(is_within("qn/binhlieu/tinhhuc", "qn/binhlieu"));
        assert!(is_within("qn/binhlieu", "qn/binhlieu"));
        assert!(is_within("qn/binhlieu", "qn"));
        assert!(!is_within("qn/binhlieux", "qn/binhlieu"));
        assert!(!is_within("qn", "qn/binhlieu"));
        assert_eq!(parent("qn/binhlieu/tinhhuc"), Some("qn/binhlieu"));
        assert_eq!(parent("qn"), None);
    }

    #[test]
    fn bad_paths_and_trees_are_refused() {
        for bad in ["", "QN", "qn//x", "qn/a/b/c", "qn/a b", "/qn"] {
            assert!(validate_path(bad).is_err(), "{bad:?} accepted");
        }
        assert!(matches!(
            UnitTree::sample().get("qn/nowhere"),
            Err(UnitError::Unknown(_))
        ));
        let orphan = "[[unit]]\npath = \"qn/x\"\nname = \"X\"\nrole = \"district\"\n";
        assert!(UnitTree::parse(orphan).is_err());
        let wrong_role = "[[unit]]\npath = \"qn\"\nname = \"Q\"\nrole = \"commune\"\n";
        assert!(UnitTree::parse(wrong_role).is_err());
        assert!(UnitTree::parse("[[unit]]\npath = 3").is_err());
    }

    #[test]
    fn a_moved_unit_keeps_its_old_path_as_an_alias_and_can_move_back() {
        let tree = UnitTree::sample();
        let (old, new) = ("qn/binhlieu/tinhhuc", "qn/halong/tinhhuc");
        let moved = tree.moved(old, "qn/halong").unwrap();
        assert!(moved.get(old).is_err());
        let unit = moved.get(new).unwrap();
        assert_eq!(
            (unit.role, unit.formerly.clone()),
            (Role::Commune, vec![old.to_string()])
        );
        assert_eq!(moved.canonical(old), new);
        assert_eq!(
            moved.canonical("qn/binhlieu/hucdong"),
            "qn/binhlieu/hucdong"
        );
        assert_eq!(moved.iter().count(), tree.iter().count());
        // What `unit move` signs reads back as the same tree.
        let again = UnitTree::parse(&moved.to_toml()).unwrap();
        assert_eq!(again.aliases(), moved.aliases());
        assert_eq!(again.get(new).unwrap(), unit);
        // Back home: the old path is current again, no longer an alias; what it wrote while
        // away names the path it leaves.
        let back = again.moved(new, "qn/binhlieu").unwrap();
        assert_eq!(back.get(old).unwrap().formerly, vec![new.to_string()]);
        assert_eq!(back.canonical(new), old);
        assert_eq!(back.aliases().len(), 1);

        // A commune goes under a district, not under a commune or the province; the province
        // does not move; a unit already there, or onto a taken path, is refused.
        for (unit, to) in [
            (old, "qn/binhlieu/hucdong"),
            (old, "qn"),
            ("qn", "qn/halong"),
            (old, "qn/binhlieu"),
            ("qn/nowhere/x", "qn/halong"),
        ] {
            assert!(tree.moved(unit, to).is_err(), "{unit} -> {to}");
        }
        let twin = tree.moved(old, "qn/halong").unwrap();
        let text = twin.to_toml().replace("qn/halong/tinhhuc", "qn/halong/x")
            + "[[unit]]\npath = \"qn/binhlieu/tinhhuc\"\nname = \"T\"\nrole = \"commune\"\n";
        assert!(
            UnitTree::parse(&text).is_err(),
            "a former path that is current again"
        );
    }

    #[test]
    fn former_paths_and_addresses_are_checked() {
        let unit = |path: &str, role: &str, extra: &str| {
            format!("[[unit]]\npath = \"{path}\"\nname = \"N\"\nrole = \"{role}\"\n{extra}\n")
        };
        let base = unit("qn", "province", "addr = \"province.example.vn:7800\"")
            + &unit("qn/a", "district", "addr = \"10.0.0.2:7800\"")
            + &unit("qn/b", "district", "");
        let good = base.clone() + &unit("qn/b/x", "commune", "formerly = [\"qn/a/x\"]");
        let tree = UnitTree::parse(&good).unwrap();
        assert_eq!(tree.canonical("qn/a/x"), "qn/b/x");
        assert_eq!(
            tree.get("qn/a").unwrap().addr.as_deref(),
            Some("10.0.0.2:7800")
        );
        let bad = [
            // A former path that is another unit's current path: one path, two units.
            unit("qn/b/x", "commune", "formerly = [\"qn/a\"]"),
            unit("qn/b/x", "commune", "formerly = [\"qn/a/y\"]") + &unit("qn/a/y", "commune", ""),
            // Two units claiming one former path.
            unit("qn/b/x", "commune", "formerly = [\"qn/a/x\"]")
                + &unit("qn/b/y", "commune", "formerly = [\"qn/a/x\"]"),
            unit("qn/b/x", "commune", "formerly = [\"qn/b/x\"]"),
            unit("qn/b/x", "commune", "formerly = [\"QN/A\"]"),
            unit("qn/b/x", "commune", "addr = \"10.0.0.3:7800\""),
            unit("qn/c", "district", "addr = \"nowhere\""),
            unit("qn/c", "district", "addr = \"host:99999\""),
            unit(
                "qn/b/x",
                "commune",
                &format!(
                    "formerly = [{}]",
                    (0..=FORMERLY_MAX)
                        .map(|i| format!("\"qn/a/x{i}\""))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
        ];
        for extra in bad {
            let text = base.clone() + &extra;
            assert!(UnitTree::parse(&text).is_err(), "accepted:\n{extra}");
        }
    }

    // Issue 11: the fuzz target's properties (fuzz/fuzz_targets/config_files.rs), in the
    // default test run.
    mod issue11_props {
        use super::*;
        use proptest::collection::{btree_set, vec};
        use proptest::prelude::*;
        use proptest::sample::Index;

        fn slug() -> impl Strategy<Value = String> {
            "[a-z0-9-]{1,8}"
        }

        fn toml_tree(paths: &[String]) -> String {
            let mut text = String::new();
            for path in paths {
                let role = match path.split('/').count() {
                    1 => "province",
                    2 => "district",
                    _ => "commune",
                };
                text.push_str(&format!(
                    "[[unit]]\npath = \"{path}\"\nname = \"Đơn vị {path}\"\nrole = \"{role}\"\n\n"
                ));
            }
            text
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(128))]

            /// A generated tree (a province, its districts, their communes) parses to exactly
            /// its units, each with its parent.
            #[test]
            fn issue11_generated_trees_parse(
                districts in btree_set(slug(), 0..5),
                communes in vec((any::<Index>(), slug()), 0..10),
            ) {
                let districts: Vec<String> = districts.into_iter().map(|d| format!("qn/{d}")).collect();
                let mut paths = vec!["qn".to_string()];
                paths.extend(districts.iter().cloned());
                if !districts.is_empty() {
                    let mut seen = std::collections::BTreeSet::new();
                    for (at, c) in communes {
                        let path = format!("{}/{c}", at.get(&districts));
                        if seen.insert(path.clone()) {
                            paths.push(path);
                        }
                    }
                }
                let tree = UnitTree::parse(&toml_tree(&paths)).unwrap();
                prop_assert_eq!(tree.iter().count(), paths.len());
                for unit in tree.iter() {
                    if let Some(p) = parent(&unit.path) {
                        prop_assert!(tree.get(p).is_ok());
                    }
                }
            }

            /// The shipped tree with characters replaced, and any text: never a panic, and a
            /// tree that parses holds every unit's parent.
            #[test]
            fn issue11_mutated_trees_are_read_safely(
                edits in vec((any::<Index>(), any::<char>()), 1..4),
                noise in "\\PC{0,200}",
            ) {
                let _ = UnitTree::parse(&noise);
                let mut text: Vec<char> = SAMPLE_TREE_TOML.chars().collect();
                for (at, c) in edits {
                    let at = at.index(text.len());
                    text[at] = c;
                }
                let text: String = text.into_iter().collect();
                if let Ok(tree) = UnitTree::parse(&text) {
                    for unit in tree.iter() {
                        if let Some(p) = parent(&unit.path) {
                            prop_assert!(tree.get(p).is_ok());
                        }
                    }
                }
            }
        }
    }
}
