//! Local operations: every action a commune office takes, each one durable transaction that
//! never waits for the network.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{now_ms, Node, NodeError, Result};
use crate::model::assignment::{self, AssignmentView, NewAssignment, Status};
use crate::model::dispatch::{self, Attachment, DispatchKind, DispatchView, NewDispatch, Priority};
use crate::model::dossier::{self, DossierView};
use crate::model::{receipts, DocId, DocKind};
use crate::store::blobs::{parse_hash, BlobInfo, Hash};
use crate::store::index::{AssignmentRow, DispatchFilter, DispatchRow, DossierRow};
use crate::store::{StoreError, User};

/// Longest user name, in bytes.
const USER_NAME_BYTES_MAX: usize = 64;

pub(crate) fn check_user_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= USER_NAME_BYTES_MAX
        && name
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if ok {
        Ok(())
    } else {
        Err(NodeError::Invalid(format!(
            "user name {name:?} is not valid: use letters, digits, '.', '-' or '_' (at most {USER_NAME_BYTES_MAX} bytes)"
        )))
    }
}

/// Media type of a scan, from its file name.
pub fn media_type_of(name: &str) -> &'static str {
    let ext = name
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "pdf" => "application/pdf",
        "jpg" | "jpeg" => "image/jpeg",
        "png" => "image/png",
        "tif" | "tiff" => "image/tiff",
        "pgm" | "pbm" | "pnm" => "image/x-portable-anymap",
        "txt" => "text/plain",
        "doc" => "application/msword",
        "docx" => "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        _ => "application/octet-stream",
    }
}

/// Everything `dispatch new` takes from the user.
#[derive(Debug, Clone)]
pub struct DispatchRequest {
    pub ref_no: String,
    pub summary: String,
    pub kind: DispatchKind,
    pub priority: Priority,
    pub to: Vec<String>,
    pub attach: Vec<PathBuf>,
}

