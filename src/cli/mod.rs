//! The command line: clap definitions, one handler per subcommand, output and exit codes.
//!
//! Handlers call [`crate::node`] and print; they hold no logic a test would need to reach.

mod demo;
pub use demo::synthetic_scan;
mod output;
pub use output::safe;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::model::assignment::Status;
use crate::model::dispatch::{DispatchKind, Priority};
use crate::node::{DispatchRequest, Node, NodeError};
use crate::store::index::DispatchFilter;
use crate::units::Role;
use output::Out;

/// Exit codes scripts can rely on (docs/operations.md lists them).
pub mod exit {
    pub const OK: u8 = 0;
    /// Something failed while running (I/O, database, network).
    pub const FAILURE: u8 = 1;
    /// The command line or an input value is wrong.
    pub const USAGE: u8 = 2;
    /// A named object (document, user, scan, peer) does not exist.
    pub const NOT_FOUND: u8 = 3;
    /// The node is missing, already exists, or its config is invalid.
    pub const NODE: u8 = 4;
    /// The peer is unreachable, refused us, or the session broke off.
    pub const PEER: u8 = 5;
    /// `sync` ran to its end but something is still pending (a scan withheld by a scans window,
    /// or held by neither side yet): the summary and `--json` say what and why.
    pub const PENDING: u8 = 6;
    /// `status` found something that needs attention (a unit silent or never seen, errors,
    /// refused documents, an old backlog, an expiring certificate, a full disk): each listed.
    pub const ATTENTION: u8 = 7;
}

