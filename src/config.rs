//! Command line and configuration: clap flags, `GAR_RESTARTER_*` environment variables and a
//! TOML file, in that order of precedence.
//!
//! The file is merged by re-feeding its keys to clap as flags, so a file value is validated by
//! exactly the same parser as a flag and an error names the same field.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

use crate::act::strategy::Strategy;
use crate::index::cache::ChainConfig;
use crate::index::table::Scope;

#[derive(Debug, Parser)]
#[command(
    name = "gar-restarter",
    version,
    about = "Restarts the Kubernetes workloads that run an image when Google Artifact Registry \
             publishes a push event",
    long_about = "Restarts the Kubernetes workloads that run an image when Google Artifact \
                  Registry publishes a push event.\n\nEvery flag can also be set with an \
                  environment variable GAR_RESTARTER_<FLAG> and with a key named like the flag \
                  in the TOML file given by --config. Flags beat the environment, which beats \
                  the file.\n\nPUBSUB_EMULATOR_HOST=host:port selects the Pub/Sub emulator; \
                  otherwise Application Default Credentials are used. Kubernetes access uses \
                  KUBECONFIG, then the in-cluster service account. RUST_LOG filters logs; \
                  OTEL_EXPORTER_OTLP_* configures trace export.",
    args_override_self = true
)]
pub struct Cli {
    /// TOML configuration file; its keys are the long flag names (e.g. `dead-letter-topic`).
    #[arg(long, global = true, env = "GAR_RESTARTER_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Log format. Defaults to `json` inside a cluster (KUBERNETES_SERVICE_HOST set), else `text`.
    #[arg(long, global = true, env = "GAR_RESTARTER_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: consume push events and restart matching workloads.
    // Boxed: it holds every flag of the daemon, the other commands a handful.
    Run(Box<RunArgs>),
    /// Print, as JSON, the workloads a push of IMAGE would restart.
    Check(CheckArgs),
    /// Index cache tools.
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
    },
    /// Dead-letter topic tools.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Scan the cluster, write the cache ConfigMap, and print what was written.
    Rebuild(RebuildArgs),
}

#[derive(Debug, Clone, Args)]
pub struct RebuildArgs {
    #[command(flatten)]
    pub scope: ScopeArgs,
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Republish dead-lettered messages to the source topic, stripped of their `dlq_*` attributes.
    Replay(ReplayArgs),
}

/// Which workloads are in scope and where the image index lives; shared by `run` and `check`.
#[derive(Debug, Clone, Args)]
pub struct ScopeArgs {
    /// Namespace to watch; repeat for several. Default: all namespaces.
    #[arg(long = "namespace", env = "GAR_RESTARTER_NAMESPACE", value_name = "NS",
          value_delimiter = ',', value_parser = parse_namespace)]
    pub namespaces: Vec<String>,

    /// Label selector limiting which workloads are indexed, e.g. `team=web,tier!=batch`.
    #[arg(long, env = "GAR_RESTARTER_SELECTOR", value_name = "SELECTOR")]
    pub selector: Option<String>,

    /// Index only workloads annotated `gar-restarter/enabled: "true"` (default: every workload
    /// not annotated `"false"`).
    #[arg(long, env = "GAR_RESTARTER_OPT_IN")]
    pub opt_in: bool,

    /// Directory holding `cache.json` from the cache ConfigMap volume (mounted optional).
    #[arg(
        long,
        env = "GAR_RESTARTER_CACHE_DIR",
        value_name = "DIR",
        default_value = "/etc/cache"
    )]
    pub cache_dir: PathBuf,

    /// The cache ConfigMap as NAMESPACE/NAME. Default: the pod's namespace (POD_NAMESPACE or the
    /// service-account namespace file) and the name `gar-restarter-cache`.
    #[arg(long, env = "GAR_RESTARTER_CACHE_CONFIGMAP", value_name = "NS/NAME",
          value_parser = parse_configmap)]
    pub cache_configmap: Option<ObjectName>,

    /// A lookup miss triggers no rebuild if the last rebuild is younger than this.
    #[arg(long, env = "GAR_RESTARTER_MIN_REBUILD_INTERVAL", value_name = "DURATION",
          default_value = "30s", value_parser = parse_duration)]
    pub min_rebuild_interval: Duration,

    /// The safety net behind the watch: every stream is re-created (one LIST each) this
    /// often, catching anything a watch could still miss. With `--watch=false`, the index is
    /// rebuilt this often instead, and that is its staleness bound.
    #[arg(long, env = "GAR_RESTARTER_REFRESH_INTERVAL", value_name = "DURATION",
          default_value = "1h", value_parser = parse_period)]
    pub refresh_interval: Duration,
}

impl ScopeArgs {
    /// The scope the index is built for and restarts are confined to: namespaces sorted and
    /// deduplicated, so that equal scopes compare equal.
    pub fn scope(&self) -> Scope {
        let mut namespaces = self.namespaces.clone();
        namespaces.sort();
        namespaces.dedup();
        Scope {
            namespaces,
            selector: self.selector.clone(),
            opt_in: self.opt_in,
        }
    }

