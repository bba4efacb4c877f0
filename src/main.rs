//! The `strata` binary: parses the command line and hands each subcommand to its module.
//!
//! main stays thin: every subcommand lives in its own module and returns an exit code. Usage
//! errors are one line on stderr and exit code 1 (clap's own default is a multi-line message
//! and exit code 2).

mod bench;
mod create;
mod daemon;
mod imgcli;
mod info;
mod jobcli;

use clap::error::ErrorKind;
use clap::{Parser, Subcommand};

/// A block-I/O engine on io_uring.
#[derive(Parser)]
#[command(name = "strata", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a fio-like load through the engine against a file or a null node.
    Bench(Box<bench::BenchArgs>),
    /// Create a new image (as qemu-img create).
    Create(create::CreateArgs),
    /// Show what an image is (as qemu-img info).
    Info(info::InfoArgs),
    /// Copy the data of an image's backing chain into it (block-stream on an image at rest).
    Stream(jobcli::StreamArgs),
    /// Commit an image's data into its backing chain (as qemu-img commit).
    Commit(jobcli::CommitArgs),
    /// Serve QMP (qemu-storage-daemon's command line and commands).
    Daemon(daemon::DaemonArgs),
}

fn main() {
    let argv: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let cli = match Cli::try_parse_from(std::env::args_os()) {
        Ok(cli) => cli,
        Err(e) => std::process::exit(usage_error(&e, &argv)),
    };
    let code = match cli.command {
        Command::Bench(args) => bench::main(*args, argv),
        Command::Create(args) => create::main(args),
        Command::Info(args) => info::main(args),
        Command::Stream(args) => jobcli::stream_main(args),
        Command::Commit(args) => jobcli::commit_main(args),
        Command::Daemon(args) => daemon::main(args),
    };
    std::process::exit(code);
}

/// Prints help and version as clap does (exit 0); anything else as one line (exit 1).
fn usage_error(e: &clap::Error, argv: &[String]) -> i32 {
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let _ = e.print();
        return 0;
    }
    let prog = match argv.get(1).map(String::as_str) {
        Some("bench") => "strata bench",
        Some("create") => "strata create",
        Some("info") => "strata info",
        Some("stream") => "strata stream",
        Some("commit") => "strata commit",
        Some("daemon") => "strata daemon",
        _ => "strata",
    };
    if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        eprintln!(
            "{prog}: error: a subcommand is required (bench, create, info, stream, commit); see '{prog} --help'"
        );
        return 1;
    }
    let text = e.to_string();
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or("invalid usage");
    let mut msg = first.strip_prefix("error: ").unwrap_or(first).to_string();
    // "the following required arguments were not provided:" names them on the next line.
    if msg.ends_with(':') {
        if let Some(next) = lines.next() {
            msg.push(' ');
            msg.push_str(next);
        }
    }
    if let Some(tip) = lines.find_map(|l| l.strip_prefix("tip: ")) {
        msg.push_str(&format!(" ({tip})"));
    }
    eprintln!("{prog}: error: {msg}");
    1
}
