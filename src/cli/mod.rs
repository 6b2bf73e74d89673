//! The command line: clap definitions, one handler per subcommand, output and exit codes.
//!
//! Handlers call [`crate::node`] and print; they hold no logic a test would need to reach.

mod demo;
pub use demo::synthetic_scan;
mod output;
pub use output::safe;
pub mod progress;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Args, CommandFactory, Parser, Subcommand};

use crate::model::assignment::Status;
use crate::model::dispatch::{DispatchKind, Priority};
use crate::node::bundle::BundleProgress;
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

/// A text argument as typed, normalized to Unicode NFC: Vietnamese typed in decomposed form
/// (NFD, as some keyboards and copied text do) is stored and matched like the precomposed form.
pub fn nfc(text: &str) -> std::result::Result<String, std::convert::Infallible> {
    use unicode_normalization::UnicodeNormalization;
    Ok(text.nfc().collect())
}

/// A parser accepting exactly `names` (listed in `--help` and completions), each parsed by
/// `T`'s own `FromStr`.
fn one_of<T>(names: Vec<&'static str>) -> impl clap::builder::TypedValueParser<Value = T>
where
    T: std::str::FromStr + Clone + Send + Sync + 'static,
    T::Err: std::error::Error + Send + Sync + 'static,
{
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(names).try_map(|s| s.parse::<T>())
}

fn roles() -> impl clap::builder::TypedValueParser<Value = Role> {
    one_of(vec!["commune", "district", "province"])
}

#[derive(Debug, Parser)]
#[command(
    name = "communesync",
    version,
    about = "Offline-first sync node for commune, district and province offices",
    long_about = "Offline-first sync node for commune, district and province offices: dispatches with \
                  their scans, assignments and dossiers, stored locally and synced along the unit \
                  tree over QUIC, or carried in signed bundles.",
    after_help = "Example:\n  communesync --data /var/lib/communesync status\n\n\
                  Exit codes: 0 success; 1 failure while running; 2 bad command line or input; 3 a named \
                  document, user, scan or peer does not exist; 4 no node here, a node already here, or \
                  an invalid config; 5 the peer is unreachable, refused, went silent, or `serve` cannot \
                  bind its address; 6 `sync` ran to its end with something still pending.",
    max_term_width = 100
)]
pub struct Cli {
    /// Node data directory [default: the per-user data directory]
    #[arg(long, global = true, env = "COMMUNESYNC_DATA", value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Machine-readable JSON output on stdout (no progress bars)
    #[arg(long, global = true)]
    pub json: bool,
    /// Who acts [default: node.default_user from the config]
    #[arg(long = "as", global = true, value_name = "USER", value_parser = nfc)]
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
    #[command(
        after_help = "Example:\n  communesync --data /var/lib/communesync init --unit qn/binhlieu/tinhhuc --role commune"
    )]
    Init {
        /// Unit path, e.g. qn/binhlieu/tinhhuc (must be in the unit tree)
        #[arg(long, value_name = "UNIT")]
        unit: String,
        /// Role of the unit in the tree; fixed for the life of the node
        #[arg(long, value_parser = roles())]
        role: Role,
        /// First user account, who becomes the default acting user
        #[arg(long, default_value = "admin", value_name = "USER", value_parser = nfc)]
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
    #[command(after_help = "Example:\n  communesync audit asg_3f9a0c1b2d4e5f60")]
    Audit {
        /// Document id (dsp_..., asg_... or dos_...)
        #[arg(value_name = "ID")]
        id: String,
    },
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
    #[command(
        after_help = "Tells systemd it is ready (Type=notify, $NOTIFY_SOCKET) once its address is bound; \
                      config/communesync.service is the unit to install.\n\n\
                      Example:\n  communesync --data /var/lib/communesync serve --listen 0.0.0.0:7410"
    )]
    Serve {
        /// UDP address to listen on [default: sync.listen from the config]
        #[arg(long, value_name = "ADDR:PORT")]
        listen: Option<std::net::SocketAddr>,
        /// Serve the read-only status page (/) and /metrics on ADDR [default: http.listen from
        /// the config; 127.0.0.1:8377 on districts and the province, none on communes]
        #[arg(long, value_name = "ADDR")]
        http: Option<std::net::SocketAddr>,
    },
    /// One full sync round with a peer, both directions, documents then scans
    #[command(
        after_help = "Exit 0 when converged, 5 when the peer cannot be reached, 6 when something is still \
                      pending. On a terminal, a bar per scan shows its name, bytes, rate and time left.\n\n\
                      Example:\n  communesync sync --peer district"
    )]
    Sync {
        /// Peer name [default: sync.upstream, or the only peer]
        #[arg(long, value_name = "NAME")]
        peer: Option<String>,
    },
    /// This node and each peer: last sync, what is pending in each direction; every unit below
    /// it, connected or when last seen. Exits 7 when something needs attention
    #[command(after_help = "Example:\n  communesync --json status --problems")]
    Status(StatusArgs),
    /// Verify the config's names, the database, every document and every scan (reads only)
    #[command(after_help = "Example:\n  communesync check --full")]
    Check {
        /// SQLite's full integrity check instead of the quick one
        #[arg(long)]
        full: bool,
    },
    /// Write a consistent copy of the database while the node runs
    #[command(
        after_help = "Example:\n  communesync backup --out /var/backups/communesync/node-2026-11-26.db"
    )]
    Backup {
        /// A new file for the copy (the scans go to blobs/ beside it)
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Put a backup (FILE from `backup --out FILE`, its blobs/ beside it) in place of the
    /// node's database; the current one is kept as node.db.before-restore-TIME. Stop `serve`
    /// first
    #[command(
        after_help = "Example:\n  communesync restore /var/backups/communesync/node-2026-11-26.db"
    )]
    Restore {
        /// The database file `backup --out FILE` wrote
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Sync without a link: a signed file carried on a USB stick
    #[command(subcommand)]
    Bundle(BundleCmd),
    /// Where the scans' bytes are kept
    #[command(subcommand)]
    Scans(ScansCmd),
    /// Demonstration on loopback: a province, a district relay and two communes exchange a
    /// dispatch with a scan, an assignment and its completion
    #[command(after_help = "Example:\n  communesync demo --local")]
    Demo {
        /// Keep the demonstration's data directories instead of deleting them
        #[arg(long)]
        keep: bool,
        /// Only one commune office, offline: a dispatch through receipt, assignment and completion
        #[arg(long)]
        local: bool,
    },
    /// Print a shell completion script to standard output
    #[command(
        after_help = "Example:\n  communesync completions bash | sudo tee /usr/share/bash-completion/completions/communesync"
    )]
    Completions {
        /// The shell to complete for
        #[arg(value_enum, value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff) to standard output
    #[command(
        after_help = "Example:\n  communesync man | sudo tee /usr/local/share/man/man1/communesync.1 >/dev/null"
    )]
    Man,
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
    #[command(after_help = "Example:\n  communesync ca init")]
    Init,
    /// Sign an enrolment request; the province decides the unit and role
    #[command(
        after_help = "Example:\n  communesync ca issue /tmp/tinhhuc.req --unit qn/binhlieu/tinhhuc --role commune --out /tmp/tinhhuc.crt"
    )]
    Issue {
        /// Request file written by `enrol request` on the node
        #[arg(value_name = "REQUEST")]
        request: PathBuf,
        /// Unit the node serves (must be in the province's unit tree)
        #[arg(long, value_name = "UNIT")]
        unit: String,
        /// Role of that unit, as in the unit tree
        #[arg(long, value_parser = roles())]
        role: Role,
        /// Where to write the certificate bundle to carry back to the node
        #[arg(long, value_name = "CERT")]
        out: PathBuf,
    },
    /// Revoke a node; the revocation reaches every node by sync
    #[command(after_help = "Example:\n  communesync ca revoke 46dc591a3c00a64f7427e640160547f1")]
    Revoke {
        /// Node id (32 hex digits, from `ca list`)
        #[arg(value_name = "NODE_ID")]
        node_id: String,
    },
    /// Certificates issued so far
    #[command(after_help = "Example:\n  communesync ca list")]
    List,
}