    /// The lookup chain's settings; `run`, `check` and `cache rebuild` share them.
    pub fn chain_config(&self) -> ChainConfig {
        ChainConfig {
            cache_dir: self.cache_dir.clone(),
            configmap: self.cache_configmap(),
            scope: self.scope(),
            min_rebuild_interval: self.min_rebuild_interval,
            refresh_interval: self.refresh_interval,
            store_rebuilds: true,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Subscription on the GAR topic, as projects/P/subscriptions/S.
    #[arg(long, env = "GAR_RESTARTER_SUBSCRIPTION", value_name = "SUBSCRIPTION",
          value_parser = parse_subscription)]
    pub subscription: String,

    /// Topic that receives messages which failed for good, as projects/P/topics/T.
    #[arg(long, env = "GAR_RESTARTER_DEAD_LETTER_TOPIC", value_name = "TOPIC",
          value_parser = parse_topic)]
    pub dead_letter_topic: String,

    /// Publish one JSON record per restart and per rollout outcome to this topic
    /// (`projects/P/topics/T`), for announcements; a failed publish never holds up the work.
    #[arg(long, env = "GAR_RESTARTER_NOTIFY_TOPIC", value_name = "TOPIC",
          value_parser = parse_topic)]
    pub notify_topic: Option<String>,

    #[command(flatten)]
    pub scope: ScopeArgs,

    /// Log what would be restarted, patch nothing, and still ack.
    #[arg(long, env = "GAR_RESTARTER_DRY_RUN")]
    pub dry_run: bool,

    /// How workloads without a `gar-restarter/strategy` annotation are restarted: `restart`
    /// (kubectl's restart; a container with imagePullPolicy IfNotPresent or Never is flagged as
    /// a stale-image risk) or `pin-digest` (set the matching containers' images to
    /// REPO:TAG@sha256:…, so the pods run exactly the pushed digest). pin-digest needs --watch.
    #[arg(long, env = "GAR_RESTARTER_STRATEGY", value_name = "STRATEGY", value_enum,
          default_value_t = Strategy::Restart)]
    pub strategy: Strategy,

    /// Address serving /metrics, /healthz and /readyz.
    #[arg(
        long,
        env = "GAR_RESTARTER_METRICS_ADDR",
        value_name = "HOST:PORT",
        default_value = "0.0.0.0:9090"
    )]
    pub metrics_addr: SocketAddr,

    /// Deliveries of one message before it is dead-lettered as `exhausted`.
    #[arg(long, env = "GAR_RESTARTER_MAX_ATTEMPTS", value_name = "N", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_attempts: u32,

    /// Messages processed concurrently.
    #[arg(long, env = "GAR_RESTARTER_MAX_IN_FLIGHT", value_name = "N", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_in_flight: u32,

    /// Streaming-pull flow control: Pub/Sub stops sending once this many messages are
    /// unacked on a stream. Default: 2 × --max-in-flight, so the next batch is at hand.
    #[arg(long, env = "GAR_RESTARTER_MAX_OUTSTANDING_MESSAGES", value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_outstanding_messages: Option<u32>,

    /// Streaming-pull flow control: Pub/Sub stops sending once this many bytes are unacked
    /// on a stream (e.g. `8MiB`, `65536`). Default: the outstanding messages × 64 KiB, the
    /// largest valid event; the SDK's own default is 100 MiB. Memory held by received
    /// messages is at most this plus one message (≤ 10 MB).
    #[arg(long, env = "GAR_RESTARTER_MAX_OUTSTANDING_BYTES", value_name = "BYTES",
          value_parser = parse_outstanding_bytes)]
    pub max_outstanding_bytes: Option<u64>,

    /// Wall-clock budget for in-process retries of transient API errors within one delivery,
    /// Retry-After waits included; past it the message is nacked for redelivery.
    #[arg(long, env = "GAR_RESTARTER_RETRY_BUDGET", value_name = "DURATION",
          default_value = "30s", value_parser = parse_duration)]
    pub retry_budget: Duration,

    /// How long this process trusts its own record of a restart that the watch has not shown
    /// yet (without the watch: the dedupe window for a repeated (workload, digest)).
    #[arg(long, env = "GAR_RESTARTER_DEDUPE_WINDOW", value_name = "DURATION",
          default_value = "10m", value_parser = parse_duration)]
    pub dedupe_window: Duration,

    /// Keep a live view of every workload in scope with a watch (kube's runtime watcher), and
    /// decide each restart on it. `false` is for API servers that cannot watch: lookups and
    /// decisions then use the snapshot index, as fresh as `--refresh-interval`.
    #[arg(long, env = "GAR_RESTARTER_WATCH", value_name = "BOOL", default_value_t = true,
          action = clap::ArgAction::Set)]
    pub watch: bool,

    /// How long events wait for the watch's list, after start-up and after a watch failure
    /// (until its relist), before falling back to the snapshot index (a miss is authoritative
    /// only once the list is done).
    #[arg(long, env = "GAR_RESTARTER_WATCH_SYNC_TIMEOUT", value_name = "DURATION",
          default_value = "10s", value_parser = parse_duration)]
    pub watch_sync_timeout: Duration,

    /// How long a restart's rollout is followed before it counts as `timed_out`: for
    /// StatefulSets and DaemonSets (they have no progress deadline), and for a Deployment
    /// until its `progressDeadlineSeconds` is seen (then that, plus a minute). The ack never
    /// waits for a rollout; this only bounds how long its outcome is awaited.
    #[arg(long, env = "GAR_RESTARTER_ROLLOUT_TIMEOUT", value_name = "DURATION",
          default_value = "10m", value_parser = parse_duration)]
    pub rollout_timeout: Duration,

    /// At most this many restarts per second across every message in flight (a token bucket
    /// with a burst of one second's worth); `0` turns the limit off. A push of an image that
    /// thousands of workloads share then rolls out at this pace instead of all at once: a
    /// message whose restarts outlast its lease keeps the lease extended and is acked once,
    /// when all are done.
    #[arg(
        long,
        env = "GAR_RESTARTER_MAX_RESTARTS_PER_SECOND",
        value_name = "N",
        default_value_t = 10
    )]
    pub max_restarts_per_second: u32,

    /// Write the live view back to the cache ConfigMap at most this often, when it changed,
    /// so that the next start-up loads a recent snapshot.
    #[arg(long, env = "GAR_RESTARTER_SNAPSHOT_INTERVAL", value_name = "DURATION",
          default_value = "5m", value_parser = parse_period)]
    pub snapshot_interval: Duration,

    /// On SIGTERM, time in-flight messages get to finish before the rest are nacked.
    #[arg(long, env = "GAR_RESTARTER_SHUTDOWN_TIMEOUT", value_name = "DURATION",
          default_value = "20s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    /// `/healthz` fails once the message loop has not run for this long (it beats several
    /// times per timeout from every wait), so the kubelet replaces a wedged pod. At least 1s.
    #[arg(long, env = "GAR_RESTARTER_LIVENESS_TIMEOUT", value_name = "DURATION",
          default_value = "60s", value_parser = parse_liveness_timeout)]
    pub liveness_timeout: Duration,
}

