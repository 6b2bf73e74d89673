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
        Ok(UnitTree { units })
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
