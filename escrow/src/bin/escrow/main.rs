//! The `escrow` command: operator commands on a data directory, the server, and the client.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, anyhow};
use clap::{Args, Parser, Subcommand, ValueEnum};
use escrow::client::Client;
use escrow::datadir::DataDir;
use escrow::server;
use escrow::wire;

#[derive(Parser)]
#[command(name = "escrow", version, about = "A self-hostable data clean room")]
struct Cli {
    /// Log format of the server (text or json).
    #[arg(long, global = true, default_value = "text", env = "ESCROW_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Args, Clone)]
struct DirArgs {
    /// Data directory.
    #[arg(long, env = "ESCROW_DATA_DIR", default_value = "./escrow-data")]
    data_dir: PathBuf,
    /// Keep the catalog in this PostgreSQL database (postgres://user@host:port/db), shared
    /// by every node, instead of the data directory's SQLite file.
    #[arg(long, env = "ESCROW_CATALOG", hide_env_values = true)]
    catalog: Option<String>,
    /// Keep the sealed datasets in this object store (s3://bucket/prefix, with endpoint,
    /// region and credentials from the AWS_* environment variables), shared by every node,
    /// instead of the data directory's datasets/ folder.
    #[arg(long, env = "ESCROW_OBJECTS", hide_env_values = true)]
    objects: Option<String>,
}

impl DirArgs {
    fn dir(self) -> DataDir {
        DataDir::new(self.data_dir)
            .with_catalog(self.catalog)
            .with_objects(self.objects)
    }
}

#[derive(Args, Clone)]
struct ClientArgs {
    /// Identity bundle directory (cert.pem, key.pem, ca.pem).
    #[arg(long, env = "ESCROW_IDENTITY")]
    identity: Option<PathBuf>,
    /// Server URL.
    #[arg(long, env = "ESCROW_SERVER", default_value = "https://127.0.0.1:8443")]
    server: String,
    /// CA certificate(s) (PEM) the server's certificate chains to, when the server presents
    /// the operator's own (serve --tls-cert); default: the bundle's ca.pem.
    #[arg(long, env = "ESCROW_SERVER_CA", value_name = "FILE")]
    server_ca: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Create the data directory: key-encryption key, dev CA, server certificate, catalog.
    /// Idempotent; never overwrites existing keys (but the server certificate's, to name
    /// other --hostname values).
    Init {
        #[command(flatten)]
        dir: DirArgs,
        /// A DNS name or IP address clients reach the escrow by, named in its server
        /// certificate besides localhost, 127.0.0.1 and ::1 (repeatable). Given on an
        /// initialised directory whose certificate names others, the certificate is issued
        /// again (a running server serves it from its next connection).
        #[arg(long = "hostname", value_name = "NAME")]
        hostnames: Vec<String>,
    },
    /// Run the HTTPS server (initialises an empty data directory first).
    Serve {
        #[command(flatten)]
        dir: DirArgs,
        /// Address to listen on (port 0 picks a free port; the bound address is printed).
        #[arg(long, env = "ESCROW_LISTEN", default_value = "127.0.0.1:8443")]
        listen: SocketAddr,
        /// Largest upload accepted, in bytes.
        #[arg(long, env = "ESCROW_MAX_UPLOAD_BYTES", default_value_t = 2 << 30)]
        max_upload_bytes: u64,
        /// Seconds in-flight requests get to finish on shutdown.
        #[arg(long, default_value_t = 30)]
        shutdown_grace_secs: u64,
        /// Serve this certificate chain (PEM, the server's certificate first: from your own
        /// CA or an ACME client) instead of the one the escrow CA issued at init; re-read
        /// when the file changes. Client certificates are still checked against the escrow
        /// CA. Give its key with --tls-key.
        #[arg(
            long,
            env = "ESCROW_TLS_CERT",
            value_name = "FILE",
            requires = "tls_key"
        )]
        tls_cert: Option<PathBuf>,
        /// The private key (PEM) of --tls-cert; re-read when the file changes.
        #[arg(
            long,
            env = "ESCROW_TLS_KEY",
            value_name = "FILE",
            requires = "tls_cert"
        )]
        tls_key: Option<PathBuf>,
        #[command(flatten)]
        query: QueryLimitArgs,
    },
    /// Manage partners (operator commands on the data directory).
    Partner {
        #[command(subcommand)]
        command: PartnerCommand,
    },
    /// Upload a CSV, Parquet or Arrow IPC file as a new version of a dataset.
    Upload {
        /// The file to upload.
        file: PathBuf,
        /// Dataset name ([a-z][a-z0-9_]*).
        #[arg(long)]
        dataset: String,
        /// Column that identifies the account (e.g. website).
        #[arg(long)]
        key_column: Option<String>,
        /// Company names, to match rows without a usable website (docs/MATCHING.md).
        #[arg(long)]
        name_column: Option<String>,
        /// Columns whose values must agree too when rows are matched by name, comma-separated
        /// (e.g. country,region): a name alone is weak evidence (docs/MATCHING.md).
        #[arg(long)]
        name_context: Option<String>,
        /// Columns giving a company's place (country, region, state), comma-separated, or
        /// `none`: a name link between two companies whose places differ is refused. By
        /// default the upload's columns so named are used (docs/MATCHING.md).
        #[arg(long)]
        places: Option<String>,
        /// How the key column is read: website (matched as companies, the default for text)
        /// or id (exact identifiers such as DUNS numbers).
        #[arg(long)]
        key_type: Option<String>,
        /// File format (csv, arrow, arrow-stream, parquet); guessed from the name otherwise.
        #[arg(long = "input-format")]
        input_format: Option<String>,
        /// A CSV column's type, over the one inferred from the first rows (repeatable):
        /// COLUMN=TYPE, TYPE one of string, integer, float, boolean, date, timestamp. A value
        /// that does not fit refuses the upload, naming its row and column.
        #[arg(long = "schema", value_name = "COLUMN=TYPE")]
        schema: Vec<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List your datasets (metadata only), show one's versions, or delete one.
    #[command(args_conflicts_with_subcommands = true)]
    Datasets {
        #[command(subcommand)]
        command: Option<DatasetsCommand>,
        /// Output format.
        #[arg(long, default_value = "table")]
        format: OutputFormat,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Grant, revoke and list the uses other partners may make of your datasets.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Define, list and remove populations: named subsets of your datasets.
    Population {
        #[command(subcommand)]
        command: PopulationCommand,
    },
    /// Ask an aggregate question in SQL over your datasets and those shared with you
    /// (tables are named partner.dataset). Exits non-zero when the query is refused.
    Query {
        /// One SELECT statement.
        #[arg(required_unless_present = "file")]
        sql: Option<String>,
        /// Read the statement from this file instead (`-` for stdin).
        #[arg(long, conflicts_with = "sql")]
        file: Option<PathBuf>,
        /// Output format.
        #[arg(long, default_value = "table")]
        format: QueryFormat,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Account mapping: how many of your companies are in another partner's populations,
    /// as a matrix of your populations x theirs (only the ones they let you see).
    Overlap {
        /// The other partner.
        #[arg(long)]
        with: String,
        #[command(flatten)]
        args: OverlapArgs,
        #[arg(long, default_value = "table")]
        format: QueryFormat,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Ready reports built on the overlap matrix.
    Report {
        #[command(subcommand)]
        command: ReportCommand,
    },
    /// Users inside a partner and their roles (admin, compliance, analyst, uploader).
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// The tamper-evident audit log: list events, export the chain, verify it.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// The escrow's keys (operator commands on the data directory).
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Open the web console: a single-use sign-in link for your identity, valid for five
    /// minutes, opened in a browser on this machine (or only printed with --print).
    Console {
        #[command(flatten)]
        client: ClientArgs,
        /// Print the link instead of opening a browser (to open it on another machine).
        #[arg(long)]
        print: bool,
    },
    /// Show who the server thinks you are (and warn when your certificate ends within 30
    /// days).
    Whoami {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Enroll with a token from `partner invite` or `user invite`: make a key on this
    /// machine, have the escrow sign its certificate, and write the identity bundle
    /// (cert.pem, key.pem, ca.pem) to --out. The key never leaves this machine.
    Enroll {
        /// Server URL.
        #[arg(long, env = "ESCROW_SERVER")]
        server: String,
        /// The enrollment token (escrow1....).
        #[arg(long, env = "ESCROW_ENROLL_TOKEN", hide_env_values = true)]
        token: String,
        /// Where to write the identity bundle (default ./PARTNER-USER).
        #[arg(long)]
        out: Option<PathBuf>,
        /// CA certificate(s) the server's certificate chains to, when the server presents
        /// the operator's own (serve --tls-cert).
        #[arg(long, env = "ESCROW_SERVER_CA", value_name = "FILE")]
        server_ca: Option<PathBuf>,
    },
    /// Renew your certificate before it ends: a new key made here, its certificate signed
    /// over your current identity, the bundle at --identity replaced in place.
    Renew {
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Args, Clone)]
struct QueryLimitArgs {
    /// Memory one query may use, in MiB (nothing spills to disk).
    #[arg(long, env = "ESCROW_QUERY_MEMORY_MB", default_value_t = 1024)]
    query_memory_mb: usize,
    /// Seconds one query may run.
    #[arg(long, env = "ESCROW_QUERY_TIMEOUT_SECS", default_value_t = 60)]
    query_timeout_secs: u64,
    /// Verified plaintext batches kept in memory across queries, in MiB.
    #[arg(long, env = "ESCROW_QUERY_CACHE_MB", default_value_t = 1024)]
    query_cache_mb: usize,
    /// Questions (queries, overlaps, reports, explanations) one partner may run at once;
    /// more are refused at once with 429 and Retry-After.
    #[arg(long, env = "ESCROW_MAX_QUESTIONS_PER_PARTNER", default_value_t = 4)]
    max_questions_per_partner: usize,
    /// Questions the whole server runs at once (each may use --query-memory-mb).
    #[arg(long, env = "ESCROW_MAX_QUESTIONS", default_value_t = 8)]
    max_questions: usize,
    /// Memory, in MiB, that admitted questions share for reading other partners' data
    /// (after admission no per-query limit applies, so that no refusal depends on their
    /// rows): a question reserves what it could hold at most and waits until it is free.
    /// One partner's questions hold at most half of it; a question that alone needs more
    /// is refused before admission. Default: --max-questions x --query-memory-mb.
    #[arg(long, env = "ESCROW_ADMITTED_MEMORY_MB")]
    admitted_memory_mb: Option<usize>,
    /// Seconds a console sign-in link (`escrow console`) stays valid (1 to 3600).
    #[arg(long, env = "ESCROW_CONSOLE_LINK_SECS", default_value_t = 300)]
    console_link_secs: u64,
    /// Days the identity certificates this server issues are valid (`escrow renew`, and
    /// invitations admins make through the API), 1 to 825.
    #[arg(long, env = "ESCROW_CERT_DAYS", default_value_t = escrow::pki::DEFAULT_CERT_DAYS)]
    cert_days: u32,
    /// Uploads one partner may send at once.
    #[arg(long, env = "ESCROW_MAX_UPLOADS_PER_PARTNER", default_value_t = 2)]
    max_uploads_per_partner: usize,
    /// Uploads the whole server receives at once.
    #[arg(long, env = "ESCROW_MAX_UPLOADS", default_value_t = 16)]
    max_uploads: usize,
    /// Milliseconds a question or upload waits for a server-wide slot before it is refused
    /// with 429 (a partner over its own limit is refused at once).
    #[arg(long, env = "ESCROW_BUSY_WAIT_MS", default_value_t = 1000)]
    busy_wait_ms: u64,
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Rotate the key-encryption key: every data key is re-wrapped under a new key (no data
    /// is re-encrypted), then the old key is retired. Safe while the server runs.
    Rotate(DirArgs),
    /// Print a new random key-encryption key as 64 hex digits, for a key kept outside the
    /// data directory (ESCROW_KEK, ESCROW_KEK_NEXT, or a KMS/Vault behind ESCROW_KEK_COMMAND).
    Generate,
}

#[derive(Subcommand)]
enum PartnerCommand {
    /// Register a partner and print a single-use enrollment token for its admin (the only
    /// line on stdout). On the partner's machine, `escrow enroll --server URL --token TOKEN
    /// --out DIR` makes the key there and gets its certificate: the key never leaves it.
    Invite {
        name: String,
        #[command(flatten)]
        terms: InviteArgs,
        #[command(flatten)]
        dir: DirArgs,
    },
    /// Register a partner and write its admin identity bundle, key included, to
    /// DIR/identities/NAME/admin/: for local trials and tests, where the operator may hold
    /// the partner's key (otherwise use `partner invite`).
    Add {
        name: String,
        /// Days the certificate is valid (1 to 825).
        #[arg(long, env = "ESCROW_CERT_DAYS", default_value_t = escrow::pki::DEFAULT_CERT_DAYS)]
        cert_days: u32,
        #[command(flatten)]
        dir: DirArgs,
    },
    /// Revoke a partner: its certificates stop working on the next handshake.
    Revoke {
        name: String,
        #[command(flatten)]
        dir: DirArgs,
    },
}

/// The terms of an invitation.
#[derive(Args, Clone)]
struct InviteArgs {
    /// How long the token may be used (e.g. 30m, 24h, 7d; one second to 30 days).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    valid_for: Duration,
    /// Days the certificate it enrolls is valid (1 to 825; default 90). Through the API
    /// (--identity) the server's --cert-days applies.
    #[arg(long, env = "ESCROW_CERT_DAYS")]
    cert_days: Option<u32>,
}

impl InviteArgs {
    fn terms(&self) -> escrow::admin::InviteTerms {
        escrow::admin::InviteTerms {
            valid_for: self.valid_for,
            cert_days: self.cert_days.unwrap_or(escrow::pki::DEFAULT_CERT_DAYS),
        }
    }
}

/// Print an invitation's token alone on stdout (for scripts), and how to use it on stderr.
fn print_invitation(partner: &str, user: &str, role: &str, token: &str, expires_at: &str) {
    eprintln!(
        "invited {partner}/{user} (role {role}); the token below works once, until {expires_at}. \
         On the machine that is to hold the key: escrow enroll --server URL --token TOKEN --out DIR"
    );
    println!("{token}");
}

/// Where a user command acts: on the data directory (operator), or through the API as the
/// partner's admin (`--identity`).
#[derive(Args)]
struct UserTarget {
    /// Data directory (operator command).
    #[arg(long, env = "ESCROW_DATA_DIR", default_value = "./escrow-data")]
    data_dir: PathBuf,
    /// The PostgreSQL catalog, if the data directory's nodes share one (operator command).
    #[arg(long, env = "ESCROW_CATALOG", hide_env_values = true)]
    catalog: Option<String>,
    /// The object store, if the data directory's nodes share one (operator command).
    #[arg(long, env = "ESCROW_OBJECTS", hide_env_values = true)]
    objects: Option<String>,
    /// Act through the API as this admin identity bundle instead of on the data directory.
    #[arg(long)]
    identity: Option<PathBuf>,
    /// Server URL (with --identity).
    #[arg(long, env = "ESCROW_SERVER", default_value = "https://127.0.0.1:8443")]
    server: String,
    /// CA certificate(s) the server's certificate chains to (with --identity; as for the
    /// client commands).
    #[arg(long, env = "ESCROW_SERVER_CA", value_name = "FILE")]
    server_ca: Option<PathBuf>,
}

impl UserTarget {
    /// The data directory, for operator commands.
    fn dir(&self) -> DataDir {
        DataDir::new(&self.data_dir)
            .with_catalog(self.catalog.clone())
            .with_objects(self.objects.clone())
    }

    /// The API client, if acting as an admin through the API.
    fn client(&self) -> anyhow::Result<Option<Client>> {
        self.identity
            .as_ref()
            .map(|id| Client::trusting(&self.server, id, self.server_ca.as_deref()))
            .transpose()
    }
}

#[derive(Subcommand)]
enum UserCommand {
    /// Invite a user of a partner with a role: print a single-use enrollment token (the
    /// only line on stdout) for `escrow enroll` on the user's machine, where its key is made.
    Invite {
        partner: String,
        name: String,
        /// admin, compliance, analyst or uploader (policies/roles.csv says what each may do).
        #[arg(long)]
        role: String,
        #[command(flatten)]
        terms: InviteArgs,
        #[command(flatten)]
        target: UserTarget,
    },
    /// Issue an identity for a user of a partner with a role; the bundle, key included, is
    /// written to DIR/identities/PARTNER/NAME/ (or, through the API, to --out): for local
    /// trials and tests (otherwise use `user invite`).
    Add {
        partner: String,
        name: String,
        /// admin, compliance, analyst or uploader (policies/roles.csv says what each may do).
        #[arg(long)]
        role: String,
        /// Days the certificate is valid (1 to 825; operator command).
        #[arg(long, env = "ESCROW_CERT_DAYS", default_value_t = escrow::pki::DEFAULT_CERT_DAYS)]
        cert_days: u32,
        /// With --identity: where to write the new bundle (default ./PARTNER-NAME).
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        target: UserTarget,
    },
    /// The open invitations (of PARTNER, or, for the operator, of every partner): who is
    /// invited, with which role, until when, by whom. `user revoke` withdraws one.
    Invitations {
        partner: Option<String>,
        #[command(flatten)]
        target: UserTarget,
    },
    /// Revoke a user's identity: its certificate is refused from the next request.
    Revoke {
        partner: String,
        name: String,
        #[command(flatten)]
        target: UserTarget,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Events of your partner and every event that touched your datasets or rules
    /// (with --data-dir: every event, as the operator).
    List {
        /// Only events at or after this RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
        #[arg(long, default_value = "table")]
        format: OutputFormat,
        /// Read the log of this data directory (operator) instead of asking the server.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// With --data-dir: the PostgreSQL catalog its nodes share, if any.
        #[arg(long, env = "ESCROW_CATALOG", hide_env_values = true)]
        catalog: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// The hash chain as JSON lines with signed checkpoints (records you may not see are
    /// redacted to their hashes); with --data-dir, the whole log.
    Export {
        /// Write here instead of stdout.
        #[arg(long)]
        output: Option<PathBuf>,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// With --data-dir: the PostgreSQL catalog its nodes share, if any.
        #[arg(long, env = "ESCROW_CATALOG", hide_env_values = true)]
        catalog: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Check the chain and every signature of an export or of a data directory's log.
    /// Exits 0 only if intact; otherwise names the first bad record.
    #[command(group(clap::ArgGroup::new("source").required(true).args(["data_dir", "file"])))]
    Verify {
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// With --data-dir: the PostgreSQL catalog its nodes share, if any.
        #[arg(long, env = "ESCROW_CATALOG", hide_env_values = true)]
        catalog: Option<String>,
        /// An export (`escrow audit export`).
        #[arg(long)]
        file: Option<PathBuf>,
        /// The escrow's audit public key (hex) to check signatures against; without it the
        /// key named in the export's checkpoints is used (and printed, to compare).
        #[arg(long)]
        public_key: Option<String>,
        /// A checkpoint kept earlier (`escrow audit checkpoint` output): the log must still
        /// contain it, so a rewritten or truncated history fails.
        #[arg(long)]
        checkpoint: Option<PathBuf>,
    },
    /// Print the latest signed checkpoint (JSON), to keep and check later exports against.
    Checkpoint {
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Args)]
struct GrantArgs {
    /// Your dataset.
    dataset: String,
    /// The partner (or `*` for every partner).
    #[arg(long)]
    to: String,
    /// join, count, dimension, filter, sum or avg (of a column); standalone (of the
    /// dataset: may be queried without a key join to the grantee's own data); overlap (of
    /// the dataset's populations: overlap counts, see `escrow overlap`).
    #[arg(long)]
    usage: String,
    /// One column (default: every column of the dataset).
    #[arg(long, conflicts_with = "population")]
    column: Option<String>,
    /// For usage overlap: one population (default: every population of the dataset).
    #[arg(long)]
    population: Option<String>,
    #[command(flatten)]
    client: ClientArgs,
}

impl GrantArgs {
    fn request(&self) -> wire::GrantRequest {
        wire::GrantRequest {
            dataset: self.dataset.clone(),
            to: self.to.clone(),
            usage: self.usage.clone(),
            column: self.column.clone(),
            population: self.population.clone(),
        }
    }
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Let a partner use a column of your dataset in a given way.
    Grant(GrantArgs),
    /// Take a grant back.
    Revoke(GrantArgs),
    /// Set the protection of one of your datasets: threshold, ε per query, budget per
    /// partner, contribution bound, and clamping bounds of numeric columns.
    Set {
        /// Your dataset.
        dataset: String,
        /// Minimum distinct entities in any released row (k, default 5).
        #[arg(long)]
        min_entities: Option<u64>,
        /// Privacy loss per query (ε, default 0.125; zCDP ρ = ε²/2).
        #[arg(long)]
        epsilon: Option<f64>,
        /// What each partner may spend on your data, as the ε of one equivalent question:
        /// the ε of its questions add up in squares (default 0.4: ten questions at 0.125).
        #[arg(long)]
        budget: Option<f64>,
        /// Groups one entity may count in, per query (L, default 1; L^(tables with a
        /// GROUP BY column) of a question may be at most 100).
        #[arg(long)]
        max_groups: Option<u32>,
        /// Clamping bounds of a numeric column for SUM/AVG: COLUMN=LOW:HIGH (repeatable).
        #[arg(long = "bounds", value_name = "COLUMN=LOW:HIGH")]
        bounds: Vec<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// The protection settings in force for each of your datasets (defaults where you set
    /// none).
    Settings {
        #[arg(long, default_value = "table")]
        format: OutputFormat,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Grants you made and grants you received.
    List {
        #[arg(long, default_value = "table")]
        format: OutputFormat,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Why a question would be answered or refused: for each (dataset, column, usage) it
    /// needs, the rule that grants it or the grant that is missing, and the threshold, ε and
    /// budget that would apply. Give SQL, or --with PARTNER for an overlap question. Nothing
    /// is read, spent or run.
    Explain {
        /// The SQL question.
        sql: Option<String>,
        /// Explain an overlap question with this partner instead.
        #[arg(long, conflicts_with = "sql")]
        with: Option<String>,
        #[command(flatten)]
        args: OverlapArgs,
        #[arg(long, default_value = "table")]
        format: OutputFormat,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// What another partner can currently ask of your datasets: usable columns and usages,
    /// populations it sees, the protection in force and the budget it has left.
    Preview {
        /// The other partner.
        #[arg(long)]
        partner: String,
        /// One of your datasets (default: all).
        #[arg(long)]
        dataset: Option<String>,
        #[arg(long, default_value = "table")]
        format: OutputFormat,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Every version of your policy (grants, settings, populations): who changed what, when.
    History {
        #[arg(long, default_value = "table")]
        format: OutputFormat,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// What changed between two versions of your policy (0 = before any rule).
    Diff {
        from: i64,
        /// Default: the latest version.
        to: Option<i64>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Make an earlier version your policy again (recorded as a new version).
    Rollback {
        version: i64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Your policy (or one version of it) as casbin CSV.
    Export {
        /// A version (default: the policy in force).
        #[arg(long)]
        version: Option<i64>,
        /// Write to this file instead of standard output.
        #[arg(long)]
        output: Option<PathBuf>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Replace your whole policy with a casbin CSV document (as `policy export` writes it),
    /// validated whole: an invalid document changes nothing.
    Import {
        file: PathBuf,
        /// Validate and show what would change, without changing anything.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand)]
enum PopulationCommand {
    /// Define a population of one of your datasets by a SQL predicate over its columns
    /// (not the key column), e.g. --filter "status = 'customer'".
    Add {
        /// Your dataset.
        dataset: String,
        /// Population name ([a-z][a-z0-9_]*).
        name: String,
        #[arg(long)]
        filter: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Your populations.
    List {
        #[arg(long, default_value = "table")]
        format: OutputFormat,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Remove a population.
    Remove {
        dataset: String,
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Args)]
struct OverlapArgs {
    /// Your dataset (default: your only dataset with populations).
    #[arg(long)]
    mine: Option<String>,
    /// Their dataset (default: their only dataset whose populations you may see).
    #[arg(long)]
    theirs: Option<String>,
    /// Break every cell down by a column both datasets have (e.g. industry, region).
    #[arg(long)]
    by: Option<String>,
}

#[derive(Subcommand)]
enum ReportCommand {
    /// Co-selling: your customers x their opportunities and your opportunities x their
    /// customers, optionally by a shared dimension.
    CoSelling {
        /// The other partner.
        #[arg(long)]
        with: String,
        #[command(flatten)]
        args: OverlapArgs,
        /// Your population of customers (default: the one named customers or customer).
        #[arg(long)]
        my_customers: Option<String>,
        /// Your population of open opportunities (default: opportunities, opportunity,
        /// open_opportunities or open_opportunity).
        #[arg(long)]
        my_opportunities: Option<String>,
        /// Their population of customers.
        #[arg(long)]
        their_customers: Option<String>,
        /// Their population of open opportunities.
        #[arg(long)]
        their_opportunities: Option<String>,
        #[arg(long, default_value = "table")]
        format: QueryFormat,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// The overlap matrices (without --by) released to you with a partner before, oldest
    /// first, with the dataset versions they were computed from. Nothing is run or spent.
    History {
        /// The other partner.
        #[arg(long)]
        with: String,
        #[arg(long, default_value = "table")]
        format: OutputFormat,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand)]
enum DatasetsCommand {
    /// Every version of one of your datasets: rows, sizes, who uploaded it, and how its
    /// companies were matched (by domain, by name, unmatched).
    Versions {
        name: String,
        /// Output format.
        #[arg(long, default_value = "table")]
        format: OutputFormat,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Crypto-shred a dataset: its keys are destroyed and its files removed.
    Delete {
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum QueryFormat {
    Table,
    Json,
    Csv,
}

#[derive(Clone, Copy, ValueEnum)]
enum OutputFormat {
    Table,
    Json,
}

mod print;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // One line: the error paragraph without clap's usage block.
            let text = e.render().to_string();
            let message: Vec<&str> = text
                .lines()
                .map(str::trim)
                .take_while(|l| !l.is_empty() && !l.starts_with("Usage:"))
                .collect();
            eprintln!("{} (see escrow --help)", message.join(" "));
            return ExitCode::from(2);
        }
    };
    init_tracing(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("ESCROW_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn engine(e: escrow::Error) -> anyhow::Error {
    anyhow!("{e}")
}

fn identity(args: &ClientArgs) -> anyhow::Result<Client> {
    let id = args
        .identity
        .clone()
        .ok_or_else(|| anyhow!("no identity: pass --identity BUNDLE_DIR or set ESCROW_IDENTITY"))?;
    Client::trusting(&args.server, &id, args.server_ca.as_deref())
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Init { dir: d, hostnames } => {
            let dir = d.dir();
            let r = escrow::admin::init(&dir, &hostnames).map_err(engine)?;
            // Reach the object store and bind it to the catalog now, not at the first serve.
            escrow::store::Store::open(
                dir.clone(),
                escrow::store::StoreConfig::default(),
                escrow::s3::open_objects(&dir).map_err(engine)?,
            )
            .map_err(engine)?;
            if r.created_anything() {
                println!("initialised {}", dir.root().display());
            } else {
                println!(
                    "{} is already initialised; nothing changed",
                    dir.root().display()
                );
            }
            if !hostnames.is_empty() {
                let names = escrow::pki::server_names(&dir).map_err(engine)?;
                println!("server certificate names: {}", names.join(", "));
            }
        }
        Command::Serve {
            dir,
            listen,
            max_upload_bytes,
            shutdown_grace_secs,
            tls_cert,
            tls_key,
            query,
        } => {
            let server_cert = tls_cert
                .zip(tls_key)
                .map(|(cert, key)| server::tls::ServerCert { cert, key });
            serve(
                dir.dir(),
                listen,
                (max_upload_bytes, shutdown_grace_secs),
                server_cert,
                query,
            )
            .await?
        }
        Command::Keys {
            command: KeysCommand::Rotate(dir),
        } => {
            let r = escrow::admin::rotate_kek(&dir.dir()).map_err(engine)?;
            if let Some(s) = &r.settled {
                println!("first {s}");
            }
            println!(
                "rotated the key-encryption key {} -> {}: {} data key(s) re-wrapped; {}",
                r.from, r.to, r.rewrapped, r.retired
            );
        }
        Command::Keys {
            command: KeysCommand::Generate,
        } => {
            println!(
                "{}",
                escrow::crypto::keys::generate_hex()
                    .map_err(engine)?
                    .as_str()
            );
        }
        Command::Partner { command } => match command {
            PartnerCommand::Invite { name, terms, dir } => {
                let invited = escrow::admin::invite_partner(&dir.dir(), &name, terms.terms())
                    .map_err(engine)?;
                print_invitation(
                    &name,
                    "admin",
                    &invited.role,
                    &invited.token.to_string(),
                    &escrow::catalog::rfc3339(invited.expires_at),
                );
            }
            PartnerCommand::Add {
                name,
                cert_days,
                dir,
            } => {
                let bundle =
                    escrow::admin::add_partner(&dir.dir(), &name, cert_days).map_err(engine)?;
                println!(
                    "partner {name} added; admin identity bundle: {}",
                    bundle.display()
                );
            }
            PartnerCommand::Revoke { name, dir } => {
                escrow::admin::revoke_partner(&dir.dir(), &name).map_err(engine)?;
                println!(
                    "partner {name} revoked; its certificates are refused from the next connection"
                );
            }
        },
        Command::Upload {
            file,
            dataset,
            key_column,
            name_column,
            name_context,
            places,
            key_type,
            input_format,
            schema,
            client,
        } => {
            // Checked here, before a byte is sent.
            let declared = escrow::ingest::DeclaredSchema::parse(schema.iter().map(String::as_str))
                .map_err(engine)?
                .to_param();
            let c = identity(&client)?;
            let key = escrow::client::UploadKey {
                column: key_column.as_deref(),
                name_column: name_column.as_deref(),
                name_context: name_context.as_deref(),
                places: places.as_deref(),
                key_type: key_type.as_deref(),
                schema: (!declared.is_empty()).then_some(declared.as_str()),
            };
            let out = c
                .upload(&file, &dataset, &key, input_format.as_deref())
                .await?;
            print::upload(&out);
        }
        Command::Datasets {
            command,
            format,
            client,
        } => match command {
            Some(DatasetsCommand::Versions {
                name,
                format,
                client,
            }) => {
                let out = identity(&client)?.versions(&name).await?;
                show(format, &out, print::versions)?
            }
            Some(DatasetsCommand::Delete { name, client }) => {
                let out = identity(&client)?.delete(&name).await?;
                println!(
                    "dataset {name} deleted: {} version(s) crypto-shredded",
                    out.versions_destroyed
                );
            }
            None => {
                let out = identity(&client)?.datasets().await?;
                show(format, &out, print::datasets)?
            }
        },
        Command::Policy { command } => match command {
            PolicyCommand::Grant(a) => {
                let out = identity(&a.client)?.grant(&a.request()).await?;
                let verb = if out.changed {
                    "granted"
                } else {
                    "already granted"
                };
                println!("{verb}: {}", print::grant_line(&out.grant));
            }
            PolicyCommand::Revoke(a) => {
                let out = identity(&a.client)?.revoke(&a.request()).await?;
                println!("revoked: {}", print::grant_line(&out.revoked));
            }
            PolicyCommand::Set {
                dataset,
                min_entities,
                epsilon,
                budget,
                max_groups,
                bounds,
                client,
            } => {
                // JSON has no NaN or infinity (serde_json writes them as null, which would
                // read as "unchanged"): refused here with the server's code.
                let finite = |flag: &str, v: Option<f64>| match v {
                    Some(x) if !x.is_finite() => Err(anyhow!(
                        "settings refused (invalid_setting): {flag} must be a finite number, got {x}"
                    )),
                    _ => Ok(()),
                };
                finite("--epsilon", epsilon)?;
                finite("--budget", budget)?;
                let mut b = std::collections::BTreeMap::new();
                for spec in &bounds {
                    let (col, range) = spec
                        .split_once('=')
                        .ok_or_else(|| anyhow!("--bounds takes COLUMN=LOW:HIGH, got {spec:?}"))?;
                    let (lo, hi) = range
                        .split_once(':')
                        .and_then(|(l, h)| Some((l.parse::<f64>().ok()?, h.parse::<f64>().ok()?)))
                        .ok_or_else(|| anyhow!("--bounds takes COLUMN=LOW:HIGH, got {spec:?}"))?;
                    finite("--bounds", Some(lo))?;
                    finite("--bounds", Some(hi))?;
                    b.insert(col.to_string(), Some([lo, hi]));
                }
                let req = wire::SettingsChange {
                    dataset,
                    min_entities,
                    epsilon,
                    budget,
                    max_groups_per_entity: max_groups,
                    bounds: b,
                };
                print::settings(&identity(&client)?.settings(&req).await?);
            }
            PolicyCommand::Settings { format, client } => {
                let out = identity(&client)?.settings_list().await?;
                show(format, &out, print::settings_list)?
            }
            PolicyCommand::List { format, client } => {
                let out = identity(&client)?.policies().await?;
                show(format, &out, print::grants)?
            }
            PolicyCommand::Explain {
                sql,
                with,
                args,
                format,
                client,
            } => {
                let c = identity(&client)?;
                let out: wire::Explanation = match (sql, with) {
                    (Some(sql), None) => {
                        let req = wire::ExplainRequest { sql };
                        c.post("v1/queries/explain", &req, "explain").await?
                    }
                    (None, Some(with)) => {
                        c.post("v1/overlaps/explain", &args.request(&with), "explain")
                            .await?
                    }
                    _ => {
                        return Err(anyhow!(
                            "give the SQL to explain, or --with PARTNER for an overlap question"
                        ));
                    }
                };
                show(format, &out, print::explanation)?
            }
            PolicyCommand::Preview {
                partner,
                dataset,
                format,
                client,
            } => {
                let mut q = vec![("partner", partner.as_str())];
                if let Some(d) = &dataset {
                    q.push(("dataset", d.as_str()));
                }
                let out: wire::Preview = identity(&client)?
                    .get("v1/policies/preview", &q, "preview")
                    .await?;
                show(format, &out, print::preview)?
            }
            PolicyCommand::History { format, client } => {
                let out: wire::PolicyHistory = identity(&client)?
                    .get("v1/policies/versions", &[], "policy history")
                    .await?;
                show(format, &out, print::history)?
            }
            PolicyCommand::Diff { from, to, client } => {
                let (from_s, to_s) = (from.to_string(), to.map(|t| t.to_string()));
                let mut q = vec![("from", from_s.as_str())];
                if let Some(t) = &to_s {
                    q.push(("to", t.as_str()));
                }
                let out: wire::PolicyVersionsDiff = identity(&client)?
                    .get("v1/policies/diff", &q, "policy diff")
                    .await?;
                println!("v{} -> v{}", out.from, out.to);
                print::diff(&out.diff, "");
            }
            PolicyCommand::Rollback { version, client } => {
                let out: wire::PolicyReplaced = identity(&client)?
                    .post(
                        "v1/policies/rollback",
                        &wire::RollbackRequest { version },
                        "rollback",
                    )
                    .await?;
                match out.version {
                    Some(v) => println!("policy v{v}: the rules of v{version} again"),
                    None => {
                        println!("the policy in force already is v{version}'s: nothing changed")
                    }
                }
                print::diff(&out.diff, "");
            }
            PolicyCommand::Export {
                version,
                output,
                client,
            } => {
                let path = match version {
                    Some(v) => format!("v1/policies/export?version={v}"),
                    None => "v1/policies/export".to_string(),
                };
                let text = identity(&client)?
                    .get_text(&path, "exporting the policy")
                    .await?;
                match output {
                    Some(p) => std::fs::write(&p, text)
                        .with_context(|| format!("writing {}", p.display()))?,
                    None => print!("{text}"),
                }
            }
            PolicyCommand::Import {
                file,
                dry_run,
                client,
            } => {
                let body =
                    std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
                let out = identity(&client)?.import_policy(body, dry_run).await?;
                match (dry_run, out.version) {
                    (true, _) => println!("valid; importing it would change:"),
                    (false, Some(v)) => println!("imported as policy v{v}"),
                    (false, None) => {
                        println!("the document is the policy in force: nothing changed")
                    }
                }
                print::diff(&out.diff, "");
            }
        },
        Command::Population { command } => match command {
            PopulationCommand::Add {
                dataset,
                name,
                filter,
                client,
            } => {
                let req = wire::PopulationRequest {
                    dataset: dataset.clone(),
                    name,
                    filter: Some(filter),
                };
                let out = identity(&client)?.define_population(&req).await?;
                let p = &out.population;
                let verb = if out.changed {
                    "defined"
                } else {
                    "already defined"
                };
                println!("{verb}: {dataset}.{} where {}", p.name, p.filter);
            }
            PopulationCommand::List { format, client } => {
                let out = identity(&client)?.populations().await?;
                show(format, &out, print::populations)?
            }
            PopulationCommand::Remove {
                dataset,
                name,
                client,
            } => {
                let req = wire::PopulationRequest {
                    dataset: dataset.clone(),
                    name: name.clone(),
                    filter: None,
                };
                identity(&client)?.remove_population(&req).await?;
                println!("removed: {dataset}.{name}");
            }
        },
        Command::Query {
            sql,
            file,
            format,
            client,
        } => {
            let sql = match (sql, file) {
                (Some(sql), _) => sql,
                (None, Some(f)) if f.as_os_str() == "-" => {
                    std::io::read_to_string(std::io::stdin()).context("reading stdin")?
                }
                (None, Some(f)) => std::fs::read_to_string(&f)
                    .with_context(|| format!("cannot read {}", f.display()))?,
                (None, None) => unreachable!("clap requires one"),
            };
            let c = identity(&client)?;
            match format {
                QueryFormat::Csv => print!("{}", c.query_csv(&sql).await?),
                QueryFormat::Json => {
                    println!("{}", serde_json::to_string_pretty(&c.query(&sql).await?)?)
                }
                QueryFormat::Table => print::answer(&c.query(&sql).await?),
            }
        }
        Command::Overlap {
            with,
            args,
            format,
            client,
        } => {
            report(
                &client,
                "v1/overlaps",
                "overlap",
                &args.request(&with),
                format,
                print::overlap,
            )
            .await?;
        }
        Command::Report {
            command:
                ReportCommand::History {
                    with,
                    format,
                    client,
                },
        } => {
            let out = identity(&client)?.overlap_history(&with).await?;
            show(format, &out, print::overlap_history)?
        }
        Command::Report {
            command:
                ReportCommand::CoSelling {
                    with,
                    args,
                    my_customers,
                    my_opportunities,
                    their_customers,
                    their_opportunities,
                    format,
                    client,
                },
        } => {
            let req = wire::CoSellingRequest {
                with,
                mine: args.mine,
                theirs: args.theirs,
                by: args.by,
                my_customers,
                my_opportunities,
                their_customers,
                their_opportunities,
            };
            report(
                &client,
                "v1/reports/co-selling",
                "co-selling report",
                &req,
                format,
                print::co_selling,
            )
            .await?;
        }
        Command::User { command } => user(command).await?,
        Command::Audit { command } => audit(command).await?,
        Command::Console { client, print } => {
            let (url, link) = identity(&client)?.console_link().await?;
            println!("{url}");
            if !print {
                let opened = std::process::Command::new("xdg-open")
                    .arg(&url)
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .is_ok();
                if !opened {
                    eprintln!(
                        "no browser to open here: open the link above within {} seconds",
                        link.expires_in_secs
                    );
                }
            }
        }
        Command::Whoami { client } => {
            let out = identity(&client)?.whoami().await?;
            println!(
                "partner={} user={} role={}",
                out.partner, out.user, out.role
            );
            if let Some(bundle) = &client.identity {
                warn_if_ending(bundle);
            }
        }
        Command::Enroll {
            server,
            token,
            out,
            server_ca,
        } => {
            // The default directory is named after the token's identity.
            let out = match out {
                Some(out) => out,
                None => {
                    let t = escrow::model::enrollment::Token::parse(&token).map_err(engine)?;
                    PathBuf::from(format!("{}-{}", t.partner, t.user))
                }
            };
            let cert = escrow::client::enroll(&server, &token, server_ca.as_deref(), &out).await?;
            println!(
                "enrolled as {}/{} (role {}); identity bundle: {}; certificate valid until {}",
                cert.partner,
                cert.user,
                cert.role,
                out.display(),
                cert.not_after
            );
        }
        Command::Renew { client } => {
            let bundle = client.identity.clone().ok_or_else(|| {
                anyhow!("no identity: pass --identity BUNDLE_DIR or set ESCROW_IDENTITY")
            })?;
            let cert = identity(&client)?.renew(&bundle).await?;
            println!(
                "renewed {}/{}: {} holds a new key and a certificate valid until {}",
                cert.partner,
                cert.user,
                bundle.display(),
                cert.not_after
            );
        }
    }
    Ok(())
}

/// Warn on stderr when the certificate of the bundle at `bundle` ends within 30 days.
fn warn_if_ending(bundle: &std::path::Path) {
    let Ok(pem) = std::fs::read_to_string(bundle.join("cert.pem")) else {
        return;
    };
    let Ok(end) = escrow::pki::not_after(&pem) else {
        return;
    };
    let left = end - time::OffsetDateTime::now_utc();
    if left < time::Duration::days(30) {
        eprintln!(
            "warning: your certificate ends on {} (in {} days): run `escrow renew` before then",
            escrow::catalog::rfc3339(end),
            left.whole_days()
        );
    }
}

async fn user(command: UserCommand) -> anyhow::Result<()> {
    match command {
        UserCommand::Invite {
            partner,
            name,
            role,
            terms,
            target,
        } => match target.client()? {
            None => {
                let invited = escrow::admin::invite_user(
                    &target.dir(),
                    &escrow::audit::Actor::operator(),
                    (&partner, &name, &role),
                    terms.terms(),
                )
                .map_err(engine)?;
                print_invitation(
                    &partner,
                    &name,
                    &role,
                    &invited.token.to_string(),
                    &escrow::catalog::rfc3339(invited.expires_at),
                );
            }
            Some(c) => {
                if terms.cert_days.is_some() {
                    anyhow::bail!(
                        "--cert-days is the server's (serve --cert-days) for an invitation made through the API"
                    );
                }
                let req = wire::InviteRequest {
                    partner: Some(partner.clone()),
                    name: name.clone(),
                    role: role.clone(),
                    valid_for_secs: Some(terms.valid_for.as_secs()),
                };
                let inv: wire::Invitation = c
                    .post("v1/users/invitations", &req, "inviting the user")
                    .await?;
                print_invitation(&partner, &name, &inv.role, &inv.token, &inv.expires_at);
            }
        },
        UserCommand::Add {
            partner,
            name,
            role,
            cert_days,
            out,
            target,
        } => match target.client()? {
            None => {
                let bundle = escrow::admin::add_user(
                    &target.dir(),
                    &escrow::audit::Actor::operator(),
                    (&partner, &name, &role),
                    cert_days,
                )
                .map_err(engine)?;
                println!(
                    "user {partner}/{name} added with role {role}; identity bundle: {}",
                    bundle.display()
                );
            }
            Some(c) => {
                let req = wire::UserRequest {
                    partner: Some(partner.clone()),
                    name: name.clone(),
                    role: Some(role.clone()),
                };
                let added: wire::UserAdded = c.post("v1/users", &req, "adding the user").await?;
                let out = out.unwrap_or_else(|| PathBuf::from(format!("{partner}-{name}")));
                escrow::client::write_bundle(&out, &added.bundle)?;
                println!(
                    "user {partner}/{name} added with role {role}; identity bundle: {}",
                    out.display()
                );
            }
        },
        UserCommand::Invitations { partner, target } => {
            let (partner_shown, open): (String, Vec<wire::PendingInvitation>) = match target
                .client()?
            {
                None => {
                    let open = escrow::admin::open_invitations(&target.dir(), partner.as_deref())
                        .map_err(engine)?;
                    let rows = open
                        .into_iter()
                        .map(|i| {
                            let p = i.partner.clone();
                            let mut w = wire::PendingInvitation::from(i);
                            w.user = format!("{p}/{}", w.user);
                            w
                        })
                        .collect();
                    (partner.unwrap_or_else(|| "every partner".into()), rows)
                }
                Some(c) => {
                    let list: wire::InvitationList = c
                        .get("v1/users/invitations", &[], "listing invitations")
                        .await?;
                    (list.partner, list.invitations)
                }
            };
            if open.is_empty() {
                println!("no open invitations ({partner_shown})");
            } else {
                print::table(
                    &["user", "role", "expires_at", "invited_by"].map(String::from),
                    &open
                        .into_iter()
                        .map(|i| vec![i.user, i.role, i.expires_at, i.invited_by])
                        .collect::<Vec<_>>(),
                );
            }
        }
        UserCommand::Revoke {
            partner,
            name,
            target,
        } => {
            match target.client()? {
                None => escrow::admin::revoke_user(
                    &target.dir(),
                    &escrow::audit::Actor::operator(),
                    &partner,
                    &name,
                )
                .map_err(engine)?,
                Some(c) => {
                    let req = wire::UserRequest {
                        partner: Some(partner.clone()),
                        name: name.clone(),
                        role: None,
                    };
                    let _: wire::UserRevoked = c
                        .post("v1/users/revocations", &req, "revoking the user")
                        .await?;
                }
            }
            println!("user {partner}/{name} revoked; its certificate is refused from now on");
        }
    }
    Ok(())
}

async fn audit(command: AuditCommand) -> anyhow::Result<()> {
    match command {
        AuditCommand::List {
            since,
            format,
            data_dir,
            catalog,
            client,
        } => {
            let records = match data_dir {
                Some(d) => {
                    let since = since
                        .as_deref()
                        .map(escrow::audit::parse_since)
                        .transpose()
                        .map_err(engine)?;
                    escrow::admin::audit_list(&DataDir::new(d).with_catalog(catalog), since)
                        .map_err(engine)?
                }
                None => {
                    let q: Vec<(&str, &str)> =
                        since.as_deref().map(|s| ("since", s)).into_iter().collect();
                    let out: wire::AuditRecords = identity(&client)?
                        .get("v1/audit", &q, "listing the audit log")
                        .await?;
                    out.records
                }
            };
            show(format, records.as_slice(), print::audit)?
        }
        AuditCommand::Export {
            output,
            data_dir,
            catalog,
            client,
        } => {
            let bytes = match data_dir {
                Some(d) => {
                    let mut out = Vec::new();
                    escrow::admin::audit_export(&DataDir::new(d).with_catalog(catalog), &mut out)
                        .map_err(engine)?;
                    out
                }
                None => identity(&client)?
                    .get_text("v1/audit/export", "exporting the audit log")
                    .await?
                    .into_bytes(),
            };
            match output {
                Some(p) => std::fs::write(&p, &bytes)
                    .with_context(|| format!("writing {}", p.display()))?,
                None => {
                    use std::io::Write;
                    std::io::stdout().write_all(&bytes)?;
                }
            }
        }
        AuditCommand::Verify {
            data_dir,
            catalog,
            file,
            public_key,
            checkpoint,
        } => {
            let must_contain = checkpoint
                .map(|p| -> anyhow::Result<(u64, String)> {
                    /// What `audit checkpoint` prints, or the checkpoint alone.
                    #[derive(serde::Deserialize)]
                    #[serde(untagged)]
                    enum Kept {
                        Fetched(wire::AuditCheckpoint),
                        Alone(wire::Checkpoint),
                    }
                    let kept: Kept = serde_json::from_slice(
                        &std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?,
                    )
                    .with_context(|| format!("{} is not a checkpoint", p.display()))?;
                    let c = match kept {
                        Kept::Fetched(f) => f
                            .checkpoint
                            .ok_or_else(|| anyhow!("{} holds no checkpoint", p.display()))?,
                        Kept::Alone(c) => c,
                    };
                    Ok((c.seq, c.hash))
                })
                .transpose()?
                .into_iter()
                .collect::<Vec<_>>();
            let (what, result, pinned) = match (data_dir, file) {
                (Some(d), _) => {
                    let r = escrow::admin::audit_verify(
                        &DataDir::new(&d).with_catalog(catalog),
                        must_contain,
                    )
                    .map_err(engine)?;
                    (d.display().to_string(), r, true)
                }
                (None, Some(f)) => {
                    let file = std::fs::File::open(&f)
                        .with_context(|| format!("opening {}", f.display()))?;
                    let opts = escrow::audit::VerifyOptions {
                        public_key: public_key.clone(),
                        must_contain,
                        whole: true,
                    };
                    (
                        f.display().to_string(),
                        escrow::audit::verify(file, &opts),
                        public_key.is_some(),
                    )
                }
                (None, None) => anyhow::bail!("pass --data-dir DIR or --file EXPORT"),
            };
            match result {
                Ok(v) => {
                    println!(
                        "audit log {what} intact: {} records ({} redacted), {} signed checkpoints, head {}",
                        v.records, v.redacted, v.checkpoints, v.head
                    );
                    println!(
                        "signatures checked against key {}{}",
                        v.public_key,
                        if pinned {
                            ""
                        } else {
                            " (named by the export itself: compare it with the escrow's key)"
                        }
                    );
                    if v.after_last_checkpoint > 0 {
                        println!(
                            "{} record(s) after the last checkpoint (signed, not yet checkpointed)",
                            v.after_last_checkpoint
                        );
                    }
                    if v.torn_tail {
                        println!(
                            "the last line is incomplete (an append interrupted by a crash); the next append cuts it off and records that"
                        );
                    }
                }
                Err(f) => anyhow::bail!("audit log {what} is NOT intact: {f}"),
            }
        }
        AuditCommand::Checkpoint { client } => {
            let out: wire::AuditCheckpoint = identity(&client)?
                .get("v1/audit/checkpoint", &[], "fetching the checkpoint")
                .await?;
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
    }
    Ok(())
}

impl OverlapArgs {
    fn request(&self, with: &str) -> wire::OverlapRequest {
        wire::OverlapRequest {
            with: with.to_string(),
            mine: self.mine.clone(),
            theirs: self.theirs.clone(),
            by: self.by.clone(),
        }
    }
}

/// Print an answer as JSON (the API's own shape) or as text by `table`.
fn show<T: serde::Serialize + ?Sized>(
    format: OutputFormat,
    out: &T,
    table: fn(&T),
) -> anyhow::Result<()> {
    match format {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(out)?),
        OutputFormat::Table => table(out),
    }
    Ok(())
}

/// Ask for an overlap-shaped answer and print it in `format`.
async fn report<R: serde::Serialize, T: serde::Serialize + serde::de::DeserializeOwned>(
    client: &ClientArgs,
    path: &str,
    what: &str,
    request: &R,
    format: QueryFormat,
    table: fn(&T),
) -> anyhow::Result<()> {
    let c = identity(client)?;
    match format {
        QueryFormat::Csv => {
            let body = escrow::client::WithFormat {
                request,
                format: "csv",
            };
            print!("{}", c.post_text(path, &body, what).await?);
        }
        QueryFormat::Json => {
            let out: T = c.post(path, request, what).await?;
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        QueryFormat::Table => table(&c.post(path, request, what).await?),
    }
    Ok(())
}

async fn serve(
    dir: DataDir,
    listen: SocketAddr,
    (max_upload_bytes, grace_secs): (u64, u64),
    server_cert: Option<server::tls::ServerCert>,
    query: QueryLimitArgs,
) -> anyhow::Result<()> {
    let mb = |n: usize| n.saturating_mul(1 << 20);
    escrow::pki::check_cert_days(query.cert_days).map_err(engine)?;
    let config = escrow::app::Config {
        listen,
        server_cert,
        max_upload_bytes,
        shutdown_grace: Duration::from_secs(grace_secs),
        query_memory_bytes: mb(query.query_memory_mb),
        query_timeout: Duration::from_secs(query.query_timeout_secs),
        query_cache_bytes: mb(query.query_cache_mb),
        admitted_memory_bytes: query.admitted_memory_mb.map(mb),
        console_link: Duration::from_secs(query.console_link_secs),
        cert_days: query.cert_days,
        admission: server::limits::Limits {
            uploads: server::limits::Limit {
                per_partner: query.max_uploads_per_partner,
                total: query.max_uploads,
            },
            questions: server::limits::Limit {
                per_partner: query.max_questions_per_partner,
                total: query.max_questions,
            },
            wait: Duration::from_millis(query.busy_wait_ms),
        },
        ..escrow::app::Config::new(dir)
    };
    let app = escrow::app::Application::build(config)
        .await
        .map_err(engine)?;
    // Machine-readable first line on stdout (tests and scripts read the bound port here).
    println!("escrow listening on https://{}", app.local_addr());
    app.run_until(server::shutdown_signal())
        .await
        .map_err(engine)
}
