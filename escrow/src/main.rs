//! The `escrow` command: operator commands on a data directory, the server, and the client.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use clap::{Args, Parser, Subcommand, ValueEnum};
use escrow::client::Client;
use escrow::datadir::DataDir;
use escrow::server::{self, AppState};
use escrow::store::{Store, StoreConfig};

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
}

#[derive(Args, Clone)]
struct ClientArgs {
    /// Identity bundle directory (cert.pem, key.pem, ca.pem).
    #[arg(long, env = "ESCROW_IDENTITY")]
    identity: Option<PathBuf>,
    /// Server URL.
    #[arg(long, env = "ESCROW_SERVER", default_value = "https://127.0.0.1:8443")]
    server: String,
}

#[derive(Subcommand)]
enum Command {
    /// Create the data directory: key-encryption key, dev CA, server certificate, catalog.
    /// Idempotent; never overwrites existing keys.
    Init(DirArgs),
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
        /// How the key column is read: website (matched as companies, the default for text)
        /// or id (exact identifiers such as DUNS numbers).
        #[arg(long)]
        key_type: Option<String>,
        /// File format (csv, arrow, arrow-stream, parquet); guessed from the name otherwise.
        #[arg(long = "input-format")]
        input_format: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List your datasets (metadata only), or delete one.
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
    /// Show who the server thinks you are.
    Whoami {
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
    /// Default: --max-questions x --query-memory-mb.
    #[arg(long, env = "ESCROW_ADMITTED_MEMORY_MB")]
    admitted_memory_mb: Option<usize>,
    /// Seconds a console sign-in link (`escrow console`) stays valid (1 to 3600).
    #[arg(long, env = "ESCROW_CONSOLE_LINK_SECS", default_value_t = 300)]
    console_link_secs: u64,
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
    /// Register a partner and write its admin identity bundle to DIR/identities/NAME/admin/.
    Add {
        name: String,
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

/// Where a user command acts: on the data directory (operator), or through the API as the
/// partner's admin (`--identity`).
#[derive(Args)]
struct UserTarget {
    /// Data directory (operator command).
    #[arg(long, env = "ESCROW_DATA_DIR", default_value = "./escrow-data")]
    data_dir: PathBuf,
    /// Act through the API as this admin identity bundle instead of on the data directory.
    #[arg(long)]
    identity: Option<PathBuf>,
    /// Server URL (with --identity).
    #[arg(long, env = "ESCROW_SERVER", default_value = "https://127.0.0.1:8443")]
    server: String,
}

impl UserTarget {
    /// The API client, if acting as an admin through the API.
    fn client(&self) -> anyhow::Result<Option<Client>> {
        self.identity
            .as_ref()
            .map(|id| Client::new(&self.server, id))
            .transpose()
    }
}

#[derive(Subcommand)]
enum UserCommand {
    /// Issue an identity for a user of a partner with a role; the bundle is written to
    /// DIR/identities/PARTNER/NAME/ (or, through the API, to --out).
    Add {
        partner: String,
        name: String,
        /// admin, compliance, analyst or uploader (policies/roles.csv says what each may do).
        #[arg(long)]
        role: String,
        /// With --identity: where to write the new bundle (default ./PARTNER-NAME).
        #[arg(long)]
        out: Option<PathBuf>,
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
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Check the chain and every signature of an export or of a data directory's log.
    /// Exits 0 only if intact; otherwise names the first bad record.
    #[command(group(clap::ArgGroup::new("source").required(true).args(["data_dir", "file"])))]
    Verify {
        #[arg(long)]
        data_dir: Option<PathBuf>,
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
    fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "dataset": self.dataset,
            "to": self.to,
            "usage": self.usage,
            "column": self.column,
            "population": self.population,
        })
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
}

#[derive(Subcommand)]
enum DatasetsCommand {
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

/// Seconds between the server's periodic audit checkpoints.
const AUDIT_CHECKPOINT_SECS: u64 = 60;

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
    Client::new(&args.server, &id)
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Init(d) => {
            let dir = DataDir::new(d.data_dir);
            let r = escrow::admin::init(&dir).map_err(engine)?;
            if r.created_anything() {
                println!("initialised {}", dir.root().display());
            } else {
                println!(
                    "{} is already initialised; nothing changed",
                    dir.root().display()
                );
            }
        }
        Command::Serve {
            dir,
            listen,
            max_upload_bytes,
            shutdown_grace_secs,
            query,
        } => {
            serve(
                DataDir::new(dir.data_dir),
                listen,
                max_upload_bytes,
                shutdown_grace_secs,
                query,
            )
            .await?
        }
        Command::Keys {
            command: KeysCommand::Rotate(dir),
        } => {
            let r = escrow::admin::rotate_kek(&DataDir::new(dir.data_dir)).map_err(engine)?;
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
            PartnerCommand::Add { name, dir } => {
                let bundle = escrow::admin::add_partner(&DataDir::new(dir.data_dir), &name)
                    .map_err(engine)?;
                println!(
                    "partner {name} added; admin identity bundle: {}",
                    bundle.display()
                );
            }
            PartnerCommand::Revoke { name, dir } => {
                escrow::admin::revoke_partner(&DataDir::new(dir.data_dir), &name)
                    .map_err(engine)?;
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
            key_type,
            input_format,
            client,
        } => {
            let c = identity(&client)?;
            let key = escrow::client::UploadKey {
                column: key_column.as_deref(),
                name_column: name_column.as_deref(),
                name_context: name_context.as_deref(),
                key_type: key_type.as_deref(),
            };
            let out = c
                .upload(&file, &dataset, &key, input_format.as_deref())
                .await?;
            let m = &out["matching"];
            let matching = if m.is_null() {
                String::new()
            } else {
                format!(
                    " matched_by_domain={} matched_by_name={} unmatched={}",
                    m["by_domain"], m["by_name"], m["unmatched"]
                )
            };
            println!(
                "dataset={} version={} rows={} bytes={} format={} key_column={}{matching}",
                out["dataset"].as_str().unwrap_or("?"),
                out["version"],
                out["rows"],
                out["bytes"],
                out["format"].as_str().unwrap_or("?"),
                out["key_column"].as_str().unwrap_or("-"),
            );
        }
        Command::Datasets {
            command,
            format,
            client,
        } => match command {
            Some(DatasetsCommand::Delete { name, client }) => {
                let out = identity(&client)?.delete(&name).await?;
                println!(
                    "dataset {name} deleted: {} version(s) crypto-shredded",
                    out["versions_destroyed"]
                );
            }
            None => {
                let out = identity(&client)?.datasets().await?;
                match format {
                    OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&out)?),
                    OutputFormat::Table => print_datasets(&out),
                }
            }
        },
        Command::Policy { command } => match command {
            PolicyCommand::Grant(a) => {
                let out = identity(&a.client)?.policy_change(false, &a.body()).await?;
                let verb = if out["changed"] == true {
                    "granted"
                } else {
                    "already granted"
                };
                println!("{verb}: {}", grant_line(&out["grant"]));
            }
            PolicyCommand::Revoke(a) => {
                let out = identity(&a.client)?.policy_change(true, &a.body()).await?;
                println!("revoked: {}", grant_line(&out["revoked"]));
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
                let mut b = serde_json::Map::new();
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
                    b.insert(col.to_string(), serde_json::json!([lo, hi]));
                }
                let body = serde_json::json!({
                    "dataset": dataset,
                    "min_entities": min_entities,
                    "epsilon": epsilon,
                    "budget": budget,
                    "max_groups_per_entity": max_groups,
                    "bounds": b,
                });
                let out = identity(&client)?.settings(&body).await?;
                let s = &out["settings"];
                println!(
                    "{dataset}: min_entities={} epsilon={} budget={} max_groups_per_entity={} bounds={}",
                    s["min_entities"],
                    s["epsilon"],
                    s["budget"],
                    s["max_groups_per_entity"],
                    s["bounds"]
                );
            }
            PolicyCommand::List { format, client } => {
                let out = identity(&client)?.policies().await?;
                match format {
                    OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&out)?),
                    OutputFormat::Table => {
                        for (title, key) in [
                            ("granted by you", "granted"),
                            ("granted to you", "received"),
                        ] {
                            let list = list(&out[key]);
                            println!("{title}: {}", if list.is_empty() { "none" } else { "" });
                            for g in list {
                                println!("  {}", grant_line(g));
                            }
                        }
                    }
                }
            }
            PolicyCommand::Explain {
                sql,
                with,
                args,
                format,
                client,
            } => {
                let c = identity(&client)?;
                let out = match (sql, with) {
                    (Some(sql), None) => {
                        c.post_json(
                            "v1/queries/explain",
                            &serde_json::json!({ "sql": sql }),
                            "explain",
                        )
                        .await?
                    }
                    (None, Some(with)) => {
                        let body = serde_json::json!({
                            "with": with, "mine": args.mine, "theirs": args.theirs, "by": args.by,
                        });
                        c.post_json("v1/overlaps/explain", &body, "explain").await?
                    }
                    _ => {
                        return Err(anyhow!(
                            "give the SQL to explain, or --with PARTNER for an overlap question"
                        ));
                    }
                };
                match format {
                    OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&out)?),
                    OutputFormat::Table => print_explanation(&out),
                }
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
                let out = identity(&client)?
                    .get_json("v1/policies/preview", &q, "preview")
                    .await?;
                match format {
                    OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&out)?),
                    OutputFormat::Table => print_preview(&out),
                }
            }
            PolicyCommand::History { format, client } => {
                let out = identity(&client)?
                    .get_json("v1/policies/versions", &[], "policy history")
                    .await?;
                match format {
                    OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&out)?),
                    OutputFormat::Table => {
                        for v in items_or_say(&out, "versions", "no policy changes yet") {
                            println!(
                                "v{}  {}  {}  {}",
                                v["version"],
                                v["time"].as_str().unwrap_or("?"),
                                v["by"].as_str().unwrap_or("?"),
                                v["change"].as_str().unwrap_or("?"),
                            );
                            print_diff(v, "    ");
                        }
                    }
                }
            }
            PolicyCommand::Diff { from, to, client } => {
                let (from_s, to_s) = (from.to_string(), to.map(|t| t.to_string()));
                let mut q = vec![("from", from_s.as_str())];
                if let Some(t) = &to_s {
                    q.push(("to", t.as_str()));
                }
                let out = identity(&client)?
                    .get_json("v1/policies/diff", &q, "policy diff")
                    .await?;
                println!("v{} -> v{}", out["from"], out["to"]);
                print_diff(&out, "");
            }
            PolicyCommand::Rollback { version, client } => {
                let out = identity(&client)?
                    .post_json(
                        "v1/policies/rollback",
                        &serde_json::json!({ "version": version }),
                        "rollback",
                    )
                    .await?;
                match out["version"].as_i64() {
                    Some(v) => println!("policy v{v}: the rules of v{version} again"),
                    None => {
                        println!("the policy in force already is v{version}'s: nothing changed")
                    }
                }
                print_diff(&out, "");
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
                let q: &[(&str, &str)] = if dry_run { &[("dry_run", "true")] } else { &[] };
                let out = identity(&client)?
                    .post_document("v1/policies/import", q, body, "import")
                    .await?;
                match (dry_run, out["version"].as_i64()) {
                    (true, _) => println!("valid; importing it would change:"),
                    (false, Some(v)) => println!("imported as policy v{v}"),
                    (false, None) => {
                        println!("the document is the policy in force: nothing changed")
                    }
                }
                print_diff(&out, "");
            }
        },
        Command::Population { command } => match command {
            PopulationCommand::Add {
                dataset,
                name,
                filter,
                client,
            } => {
                let body = serde_json::json!({"dataset": dataset, "name": name, "filter": filter});
                let out = identity(&client)?.population_change(false, &body).await?;
                let p = &out["population"];
                let verb = if out["changed"] == true {
                    "defined"
                } else {
                    "already defined"
                };
                println!(
                    "{verb}: {}.{} where {}",
                    dataset,
                    p["name"].as_str().unwrap_or("?"),
                    p["filter"].as_str().unwrap_or("?")
                );
            }
            PopulationCommand::List { format, client } => {
                let out = identity(&client)?.populations().await?;
                match format {
                    OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&out)?),
                    OutputFormat::Table => {
                        for p in items_or_say(&out, "populations", "no populations") {
                            println!(
                                "{}.{}  where {}",
                                p["dataset"].as_str().unwrap_or("?"),
                                p["name"].as_str().unwrap_or("?"),
                                p["filter"].as_str().unwrap_or("?")
                            );
                        }
                    }
                }
            }
            PopulationCommand::Remove {
                dataset,
                name,
                client,
            } => {
                let body = serde_json::json!({"dataset": dataset, "name": name});
                identity(&client)?.population_change(true, &body).await?;
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
                QueryFormat::Table => print_answer(&c.query(&sql).await?),
            }
        }
        Command::Overlap {
            with,
            args,
            format,
            client,
        } => {
            let body = args.body(&with);
            report(
                &client,
                "v1/overlaps",
                "overlap",
                &body,
                format,
                print_overlap,
            )
            .await?;
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
            let mut body = args.body(&with);
            for (k, v) in [
                ("my_customers", my_customers),
                ("my_opportunities", my_opportunities),
                ("their_customers", their_customers),
                ("their_opportunities", their_opportunities),
            ] {
                body[k] = serde_json::json!(v);
            }
            report(
                &client,
                "v1/reports/co-selling",
                "co-selling report",
                &body,
                format,
                print_co_selling,
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
                out["partner"].as_str().unwrap_or("?"),
                out["user"].as_str().unwrap_or("?"),
                out["role"].as_str().unwrap_or("?")
            );
        }
    }
    Ok(())
}

