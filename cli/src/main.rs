//! `tandem`: the one binary of the Tandem cluster. Subcommands arrive with the issues that build
//! them (`up`, `coordinator`, `worker`, `finetune`, ...); today: `generate`, `finetune`,
//! `init-model`, `bench`.

mod bench;
mod bench_finetune;
mod bench_serve;
mod finetune;
mod generate;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "tandem", version, about = "Co-serve LLM inference and LoRA fine-tuning on shared GPUs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text with a model and adapters, many requests in one continuous batch.
    Generate(generate::GenerateArgs),
    /// Fine-tune a LoRA or ESFT adapter on a JSONL file, on this machine.
    Finetune(finetune::FinetuneArgs),
    /// Write a random-weight model in Hugging Face format (for demos, tests, benchmarks).
    InitModel {
        /// tiny | tiny-moe | small | qwen2.5-0.5b
        #[arg(long)]
        preset: String,
        #[arg(long)]
        out: std::path::PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Measure Tandem's components against peers on this machine.
    Bench {
        #[command(subcommand)]
        what: bench::Bench,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Bench { what } => bench::run(what),
        Command::Finetune(args) => finetune::run(args),
        Command::Generate(args) => generate::run(args),
        Command::InitModel { preset, out, seed } => {
            let preset: tandem_worker::init_model::Preset = preset.parse()?;
            tandem_worker::init_model::write_model(preset, &out, seed)?;
            println!("wrote {}", out.display());
            Ok(())
        }
    }
}
