//! kafka-infer: serve a Kafka stream with any model server.
//!
//! The command line; the runner's modules live in its library (lib.rs).

use clap::{Args, Parser, Subcommand};
use runner::{config, pipeline, tool};
use tokio::sync::watch;

/// mimalloc: musl's allocator (the static binary's) made every answer cost 1.5-2.4x the CPU
/// of the same code on glibc's (docs/performance.md). Transparent huge pages off (`no_thp`) and
/// freed pages purged after 10 ms instead of 1 s (arenas: 10x that) keep the peak RSS where
/// glibc's was.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc v3's `mi_option_purge_delay` (its place in `mi_option_e`, mimalloc.h; the
/// bindings name no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn tune_allocator() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return; // the operator's choice
    }
    // SAFETY: sets one integer option, first thing in main, before any other thread exists
    // (setting options is not thread-safe).
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 10) };
}

#[derive(Parser)]
#[command(
    name = "kafka-infer",
    version,
    about = "Serve a Kafka stream with any model server: consume requests, call the model, produce answers, commit only what is written."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the bridge (configured like a SeldonDeployment with serverType: kafka).
    Run(RunCmd),
    /// Produce requests to the input topic and print their answers from the output (or error)
    /// topic, with latency: curl for a Kafka-served model. Exit 1 on an error record or a timeout.
    ///
    /// Answers are matched by request id (x-request-id or Seldon-Puid). The output and error
    /// topics are read from their end offsets taken before producing, partition by partition,
    /// outside the deployment's group and without commits. Exit 0 when every request was
    /// answered; 1 on an error record, a timeout or a request that could not be written; 2 for
    /// bad settings or input. Progress goes to stderr when it is a terminal.
    Send(runner::tool::send::SendArgs),
    /// Copy error records from the error topic back to the input topic (filter by kind and
    /// time; --dry-run shows what would be copied).
    ///
    /// A copy keeps the error record's value, key and headers, less kafka-infer-* headers, and
    /// is marked kafka-infer-redriven: N; records redriven --max-redrives times are skipped.
    /// Each partition of the error topic is read from its start to its end offset taken at
    /// start, outside the deployment's group and without commits. Exit 0; 1 when a copy could
    /// not be written; 2 for bad settings. Progress goes to stderr when it is a terminal.
    Redrive(runner::tool::redrive::RedriveArgs),
    /// The group's lag on the input topic (per partition, in records and in time).
    ///
    /// Committed offset, end offset (the Fetch high watermark) and lag per partition and in
    /// total; the age of the oldest unprocessed record (the timestamp of the record at the
    /// committed offset); the members and their partitions (DescribeGroups). Same settings as
    /// `run`. Exit 0; 1 when over --max-lag or --max-lag-age; 2 when it cannot tell.
    Lag(tool::lag::LagArgs),
    /// Preflight that consumes nothing (CI, init containers).
    ///
    /// Checks the configuration, each broker (TCP, TLS, ApiVersions, SASL: the step that
    /// failed), the input, output and error topics (partitions, max.message.bytes), the group,
    /// and every graph node's model server (its protocol's readiness endpoint). Prints a table
    /// of the checks with what failed and the setting to look at. Same settings as `run`.
    /// Exit 0 only if all pass, else 1.
    Check(tool::check::CheckArgs),
}

/// `kafka-infer run` flags: the settings every subcommand shares, and run's own.
#[derive(Args)]
struct RunCmd {
    #[command(flatten)]
    args: config::RunArgs,
    /// Batch mode (a Kubernetes Job, CI): read each assigned partition's end offset when it is
    /// assigned, process up to it, then drain, commit, leave the group and exit with a summary
    /// on stdout (answered, error records, duration, records/s). Several replicas may run it at
    /// once: each stops when its partitions are done. Exit 0; 3 when error records were
    /// written (expired ones included); 4 when stopped (SIGTERM/SIGINT) before catching up;
    /// 1 on a fatal error. Progress is shown when stderr is a terminal.
    #[arg(long)]
    until_caught_up: bool,
}

/// `run --until-caught-up`: the exit code when error records were written.
const EXIT_ERROR_RECORDS: u8 = 3;
/// `run --until-caught-up`: the exit code when a signal stopped it before it caught up.
const EXIT_NOT_CAUGHT_UP: u8 = 4;

fn init_logging(format: config::LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rskafka=warn"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    match format {
        config::LogFormat::Json => b.json().init(),
        config::LogFormat::Text => b.init(),
    }
}

fn main() -> std::process::ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    let RunCmd {
        args,
        until_caught_up,
    } = match cli.cmd {
        Cmd::Run(r) => r,
        Cmd::Send(args) => return runner::tool::send::main(args),
        Cmd::Redrive(args) => return runner::tool::redrive::main(args),
        Cmd::Lag(a) => return tool::lag::main(a),
        Cmd::Check(a) => return tool::check::main(a),
    };
    let cfg = match config::Config::resolve(&args, &|k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kafka-infer: configuration error: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    if args.print_config {
        println!(
            "{}",
            serde_json::to_string_pretty(&cfg.summary()).expect("JSON")
        );
        return std::process::ExitCode::SUCCESS;
    }
    init_logging(cfg.log_format);
    for w in &cfg.warnings {
        tracing::warn!("{w}");
    }
    let rt = match args.threads.unwrap_or(1) {
        0 | 1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
    }
    .expect("tokio runtime");
    rt.block_on(async move {
        let (stop_tx, stop) = watch::channel(false);
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
            let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM"),
                _ = int.recv() => tracing::info!("SIGINT"),
            }
            let _ = stop_tx.send(true);
        });
        match pipeline::run_mode(cfg, stop, until_caught_up).await {
            Ok(summary) if until_caught_up => {
                tracing::info!("{summary}");
                println!("{summary}");
                if !summary.caught_up {
                    std::process::ExitCode::from(EXIT_NOT_CAUGHT_UP)
                } else if summary.error_records > 0 {
                    std::process::ExitCode::from(EXIT_ERROR_RECORDS)
                } else {
                    std::process::ExitCode::SUCCESS
                }
            }
            Ok(_) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e:#}");
                eprintln!("kafka-infer: {e:#}");
                std::process::ExitCode::FAILURE
            }
        }
    })
}