#[derive(Debug, Subcommand)]
pub enum EnrolCmd {
    /// Write an enrolment request for this node's key
    #[command(after_help = "Example:\n  communesync enrol request --out /tmp/tinhhuc.req")]
    Request {
        /// File to write the request to (carry it to the province)
        #[arg(long, value_name = "REQ")]
        out: PathBuf,
    },
    /// Install the certificate bundle written by `ca issue`
    #[command(after_help = "Example:\n  communesync enrol install /tmp/tinhhuc.crt")]
    Install {
        /// Certificate bundle from `ca issue --out`
        #[arg(value_name = "CERT")]
        cert: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum BundleCmd {
    /// Write what a peer lacks (as far as this node knows) into one signed, compressed file
    #[command(
        after_help = "Example:\n  communesync bundle export --for qn/binhlieu/tinhhuc --out /media/usb/tinhhuc.csb"
    )]
    Export {
        /// Peer name (one that has synced with this node) or unit path
        #[arg(long = "for", value_name = "PEER")]
        for_peer: String,
        /// A new file for the bundle, outside the data directory
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Apply a bundle with the same checks as the wire; importing it twice changes nothing
    #[command(after_help = "Example:\n  communesync bundle import /media/usb/tinhhuc.csb")]
    Import {
        /// Bundle file (or /dev/stdin)
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum ScansCmd {
    /// Copy every scan to the S3-compatible bucket of [scans.s3], each chunk verified, then set
    /// scans.store = "s3". Stop `serve` first; run it again after a cut to resume
    #[command(after_help = "Example:\n  communesync scans migrate --to s3")]
    Migrate {
        /// Where the scans go (only "s3": the bucket of [scans.s3] in config.toml)
        #[arg(long, value_parser = ["s3"])]
        to: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum PeerCmd {
    /// Add a peer by name and address
    #[command(
        after_help = "Example:\n  communesync peer add district --addr 10.0.0.2:7410 --upstream"
    )]
    Add {
        /// Name to refer to the peer by (`sync --peer NAME`, sync.upstream)
        #[arg(value_name = "NAME")]
        name: String,
        /// The peer's UDP address: an IP or host name and a port (the name must resolve now)
        #[arg(long, value_name = "HOST:PORT")]
        addr: String,
        /// This is the node's upstream (its district, or the province): `serve` keeps syncing with it
        #[arg(long)]
        upstream: bool,
    },
    /// List configured peers
    #[command(after_help = "Example:\n  communesync peer list")]
    List,
    /// Remove a peer
    #[command(after_help = "Example:\n  communesync peer remove district")]
    Remove {
        /// Name given to `peer add`
        #[arg(value_name = "NAME")]
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum UserCmd {
    /// Add a user account
    #[command(after_help = "Example:\n  communesync user add lan --title \"văn thư\"")]
    Add {
        /// Account name, used with --as, --lead and --co
        #[arg(value_name = "NAME", value_parser = nfc)]
        name: String,
        /// Job title shown beside the name
        #[arg(long, value_parser = nfc)]
        title: Option<String>,
    },
    /// List user accounts
    #[command(after_help = "Example:\n  communesync user list")]
    List,
}

#[derive(Debug, Subcommand)]
pub enum DispatchCmd {
    /// Issue a dispatch from this unit (durable before the command returns)
    #[command(
        after_help = "Example:\n  communesync dispatch new --ref 123/UBND-VP --summary \"Kế hoạch\" --kind directive \\\n      --to qn/binhlieu/tinhhuc --priority urgent --attach scan.pdf"
    )]
    New(NewDispatchArgs),
    /// List dispatches held by this node, newest first
    #[command(after_help = "Example:\n  communesync dispatch list --inbox --limit 50")]
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
        /// At most this many rows (the output says how many there are in all when it stops)
        #[arg(long, default_value_t = 1000, value_name = "N")]
        limit: usize,
    },
    /// Show one dispatch: recipients and receipts, scans, comments, assignments, conflicts
    #[command(after_help = "Example:\n  communesync dispatch show dsp_3f9a0c1b2d4e5f60")]
    Show {
        /// Dispatch id (dsp_...)
        #[arg(value_name = "ID")]
        id: String,
    },
    /// Record that this unit received the dispatch (who and when)
    #[command(
        after_help = "Example:\n  communesync --as lan dispatch receive dsp_3f9a0c1b2d4e5f60"
    )]
    Receive {
        /// Dispatch id (dsp_...)
        #[arg(value_name = "ID")]
        id: String,
    },
    /// Add a comment
    #[command(
        after_help = "Example:\n  communesync dispatch comment dsp_3f9a0c1b2d4e5f60 \"đã nhận\""
    )]
    Comment {
        /// Dispatch id (dsp_...)
        #[arg(value_name = "ID")]
        id: String,
        /// The comment
        #[arg(value_name = "TEXT", value_parser = nfc)]
        text: String,
    },
    /// Write an attached scan back to a file, bit for bit (verified)
    #[command(
        after_help = "Example:\n  communesync dispatch attachment dsp_3f9a0c1b2d4e5f60 scan.pdf --out copy.pdf"
    )]
    Attachment {
        /// Dispatch id (dsp_...)
        #[arg(value_name = "ID")]
        id: String,
        /// Attachment file name (or a hash prefix of at least 8 digits)
        #[arg(value_name = "NAME", value_parser = nfc)]
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
    #[arg(long = "ref", value_name = "REF", value_parser = nfc)]
    pub ref_no: String,
    /// Summary (subject line)
    #[arg(long, value_parser = nfc)]
    pub summary: String,
    /// Kind of document
    #[arg(long, default_value = "dispatch",
          value_parser = one_of::<DispatchKind>(DispatchKind::ALL.iter().map(|k| k.as_str()).collect()))]
    pub kind: DispatchKind,
    /// Recipient unit paths
    #[arg(long, num_args = 1.., required = true, value_name = "UNIT")]
    pub to: Vec<String>,
    /// How urgent; more urgent documents and their scans travel first
    #[arg(long, default_value = "normal",
          value_parser = one_of::<Priority>(Priority::ALL.iter().map(|p| p.as_str()).collect()))]
    pub priority: Priority,
    /// Scans to attach
    #[arg(long, num_args = 1.., value_name = "FILE")]
    pub attach: Vec<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum AssignCmd {
    /// Assign a dispatch to a lead (and co-handlers) with a deadline
    #[command(
        after_help = "Example:\n  communesync assign new dsp_3f9a0c1b2d4e5f60 --lead minh --co lan --deadline 2026-12-15"
    )]
    New {
        /// Dispatch id (dsp_...)
        #[arg(value_name = "DISPATCH_ID")]
        dispatch_id: String,
        /// User who leads the work (a user of this unit)
        #[arg(long, value_name = "USER", value_parser = nfc)]
        lead: String,
        /// Users who work with the lead
        #[arg(long = "co", num_args = 1.., value_name = "USER", value_parser = nfc)]
        co: Vec<String>,
        /// Last day to finish, YYYY-MM-DD (local date)
        #[arg(long, value_name = "YYYY-MM-DD")]
        deadline: String,
    },
    /// Move an assignment to a new status (the history keeps every transition)
    #[command(
        after_help = "Example:\n  communesync --as minh assign update asg_3f9a0c1b2d4e5f60 --status in-progress --note \"đang xử lý\""
    )]
    Update {
        /// Assignment id (asg_...)
        #[arg(value_name = "ID")]
        id: String,
        /// The new status
        #[arg(long, value_parser = one_of::<Status>(Status::ALL.iter().map(|s| s.as_str()).collect()))]
        status: Status,
        /// Why, or what was done (kept in the history)
        #[arg(long, value_parser = nfc)]
        note: Option<String>,
    },
    /// List assignments, earliest deadline first
    #[command(after_help = "Example:\n  communesync assign list --overdue --lead minh")]
    List {
        /// Only those past their deadline and not done
        #[arg(long)]
        overdue: bool,
        /// Only those led by USER
        #[arg(long, value_name = "USER", value_parser = nfc)]
        lead: Option<String>,
        /// At most this many rows (the output says how many there are in all when it stops)
        #[arg(long, default_value_t = 1000, value_name = "N")]
        limit: usize,
    },
    /// Show one assignment with its whole status history
    #[command(after_help = "Example:\n  communesync assign show asg_3f9a0c1b2d4e5f60")]
    Show {
        /// Assignment id (asg_...)
        #[arg(value_name = "ID")]
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum DossierCmd {
    /// Open a dossier for a citizen's application
    #[command(
        after_help = "Example:\n  communesync dossier new --applicant \"Nguyễn Văn A\" --procedure \"đăng ký khai sinh\""
    )]
    New {
        /// The citizen who applies
        #[arg(long, value_name = "NAME", value_parser = nfc)]
        applicant: String,
        /// The administrative procedure applied for
        #[arg(long, value_name = "PROCEDURE", value_parser = nfc)]
        procedure: String,
    },
    /// Move a dossier to its next step, optionally handing it to another unit
    #[command(
        after_help = "Example:\n  communesync dossier advance dos_3f9a0c1b2d4e5f60 --step \"chuyển huyện\" --to-unit qn/binhlieu"
    )]
    Advance {
        /// Dossier id (dos_...)
        #[arg(value_name = "ID")]
        id: String,
        /// Name of the step the dossier reaches
        #[arg(long, value_name = "STEP", value_parser = nfc)]
        step: String,
        /// Unit that holds the dossier from now on [default: this unit]
        #[arg(long, value_name = "UNIT")]
        to_unit: Option<String>,
    },
    /// Which step a dossier is at, since when, who holds it, and its route so far
    #[command(after_help = "Example:\n  communesync dossier track dos_3f9a0c1b2d4e5f60")]
    Track {
        /// Dossier id (dos_...)
        #[arg(value_name = "ID")]
        id: String,
    },
    /// List dossiers, most recently moved first
    #[command(after_help = "Example:\n  communesync dossier list --limit 20")]
    List {
        /// At most this many rows (the output says how many there are in all when it stops)
        #[arg(long, default_value_t = 1000, value_name = "N")]
        limit: usize,
    },
}