fn parse_liveness_timeout(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_secs(1) {
        return Err(format!(
            "{s:?} is shorter than 1s; a probe needs several beats of slack"
        ));
    }
    Ok(d)
}

/// The period of a background loop (relists, snapshot writes): at least 1s, since 0 would
/// spin the loop and hammer the API.
fn parse_period(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_secs(1) {
        return Err(format!("{s:?} is shorter than 1s"));
    }
    Ok(d)
}

/// The streaming pull's flow control, as the SDK's builder takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowControl {
    pub max_outstanding_messages: i64,
    pub max_outstanding_bytes: i64,
}

impl RunArgs {
    /// Flow control from the flags, with the defaults derived from `--max-in-flight`.
    pub fn flow_control(&self) -> FlowControl {
        let messages = self
            .max_outstanding_messages
            .unwrap_or_else(|| self.max_in_flight.saturating_mul(2));
        let bytes = self
            .max_outstanding_bytes
            .unwrap_or(u64::from(messages) * crate::ingest::event::MAX_PAYLOAD_BYTES as u64);
        FlowControl {
            max_outstanding_messages: i64::from(messages),
            // Both bounded by their parsers (≤ 100,000 × 64 KiB, ≤ 1 GiB): no overflow.
            max_outstanding_bytes: i64::try_from(bytes).unwrap_or(i64::MAX),
        }
    }

    /// Checks between flags that clap cannot express; the message names both fields.
    fn validate(&self) -> Result<(), String> {
        if self.strategy == Strategy::PinDigest && !self.watch {
            return Err(
                "--strategy=pin-digest needs --watch=true: the containers to pin and the \
                 workloads' gar-restarter/strategy annotations are read from the live view"
                    .to_string(),
            );
        }
        if let Some(n) = self.max_outstanding_messages
            && n < self.max_in_flight
        {
            return Err(format!(
                "--max-outstanding-messages ({n}) is below --max-in-flight ({}): Pub/Sub would \
                 never hand over enough messages to fill the workers; raise it or lower \
                 --max-in-flight",
                self.max_in_flight
            ));
        }
        Ok(())
    }
}

/// Smallest and largest `--max-outstanding-bytes`: one largest valid event, and 1 GiB.
const MIN_OUTSTANDING_BYTES: u64 = crate::ingest::event::MAX_PAYLOAD_BYTES as u64;
const MAX_OUTSTANDING_BYTES: u64 = 1 << 30;

/// A byte count: a plain integer, or one with a `KiB`, `MiB` or `GiB` suffix.
fn parse_outstanding_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (digits, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, ""),
    };
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        other => {
            return Err(format!(
                "{s:?}: unknown unit {other:?} (use a byte count, or KiB, MiB, GiB)"
            ));
        }
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a byte count like 8MiB or 65536"))?;
    let bytes = n
        .checked_mul(multiplier)
        .filter(|b| (MIN_OUTSTANDING_BYTES..=MAX_OUTSTANDING_BYTES).contains(b))
        .ok_or_else(|| {
            format!(
                "{s:?} is outside {MIN_OUTSTANDING_BYTES} bytes (64 KiB, the largest event) to 1GiB"
            )
        })?;
    Ok(bytes)
}