async fn user(command: UserCommand) -> anyhow::Result<()> {
    match command {
        UserCommand::Add {
            partner,
            name,
            role,
            out,
            target,
        } => match target.client()? {
            None => {
                let bundle = escrow::admin::add_user(
                    &DataDir::new(&target.data_dir),
                    &escrow::audit::Actor::operator(),
                    &partner,
                    &name,
                    &role,
                )
                .map_err(engine)?;
                println!(
                    "user {partner}/{name} added with role {role}; identity bundle: {}",
                    bundle.display()
                );
            }
            Some(c) => {
                let body = serde_json::json!({ "partner": partner, "name": name, "role": role });
                let resp = c.post_json("v1/users", &body, "adding the user").await?;
                let out = out.unwrap_or_else(|| PathBuf::from(format!("{partner}-{name}")));
                write_bundle(&out, &resp["bundle"])?;
                println!(
                    "user {partner}/{name} added with role {role}; identity bundle: {}",
                    out.display()
                );
            }
        },
        UserCommand::Revoke {
            partner,
            name,
            target,
        } => {
            match target.client()? {
                None => escrow::admin::revoke_user(
                    &DataDir::new(&target.data_dir),
                    &escrow::audit::Actor::operator(),
                    &partner,
                    &name,
                )
                .map_err(engine)?,
                Some(c) => {
                    let body = serde_json::json!({ "partner": partner, "name": name });
                    c.post_json("v1/users/revocations", &body, "revoking the user")
                        .await?;
                }
            }
            println!("user {partner}/{name} revoked; its certificate is refused from now on");
        }
    }
    Ok(())
}

