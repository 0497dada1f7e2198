//! `tandem`: the one binary of the Tandem cluster. Subcommands arrive with the issues that build
//! them (`up`, `coordinator`, `worker`, `generate`, `finetune`, ...); today it runs benchmarks.

mod bench;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "tandem", version, about = "Co-serve LLM inference and LoRA fine-tuning on shared GPUs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measure Tandem's components against peers on this machine.
    Bench {
        #[command(subcommand)]
        what: bench::Bench,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Bench { what } => bench::run(what),
    }
}