#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    /// Image reference as a push event would carry it, e.g. `nginx` or `…/app:v1`.
    #[arg(long, value_name = "REF")]
    pub image: String,

    /// Ignore the mounted and stored index and rebuild it from the cluster first. The rebuilt
    /// index is also written to the cache ConfigMap, as `cache rebuild` does; off-cluster
    /// this needs an explicit --cache-configmap.
    #[arg(long)]
    pub rebuild: bool,

    #[command(flatten)]
    pub scope: ScopeArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ReplayArgs {
    /// Subscription on the dead-letter topic, as projects/P/subscriptions/S.
    #[arg(long, env = "GAR_RESTARTER_DLQ_SUBSCRIPTION", value_name = "SUBSCRIPTION",
          value_parser = parse_subscription)]
    pub subscription: String,

    /// Topic to republish to (normally the GAR topic `gcr`), as projects/P/topics/T.
    #[arg(long, env = "GAR_RESTARTER_DLQ_TOPIC", value_name = "TOPIC", value_parser = parse_topic)]
    pub topic: String,

    /// Stop after replaying this many messages.
    #[arg(long, value_name = "N")]
    pub limit: Option<u64>,

    /// Replay only messages whose `dlq_kind` is this (malformed, permanent, exhausted); others
    /// are left on the subscription.
    #[arg(long, value_name = "KIND", value_parser = ["malformed", "permanent", "exhausted"])]
    pub kind: Option<String>,

    /// Print what would be replayed; publish and ack nothing.
    #[arg(long)]
    pub dry_run: bool,

    /// Exit once no message has arrived for this long.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub idle_timeout: Duration,
}

/// `namespace/name` of a Kubernetes object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectName {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

fn parse_namespace(s: &str) -> Result<String, String> {
    if is_dns_label(s) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is not a valid namespace name (RFC 1123 label)"
        ))
    }
}

fn parse_configmap(s: &str) -> Result<ObjectName, String> {
    match s.split_once('/') {
        Some((ns, name)) if is_dns_label(ns) && is_dns_subdomain(name) => Ok(ObjectName {
            namespace: ns.to_string(),
            name: name.to_string(),
        }),
        _ => Err(format!("{s:?} is not NAMESPACE/NAME")),
    }
}

fn parse_resource_path(s: &str, collection: &str) -> Result<String, String> {
    let parts: Vec<&str> = s.split('/').collect();
    let valid = parts.len() == 4
        && parts[0] == "projects"
        && parts[2] == collection
        && !parts[1].is_empty()
        && parts[3].len() >= 3
        && parts[3].len() <= 255
        && parts[3]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.~+%".contains(&b))
        && parts[3].as_bytes()[0].is_ascii_alphabetic();
    if valid {
        Ok(s.to_string())
    } else {
        Err(format!("{s:?} is not projects/PROJECT/{collection}/NAME"))
    }
}

fn parse_subscription(s: &str) -> Result<String, String> {
    parse_resource_path(s, "subscriptions")
}

fn parse_topic(s: &str) -> Result<String, String> {
    parse_resource_path(s, "topics")
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration like 30s or 10m: {e}"))
}

/// Why the configuration was refused; `main` prints it and exits with code 2.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{0}")]
    Clap(#[from] clap::Error),
    /// Values that parse alone but contradict each other.
    #[error("{0}")]
    Invalid(String),
    /// A bad `GAR_RESTARTER_*` value, named by its variable.
    #[error("{message}")]
    Env { var: String, message: String },
}

impl ConfigError {
    /// Prints the error; clap's own `--help`/`--version` output goes to stdout with code 0.
    pub fn exit(self) -> ! {
        match self {
            ConfigError::Clap(e) => e.exit(),
            other => {
                eprintln!("error: {other}");
                std::process::exit(2)
            }
        }
    }
}

impl Cli {
    /// Parses flags and the environment, then fills what they left unset from `--config`.
    pub fn load() -> Result<Cli, ConfigError> {
        Self::load_from(std::env::args_os())
    }

    pub fn load_from<I, T>(args: I) -> Result<Cli, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
        let command = Cli::command();
        // First pass without `required`, so that required flags may come from the file.
        let matches = relaxed(command.clone())
            .try_get_matches_from(&args)
            .map_err(|e| env_error(&command, &args, e))?;
        let merged = match matches.get_one::<PathBuf>("config") {
            Some(path) => merge_file(&command, &matches, &args, path)?,
            None => args.clone(),
        };
        let matches = command
            .clone()
            .try_get_matches_from(&merged)
            .map_err(|e| env_error(&command, &args, e))?;
        let cli = Cli::from_arg_matches(&matches)?;
        if let Command::Run(run) = &cli.command {
            run.validate().map_err(ConfigError::Invalid)?;
        }
        Ok(cli)
    }
}