/// Write an identity bundle received from the API (key 0600, never overwriting).
fn write_bundle(out: &std::path::Path, bundle: &serde_json::Value) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(out)
        .with_context(|| format!("creating {}", out.display()))?;
    for (file, field) in [
        ("key.pem", "key_pem"),
        ("cert.pem", "cert_pem"),
        ("ca.pem", "ca_pem"),
    ] {
        let text = bundle[field]
            .as_str()
            .ok_or_else(|| anyhow!("the server sent no {field}"))?;
        let path = out.join(file);
        if !escrow::fsutil::write_new_private(&path, text.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?
        {
            anyhow::bail!("{} exists; choose another --out", path.display());
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
            client,
        } => {
            let records = match data_dir {
                Some(d) => {
                    let since = since
                        .as_deref()
                        .map(escrow::audit::parse_since)
                        .transpose()
                        .map_err(engine)?;
                    let r = escrow::admin::audit_list(&DataDir::new(d), since).map_err(engine)?;
                    serde_json::to_value(r)?
                }
                None => {
                    let q: Vec<(&str, &str)> =
                        since.as_deref().map(|s| ("since", s)).into_iter().collect();
                    identity(&client)?
                        .get_json("v1/audit", &q, "listing the audit log")
                        .await?["records"]
                        .take()
                }
            };
            match format {
                OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&records)?),
                OutputFormat::Table => print_audit(&records),
            }
        }
        AuditCommand::Export {
            output,
            data_dir,
            client,
        } => {
            let bytes = match data_dir {
                Some(d) => {
                    let mut out = Vec::new();
                    escrow::admin::audit_export(&DataDir::new(d), &mut out).map_err(engine)?;
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
            file,
            public_key,
            checkpoint,
        } => {
            let must_contain = checkpoint
                .map(|p| -> anyhow::Result<(u64, String)> {
                    let v: serde_json::Value = serde_json::from_slice(
                        &std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?,
                    )
                    .with_context(|| format!("{} is not a checkpoint", p.display()))?;
                    let c = if v["checkpoint"].is_object() {
                        &v["checkpoint"]
                    } else {
                        &v
                    };
                    match (c["seq"].as_u64(), c["hash"].as_str()) {
                        (Some(s), Some(h)) => Ok((s, h.to_string())),
                        _ => Err(anyhow!("{} is not a checkpoint", p.display())),
                    }
                })
                .transpose()?
                .into_iter()
                .collect::<Vec<_>>();
            let (what, result, pinned) = match (data_dir, file) {
                (Some(d), _) => {
                    let r = escrow::admin::audit_verify(&DataDir::new(&d), must_contain)
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
            let out = identity(&client)?
                .get_json("v1/audit/checkpoint", &[], "fetching the checkpoint")
                .await?;
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
    }
    Ok(())
}

fn print_audit(records: &serde_json::Value) {
    let rows: Vec<Vec<String>> = list(records)
        .iter()
        .map(|r| {
            let a = &r["actor"];
            let who = match a["partner"].as_str() {
                Some(p) => format!("{p}/{}", text(&a["user"])),
                None => text(&a["user"]),
            };
            let outcome = match r["code"].as_str() {
                Some(c) => format!("{} ({c})", text(&r["outcome"])),
                None => text(&r["outcome"]),
            };
            vec![
                r["seq"].to_string(),
                text(&r["time"]),
                text(&r["kind"]),
                who,
                outcome,
                audit_summary(&r["detail"]),
            ]
        })
        .collect();
    if rows.is_empty() {
        println!("no audit events");
        return;
    }
    let header: Vec<String> = ["seq", "time", "kind", "by", "outcome", "detail"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    print_table(&header, &rows);
}

/// The detail of an audit record on one line (the SQL shortened).
fn audit_summary(detail: &serde_json::Value) -> String {
    let Some(o) = detail.as_object() else {
        return String::new();
    };
    let mut parts = Vec::new();
    for (k, v) in o {
        if v.is_null() {
            continue;
        }
        let mut s = match v {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        if s.chars().count() > 60 {
            s = s.chars().take(57).collect::<String>() + "...";
        }
        parts.push(format!("{k}={s}"));
    }
    parts.join(" ")
}

impl OverlapArgs {
    fn body(&self, with: &str) -> serde_json::Value {
        serde_json::json!({ "with": with, "mine": self.mine, "theirs": self.theirs, "by": self.by })
    }
}

/// Ask for an overlap-shaped answer and print it in `format`.
async fn report(
    client: &ClientArgs,
    path: &str,
    what: &str,
    body: &serde_json::Value,
    format: QueryFormat,
    table: fn(&serde_json::Value),
) -> anyhow::Result<()> {
    let c = identity(client)?;
    match format {
        QueryFormat::Csv => {
            let mut body = body.clone();
            body["format"] = serde_json::json!("csv");
            print!("{}", c.post_text(path, &body, what).await?);
        }
        QueryFormat::Json => {
            let out = c.post_json(path, body, what).await?;
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        QueryFormat::Table => table(&c.post_json(path, body, what).await?),
    }
    Ok(())
}

fn print_explanation(e: &serde_json::Value) {
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("?").to_string();
    match e["refusal"].as_object() {
        None => println!("allowed"),
        Some(r) => println!("refused by rule {}: {}", s(&r["rule"]), s(&r["message"])),
    }
    let reads: Vec<String> = e["datasets"]
        .as_array()
        .into_iter()
        .flatten()
        .map(s)
        .collect();
    if !reads.is_empty() {
        println!("reads: {}", reads.join(", "));
    }
    for u in list(&e["uses"]) {
        let target = match (u["column"].as_str(), u["population"].as_str()) {
            (Some(c), _) => format!("{}.{c}", s(&u["dataset"])),
            (_, Some(p)) => format!("population {p} of {}", s(&u["dataset"])),
            _ => s(&u["dataset"]),
        };
        let why = match u["decision"].as_str() {
            Some("owner") => "your own data".to_string(),
            Some("granted") => format!("granted by {}", s(&u["rule"])),
            _ => format!("MISSING GRANT ({})", s(&u["missing_grant"])),
        };
        println!("  {target} as {}: {why}", s(&u["usage"]));
    }
    let p = &e["protection"];
    if p.is_object() {
        let from: Vec<String> = list(&p["from"]).iter().map(s).collect();
        println!(
            "protection: min_entities={} epsilon={} max_groups_per_entity={} (settings of {})",
            p["min_entities"],
            p["epsilon"],
            p["max_groups_per_entity"],
            from.join(", ")
        );
    }
    let c = &e["cost"];
    if c.is_object() {
        let repeat = if c["repeated"] == true {
            " (asked before: no new spend)"
        } else {
            ""
        };
        println!("cost: epsilon {}{repeat}", c["epsilon_spent"]);
        for b in list(&c["budgets"]) {
            println!(
                "  budget of {}: {} of {} spent after it",
                s(&b["dataset"]),
                b["spent"],
                b["budget"]
            );
        }
    }
}

fn print_preview(p: &serde_json::Value) {
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("?").to_string();
    let partner = s(&p["partner"]);
    for d in list(&p["datasets"]) {
        let seen = if d["visible"] == true {
            "can name it in queries"
        } else {
            "cannot see it"
        };
        println!("{} (v{}): {partner} {seen}", s(&d["dataset"]), d["version"]);
        for c in list(&d["columns"]) {
            let usages: Vec<String> = c["usages"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|u| s(&u["usage"]))
                .collect();
            println!("  {}: {}", s(&c["column"]), usages.join(", "));
        }
        match d["standalone"].as_str() {
            Some(rule) => println!("  standalone: yes ({rule})"),
            None => println!("  standalone: no (only joined to {partner}'s own datasets)"),
        }
        let pops: Vec<String> = d["populations"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|x| {
                format!(
                    "{} ({})",
                    s(&x["name"]),
                    if x["visible"] == true {
                        "visible"
                    } else {
                        "hidden"
                    }
                )
            })
            .collect();
        if !pops.is_empty() {
            println!("  populations: {}", pops.join(", "));
        }
        let st = &d["settings"];
        println!(
            "  protection: min_entities={} epsilon={} max_groups_per_entity={}; budget {} spent {} remaining {}",
            st["min_entities"],
            st["epsilon"],
            st["max_groups_per_entity"],
            st["budget"],
            d["budget"]["spent"],
            d["remaining"]
        );
        println!("  guarantee: {}", s(&d["guarantee"]));
        for n in list(&d["notes"]) {
            println!("  note: {}", s(n));
        }
    }
}

/// The `removed` and `added` lines of a policy diff, as `- line` / `+ line`.
fn print_diff(d: &serde_json::Value, indent: &str) {
    for (sign, key) in [("-", "removed"), ("+", "added")] {
        for line in list(&d[key]) {
            println!("{indent}{sign} {}", line.as_str().unwrap_or("?"));
        }
    }
}

fn grant_line(g: &serde_json::Value) -> String {
    let s = |k: &str| g[k].as_str().unwrap_or("?").to_string();
    if s("usage") == "overlap" {
        let which = match s("population").as_str() {
            "*" => "every population".to_string(),
            p => format!("population {p}"),
        };
        return format!(
            "{} may see overlap counts of {which} of {}",
            s("to"),
            s("dataset")
        );
    }
    format!(
        "{} may use {}.{} as {}",
        s("to"),
        s("dataset"),
        s("column"),
        s("usage")
    )
}

/// The items of the list `out[field]`, after printing `none` if there are none.
fn items_or_say<'a>(
    out: &'a serde_json::Value,
    field: &str,
    none: &str,
) -> &'a [serde_json::Value] {
    let list = list(&out[field]);
    if list.is_empty() {
        println!("{none}");
    }
    list
}

fn print_datasets(out: &serde_json::Value) {
    let datasets = items_or_say(out, "datasets", "no datasets");
    if datasets.is_empty() {
        return;
    }
    println!(
        "{:<24} {:>7} {:>10}  {:<16} {:<20}  COLUMNS",
        "NAME", "VERSION", "ROWS", "KEY COLUMN", "CREATED (UTC)"
    );
    for d in datasets {
        let cols: Vec<String> = list(&d["columns"])
            .iter()
            .map(|c| format!("{}:{}", text(&c["name"]), text(&c["type"])))
            .collect();
        let created = text(&d["created_at"]);
        println!(
            "{:<24} {:>7} {:>10}  {:<16} {:<20}  {}",
            text(&d["name"]),
            text(&d["version"]),
            text(&d["rows"]),
            text(&d["key_column"]),
            created.get(..19).unwrap_or(&created).replace('T', " "),
            cols.join(", ")
        );
    }
}

/// An answer as a table; suppressed rows and the protection applied are stated under it.
fn text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".to_string(),
        other => other.to_string(),
    }
}

fn list(v: &serde_json::Value) -> &[serde_json::Value] {
    v.as_array().map(Vec::as_slice).unwrap_or(&[])
}

/// Columns padded to their widest value, two spaces apart.
fn print_table(header: &[String], rows: &[Vec<String>]) {
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, v) in width.iter_mut().zip(r) {
            *w = (*w).max(v.chars().count());
        }
    }
    let line = |vals: &[String]| {
        vals.iter()
            .zip(&width)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    println!("{}", line(header));
    for r in rows {
        println!("{}", line(r));
    }
}

/// The protection applied and the budget it cost, under an answer.
fn print_protection(out: &serde_json::Value, withheld: &str) {
    let Some(p) = out["protection"].as_object() else {
        return;
    };
    let sensitivity = match p.get("sensitivity") {
        Some(s) => format!(" and sensitivity {s}"),
        None => String::new(),
    };
    println!(
        "protected: rows need >= {} entities (release threshold {:.1}), noise with epsilon {}{sensitivity} (sd {:.1} per count); {withheld}",
        p["min_entities"],
        p["release_threshold"].as_f64().unwrap_or(0.0),
        p["epsilon"],
        p["noise_sd"].as_f64().unwrap_or(0.0)
    );
    if out["repeated"] == true {
        println!("same question on the same data as before: same answer, no budget spent");
    } else {
        println!("budget spent: {}", out["epsilon_spent"]);
    }
    for b in list(&out["budgets"]) {
        println!(
            "  {}: {} of {} spent",
            text(&b["dataset"]),
            b["spent"],
            b["budget"]
        );
    }
}

/// An answer as a table; suppressed rows and the protection applied are stated under it.
fn print_answer(out: &serde_json::Value) {
    let cols: Vec<String> = list(&out["columns"])
        .iter()
        .map(|c| text(&c["name"]))
        .collect();
    let suppressed = list(&out["suppressed"]);
    let rows: Vec<Vec<String>> = list(&out["rows"])
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut row: Vec<String> = list(r).iter().map(text).collect();
            if suppressed.get(i) == Some(&serde_json::Value::Bool(true)) {
                row.push("(suppressed: too few entities)".into());
            }
            row
        })
        .collect();
    print_table(&cols, &rows);
    println!(
        "({} row{})",
        rows.len(),
        if rows.len() == 1 { "" } else { "s" }
    );
    print_protection(out, "groups below the threshold are not listed");
}