#[derive(Debug, Parser)]
#[command(
    name = "communesync",
    version,
    about = "Offline-first sync node for commune, district and province offices",
    max_term_width = 100
)]
pub struct Cli {
    /// Node data directory [default: the per-user data directory]
    #[arg(long, global = true, env = "COMMUNESYNC_DATA", value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Machine-readable JSON output
    #[arg(long, global = true)]
    pub json: bool,
    /// Who acts [default: node.default_user from the config]
    #[arg(long = "as", global = true, value_name = "USER")]
    pub as_user: Option<String>,
    /// More log output (repeat for more); logs go to stderr
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a node: data directory, database, key pair and config
    Init {
        /// Unit path, e.g. qn/binhlieu/tinhhuc
        #[arg(long)]
        unit: String,
        #[arg(long)]
        role: Role,
        /// First user account, who becomes the default acting user
        #[arg(long, default_value = "admin")]
        user: String,
        /// Unit tree to use (a TOML file of [[unit]] path/name/role) instead of the embedded
        /// Quảng Ninh sample; it is copied into the data directory
        #[arg(long, value_name = "FILE")]
        units_file: Option<PathBuf>,
    },
    /// User accounts of this unit
    #[command(subcommand)]
    User(UserCmd),
    /// Official documents: create, list, show, receive, comment, get scans
    #[command(subcommand)]
    Dispatch(DispatchCmd),
    /// Assignments of a dispatch to a lead and co-handlers, with deadline and status
    #[command(subcommand)]
    Assign(AssignCmd),
    /// Citizens' dossiers moving between units
    #[command(subcommand)]
    Dossier(DossierCmd),
    /// Every change to a document, oldest first: who, when, from which node, what
    Audit { id: String },
    /// The unit tree this node knows
    #[command(subcommand)]
    Unit(UnitCmd),
    /// The provincial certificate authority (province node only)
    #[command(subcommand)]
    Ca(CaCmd),
    /// Enrol this node with the provincial CA
    #[command(subcommand)]
    Enrol(EnrolCmd),
    /// Peers this node syncs with
    #[command(subcommand)]
    Peer(PeerCmd),
    /// Run the node as a daemon: accept enrolled peers, keep syncing with the upstream
    Serve {
        /// Address to listen on [default: sync.listen from the config]
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Serve the read-only status page (/) and /metrics on ADDR [default: http.listen from
        /// the config; 127.0.0.1:8377 on districts and the province, none on communes]
        #[arg(long, value_name = "ADDR")]
        http: Option<std::net::SocketAddr>,
    },
    /// One full sync round with a peer, both directions, documents then scans
    Sync {
        /// Peer name [default: sync.upstream, or the only peer]
        #[arg(long)]
        peer: Option<String>,
    },
    /// This node and each peer: last sync, what is pending in each direction; every unit below
    /// it, connected or when last seen. Exits 7 when something needs attention
    Status(StatusArgs),
    /// Verify the database, every document and every scan (reads only)
    Check {
        /// SQLite's full integrity check instead of the quick one
        #[arg(long)]
        full: bool,
    },
    /// Write a consistent copy of the database while the node runs
    Backup {
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Put a backup (FILE from `backup --out FILE`, its blobs/ beside it) in place of the
    /// node's database; the current one is kept as node.db.before-restore-TIME. Stop `serve`
    /// first
    Restore { file: PathBuf },
    /// Sync without a link: a signed file carried on a USB stick
    #[command(subcommand)]
    Bundle(BundleCmd),
    /// Demonstration on loopback: a province, a district relay and two communes exchange a
    /// dispatch with a scan, an assignment and its completion
    Demo {
        /// Keep the demonstration's data directories instead of deleting them
        #[arg(long)]
        keep: bool,
        /// Only one commune office, offline: a dispatch through receipt, assignment and completion
        #[arg(long)]
        local: bool,
    },
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Only UNIT and the units below it
    #[arg(long, value_name = "UNIT")]
    pub unit: Option<String>,
    /// Only units not connected and not heard from for DURATION (90s, 15m, 2h, 3d) or never;
    /// also the silence that counts as a problem [default: 1h]
    #[arg(long, value_name = "DURATION", value_parser = crate::node::health::parse_duration)]
    pub stale: Option<std::time::Duration>,
    /// Only units with a problem
    #[arg(long)]
    pub problems: bool,
}

#[derive(Debug, Subcommand)]
pub enum CaCmd {
    /// Create the provincial CA and enrol this province node with it
    Init,
    /// Sign an enrolment request; the province decides the unit and role
    Issue {
        /// Request file written by `enrol request` on the node
        request: PathBuf,
        #[arg(long)]
        unit: String,
        #[arg(long)]
        role: Role,
        /// Where to write the certificate bundle to carry back to the node
        #[arg(long, value_name = "CERT")]
        out: PathBuf,
    },
    /// Revoke a node; the revocation reaches every node by sync
    Revoke { node_id: String },
    /// Certificates issued so far
    List,
}

#[derive(Debug, Subcommand)]
pub enum EnrolCmd {
    /// Write an enrolment request for this node's key
    Request {
        #[arg(long, value_name = "REQ")]
        out: PathBuf,
    },
    /// Install the certificate bundle written by `ca issue`
    Install { cert: PathBuf },
}

#[derive(Debug, Subcommand)]
pub enum BundleCmd {
    /// Write what a peer lacks (as far as this node knows) into one signed, compressed file
    Export {
        /// Peer name (one that has synced with this node) or unit path
        #[arg(long = "for", value_name = "PEER")]
        for_peer: String,
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Apply a bundle with the same checks as the wire; importing it twice changes nothing
    Import { file: PathBuf },
}

#[derive(Debug, Subcommand)]
pub enum PeerCmd {
    /// Add a peer by name and address
    Add {
        name: String,
        #[arg(long, value_name = "HOST:PORT")]
        addr: String,
        /// This is the node's upstream (its district, or the province): `serve` keeps syncing with it
        #[arg(long)]
        upstream: bool,
    },
    /// List configured peers
    List,
    /// Remove a peer
    Remove { name: String },
}

#[derive(Debug, Subcommand)]
pub enum UserCmd {
    /// Add a user account
    Add {
        name: String,
        #[arg(long)]
        title: Option<String>,
    },
    /// List user accounts
    List,
}

#[derive(Debug, Subcommand)]
pub enum DispatchCmd {
    /// Issue a dispatch from this unit (durable before the command returns)
    New(NewDispatchArgs),
    /// List dispatches held by this node, newest first
    List {
        /// Only dispatches addressed to this unit
        #[arg(long, conflicts_with_all = ["outbox", "unit"])]
        inbox: bool,
        /// Only dispatches issued by this unit
        #[arg(long, conflicts_with = "unit")]
        outbox: bool,
        /// Only dispatches issued by or addressed to UNIT
        #[arg(long, value_name = "UNIT")]
        unit: Option<String>,
        /// At most this many rows
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Show one dispatch: recipients and receipts, scans, comments, assignments, conflicts
    Show { id: String },
    /// Record that this unit received the dispatch (who and when)
    Receive { id: String },
    /// Add a comment
    Comment { id: String, text: String },
    /// Write an attached scan back to a file, bit for bit (verified)
    Attachment {
        id: String,
        /// Attachment file name (or a hash prefix of at least 8 digits)
        name: String,
        /// A new file outside the node's data directory, or `-` for standard output
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Replace FILE if it is an existing regular file
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Args)]
pub struct NewDispatchArgs {
    /// Reference number, e.g. 123/UBND-VP
    #[arg(long = "ref", value_name = "REF")]
    pub ref_no: String,
    /// Summary (subject line)
    #[arg(long)]
    pub summary: String,
    #[arg(long, default_value = "dispatch")]
    pub kind: DispatchKind,
    /// Recipient unit paths
    #[arg(long, num_args = 1.., required = true, value_name = "UNIT")]
    pub to: Vec<String>,
    #[arg(long, default_value = "normal")]
    pub priority: Priority,
    /// Scans to attach
    #[arg(long, num_args = 1.., value_name = "FILE")]
    pub attach: Vec<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum AssignCmd {
    /// Assign a dispatch to a lead (and co-handlers) with a deadline
    New {
        dispatch_id: String,
        #[arg(long)]
        lead: String,
        #[arg(long = "co", num_args = 1.., value_name = "USER")]
        co: Vec<String>,
        /// YYYY-MM-DD
        #[arg(long)]
        deadline: String,
    },
    /// Move an assignment to a new status (the history keeps every transition)
    Update {
        id: String,
        #[arg(long)]
        status: Status,
        #[arg(long)]
        note: Option<String>,
    },
    /// List assignments, earliest deadline first
    List {
        /// Only those past their deadline and not done
        #[arg(long)]
        overdue: bool,
        #[arg(long, value_name = "USER")]
        lead: Option<String>,
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Show one assignment with its whole status history
    Show { id: String },
}

#[derive(Debug, Subcommand)]
pub enum DossierCmd {
    /// Open a dossier for a citizen's application
    New {
        #[arg(long)]
        applicant: String,
        #[arg(long)]
        procedure: String,
    },
    /// Move a dossier to its next step, optionally handing it to another unit
    Advance {
        id: String,
        #[arg(long)]
        step: String,
        #[arg(long, value_name = "UNIT")]
        to_unit: Option<String>,
    },
    /// Which step a dossier is at, since when, who holds it, and its route so far
    Track { id: String },
    /// List dossiers, most recently moved first
    List {
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
}

#[derive(Debug, Subcommand)]
pub enum UnitCmd {
    /// List the units of the tree (optionally only below UNIT)
    List { under: Option<String> },
    /// Province only: sign FILE (a TOML file of [[unit]] path/name/role) with the CA as the next
    /// version of the unit tree and use it; every node gets it at its next sync
    #[command(after_help = "Example: communesync unit publish units-2027.toml")]
    Publish {
        /// The new unit tree: every unit of the current one still enrolled must be in it
        file: PathBuf,
    },
}

/// The data directory: --data, then COMMUNESYNC_DATA (both via clap), then the per-user default.
fn data_dir(cli: &Cli) -> Result<PathBuf> {
    if let Some(dir) = &cli.data {
        return Ok(dir.clone());
    }
    directories::ProjectDirs::from("", "", "communesync")
        .map(|d| d.data_dir().to_path_buf())
        .context("no home directory to hold the default data directory; pass --data DIR")
}

fn open(cli: &Cli) -> Result<Node> {
    let dir = data_dir(cli)?;
    Ok(Node::open(&dir)?)
}

/// Runs one command; the error carries everything the user needs to see.
pub fn run(cli: Cli) -> Result<()> {
    let out = Out::new(cli.json);
    let user = cli.as_user.as_deref();
    match &cli.command {
        Command::Init {
            unit,
            role,
            user,
            units_file,
        } => {
            let report =
                Node::init_with_tree(&data_dir(&cli)?, unit, *role, user, units_file.as_deref())?;
            out.init(&report)
        }
        Command::User(UserCmd::Add { name, title }) => {
            out.user(&open(&cli)?.user_add(name, title.as_deref())?)
        }
        Command::User(UserCmd::List) => out.users(&open(&cli)?.user_list()?),
        Command::Dispatch(cmd) => {
            let mut node = open(&cli)?;
            match cmd {
                DispatchCmd::New(a) => {
                    let req = DispatchRequest {
                        ref_no: a.ref_no.clone(),
                        summary: a.summary.clone(),
                        kind: a.kind,
                        priority: a.priority,
                        to: a.to.clone(),
                        attach: a.attach.clone(),
                    };
                    out.dispatch(&node.dispatch_new(user, &req)?, &node)
                }
                DispatchCmd::List {
                    inbox,
                    outbox,
                    unit,
                    limit,
                } => {
                    let own = node.unit().to_string();
                    let filter = match (inbox, outbox, unit) {
                        (true, _, _) => DispatchFilter::Inbox(&own),
                        (_, true, _) => DispatchFilter::Outbox(&own),
                        (_, _, Some(u)) => DispatchFilter::Involving(u),
                        _ => DispatchFilter::All,
                    };
                    out.dispatch_rows(&node.dispatch_list(filter, *limit)?, &node)
                }
                DispatchCmd::Show { id } => {
                    let detail = node.dispatch_show(id)?;
                    out.dispatch_detail(&detail, &node)
                }
                DispatchCmd::Receive { id } => out.receipt(&node.dispatch_receive(user, id)?),
                DispatchCmd::Comment { id, text } => {
                    out.dispatch(&node.dispatch_comment(user, id, text)?, &node)
                }
                DispatchCmd::Attachment {
                    id,
                    name,
                    out: file,
                    force,
                } => {
                    if file.as_os_str() == "-" {
                        // The scan's bytes are the output: no report after them.
                        let mut stdout = std::io::BufWriter::new(std::io::stdout().lock());
                        node.dispatch_attachment_to(id, name, &mut stdout)?;
                        std::io::Write::flush(&mut stdout).context("writing to standard output")?;
                        Ok(())
                    } else {
                        out.attachment(&node.dispatch_attachment(id, name, file, *force)?)
                    }
                }
            }
        }
        Command::Assign(cmd) => {
            let mut node = open(&cli)?;
            match cmd {
                AssignCmd::New {
                    dispatch_id,
                    lead,
                    co,
                    deadline,
                } => out.assignment(
                    &node.assign_new(user, dispatch_id, lead, co, deadline)?,
                    &node,
                ),
                AssignCmd::Update { id, status, note } => out.assignment(
                    &node.assign_update(user, id, *status, note.as_deref())?,
                    &node,
                ),
                AssignCmd::List {
                    overdue,
                    lead,
                    limit,
                } => out.assignment_rows(&node.assign_list(*overdue, lead.as_deref(), *limit)?),
                AssignCmd::Show { id } => out.assignment(&node.assign_show(id)?, &node),
            }
        }
        Command::Dossier(cmd) => {
            let mut node = open(&cli)?;
            match cmd {
                DossierCmd::New {
                    applicant,
                    procedure,
                } => out.dossier(&node.dossier_new(user, applicant, procedure)?, &node),
                DossierCmd::Advance { id, step, to_unit } => out.dossier(
                    &node.dossier_advance(user, id, step, to_unit.as_deref())?,
                    &node,
                ),
                DossierCmd::Track { id } => out.dossier(&node.dossier_track(id)?, &node),
                DossierCmd::List { limit } => out.dossier_rows(&node.dossier_list(*limit)?, &node),
            }
        }
        Command::Audit { id } => {
            let mut node = open(&cli)?;
            out.audit(&node.audit(id)?, &node)
        }
        Command::Unit(UnitCmd::List { under }) => {
            let node = open(&cli)?;
            if let Some(u) = under {
                // Through NodeError, so that exit_code maps an unknown unit to USAGE.
                node.tree.get(u).map_err(NodeError::from)?;
            }
            let units: Vec<_> = node
                .tree
                .iter()
                .filter(|u| {
                    under
                        .as_deref()
                        .is_none_or(|a| crate::units::is_within(&u.path, a))
                })
                .collect();
            out.units(&units, node.units_version())
        }
        Command::Ca(cmd) => {
            let mut node = open(&cli)?;
            match cmd {
                CaCmd::Init => out.enrolled(&node.ca_init()?),
                CaCmd::Issue {
                    request,
                    unit,
                    role,
                    out: file,
                } => out.issued(&node.ca_issue(request, unit, *role, file)?),
                CaCmd::Revoke { node_id } => out.revoked(node_id, node.ca_revoke(node_id)?),
                CaCmd::List => out.issued_list(&node.ca_list()?),
            }
        }
        Command::Unit(UnitCmd::Publish { file }) => {
            let mut node = open(&cli)?;
            let signed = node.units_publish(file)?;
            node.wake_daemon();
            out.units_published(signed.version, node.tree.iter().count())
        }
        Command::Enrol(EnrolCmd::Request { out: file }) => {
            let node = open(&cli)?;
            let id = node.enrol_request(file)?;
            out.request_written(&id, file)
        }
        Command::Enrol(EnrolCmd::Install { cert }) => {
            out.enrolled(&open(&cli)?.enrol_install(cert)?)
        }
        Command::Peer(PeerCmd::Add {
            name,
            addr,
            upstream,
        }) => out.peers(&[open(&cli)?.peer_add(name, addr, *upstream)?]),
        Command::Peer(PeerCmd::List) => out.peers(&open(&cli)?.peer_list()?),
        Command::Peer(PeerCmd::Remove { name }) => {
            open(&cli)?.peer_remove(name)?;
            out.removed(name)
        }
        Command::Bundle(BundleCmd::Export {
            for_peer,
            out: file,
        }) => out.exported(&open(&cli)?.bundle_export(for_peer, file)?),
        Command::Bundle(BundleCmd::Import { file }) => {
            let report = open(&cli)?.bundle_import(file)?;
            out.imported(&report)?;
            match report.docs_refused.first() {
                // What passed is stored; the refusals make the import a failure for scripts.
                Some((_, why)) => Err(NodeError::Invalid(format!(
                    "bundle refused in part: {} document(s) not stored; the first: {why}",
                    report.docs_refused.len()
                ))
                .into()),
                None => Ok(()),
            }
        }
        Command::Check { full } => {
            let report = open(&cli)?.check(*full)?;
            out.check(&report)?;
            if !report.problems.is_empty() {
                anyhow::bail!("{} problem(s) found; restore the damaged data from a backup (docs/operations.md)", report.problems.len());
            }
            Ok(())
        }
        Command::Backup { out: file } => {
            open(&cli)?.backup(file)?;
            out.backed_up(file)
        }
        Command::Restore { file } => {
            out.restored(&crate::node::restore::restore(&data_dir(&cli)?, file)?)
        }
        Command::Status(args) => {
            let node = open(&cli)?;
            let filter = crate::node::health::Filter {
                unit: args.unit.clone(),
                stale: args.stale,
                problems_only: args.problems,
            };
            let status = node.status_filtered(&filter)?;
            out.status(&status, &node)?;
            match status.health.attention {
                0 => Ok(()),
                n => Err(Attention(n).into()),
            }
        }
        Command::Sync { peer } => {
            let dir = data_dir(&cli)?;
            let progress = out.spinner("syncing");
            let report = runtime()?.block_on(crate::node::sync::sync_once(&dir, peer.as_deref()));
            if let Some(p) = progress {
                p.finish_and_clear();
            }
            let report = report?;
            out.sync_report(&report)?;
            if report.converged {
                Ok(())
            } else {
                Err(Pending.into())
            }
        }
        Command::Serve { listen, http } => {
            let dir = data_dir(&cli)?;
            let page = match http {
                Some(addr) => Some((*addr, true)),
                None => open(&cli)?.config.http_listen().map(|a| (a, false)),
            };
            runtime()?.block_on(async {
                let (stop, shutdown) = tokio::sync::watch::channel(false);
                tokio::spawn(async move {
                    wait_for_signal().await;
                    let _ = stop.send(true);
                });
                let counters = crate::node::health::Counters::default();
                let start_page = {
                    let (dir, counters, shutdown) =
                        (dir.clone(), counters.clone(), shutdown.clone());
                    move || -> Result<()> {
                        let Some((addr, asked)) = page else {
                            return Ok(());
                        };
                        match crate::http::bind(addr) {
                            Ok(listener) => {
                                tokio::spawn(crate::http::serve(listener, dir, counters, shutdown));
                                Ok(())
                            }
                            // Asked for on the command line: failing to serve it is an error.
                            Err(e) if asked => Err(e.into()),
                            // From the config or the default: sync matters more than the page.
                            Err(e) => {
                                tracing::warn!("{e}");
                                Ok(())
                            }
                        }
                    }
                };
                crate::node::sync::serve_counted(&dir, *listen, shutdown, counters, start_page)
                    .await
            })
        }
        Command::Demo { keep, local: true } => demo::run_local(*keep, &out),
        Command::Demo { keep, local: false } => demo::run_tree(*keep, &out),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// SIGINT or SIGTERM: stop accepting, finish in-flight writes, exit.
async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// A sync that ended with something left behind (exit 6); the summary already said what.
#[derive(Debug, thiserror::Error)]
#[error("not converged: scans pending or documents refused (see the summary); sync again later")]
pub struct Pending;

/// `status` listed problems (exit 7); the listing already said which.
#[derive(Debug, thiserror::Error)]
#[error("{0} unit(s) or link(s) need attention (see the problems listed)")]
pub struct Attention(pub usize);

/// Maps an error to the exit code documented in [`exit`].
pub fn exit_code(err: &anyhow::Error) -> u8 {
    if err.downcast_ref::<Pending>().is_some() {
        return exit::PENDING;
    }
    if err.downcast_ref::<Attention>().is_some() {
        return exit::ATTENTION;
    }
    match err.downcast_ref::<NodeError>() {
        Some(e) if e.is_not_found() => exit::NOT_FOUND,
        Some(
            NodeError::NotInitialised(_) | NodeError::AlreadyInitialised(_) | NodeError::Config(_),
        ) => exit::NODE,
        Some(
            NodeError::Invalid(_)
            | NodeError::Model(_)
            | NodeError::Unit(_)
            | NodeError::UnknownUser(_)
            | NodeError::NoUser,
        ) => exit::USAGE,
        Some(NodeError::Store(
            crate::store::StoreError::Invalid(_) | crate::store::StoreError::Model(_),
        )) => exit::USAGE,
        Some(NodeError::Store(crate::store::StoreError::Missing(_))) => exit::NODE,
        None => match err.downcast_ref::<crate::net::NetError>() {
            Some(crate::net::NetError::Setup(_) | crate::net::NetError::Node(_)) => exit::FAILURE,
            Some(_) => exit::PEER,
            None => exit::FAILURE,
        },
        _ => exit::FAILURE,
    }
}

#[cfg(test)]
mod tests {
    use super::exit::*;

    /// Issue 13: the exit codes scripts rely on are the ones docs/operations.md and the README
    /// list, in order.
    #[test]
    fn issue13_the_documented_exit_codes_are_the_ones_used() {
        let ops = include_str!("../../docs/operations.md");
        let table = ops
            .split("### Exit codes")
            .nth(1)
            .expect("an exit code table");
        let codes: Vec<u8> = table
            .lines()
            .skip_while(|l| !l.starts_with("| code"))
            .skip(2)
            .take_while(|l| l.starts_with("| "))
            .map(|l| l[2..].split(' ').next().unwrap().parse().unwrap())
            .collect();
        let used = [
            OK, FAILURE, USAGE, NOT_FOUND, NODE, PEER, PENDING, ATTENTION,
        ];
        assert_eq!(codes, used);
        let readme = include_str!("../../README.md");
        let listed = readme
            .split("Exit codes:")
            .nth(1)
            .expect("README lists exit codes");
        let listed = &listed[..listed.find("\n\n").unwrap_or(listed.len())];
        for code in used {
            assert!(
                listed.contains(&format!("{code} ")),
                "README omits exit code {code}"
            );
        }
    }
}