/// Returns `args` with the file's values inserted as flags for every key that neither a flag
/// nor an environment variable already set.
fn merge_file(
    command: &clap::Command,
    matches: &clap::ArgMatches,
    args: &[OsString],
    path: &Path,
) -> Result<Vec<OsString>, ConfigError> {
    let file_err = |message: String| ConfigError::File {
        path: path.to_path_buf(),
        message,
    };
    let text = read_config_file(path).map_err(file_err)?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| file_err(e.to_string()))?;
    // Building propagates global flags (e.g. --log-format) into the subcommands.
    let mut built = command.clone();
    built.build();
    let command = &built;
    let known = file_keys(command);
    if let Some(key) = table.keys().find(|k| !known.contains(k.as_str())) {
        return Err(file_err(format!(
            "unknown key {key:?} (keys are the long flag names, e.g. \"dead-letter-topic\")"
        )));
    }
    let Some((top_name, top_matches)) = matches.subcommand() else {
        return Ok(args.to_vec());
    };
    // `dlq replay` takes no file: its `subscription` would mean the DLQ's, not the daemon's.
    let Some(top) = command
        .find_subcommand(top_name)
        .filter(|_| top_name != "dlq")
    else {
        return Ok(args.to_vec());
    };
    // `cache rebuild` is nested one level deeper: its flags (the scope, the ConfigMap) are
    // the ones the file must fill, not the argument-less `cache`'s. Reading `cache` instead
    // once turned a namespaced rebuild into a cluster-wide scan written to `default`.
    let (sub_name, sub, sub_matches) = match top_matches.subcommand() {
        Some((name, nested_matches)) => match top.find_subcommand(name) {
            Some(nested) => (name, nested, nested_matches),
            None => return Ok(args.to_vec()),
        },
        None => (top_name, top, top_matches),
    };
    let mut injected: Vec<OsString> = Vec::new();
    for (key, value) in &table {
        let Some(arg) = sub
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()))
        else {
            continue; // a key for the other subcommand
        };
        let explicit = matches!(
            sub_matches.value_source(arg.get_id().as_str()),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        );
        if explicit {
            continue;
        }
        let flag = format!("--{key}");
        let is_switch = matches!(arg.get_action(), clap::ArgAction::SetTrue);
        match value {
            toml::Value::Boolean(b) if is_switch => {
                if *b {
                    injected.push(flag.into());
                }
            }
            toml::Value::Array(items) if !is_switch => {
                for item in items {
                    injected.push(flag.clone().into());
                    injected.push(scalar(key, item).map_err(file_err)?.into());
                }
            }
            other if !is_switch => {
                injected.push(flag.into());
                injected.push(scalar(key, other).map_err(file_err)?.into());
            }
            other => {
                return Err(file_err(format!(
                    "key {key:?} must be true or false, not {other}"
                )));
            }
        }
    }
    // File values go right after the subcommand name so that anything on the real command
    // line comes later and wins (`args_override_self`).
    let top_pos = args
        .iter()
        .position(|a| a.to_str() == Some(top_name))
        .ok_or_else(|| file_err("cannot place file values".to_string()))?;
    let pos = if sub_name == top_name {
        top_pos
    } else {
        args.iter()
            .skip(top_pos + 1)
            .position(|a| a.to_str() == Some(sub_name))
            .map(|p| p + top_pos + 1)
            .ok_or_else(|| file_err("cannot place file values".to_string()))?
    };
    let mut merged = args[..=pos].to_vec();
    merged.extend(injected);
    merged.extend_from_slice(&args[pos + 1..]);
    // Check the file's values alone so that a bad one is reported against the file.
    command
        .clone()
        .try_get_matches_from(&merged)
        .map(|_| merged)
        .map_err(|e| match e.kind() {
            clap::error::ErrorKind::ValueValidation | clap::error::ErrorKind::InvalidValue => {
                file_err(
                    e.to_string()
                        .trim_start_matches("error: ")
                        .trim()
                        .to_string(),
                )
            }
            _ => ConfigError::Clap(e),
        })
}

/// A config file is a few kilobytes; anything near this is a mistake (or `/dev/zero`).
const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// Reads `--config`, refusing what is not a regular file (a device, a FIFO, a directory:
/// `/dev/zero` used to hang here) and anything over [`MAX_CONFIG_BYTES`].
fn read_config_file(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".to_string());
    }
    let mut bytes = Vec::new();
    // Checked while reading as well: the file may grow after `metadata`.
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(format!("larger than {MAX_CONFIG_BYTES} bytes"));
    }
    String::from_utf8(bytes).map_err(|e| format!("not UTF-8: {e}"))
}

/// clap names the flag when a value from `GAR_RESTARTER_*` is bad ("invalid value 'x' for
/// '--max-attempts <N>'"), which sends the operator looking at a command line that does not
/// have it. When the flag is not on the command line and its variable is set, the error is
/// reported under the variable's name instead.
fn env_error(command: &clap::Command, args: &[OsString], e: clap::Error) -> ConfigError {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if !matches!(
        e.kind(),
        ErrorKind::ValueValidation | ErrorKind::InvalidValue
    ) {
        return ConfigError::Clap(e);
    }
    let Some(ContextValue::String(invalid_arg)) = e.get(ContextKind::InvalidArg) else {
        return ConfigError::Clap(e);
    };
    let long = invalid_arg.split_whitespace().next().unwrap_or_default();
    let Some(name) = long.strip_prefix("--") else {
        return ConfigError::Clap(e);
    };
    let on_command_line = args.iter().filter_map(|a| a.to_str()).any(|a| {
        a == long
            || a.strip_prefix(long)
                .is_some_and(|rest| rest.starts_with('='))
    });
    let mut built = command.clone();
    built.build();
    let var = std::iter::once(&built)
        .chain(built.get_subcommands())
        .chain(built.get_subcommands().flat_map(|c| c.get_subcommands()))
        .flat_map(|c| c.get_arguments())
        .find(|a| a.get_long() == Some(name))
        .and_then(|a| a.get_env())
        .and_then(|v| v.to_str())
        .map(str::to_string);
    match var {
        Some(var) if !on_command_line && std::env::var_os(&var).is_some() => {
            let rendered = e.to_string();
            let message = rendered
                .trim_start_matches("error: ")
                .split("\n\n")
                .next()
                .unwrap_or_default()
                .trim()
                .replace(
                    &format!("'{invalid_arg}'"),
                    &format!("environment variable {var} (read for {long})"),
                );
            ConfigError::Env { var, message }
        }
        _ => ConfigError::Clap(e),
    }
}