fn count_text(r: &serde_json::Value) -> String {
    if r["suppressed"] == true {
        "suppressed".into()
    } else {
        text(&r["count"])
    }
}

/// Overlap rows as a list: mine, theirs, [value,] count.
fn overlap_rows(
    out: &serde_json::Value,
    rows: &[serde_json::Value],
) -> (Vec<String>, Vec<Vec<String>>) {
    let by = out["by"].as_str();
    let key = match by {
        Some(b) if ["mine", "theirs", "count", "suppressed"].contains(&b) => Some("value"),
        other => other,
    };
    let mut header = vec!["MINE".to_string(), "THEIRS".to_string()];
    header.extend(by.map(str::to_uppercase));
    header.push("COUNT".into());
    let table = rows
        .iter()
        .map(|r| {
            let mut row = vec![text(&r["mine"]), text(&r["theirs"])];
            if let Some(k) = key {
                row.push(text(&r[k]));
            }
            row.push(count_text(r));
            row
        })
        .collect();
    (header, table)
}

/// The matrix (my populations down, theirs across), or the breakdown as a list.
fn print_overlap(out: &serde_json::Value) {
    println!(
        "overlap of {} (yours) with {}",
        text(&out["mine"]),
        text(&out["theirs"])
    );
    let rows = list(&out["rows"]);
    if out["by"].is_null() {
        let theirs: Vec<String> = list(&out["populations"]["theirs"])
            .iter()
            .map(text)
            .collect();
        let mut header = vec!["mine \\ theirs".to_string()];
        header.extend(theirs.iter().cloned());
        let table: Vec<Vec<String>> = list(&out["populations"]["mine"])
            .iter()
            .map(text)
            .map(|m| {
                let mut row = vec![m.clone()];
                row.extend(theirs.iter().map(|t| {
                    rows.iter()
                        .find(|r| text(&r["mine"]) == m && &text(&r["theirs"]) == t)
                        .map(count_text)
                        .unwrap_or_else(|| "-".into())
                }));
                row
            })
            .collect();
        print_table(&header, &table);
        print_protection(
            out,
            "suppressed cells have fewer companies than the threshold",
        );
    } else {
        let (header, table) = overlap_rows(out, rows);
        print_table(&header, &table);
        println!(
            "({} row{})",
            table.len(),
            if table.len() == 1 { "" } else { "s" }
        );
        print_protection(out, "cells below the threshold are not listed");
    }
}

