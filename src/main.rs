//! The `berth` binary: parses arguments and hands over. Nothing else lives here.

use clap::Parser;

fn main() {
    let cli = berth::cli::Cli::parse();
    std::process::exit(berth::cli::run(cli));
}