fn relaxed(mut command: clap::Command) -> clap::Command {
    fn relax(mut sub: clap::Command) -> clap::Command {
        let ids: Vec<clap::Id> = sub.get_arguments().map(|a| a.get_id().clone()).collect();
        for id in ids {
            sub = sub.mut_arg(id, |a| a.required(false));
        }
        sub
    }
    for name in ["run", "check"] {
        command = command.mut_subcommand(name, relax);
    }
    command.mut_subcommand("cache", |c| c.mut_subcommand("rebuild", relax))
}

fn scalar(key: &str, value: &toml::Value) -> Result<String, String> {
    match value {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        other => Err(format!("key {key:?} has an unsupported value {other}")),
    }
}

/// Every long flag of `run` and `check`: the keys a config file may use.
fn file_keys(command: &clap::Command) -> BTreeSet<String> {
    ["run", "check"]
        .iter()
        .filter_map(|s| command.find_subcommand(s))
        .flat_map(|c| c.get_arguments())
        .filter_map(|a| a.get_long())
        .filter(|l| !matches!(*l, "config" | "help" | "version" | "image" | "rebuild"))
        .map(str::to_string)
        .collect()
}

impl ScopeArgs {
    /// The cache ConfigMap, defaulting to the pod's namespace.
    pub fn cache_configmap(&self) -> ObjectName {
        self.cache_configmap.clone().unwrap_or_else(|| ObjectName {
            namespace: pod_namespace(Path::new(SA_NAMESPACE_FILE)),
            name: "gar-restarter-cache".to_string(),
        })
    }
}

const SA_NAMESPACE_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

impl ScopeArgs {
    /// The cache ConfigMap for a command that *writes* it (`cache rebuild`, `check
    /// --rebuild`). Off-cluster there is no pod namespace, and falling back to `default`
    /// would write a ConfigMap where nobody looks, silently; so there `--cache-configmap`
    /// is required.
    pub fn cache_configmap_for_write(&self) -> Result<ObjectName, String> {
        writable_configmap(
            self.cache_configmap.clone(),
            known_pod_namespace(Path::new(SA_NAMESPACE_FILE)),
        )
    }
}

fn writable_configmap(
    explicit: Option<ObjectName>,
    pod_namespace: Option<String>,
) -> Result<ObjectName, String> {
    match (explicit, pod_namespace) {
        (Some(name), _) => Ok(name),
        (None, Some(namespace)) => Ok(ObjectName {
            namespace,
            name: "gar-restarter-cache".to_string(),
        }),
        (None, None) => Err(
            "--cache-configmap NS/NAME is required off-cluster: this command writes the cache \
             ConfigMap, and without POD_NAMESPACE or a service-account namespace there is no \
             namespace to default to"
                .to_string(),
        ),
    }
}

/// POD_NAMESPACE, else the service account's namespace file; `None` off-cluster.
fn known_pod_namespace(sa_file: &Path) -> Option<String> {
    std::env::var("POD_NAMESPACE")
        .ok()
        .filter(|s| is_dns_label(s))
        .or_else(|| {
            std::fs::read_to_string(sa_file)
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| is_dns_label(s))
        })
}

