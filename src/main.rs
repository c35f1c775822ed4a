//! The `hopscotch` command line: parse, call the library, print.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use hopscotch::checkpoint::Checkpoint;
use hopscotch::gguf::consts::QuantType;

#[derive(Parser)]
#[command(
    name = "hopscotch",
    version,
    about = "Slim language models for a task and ship them as GGUF for llama.cpp"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Convert a Hugging Face folder or GGUF to GGUF (any llama-quantize type) or to a HF folder.
    Convert {
        /// Input: a Hugging Face folder or a .gguf file.
        input: PathBuf,
        /// Output file (GGUF) or folder (with --to hf).
        #[arg(short, long)]
        output: PathBuf,
        /// Output type: f32, f16, bf16 or any llama-quantize type (q8_0, q4_k_m, iq4_nl, ...).
        #[arg(short = 't', long = "type", default_value = "f16")]
        qtype: String,
        /// Output format.
        #[arg(long, value_enum, default_value = "gguf")]
        to: Target,
        /// Overwrite an existing output.
        #[arg(long)]
        force: bool,
        /// Threads for quantization (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Show what a GGUF file or Hugging Face folder holds.
    Inspect {
        /// A .gguf file or a Hugging Face folder.
        file: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Evaluate a GGUF in llama.cpp: perplexity on a text, KL and top-1 agreement to a reference.
    Eval {
        /// The model (.gguf).
        model: PathBuf,
        /// Plain text file for perplexity.
        #[arg(long)]
        text: PathBuf,
        /// Window size in tokens.
        #[arg(long, default_value_t = 512)]
        ctx: usize,
        /// Evaluate at most this many windows.
        #[arg(long)]
        chunks: Option<usize>,
        /// Reference model for KL divergence and top-1 agreement.
        #[arg(long)]
        reference: Option<PathBuf>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// Threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Target {
    Gguf,
    Hf,
}

fn threads(t: Option<usize>) -> usize {
    t.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn bytes_bar() -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    bar
}

fn main() {
    // An interrupt removes the temporary files of outputs being written, then exits.
    let _ = ctrlc::set_handler(|| {
        hopscotch::output::remove_temps();
        eprintln!("interrupted: no output was written");
        std::process::exit(130);
    });
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Convert {
            input,
            output,
            qtype,
            to,
            force,
            threads: t,
        } => {
            let q = QuantType::from_name(&qtype)?;
            let started = std::time::Instant::now();
            let ck =
                Checkpoint::open(&input).with_context(|| format!("opening {}", input.display()))?;
            let bar = bytes_bar();
            let summary = match to {
                Target::Gguf => {
                    bar.set_message(format!("writing {}", output.display()));
                    hopscotch::convert::to_gguf(&ck, &output, q, force, threads(t), &bar)?
                }
                Target::Hf => {
                    if qtype != "f16" {
                        bail!("--type applies to GGUF output; a Hugging Face folder keeps float tensors (quantized ones become f32)");
                    }
                    bar.set_message(format!("writing {}", output.display()));
                    hopscotch::convert::to_hf(&ck, &output, force, &bar)?
                }
            };
            eprintln!(
                "wrote {} ({} tensors, {:.1} MiB) in {:.1}s",
                summary.path.display(),
                summary.n_tensors,
                summary.file_bytes as f64 / (1 << 20) as f64,
                started.elapsed().as_secs_f64()
            );
        }
        Command::Inspect { file, json } => {
            let s = hopscotch::inspect::inspect(&file)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!("{s}");
            }
        }
        Command::Eval {
            model,
            text,
            ctx,
            chunks,
            reference,
            json,
            threads: t,
        } => {
            let body = std::fs::read_to_string(&text)
                .with_context(|| format!("reading {}", text.display()))?;
            let m = hopscotch::llamacpp::LoadedModel::load(&model)?;
            let r = reference
                .as_deref()
                .map(hopscotch::llamacpp::LoadedModel::load)
                .transpose()?;
            let rep = hopscotch::eval::perplexity::perplexity(
                &m,
                r.as_ref(),
                &body,
                &text,
                ctx,
                chunks,
                threads(t),
            )?;
            if json {
                println!("{}", serde_json::to_string(&rep)?);
            } else {
                println!("model            {}", model.display());
                println!(
                    "tokens scored    {} ({} windows of {})",
                    rep.tokens, rep.windows, rep.n_ctx
                );
                println!("perplexity       {:.4}", rep.perplexity);
                if let (Some(kl), Some(top1), Some(rp)) =
                    (rep.kl_mean, rep.top1_agreement, rep.reference_perplexity)
                {
                    println!("reference ppl    {rp:.4}");
                    println!("KL mean          {kl:.6}");
                    println!("top-1 agreement  {:.2}%", top1 * 100.0);
                }
            }
        }
    }
    Ok(())
}