#[derive(Debug, Subcommand)]
pub enum UnitCmd {
    /// List the units of the tree (optionally only below UNIT)
    #[command(after_help = "Example:\n  communesync unit list qn/binhlieu")]
    List {
        /// Only this unit and those below it
        #[arg(value_name = "UNIT")]
        under: Option<String>,
    },
    /// Province only: sign FILE (a TOML file of [[unit]] path/name/role) with the CA as the next
    /// version of the unit tree and use it; every node gets it at its next sync
    #[command(after_help = "Example:\n  communesync unit publish units-2027.toml")]
    Publish {
        /// The new unit tree: every unit of the current one still enrolled must be in it
        /// (a unit that moved lists its old path in `formerly`)
        file: PathBuf,
    },
    /// Province only: move UNIT (and the units below it) under NEW_PARENT, sign the tree as
    /// the next version and use it; its nodes keep their certificates and follow it at their
    /// next sync, and their documents move to the new parent's scope
    #[command(after_help = "Example:\n  communesync unit move qn/binhlieu/tinhhuc qn/halong")]
    Move {
        /// The unit that moves, e.g. qn/binhlieu/tinhhuc
        #[arg(value_name = "UNIT")]
        unit: String,
        /// Its new parent: a district for a commune
        #[arg(value_name = "NEW_PARENT")]
        new_parent: String,
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

/// The zone log lines are stamped in: the node's `node.utc_offset_hours`, the zone every
/// command prints its times in, so a log line and a `status` line compare at a glance. Before
/// `init`, or with a config that does not load, the default of that key (UTC+7).
pub fn log_utc_offset(cli: &Cli) -> time::UtcOffset {
    let configured = data_dir(cli).ok().and_then(|dir| {
        let text = std::fs::read_to_string(dir.join(crate::node::config::CONFIG_FILE)).ok()?;
        crate::node::Config::parse(&text).ok()
    });
    let default = crate::node::config::default_utc_offset_hours();
    match configured {
        Some(config) => config.node.utc_offset(),
        None => time::UtcOffset::from_hms(default, 0, 0).unwrap_or(time::UtcOffset::UTC),
    }
}

/// Log timestamps in a fixed zone, written like the times commands print
/// (`2026-11-26 13:33:08.412 +07`).
pub struct LogTime(pub time::UtcOffset);

impl tracing_subscriber::fmt::time::FormatTime for LogTime {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        let format = time::macros::format_description!(
            "[year]-[month]-[day] [hour]:[minute]:[second].[subsecond digits:3] [offset_hour sign:mandatory]"
        );
        let now = time::OffsetDateTime::now_utc().to_offset(self.0);
        w.write_str(&now.format(&format).map_err(|_| std::fmt::Error)?)
    }
}

/// A bar, or log lines, of a bundle export or import that reports to `progress`.
fn watch_bundle(cli: &Cli, what: &str, progress: Arc<BundleProgress>) -> progress::Watched {
    progress::Watched::start(cli.json, what, move || progress.now())
}

/// How many rows a list has in all. Counted only when the page is full: the usual short list
/// costs no second query.
fn total_of<T>(
    rows: &[T],
    limit: usize,
    count: impl FnOnce() -> std::result::Result<i64, NodeError>,
) -> Result<i64> {
    if rows.len() >= limit {
        Ok(count()?)
    } else {
        Ok(rows.len() as i64)
    }
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
                    let rows = node.dispatch_list(filter, *limit)?;
                    let total = total_of(&rows, *limit, || node.dispatch_count(filter))?;
                    out.dispatch_rows(&rows, total, &node)
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
                } => {
                    let rows = node.assign_list(*overdue, lead.as_deref(), *limit)?;
                    let total = total_of(&rows, *limit, || {
                        node.assign_count(*overdue, lead.as_deref())
                    })?;
                    out.assignment_rows(&rows, total)
                }
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
                DossierCmd::List { limit } => {
                    let rows = node.dossier_list(*limit)?;
                    let total = total_of(&rows, *limit, || node.dossier_count())?;
                    out.dossier_rows(&rows, total, &node)
                }
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
        Command::Unit(UnitCmd::Move { unit, new_parent }) => {
            let mut node = open(&cli)?;
            let signed = node.units_move(unit, new_parent)?;
            node.wake_daemon();
            let now = node.tree.canonical(unit).to_string();
            out.unit_moved(unit, &now, signed.version)
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
        }) => {
            let mut node = open(&cli)?;
            let progress = Arc::new(BundleProgress::default());
            let watched = watch_bundle(&cli, &format!("bundle for {for_peer}"), progress.clone());
            let report = node.bundle_export(for_peer, file, &progress);
            watched.finish();
            out.exported(&report?)
        }
        Command::Bundle(BundleCmd::Import { file }) => {
            let mut node = open(&cli)?;
            let progress = Arc::new(BundleProgress::default());
            let watched = watch_bundle(&cli, &file.display().to_string(), progress.clone());
            let report = node.bundle_import(file, &progress);
            watched.finish();
            let report = report?;
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
        Command::Scans(ScansCmd::Migrate { to: _ }) => {
            let spinner = progress::spinner(cli.json, "copying scans to the bucket");
            let report = crate::node::scans::migrate_to_s3(&data_dir(&cli)?, |done| {
                if let Some(s) = &spinner {
                    s.set_message(format!("copying scans to the bucket: {done} done"));
                }
            });
            if let Some(s) = spinner {
                s.finish_and_clear();
            }
            let report = report?;
            out.scans_migrated(&report)?;
            if !report.problems.is_empty() {
                anyhow::bail!(
                    "{} scan(s) not copied, so scans.store stays \"local\": repair them (`communesync check`) or fix the bucket, then run `scans migrate` again",
                    report.problems.len()
                );
            }
            Ok(())
        }
        Command::Check { full } => {
            let mut node = open(&cli)?;
            // Config first: a default user that is no user would fail every command later.
            node.check_config_names()?;
            let report = node.check(*full)?;
            out.check(&report)?;
            if !report.problems.is_empty() {
                anyhow::bail!("{} problem(s) found; restore the damaged data from a backup (docs/operations.md)", report.problems.len());
            }
            Ok(())
        }
        Command::Backup { out: file } => {
            let node = open(&cli)?;
            // The copy is about the size of the database (VACUUM INTO leaves out free pages).
            let db_bytes = std::fs::metadata(data_dir(&cli)?.join(crate::node::DB_FILE))
                .map(|m| m.len())
                .unwrap_or(0);
            let polled = file.clone();
            let watched = progress::Watched::start(cli.json, "backup", move || {
                let written = std::fs::metadata(&polled).map_or(0, |m| m.len());
                ("writing", written, Some(db_bytes))
            });
            let result = node.backup(file);
            watched.finish();
            result?;
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
            let bars = progress::wanted(cli.json).then(|| progress::ScanBars::new(&dir));
            let watcher = bars.as_ref().map(|b| b.watcher());
            let report = runtime()?.block_on(crate::service::sync_once_watched(
                &dir,
                peer.as_deref(),
                watcher,
            ));
            if let Some(b) = bars {
                b.finish();
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
            crate::service::cap_malloc_arenas();
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
                crate::service::serve_counted(&dir, *listen, shutdown, counters, start_page).await
            })
        }
        Command::Demo { keep, local: true } => demo::run_local(*keep, &out),
        Command::Demo { keep, local: false } => demo::run_tree(*keep, &out),
        Command::Completions { shell } => {
            let mut stdout = std::io::stdout().lock();
            clap_complete::generate(*shell, &mut Cli::command(), "communesync", &mut stdout);
            Ok(())
        }
        Command::Man => {
            let mut stdout = std::io::stdout().lock();
            clap_mangen::Man::new(Cli::command())
                .render(&mut stdout)
                .context("writing the manual page to standard output")
        }
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
        for code in used {
            assert!(
                readme.contains(&format!("\n| {code} | ")),
                "README's exit code table omits {code}"
            );
        }
    }

    use super::*;

    /// Every subcommand, depth first, with its full name ("dispatch new").
    fn commands(cmd: &clap::Command, name: String, all: &mut Vec<(String, clap::Command)>) {
        for sub in cmd.get_subcommands() {
            commands(sub, format!("{name} {}", sub.get_name()), all);
        }
        all.push((name, cmd.clone()));
    }

    #[test]
    fn every_option_and_argument_of_every_command_is_described() {
        let mut all = Vec::new();
        commands(&Cli::command(), "communesync".into(), &mut all);
        let mut undocumented = Vec::new();
        for (name, cmd) in &all {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if matches!(id, "help" | "version") {
                    continue;
                }
                let described = arg
                    .get_help()
                    .or(arg.get_long_help())
                    .is_some_and(|h| !h.to_string().trim().is_empty());
                if !described {
                    undocumented.push(format!("{name}: {id}"));
                }
            }
            if cmd.get_about().is_none() {
                undocumented.push(format!("{name}: the command itself"));
            }
        }
        assert!(
            undocumented.is_empty(),
            "options and arguments without help text: {undocumented:?}"
        );
    }

    #[test]
    fn every_command_that_runs_shows_an_example() {
        let mut all = Vec::new();
        commands(&Cli::command(), "communesync".into(), &mut all);
        let missing: Vec<_> = all
            .iter()
            .filter(|(_, cmd)| !cmd.has_subcommands() || cmd.get_name() == "communesync")
            .filter(|(_, cmd)| {
                !cmd.get_after_help()
                    .or(cmd.get_after_long_help())
                    .is_some_and(|h| h.to_string().contains("Example:\n  communesync"))
            })
            .map(|(name, _)| name.clone())
            .collect();
        assert!(
            missing.is_empty(),
            "commands without an example: {missing:?}"
        );
    }

    #[test]
    fn choices_are_listed_in_help_and_parsed_by_the_model() {
        let cmd = Cli::command();
        let init = cmd.find_subcommand("init").unwrap();
        let role = init.get_arguments().find(|a| a.get_id() == "role").unwrap();
        let names: Vec<_> = role
            .get_possible_values()
            .iter()
            .map(|v| v.get_name().to_string())
            .collect();
        assert_eq!(names, ["commune", "district", "province"]);
        let cli = Cli::try_parse_from([
            "communesync",
            "assign",
            "update",
            "asg_1",
            "--status",
            "in-progress",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Assign(AssignCmd::Update {
                status: Status::InProgress,
                ..
            })
        ));
        let err = Cli::try_parse_from(["communesync", "init", "--unit", "qn", "--role", "town"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("commune, district, province"), "{err}");
    }

    #[test]
    fn text_arguments_are_normalized_to_nfc() {
        // "Nguyễn" typed decomposed: e + circumflex + tilde as combining marks.
        let decomposed = "Nguye\u{302}\u{303}n";
        let cli = Cli::try_parse_from([
            "communesync",
            "--as",
            decomposed,
            "dossier",
            "new",
            "--applicant",
            decomposed,
            "--procedure",
            "khai sinh",
        ])
        .unwrap();
        assert_eq!(cli.as_user.as_deref(), Some("Nguy\u{1ec5}n"));
        let Command::Dossier(DossierCmd::New { applicant, .. }) = cli.command else {
            panic!("parsed as another command")
        };
        assert_eq!(applicant, "Nguy\u{1ec5}n");
    }
}