/// The co-selling report, one section per pair of populations.
fn print_co_selling(out: &serde_json::Value) {
    println!(
        "co-selling with {} (your {} x their {})",
        text(&out["theirs"]).split('.').next().unwrap_or("?"),
        text(&out["mine"]),
        text(&out["theirs"])
    );
    for s in list(&out["sections"]) {
        println!();
        println!("your {} x their {}", text(&s["mine"]), text(&s["theirs"]));
        let (header, table) = overlap_rows(out, list(&s["rows"]));
        if table.is_empty() {
            println!("  nothing released");
        } else {
            print_table(&header, &table);
        }
    }
    println!();
    let withheld = if out["by"].is_null() {
        "suppressed cells have fewer companies than the threshold"
    } else {
        "cells below the threshold are not listed"
    };
    print_protection(out, withheld);
}

async fn serve(
    dir: DataDir,
    listen: SocketAddr,
    max_upload_bytes: u64,
    grace_secs: u64,
    query: QueryLimitArgs,
) -> anyhow::Result<()> {
    if escrow::faults::ignored() {
        tracing::warn!(
            "{} is set, but this build has no fault points (feature fault-injection): ignored",
            escrow::faults::ENV
        );
    }
    let report = escrow::admin::init(&dir).map_err(engine)?;
    if report.created_anything() {
        tracing::info!(data_dir = %dir.root().display(), ?report, "initialised data directory");
    }
    let config = StoreConfig {
        max_upload_bytes,
        cache_bytes: query.query_cache_mb << 20,
        ..StoreConfig::default()
    };
    let store = Store::open(dir.clone(), config).map_err(engine)?;
    let recovery = store.recover().map_err(engine)?;
    tracing::info!(
        partial_uploads_removed = recovery.partial_uploads_removed,
        orphan_files_removed = recovery.orphan_files_removed,
        empty_datasets_removed = recovery.empty_datasets_removed,
        key_rotation = recovery.key_rotation.as_deref().unwrap_or("none"),
        "startup recovery done"
    );
    let tls = server::tls::server_config(&dir).map_err(engine)?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, data_dir = %dir.root().display(), "escrow serving (mutual TLS required)");
    let startup = escrow::audit::Event::new(
        "startup",
        escrow::audit::Actor::system(),
        escrow::audit::Outcome::Ok,
        serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "listen": addr.to_string(),
            "recovery": {
                "partial_uploads_removed": recovery.partial_uploads_removed,
                "orphan_files_removed": recovery.orphan_files_removed,
                "empty_datasets_removed": recovery.empty_datasets_removed,
                "key_rotation": recovery.key_rotation,
            },
            "audit_public_key": store.audit_log().public_key(),
        }),
    );
    // Audited before serving: a log that cannot be continued (truncated, replaced,
    // unwritable) stops the server here instead of letting it run unaudited.
    store
        .record(&startup)
        .map_err(|e| anyhow!("cannot write the audit log: {e}"))?;
    // Machine-readable first line on stdout (tests and scripts read the bound port here).
    println!("escrow listening on https://{addr}");
    let store = Arc::new(store);
    let noise_key =
        escrow::crypto::keys::load_secret(&dir.noise_key(), "noise key").map_err(engine)?;
    let queries = escrow::queries::QueryService::new(
        store.clone(),
        escrow_query::NoiseKey::new(*noise_key),
        escrow::queries::QueryConfig {
            limits: escrow_query::Limits {
                memory_bytes: query.query_memory_mb << 20,
                ..Default::default()
            },
            timeout: Duration::from_secs(query.query_timeout_secs),
            shared_memory_bytes: query
                .admitted_memory_mb
                .unwrap_or(query.max_questions.saturating_mul(query.query_memory_mb))
                .saturating_mul(1 << 20),
            ..Default::default()
        },
    )
    .map_err(engine)?;
    let state = Arc::new(AppState {
        sessions: server::sessions::Sessions::new(Duration::from_secs(
            query.console_link_secs.clamp(1, 3600),
        )),
        access: Arc::new(escrow::access::Access::new(store.clone())),
        store: store.clone(),
        queries: Arc::new(queries),
        admission: server::limits::Admission::new(server::limits::Limits {
            uploads: server::limits::Limit {
                per_partner: query.max_uploads_per_partner,
                total: query.max_uploads,
            },
            questions: server::limits::Limit {
                per_partner: query.max_questions_per_partner,
                total: query.max_questions,
            },
            wait: Duration::from_millis(query.busy_wait_ms),
        }),
    });
    // Certify the log's tail every so often, so a partner's kept checkpoint is recent.
    let checkpoints = {
        let store = store.clone();
        tokio::spawn(async move {
            let period = Duration::from_secs(AUDIT_CHECKPOINT_SECS);
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            loop {
                tick.tick().await;
                let s = store.clone();
                match tokio::task::spawn_blocking(move || s.audit_checkpoint()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::error!(error = %e, "audit checkpoint failed"),
                    Err(e) => tracing::error!(error = %e, "audit checkpoint task failed"),
                }
            }
        })
    };
    server::serve(
        state,
        listener,
        tls,
        server::shutdown_signal(),
        Duration::from_secs(grace_secs),
    )
    .await;
    checkpoints.abort();
    let shutdown = escrow::audit::Event::new(
        "shutdown",
        escrow::audit::Actor::system(),
        escrow::audit::Outcome::Ok,
        serde_json::json!({}),
    );
    if let Err(e) = store
        .record(&shutdown)
        .and_then(|()| store.audit_checkpoint())
    {
        tracing::error!(error = %e, "could not record the shutdown in the audit log");
    }
    tracing::info!("escrow stopped");
    Ok(())
}