fn pod_namespace(sa_file: &Path) -> String {
    known_pod_namespace(sa_file).unwrap_or_else(|| "default".to_string())
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        <Self as ValueEnum>::from_str(s, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn background_periods_must_be_at_least_a_second() {
        assert_eq!(parse_period("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_period("1h"), Ok(Duration::from_secs(3600)));
        for bad in ["0s", "500ms"] {
            let e = parse_period(bad).unwrap_err();
            assert!(e.contains("shorter than 1s"), "{bad}: {e}");
        }
    }
    use std::io::Write;

    const SUB: &str = "projects/p/subscriptions/gcr-sub";
    const TOPIC: &str = "projects/p/topics/gcr-dlq";

    fn run(args: &[&str]) -> Result<RunArgs, ConfigError> {
        let mut argv = vec!["gar-restarter"];
        argv.extend_from_slice(args);
        match Cli::load_from(argv)?.command {
            Command::Run(r) => Ok(*r),
            other => panic!("{other:?}"),
        }
    }

    fn file(contents: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(contents.as_bytes()).unwrap();
        f
    }

    #[test]
    fn defaults_and_flags() {
        let r = run(&["run", "--subscription", SUB, "--dead-letter-topic", TOPIC]).unwrap();
        assert_eq!(r.max_attempts, 5);
        assert_eq!(r.shutdown_timeout, Duration::from_secs(20));
        assert_eq!(r.scope.cache_dir, PathBuf::from("/etc/cache"));
        assert!(r.scope.namespaces.is_empty());
        let r = run(&[
            "run",
            "--subscription",
            SUB,
            "--dead-letter-topic",
            TOPIC,
            "--namespace",
            "a",
            "--namespace",
            "b",
            "--dry-run",
            "--max-attempts",
            "3",
        ])
        .unwrap();
        assert_eq!(r.scope.namespaces, vec!["a", "b"]);
        assert!(r.dry_run);
        assert_eq!(r.max_attempts, 3);
    }

    #[test]
    fn strategy_flag_env_and_file() {
        let base = ["run", "--subscription", SUB, "--dead-letter-topic", TOPIC];
        assert_eq!(run(&base).unwrap().strategy, Strategy::Restart);
        let mut argv = base.to_vec();
        argv.extend(["--strategy", "pin-digest"]);
        assert_eq!(run(&argv).unwrap().strategy, Strategy::PinDigest);
        let f = file(&format!(
            "subscription = \"{SUB}\"\ndead-letter-topic = \"{TOPIC}\"\nstrategy = \"pin-digest\"\n"
        ));
        let r = run(&["run", "--config", f.path().to_str().unwrap()]).unwrap();
        assert_eq!(r.strategy, Strategy::PinDigest);
        let mut argv = base.to_vec();
        argv.extend(["--strategy", "pin_digest"]);
        let e = run(&argv).unwrap_err().to_string();
        assert!(e.contains("--strategy"), "{e}");
        let mut argv = base.to_vec();
        argv.extend(["--strategy", "pin-digest", "--watch=false"]);
        let e = run(&argv).unwrap_err();
        assert!(matches!(e, ConfigError::Invalid(_)), "{e:?}");
        assert!(e.to_string().contains("--watch"), "{e}");
    }

    #[test]
    fn bad_values_name_the_field() {
        let e = run(&[
            "run",
            "--subscription",
            "gcr-sub",
            "--dead-letter-topic",
            TOPIC,
        ])
        .unwrap_err();
        let ConfigError::Clap(e) = e else { panic!() };
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("--subscription"), "{e}");
        let e = run(&[
            "run",
            "--subscription",
            SUB,
            "--dead-letter-topic",
            TOPIC,
            "--shutdown-timeout",
            "soon",
        ])
        .unwrap_err();
        assert!(e.to_string().contains("--shutdown-timeout"), "{e}");
    }

    #[test]
    fn flow_control_defaults_follow_max_in_flight_and_flags_are_validated() {
        let base = ["run", "--subscription", SUB, "--dead-letter-topic", TOPIC];
        let fc = run(&base).unwrap().flow_control();
        // 2 × 64 messages, each at most one 64 KiB event: 8 MiB, not the SDK's 100 MiB.
        assert_eq!(
            fc,
            FlowControl {
                max_outstanding_messages: 128,
                max_outstanding_bytes: 8 << 20
            }
        );
        let with = |extra: &[&str]| {
            let mut argv = base.to_vec();
            argv.extend_from_slice(extra);
            run(&argv)
        };
        let fc = with(&["--max-in-flight", "10"]).unwrap().flow_control();
        assert_eq!(fc.max_outstanding_messages, 20);
        assert_eq!(fc.max_outstanding_bytes, 20 * 64 * 1024);
        let fc = with(&[
            "--max-outstanding-messages",
            "500",
            "--max-outstanding-bytes",
            "16MiB",
        ])
        .unwrap()
        .flow_control();
        assert_eq!(fc.max_outstanding_messages, 500);
        assert_eq!(fc.max_outstanding_bytes, 16 << 20);
        for (flag, bad) in [
            ("--max-outstanding-bytes", "1KiB"),
            ("--max-outstanding-bytes", "2GiB"),
            ("--max-outstanding-bytes", "lots"),
            ("--max-outstanding-bytes", "8MB"),
            ("--max-outstanding-messages", "0"),
        ] {
            let e = with(&[flag, bad]).unwrap_err().to_string();
            assert!(e.contains(flag), "{flag} {bad}: {e}");
        }
        let e = with(&["--max-outstanding-messages", "10"]).unwrap_err();
        assert!(matches!(e, ConfigError::Invalid(_)), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains("--max-outstanding-messages") && msg.contains("--max-in-flight"),
            "{msg}"
        );
    }

    /// Issue #14 item 6: `cache rebuild` reads its own keys from the file.
    #[test]
    fn cache_rebuild_honours_the_file() {
        let f = file(
            "namespace = [\"team-a\"]\ncache-configmap = \"ops/idx\"\nselector = \"tier=web\"\n\
             min-rebuild-interval = \"1m\"\n",
        );
        let path = f.path().to_str().unwrap();
        let cli = Cli::load_from(["gar-restarter", "--config", path, "cache", "rebuild"]).unwrap();
        let Command::Cache {
            command: CacheCommand::Rebuild(r),
        } = cli.command
        else {
            panic!("{:?}", cli.command)
        };
        assert_eq!(r.scope.namespaces, vec!["team-a"]);
        assert_eq!(r.scope.selector.as_deref(), Some("tier=web"));
        assert_eq!(r.scope.cache_configmap.unwrap().to_string(), "ops/idx");
        // A flag still beats the file.
        let cli = Cli::load_from([
            "gar-restarter",
            "--config",
            path,
            "cache",
            "rebuild",
            "--namespace",
            "team-b",
        ])
        .unwrap();
        let Command::Cache {
            command: CacheCommand::Rebuild(r),
        } = cli.command
        else {
            panic!()
        };
        assert_eq!(r.scope.namespaces, vec!["team-b"]);
    }

    /// Issue #14 item 7: a write never lands in `default` by accident.
    #[test]
    fn writing_the_cache_off_cluster_needs_an_explicit_configmap() {
        let explicit = parse_configmap("ops/idx").unwrap();
        assert_eq!(
            writable_configmap(Some(explicit.clone()), None),
            Ok(explicit.clone())
        );
        assert_eq!(
            writable_configmap(Some(explicit.clone()), Some("gar".into())),
            Ok(explicit)
        );
        assert_eq!(
            writable_configmap(None, Some("gar".into()))
                .unwrap()
                .to_string(),
            "gar/gar-restarter-cache"
        );
        let e = writable_configmap(None, None).unwrap_err();
        assert!(e.contains("--cache-configmap"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let sa = dir.path().join("namespace");
        std::fs::write(&sa, "team-ns\n").unwrap();
        // Only when POD_NAMESPACE is not set by whoever runs the tests.
        if std::env::var_os("POD_NAMESPACE").is_none() {
            assert_eq!(known_pod_namespace(&sa).as_deref(), Some("team-ns"));
            assert_eq!(known_pod_namespace(&dir.path().join("absent")), None);
        }
    }

    #[test]
    fn config_must_be_a_small_regular_file() {
        // `/dev/zero` used to hang the process reading an endless file.
        let started = std::time::Instant::now();
        let e = run(&["run", "--config", "/dev/zero"]).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        let msg = e.to_string();
        assert!(
            msg.contains("/dev/zero") && msg.contains("not a regular file"),
            "{msg}"
        );
        let dir = tempfile::tempdir().unwrap();
        let msg = run(&["run", "--config", dir.path().to_str().unwrap()])
            .unwrap_err()
            .to_string();
        assert!(msg.contains("not a regular file"), "{msg}");
        let big = file(&format!("# {}\n", "x".repeat(MAX_CONFIG_BYTES as usize)));
        let msg = run(&["run", "--config", big.path().to_str().unwrap()])
            .unwrap_err()
            .to_string();
        assert!(msg.contains("larger than"), "{msg}");
    }

    #[test]
    fn file_fills_what_flags_leave_unset() {
        let f = file(&format!(
            "subscription = \"{SUB}\"\ndead-letter-topic = \"{TOPIC}\"\nnamespace = [\"x\", \"y\"]\n\
             max-attempts = 7\ndry-run = true\nmin-rebuild-interval = \"1m\"\n"
        ));
        let path = f.path().to_str().unwrap();
        let r = run(&["run", "--config", path]).unwrap();
        assert_eq!(r.subscription, SUB);
        assert_eq!(r.scope.namespaces, vec!["x", "y"]);
        assert_eq!(r.max_attempts, 7);
        assert!(r.dry_run);
        assert_eq!(r.scope.min_rebuild_interval, Duration::from_secs(60));
        // A flag beats the file.
        let r = run(&[
            "--config",
            path,
            "run",
            "--max-attempts",
            "2",
            "--namespace",
            "z",
        ])
        .unwrap();
        assert_eq!(r.max_attempts, 2);
        assert_eq!(r.scope.namespaces, vec!["z"]);
    }

    #[test]
    fn file_errors_name_file_and_key() {
        let f = file(&format!(
            "subscription = \"{SUB}\"\ndead-letter-topic = \"{TOPIC}\"\nmax-atempts = 3\n"
        ));
        let e = run(&["run", "--config", f.path().to_str().unwrap()]).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, ConfigError::File { .. }));
        assert!(
            msg.contains("max-atempts") && msg.contains(f.path().to_str().unwrap()),
            "{msg}"
        );

        let f = file(&format!(
            "subscription = \"{SUB}\"\ndead-letter-topic = \"{TOPIC}\"\nmax-attempts = \"many\"\n"
        ));
        let msg = run(&["run", "--config", f.path().to_str().unwrap()])
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("--max-attempts") && msg.contains("many"),
            "{msg}"
        );

        let f = file("this is not toml");
        assert!(matches!(
            run(&[
                "run",
                "--config",
                f.path().to_str().unwrap(),
                "--subscription",
                SUB,
                "--dead-letter-topic",
                TOPIC
            ]),
            Err(ConfigError::File { .. })
        ));
    }

    #[test]
    fn configmap_and_resource_parsers() {
        assert_eq!(
            parse_configmap("ops/gar-restarter-cache")
                .unwrap()
                .to_string(),
            "ops/gar-restarter-cache"
        );
        assert!(parse_configmap("noslash").is_err());
        assert!(parse_configmap("Bad/x").is_err());
        assert!(parse_topic("projects/p/topics/gcr").is_ok());
        assert!(parse_topic("projects/p/subscriptions/gcr").is_err());
        assert!(parse_subscription("projects//subscriptions/abc").is_err());
    }

    #[test]
    fn shipped_config_files_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        for name in ["local.toml", "production.toml"] {
            let path = dir.join(name);
            let cli = Cli::load_from(["gar-restarter", "--config", path.to_str().unwrap(), "run"])
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(matches!(cli.command, Command::Run(_)), "{name}");
        }
    }

    #[test]
    fn help_explains_every_flag() {
        let mut cmd = Cli::command();
        cmd.build();
        for sub in cmd.get_subcommands() {
            for arg in sub.get_arguments() {
                if arg.get_long().is_some() {
                    assert!(
                        arg.get_help().is_some(),
                        "{} --{:?} has no help",
                        sub.get_name(),
                        arg.get_long()
                    );
                }
            }
        }
    }
}