/// `dispatch show`: the document plus the assignments that handle it here.
#[derive(Debug, Serialize)]
pub struct DispatchDetail {
    #[serde(flatten)]
    pub dispatch: DispatchView,
    pub assignments: Vec<String>,
    /// Attachment hashes whose content this node does not hold yet (still in transit).
    pub missing_scans: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct ReceiveReport {
    pub id: String,
    pub unit: String,
    /// False when the unit had already recorded its receipt.
    pub recorded: bool,
    /// The receipt book that holds the receipt (`audit` it for who recorded it, and when);
    /// None for a receipt written inside the dispatch, as nodes did before receipt books.
    pub book: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct AttachmentReport {
    pub id: String,
    pub name: String,
    pub hash: String,
    pub size: u64,
    pub out: PathBuf,
}

fn already_there(out: &Path) -> NodeError {
    NodeError::Invalid(format!(
        "--out {}: a file is already there; pass --force to replace it, or name a new file",
        out.display()
    ))
}

fn parse_id(text: &str, kind: DocKind) -> Result<DocId> {
    let id: DocId = text.parse()?;
    if id.kind() != kind {
        return Err(NodeError::Invalid(format!(
            "{id} is a {}, not a {kind}",
            id.kind()
        )));
    }
    Ok(id)
}

impl Node {
    pub fn user_add(&mut self, name: &str, title: Option<&str>) -> Result<User> {
        check_user_name(name)?;
        if let Some(title) = title {
            crate::model::check_text("title", title)?;
        }
        Ok(self.store.write(|tx| tx.add_user(name, title, now_ms()))?)
    }

    pub fn user_list(&self) -> Result<Vec<User>> {
        Ok(self.store.users()?)
    }

    fn check_units(&self, units: &[String]) -> Result<()> {
        for unit in units {
            self.tree.get(unit)?;
        }
        Ok(())
    }

    pub fn dispatch_new(
        &mut self,
        user: Option<&str>,
        req: &DispatchRequest,
    ) -> Result<DispatchView> {
        let author = self.author(user)?;
        self.check_units(&req.to)?;
        let mut to = req.to.clone();
        to.sort();
        to.dedup();
        for path in &req.attach {
            if !path.is_file() {
                return Err(NodeError::Invalid(format!(
                    "attachment {}: no such file",
                    path.display()
                )));
            }
        }
        let id = DocId::generate(DocKind::Dispatch);
        let at_ms = now_ms();
        let actor = self.actor().clone();
        let issuer = self.unit().to_string();
        self.store.write(|tx| {
            let mut attachments = Vec::new();
            for path in &req.attach {
                let BlobInfo { hash, size, .. } = tx.put_blob_file(path, at_ms)?;
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "scan".into());
                attachments.push(Attachment {
                    hash,
                    media_type: media_type_of(&name).to_string(),
                    name,
                    size,
                });
            }
            let new = NewDispatch {
                ref_no: req.ref_no.clone(),
                summary: req.summary.clone(),
                kind: req.kind,
                priority: req.priority,
                issuer,
                to,
                attachments,
            };
            tx.create_doc(&id, &actor, at_ms, |doc| {
                Ok(dispatch::create(doc, &id, &new, &author, at_ms)?)
            })
        })?;
        self.wake_daemon();
        self.dispatch_view(&id)
    }

    /// The dispatch with its receipts, from the document (written there before receipt books)
    /// and from the books this node holds.
    fn dispatch_view(&mut self, id: &DocId) -> Result<DispatchView> {
        let mut view = self.store.read_doc(id, |doc| dispatch::read(doc, id))??;
        for (unit, at_ms, by) in self.store.booked_receipts(id)? {
            // Books name a recipient that moved by its current path (store::index).
            let tree = &self.tree;
            if let Some(r) = view
                .recipients
                .iter_mut()
                .find(|r| tree.canonical(&r.unit) == unit && r.received_at_ms.is_none())
            {
                r.received_at_ms = Some(at_ms);
                r.received_by = Some(by);
            }
        }
        Ok(view)
    }

    pub fn dispatch_list(
        &self,
        filter: DispatchFilter<'_>,
        limit: usize,
    ) -> Result<Vec<DispatchRow>> {
        if let DispatchFilter::Involving(unit) = filter {
            self.tree.get(unit)?;
        }
        Ok(self.store.list_dispatches(filter, limit)?)
    }

    /// The file name a dispatch gives the scan `hash`, for people watching it travel.
    pub fn scan_name(&mut self, hash: &[u8; 32]) -> Result<Option<String>> {
        let Some(doc) = self.store.doc_of_blob(hash)? else {
            return Ok(None);
        };
        let Ok(id) = doc.parse::<DocId>() else {
            return Ok(None);
        };
        let hex = hex::encode(hash);
        Ok(self
            .dispatch_view(&id)
            .ok()
            .and_then(|d| d.attachments.into_iter().find(|a| a.hash == hex))
            .map(|a| a.name))
    }

    /// How many dispatches `filter` matches, however many a list shows.
    pub fn dispatch_count(&self, filter: DispatchFilter<'_>) -> Result<i64> {
        Ok(self.store.count_dispatches(filter)?)
    }

    pub fn dispatch_show(&mut self, id: &str) -> Result<DispatchDetail> {
        let id = parse_id(id, DocKind::Dispatch)?;
        let dispatch = self.dispatch_view(&id)?;
        let mut missing_scans = Vec::new();
        for a in &dispatch.attachments {
            if !self.store.has_blob(&parse_hash(&a.hash)?)? {
                missing_scans.push(a.hash.clone());
            }
        }
        Ok(DispatchDetail {
            assignments: self.store.assignments_of(&id)?,
            missing_scans,
            dispatch,
        })
    }

    /// Records that this node's unit received the dispatch, in the unit's receipt book for the
    /// issuer (model/receipts.rs): the receipt then goes up to the issuer only, not to every
    /// recipient as a change of the dispatch would.
    pub fn dispatch_receive(&mut self, user: Option<&str>, id: &str) -> Result<ReceiveReport> {
        let id = parse_id(id, DocKind::Dispatch)?;
        let author = self.author(user)?;
        let (actor, at_ms, unit) = (self.actor().clone(), now_ms(), self.unit().to_string());
        // A dispatch sent before the province moved this unit names it by its former path.
        let aliases = self.tree.aliases().clone();
        let (recorded, book) = self.store.write(|tx| {
            let rec = tx
                .load_doc(&id)?
                .ok_or_else(|| StoreError::NotFound(format!("dispatch {id}")))?;
            let view = dispatch::read(&rec.doc, &id)?;
            let mine =
                |r: &&dispatch::Recipient| crate::units::canonical(&aliases, &r.unit) == unit;
            let Some(me) = view.recipients.iter().find(mine) else {
                return Err(StoreError::Invalid(format!(
                    "unit {unit} is not a recipient of dispatch {id}"
                )));
            };
            if me.received_at_ms.is_some() {
                return Ok((false, None));
            }
            let year = receipts::year_of(view.created_at_ms);
            let book = receipts::book_id(&view.issuer, &unit, year);
            let key = (view.issuer.as_str(), unit.as_str(), year);
            let record = |doc: &mut automerge::AutoCommit| {
                receipts::record(doc, &book, key, &id, &author, at_ms)
            };
            let recorded = if tx.doc_exists(&book)? {
                tx.update_doc(&book, &actor, at_ms, |doc| Ok(record(doc)?))?
                    .0
            } else {
                let mut recorded = false;
                tx.create_doc(&book, &actor, at_ms, |doc| {
                    recorded = record(doc)?;
                    Ok(())
                })?;
                recorded
            };
            Ok((recorded, Some(book.to_string())))
        })?;
        self.wake_daemon();
        Ok(ReceiveReport {
            id: id.to_string(),
            unit,
            recorded,
            book,
        })
    }

    pub fn dispatch_comment(
        &mut self,
        user: Option<&str>,
        id: &str,
        text: &str,
    ) -> Result<DispatchView> {
        let id = parse_id(id, DocKind::Dispatch)?;
        let author = self.author(user)?;
        let (actor, at_ms) = (self.actor().clone(), now_ms());
        self.store.write(|tx| {
            tx.update_doc(&id, &actor, at_ms, |doc| {
                Ok(dispatch::add_comment(doc, &id, text, &author, at_ms)?)
            })
        })?;
        self.wake_daemon();
        self.dispatch_view(&id)
    }

    /// The attachment of dispatch `id` named `name` (or whose hash starts with `name`), with
    /// its hash; refused if its scan has not arrived here yet.
    fn find_attachment(&mut self, id: &str, name: &str) -> Result<(DocId, Attachment, Hash)> {
        let id = parse_id(id, DocKind::Dispatch)?;
        let view = self.dispatch_view(&id)?;
        let attachment = view
            .attachments
            .iter()
            .find(|a| a.name == name)
            .or_else(|| {
                view.attachments
                    .iter()
                    .find(|a| name.len() >= 8 && a.hash.starts_with(name))
            })
            .ok_or_else(|| {
                let names: Vec<_> = view.attachments.iter().map(|a| a.name.as_str()).collect();
                NodeError::NotFound(format!(
                    "dispatch {id} has no attachment {name:?} (it has: {})",
                    if names.is_empty() {
                        "none".into()
                    } else {
                        names.join(", ")
                    }
                ))
            })?
            .clone();
        let hash = parse_hash(&attachment.hash)?;
        if !self.store.has_blob(&hash)? {
            return Err(NodeError::NotFound(format!(
                "scan {} of dispatch {id} has not arrived on this node yet; run `communesync sync`",
                attachment.name
            )));
        }
        Ok((id, attachment, hash))
    }

    /// Writes an attachment (found by name, or by hash prefix) to `sink` (standard output, for
    /// `--out -`), bit for bit, verified as it goes.
    pub fn dispatch_attachment_to(
        &mut self,
        id: &str,
        name: &str,
        sink: &mut impl Write,
    ) -> Result<AttachmentReport> {
        let (id, attachment, hash) = self.find_attachment(id, name)?;
        let size = self.store.read_blob(&hash, sink)?;
        Ok(AttachmentReport {
            id: id.to_string(),
            name: attachment.name,
            hash: attachment.hash,
            size,
            out: PathBuf::from("-"),
        })
    }

    /// Writes an attachment (found by name, or by hash prefix) to the file `out`, bit for bit,
    /// verified; the file appears whole or not at all. Refused (nothing written): anything at
    /// `out` that is not a regular file (a device, FIFO, symlink or directory), any path inside
    /// this node's data directory, and an existing file unless `replace`.
    pub fn dispatch_attachment(
        &mut self,
        id: &str,
        name: &str,
        out: &Path,
        replace: bool,
    ) -> Result<AttachmentReport> {
        let (id, attachment, hash) = self.find_attachment(id, name)?;
        self.check_output_path(out, replace)?;
        let file_name = out.file_name().expect("checked: names a file");
        let tmp = crate::trust::fsutil::temp_beside(out, file_name, "communesync-partial");
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| NodeError::Io { path, source }
        };
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io(&tmp))?;
        let written = self
            .store
            .read_blob(&hash, &mut file)
            .map_err(NodeError::from)
            .and_then(|size| {
                file.sync_all().map_err(io(&tmp))?;
                if replace {
                    std::fs::rename(&tmp, out).map_err(io(out))?;
                } else {
                    crate::trust::fsutil::rename_no_replace(&tmp, out).map_err(|e| {
                        if e.kind() == std::io::ErrorKind::AlreadyExists {
                            already_there(out)
                        } else {
                            io(out)(e)
                        }
                    })?;
                }
                Ok(size)
            });
        let size = match written {
            Ok(size) => size,
            Err(e) => {
                // Only the temporary file is ours to remove; `out` was never touched.
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        crate::trust::fsutil::sync_dir_io(crate::trust::fsutil::parent_dir(out))
            .map_err(io(out))?;
        Ok(AttachmentReport {
            id: id.to_string(),
            name: attachment.name,
            hash: attachment.hash,
            size,
            out: out.to_path_buf(),
        })
    }

    /// Refuses an output path a command must not write: one inside this node's data directory
    /// (its database, key or scans), anything there that is not a regular file (writing over a
    /// device or FIFO would replace it with a file; a symlink could point anywhere), and an
    /// existing file unless `replace`.
    pub(crate) fn check_output_path(&self, out: &Path, replace: bool) -> Result<()> {
        let refuse = |why: &str| {
            Err(NodeError::Invalid(format!(
                "--out {}: {why}; nothing was written",
                out.display()
            )))
        };
        let Some(file_name) = out.file_name() else {
            return refuse("not a file name");
        };
        let parent = crate::trust::fsutil::parent_dir(out);
        let dir = parent.canonicalize().map_err(|source| NodeError::Io {
            path: parent.to_path_buf(),
            source,
        })?;
        let data = self.dir.canonicalize().map_err(|source| NodeError::Io {
            path: self.dir.clone(),
            source,
        })?;
        if dir.starts_with(&data) {
            return refuse(&format!(
                "inside this node's data directory {}; write it somewhere else",
                data.display()
            ));
        }
        match std::fs::symlink_metadata(dir.join(file_name)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(NodeError::Io {
                path: out.to_path_buf(),
                source,
            }),
            Ok(meta) if meta.file_type().is_file() => {
                if replace {
                    Ok(())
                } else {
                    Err(already_there(out))
                }
            }
            Ok(meta) => {
                let t = meta.file_type();
                let what = if t.is_dir() {
                    "a directory"
                } else if t.is_symlink() {
                    "a symbolic link"
                } else {
                    "a device, FIFO or socket, not a regular file"
                };
                refuse(&format!(
                    "is {what}; name a new file (or `-` for standard output)"
                ))
            }
        }
    }

    pub fn assign_new(
        &mut self,
        user: Option<&str>,
        dispatch_id: &str,
        lead: &str,
        co: &[String],
        deadline: &str,
    ) -> Result<AssignmentView> {
        let dispatch_id = parse_id(dispatch_id, DocKind::Dispatch)?;
        let author = self.author(user)?;
        let deadline = assignment::parse_deadline(deadline)?;
        if !self.store.doc_exists(&dispatch_id)? {
            return Err(StoreError::NotFound(format!("dispatch {dispatch_id}")).into());
        }
        for person in std::iter::once(lead).chain(co.iter().map(String::as_str)) {
            if !self.store.user_exists(person)? {
                return Err(NodeError::UnknownUser(person.to_string()));
            }
        }
        let new = NewAssignment {
            dispatch_id,
            unit: self.unit().to_string(),
            lead: lead.to_string(),
            co: co.to_vec(),
            deadline,
        };
        let id = DocId::generate(DocKind::Assignment);
        let (actor, at_ms) = (self.actor().clone(), now_ms());
        self.store.write(|tx| {
            tx.create_doc(&id, &actor, at_ms, |doc| {
                Ok(assignment::create(doc, &id, &new, &author, at_ms)?)
            })
        })?;
        self.wake_daemon();
        self.assign_show(id.as_str())
    }

    pub fn assign_update(
        &mut self,
        user: Option<&str>,
        id: &str,
        status: Status,
        note: Option<&str>,
    ) -> Result<AssignmentView> {
        let id = parse_id(id, DocKind::Assignment)?;
        let named = self.assign_show(id.as_str())?.unit;
        let author = self.as_named(self.author(user)?, &named);
        let (actor, at_ms) = (self.actor().clone(), now_ms());
        self.store.write(|tx| {
            tx.update_doc(&id, &actor, at_ms, |doc| {
                Ok(assignment::update_status(
                    doc, &id, status, note, &author, at_ms,
                )?)
            })
        })?;
        self.wake_daemon();
        self.assign_show(id.as_str())
    }

    pub fn assign_show(&mut self, id: &str) -> Result<AssignmentView> {
        let id = parse_id(id, DocKind::Assignment)?;
        Ok(self
            .store
            .read_doc(&id, |doc| assignment::read(doc, &id))??)
    }

    pub fn assign_list(
        &self,
        overdue: bool,
        lead: Option<&str>,
        limit: usize,
    ) -> Result<Vec<AssignmentRow>> {
        let today = overdue.then(|| self.today().to_string());
        Ok(self.store.list_assignments(today.as_deref(), lead, limit)?)
    }

    /// How many assignments `assign_list` with the same filters finds in all.
    pub fn assign_count(&self, overdue: bool, lead: Option<&str>) -> Result<i64> {
        let today = overdue.then(|| self.today().to_string());
        Ok(self.store.count_assignments(today.as_deref(), lead)?)
    }

    pub fn dossier_new(
        &mut self,
        user: Option<&str>,
        applicant: &str,
        procedure: &str,
    ) -> Result<DossierView> {
        let author = self.author(user)?;
        let id = DocId::generate(DocKind::Dossier);
        let (actor, at_ms) = (self.actor().clone(), now_ms());
        self.store.write(|tx| {
            tx.create_doc(&id, &actor, at_ms, |doc| {
                Ok(dossier::create(
                    doc, &id, applicant, procedure, &author, at_ms,
                )?)
            })
        })?;
        self.wake_daemon();
        self.dossier_track(id.as_str())
    }

    pub fn dossier_advance(
        &mut self,
        user: Option<&str>,
        id: &str,
        step: &str,
        to_unit: Option<&str>,
    ) -> Result<DossierView> {
        let id = parse_id(id, DocKind::Dossier)?;
        let named = self.dossier_track(id.as_str())?.holder;
        let author = self.as_named(self.author(user)?, &named);
        if let Some(unit) = to_unit {
            self.tree.get(unit)?;
        }
        let (actor, at_ms) = (self.actor().clone(), now_ms());
        self.store.write(|tx| {
            tx.update_doc(&id, &actor, at_ms, |doc| {
                Ok(dossier::advance(doc, &id, step, to_unit, &author, at_ms)?)
            })
        })?;
        self.wake_daemon();
        self.dossier_track(id.as_str())
    }

    /// `author`, writing under `named` when that is a former path of this node's unit: a
    /// unit the province moved changes a document that names it by its old path under that
    /// path, so the change and the document agree for every node that judges it
    /// (model/authz.rs compares paths as written).
    fn as_named(&self, mut author: crate::model::Author, named: &str) -> crate::model::Author {
        if named != author.unit && self.tree.canonical(named) == self.unit() {
            author.unit = named.to_string();
        }
        author
    }

    pub fn dossier_track(&mut self, id: &str) -> Result<DossierView> {
        let id = parse_id(id, DocKind::Dossier)?;
        Ok(self.store.read_doc(&id, |doc| dossier::read(doc, &id))??)
    }

    pub fn dossier_list(&self, limit: usize) -> Result<Vec<DossierRow>> {
        Ok(self.store.list_dossiers(limit)?)
    }

    pub fn dossier_count(&self) -> Result<i64> {
        Ok(self.store.count_dossiers()?)
    }
}

/// What `check` found.
#[derive(Debug, Serialize)]
pub struct CheckReport {
    pub database: Vec<String>,
    pub documents: u64,
    pub scans: u64,
    pub problems: Vec<String>,
    /// Files in `blobs/` no scan names (not damage: left by a crash mid-write).
    pub unreferenced_scan_files: Vec<UnreferencedFile>,
    /// Temporary files in `blobs/` of local scan writes whose process is gone (killed).
    pub stale_scan_writes: Vec<UnreferencedFile>,
}

#[derive(Debug, Serialize)]
pub struct UnreferencedFile {
    pub path: PathBuf,
    pub bytes: u64,
}

impl Node {
    /// Verifies the database file, that every document loads to its recorded heads and that
    /// every scan matches its hash, and lists scan files nothing names. Reads only; one
    /// document or chunk in memory at a time.
    pub fn check(&mut self, full: bool) -> Result<CheckReport> {
        let database = self.store.integrity_check(full)?;
        let mut problems: Vec<String> = database
            .iter()
            .filter(|l| l.as_str() != "ok")
            .cloned()
            .collect();
        let (mut documents, mut scans) = (0u64, 0u64);
        let mut after = String::new();
        loop {
            let ids = self.store.doc_ids_after(&after, 500)?;
            let Some(last) = ids.last().cloned() else {
                break;
            };
            for id in ids {
                documents += 1;
                let loaded = id
                    .parse::<DocId>()
                    .map_err(NodeError::from)
                    .and_then(|doc_id| {
                        self.store
                            .read_doc(&doc_id, |doc| crate::model::parties(doc, &doc_id))?
                            .map_err(NodeError::from)
                    });
                if let Err(e) = loaded {
                    problems.push(format!("document {id}: {e}"));
                }
            }
            after = last;
        }
        // An unreachable bucket is one problem, not one per scan after each one's retries.
        let bucket_answers = match self.store.scans() {
            crate::store::scanstore::ScanStore::S3(s3) => {
                s3.probe().map_err(|e| problems.push(e.to_string())).is_ok()
            }
            crate::store::scanstore::ScanStore::Local => true,
        };
        let mut after_hash = Vec::new();
        loop {
            let hashes = match bucket_answers {
                true => self.store.blob_hashes_after(&after_hash, 100)?,
                false => Vec::new(),
            };
            let Some(last) = hashes.last().cloned() else {
                break;
            };
            for hash in hashes {
                scans += 1;
                let Ok(fixed) = <[u8; 32]>::try_from(hash.as_slice()) else {
                    problems.push(format!("scan row with a {}-byte hash", hash.len()));
                    continue;
                };
                if let Err(e) = self.store.read_blob(&fixed, &mut std::io::sink()) {
                    problems.push(e.to_string());
                }
            }
            after_hash = last;
        }
        let listed = |files: Vec<(PathBuf, u64)>| {
            files
                .into_iter()
                .map(|(path, bytes)| UnreferencedFile { path, bytes })
                .collect()
        };
        Ok(CheckReport {
            database,
            documents,
            scans,
            problems,
            unreferenced_scan_files: listed(self.store.unreferenced_scan_files()?),
            stale_scan_writes: listed(self.store.stale_scan_writes()?),
        })
    }

    /// A consistent copy of the database, taken while the node runs.
    pub fn backup(&self, out: &Path) -> Result<()> {
        Ok(self.store.backup_to(out)?)
    }
}
