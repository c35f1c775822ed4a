//! The `hopscotch` command line: parse, call the library, print.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use hopscotch::checkpoint::Checkpoint;
use hopscotch::fit::scales::Objective;
use hopscotch::fit::search::{FitOptions, LossTokens, Method, ScoreBy, Screen};
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
        /// Importance matrix for the quantizer (llama-quantize's --imatrix): a GGUF from
        /// `hopscotch imatrix` or llama-imatrix, or a legacy .dat. iq1_s, iq1_m, iq2_* and
        /// q2_k_s need one.
        #[arg(long, value_name = "FILE")]
        imatrix: Option<PathBuf>,
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
    /// Prompt processing speed of GGUF files in llama.cpp (what llama-bench's pp test measures),
    /// measured in turns so that other work on the machine weighs on each alike; each file's
    /// fastest turn is reported.
    Speed {
        /// The .gguf files to compare.
        #[arg(required = true)]
        models: Vec<PathBuf>,
        /// Text whose tokens are decoded (reused cyclically).
        #[arg(long)]
        text: PathBuf,
        /// Tokens per decoded window.
        #[arg(long, default_value_t = 512)]
        ctx: usize,
        /// Timed windows per turn.
        #[arg(long, default_value_t = 4)]
        windows: usize,
        /// Turns (every file once per turn).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Evaluate a GGUF in llama.cpp: perplexity on a text or accuracy on a multiple-choice task,
    /// paired against a reference model.
    #[command(group(clap::ArgGroup::new("data").required(true).args(["text", "task"])))]
    Eval {
        /// The model (.gguf).
        model: PathBuf,
        /// Plain text file: perplexity.
        #[arg(long)]
        text: Option<PathBuf>,
        /// Task file of multiple-choice log-likelihood requests (JSON lines, plain or gzip):
        /// accuracy and acc_norm.
        #[arg(long)]
        task: Option<PathBuf>,
        /// Context in tokens: the window with --text (default 512), the most tokens decoded at
        /// once with --task (default 2048).
        #[arg(long)]
        ctx: Option<usize>,
        /// Evaluate at most this many windows (--text).
        #[arg(long, requires = "text")]
        chunks: Option<usize>,
        /// Score the first N docs in file order, after --exclude-fit (--task).
        #[arg(long, requires = "task")]
        limit: Option<usize>,
        /// Hold out the docs this plan was fitted on (--task).
        #[arg(long, value_name = "PLAN", requires = "task")]
        exclude_fit: Option<PathBuf>,
        /// Reference model: KL and top-1 agreement (--text); answer agreement, accuracy
        /// difference and KL over the choices (--task).
        #[arg(long)]
        reference: Option<PathBuf>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// Threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Export a slim GGUF: the plan's attention blocks skipped (llama.cpp's `deci`), its scalars
    /// folded into the weights, and an Ollama Modelfile beside it.
    Export {
        /// The model the plan was fitted on: a Hugging Face folder or a .gguf file.
        model: PathBuf,
        /// The plan (JSON) written by `hopscotch fit`.
        #[arg(long)]
        plan: PathBuf,
        /// Output GGUF; the Modelfile goes beside it (slim.gguf -> slim.Modelfile).
        #[arg(short, long)]
        output: PathBuf,
        /// Output type: f32, f16, bf16 or any llama-quantize type (q8_0, q4_k_m, iq4_nl, ...).
        #[arg(short = 't', long = "type", default_value = "f16")]
        qtype: String,
        /// Importance matrix for the quantizer (llama-quantize's --imatrix): a GGUF from
        /// `hopscotch imatrix --plan` (the slim model's) or llama-imatrix, or a legacy .dat. iq1_s, iq1_m, iq2_* and
        /// q2_k_s need one.
        #[arg(long, value_name = "FILE")]
        imatrix: Option<PathBuf>,
        /// Overwrite existing outputs.
        #[arg(long)]
        force: bool,
        /// Threads for quantization (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Compute an importance matrix for llama.cpp's quantizer from a task's documents: the mean
    /// square of every weight matrix's inputs, in the slim model when a plan is given. Written as
    /// llama.cpp's imatrix GGUF, for `--imatrix` here or `llama-quantize --imatrix`.
    Imatrix {
        /// The model: a Hugging Face folder or a .gguf file.
        model: PathBuf,
        /// The task file (JSON lines, plain or gzip) whose documents calibrate.
        #[arg(long)]
        task: PathBuf,
        /// A plan: the statistics are the slim model's (skipped blocks, scalars), and the
        /// documents follow the plan's seed, so the plan's own documents come first.
        #[arg(long)]
        plan: Option<PathBuf>,
        /// Documents: the first N of the task's seeded split, as the fit takes them. Documents
        /// beyond a plan's own are not held out by `eval --exclude-fit`.
        #[arg(long, default_value_t = 128)]
        docs: usize,
        /// Seed of the document split without a plan (with one, the plan's seed).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Longest sequence in tokens; longer ones lose context from the left.
        #[arg(long, default_value_t = 256)]
        max_seq_len: usize,
        /// Output (GGUF).
        #[arg(short, long)]
        output: PathBuf,
        /// Threads for the model (candle's CPU pool).
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Overwrite an existing output.
        #[arg(long)]
        force: bool,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Choose the attention blocks to skip for a task and fit the scalars: writes a plan (JSON).
    Fit {
        /// The model: a Hugging Face folder or a .gguf file (quantized ones are dequantized).
        model: PathBuf,
        /// The task file (JSON lines, plain or gzip): requests, text, chat or prompts.
        #[arg(long)]
        task: PathBuf,
        /// Attention blocks to skip (layer 0's always stays).
        #[arg(long)]
        skip: usize,
        /// Output plan (JSON).
        #[arg(short, long)]
        output: PathBuf,
        #[command(flatten)]
        choice: ChoiceArgs,
        #[command(flatten)]
        fit: FitArgs,
        /// Threads (default: all cores). The screening, the losses, the teacher and the
        /// stand-ins run their candidates or batches side by side, one per thread, and a
        /// training step its batch's sequences. The plan is the same at any count; memory grows
        /// a little with it (one sequence's training per thread).
        #[arg(long)]
        threads: Option<usize>,
        /// Overwrite an existing plan.
        #[arg(long)]
        force: bool,
        /// Continue from <output>.partial.json (written after every round) when it exists.
        #[arg(long)]
        resume: bool,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The whole pipeline: fit, export the slim GGUF, write the original at the same type,
    /// evaluate both in llama.cpp on held-out documents, and write the report.
    Run {
        /// The model: a Hugging Face folder or a .gguf file.
        model: PathBuf,
        /// The task file (log-likelihood requests, .jsonl or .jsonl.gz).
        #[arg(long)]
        task: PathBuf,
        /// Attention blocks to skip (layer 0's always stays).
        #[arg(long)]
        skip: usize,
        /// Output folder.
        #[arg(short, long)]
        output: PathBuf,
        #[command(flatten)]
        eval: EvalArgs,
        #[command(flatten)]
        choice: ChoiceArgs,
        #[command(flatten)]
        fit: FitArgs,
        /// Quantize each file with its own importance matrix from the fit documents (the slim
        /// model's with its skips and scalars), written beside it as *.imatrix.gguf. iq1_s,
        /// iq1_m, iq2_* and q2_k_s need it.
        #[arg(long)]
        imatrix: bool,
        /// Overwrite existing outputs in the folder.
        #[arg(long)]
        force: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Fit and export every configuration (task x method x objective x K), evaluate every slim
    /// model on the held-out documents of every task against the original, and write
    /// sweep.json, sweep.md and SVG plots. Finished work in the folder is reused: an
    /// interrupted sweep continues where it stopped.
    Sweep {
        /// The model: a Hugging Face folder or a .gguf file.
        model: PathBuf,
        /// A task file (multiple-choice log-likelihood requests); give --task once per task.
        /// Each is fitted on, and every model is evaluated on all of them.
        #[arg(long = "task", required = true)]
        tasks: Vec<PathBuf>,
        /// A task only evaluated on, not fitted on (to see how far plans fitted on the --task
        /// files carry); give it once per task.
        #[arg(long = "eval-task")]
        eval_tasks: Vec<PathBuf>,
        /// The numbers of attention blocks to skip, comma-separated (1,2,4,6,8,10). One search
        /// per configuration runs to the largest; smaller ones take its first blocks.
        #[arg(long, value_delimiter = ',', required = true)]
        skip: Vec<usize>,
        /// How to choose the blocks, comma-separated.
        #[arg(
            long,
            value_enum,
            value_delimiter = ',',
            default_value = "hopscotch,attn-cosine,random"
        )]
        method: Vec<MethodArg>,
        /// Training objectives, comma-separated (kl,ce compares them).
        #[arg(long, value_enum, value_delimiter = ',', default_value = "kl")]
        objective: Vec<ObjectiveArg>,
        /// Also every method without scalar training (for a baseline, one configuration
        /// whatever the objective).
        #[arg(long)]
        no_scales_too: bool,
        /// Output folder.
        #[arg(short, long)]
        output: PathBuf,
        #[command(flatten)]
        eval: EvalArgs,
        #[command(flatten)]
        fit: FitArgs,
        /// Start over: remove the folder's sweep files (needed when the folder holds a sweep
        /// of another model, task file, type, limit or fit settings).
        #[arg(long)]
        force: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// How `run` and `sweep` evaluate: the files' type, the documents, the decode and the threads.
#[derive(clap::Args)]
struct EvalArgs {
    /// Type of every evaluated file (the original's and the slim models'): f32, f16, bf16 or
    /// any llama-quantize type.
    #[arg(short = 't', long = "type", default_value = "q4_k_m")]
    qtype: String,
    /// Held-out documents to evaluate per task (default: all); the same for every model.
    #[arg(long)]
    limit: Option<usize>,
    /// Context of one evaluation decode, in tokens.
    #[arg(long, default_value_t = 4096)]
    ctx: usize,
    /// Threads for the fits (see `fit --threads`) and llama.cpp.
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

impl EvalArgs {
    /// Gives the fits the threads asked for (at least 1, see [`set_fit_threads`]) and returns it.
    fn set_threads(&self) -> usize {
        set_fit_threads(self.threads)
    }
}

/// How `fit` and `run` choose the blocks and train: one method, one objective (`sweep` takes
/// lists of these instead).
#[derive(clap::Args)]
struct ChoiceArgs {
    /// Training objective: KL to the original model's next-token distribution, cross-entropy
    /// of the targets, or (multiple-choice tasks) KL to the original's distribution over each
    /// doc's choices, what answer agreement measures (every choice's continuation is trained on).
    #[arg(long, value_enum, default_value = "kl")]
    objective: ObjectiveArg,
    /// How to choose the blocks: the greedy search, or a baseline.
    #[arg(long, value_enum, default_value = "hopscotch")]
    method: MethodArg,
    /// Train no scalars: score candidates by the loss with scalars at 1, keep them all at 1.
    #[arg(long)]
    no_scales: bool,
}

/// The fit's settings, shared by `fit`, `run` and `sweep`.
#[derive(clap::Args)]
struct FitArgs {
    /// Documents to fit on (the first of the task's seeded split).
    #[arg(long, default_value_t = FitOptions::default().fit_docs)]
    fit_docs: usize,
    /// Documents of the final training: the fit documents and more of the same split (default:
    /// the fit documents). Held out of evaluation like them.
    #[arg(long)]
    final_docs: Option<usize>,
    /// Training steps per trained candidate (default: one epoch over the fit batches).
    #[arg(long)]
    candidate_steps: Option<usize>,
    /// Training steps of the final choice (default: 4 epochs of the final documents).
    #[arg(long)]
    final_steps: Option<usize>,
    /// Learning rate of the candidates' training (Adam).
    #[arg(long, default_value_t = FitOptions::default().lr)]
    lr: f64,
    /// Learning rate of the final training (Adam).
    #[arg(long, default_value_t = FitOptions::default().final_lr)]
    final_lr: f64,
    /// Sequences per batch.
    #[arg(long, default_value_t = FitOptions::default().batch_size)]
    batch_size: usize,
    /// Longest sequence in tokens; longer ones lose context from the left.
    #[arg(long, default_value_t = FitOptions::default().max_seq_len)]
    max_seq_len: usize,
    /// Seed of the document split, batch order and random baseline.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Train every candidate every round (the paper's loop) instead of a screened shortlist.
    #[arg(long)]
    exhaustive: bool,
    /// Candidates trained per round after screening.
    #[arg(long, default_value_t = FitOptions::default().shortlist)]
    shortlist: usize,
    /// Screening signal of the default search.
    #[arg(long, value_enum, default_value = "skip-loss")]
    screen: ScreenArg,
    /// Batches the screening (and the attn-cosine importance) is measured on.
    #[arg(long, default_value_t = FitOptions::default().screen_batches)]
    screen_batches: usize,
    /// After the first round, screen only this many candidates, those the latest screenings
    /// ranked best (0: every candidate every round).
    #[arg(long, default_value_t = FitOptions::default().rescreen)]
    rescreen: usize,
    /// Positions the loss covers: every token after the first, a prefix all fit documents share
    /// (few-shot examples) counted once; or only the task's targets (a request's answer, a
    /// chat's assistant turns), as the paper trains. `--objective choice` always scores each
    /// choice's continuation.
    #[arg(long, value_enum, default_value = "all")]
    loss_tokens: LossTokensArg,
    /// The final training also trains a gain per channel of every attention and MLP output
    /// (2 x width per layer, beyond the paper's four scalars; folded into `attn_output` and
    /// `ffn_down` as exactly). The search still trains the four scalars only.
    #[arg(long)]
    channel_gains: bool,
    /// Give each skipped block a linear stand-in instead of nothing: an n_embd x n_embd matrix
    /// on the normed stream, fitted by least squares to the block's output before the search
    /// (llama.cpp's deci runs it as "linear attention": no KV cache, a matrix product per
    /// token). The search and the final training run with each candidate replaced by its
    /// stand-in.
    #[arg(long)]
    linear_attention: bool,
    /// With --linear-attention: the final training also trains the stand-ins' matrices, end
    /// to end on the objective, at this learning rate (Adam; their entries are about 0.1 to
    /// 0.5). Without it they stay at their least-squares fit.
    #[arg(long, value_name = "LR")]
    linear_lr: Option<f64>,
    /// With --linear-attention: fit the chosen blocks' stand-ins again after the search, one
    /// after another in layer order, each on the stream the stand-ins before it leave, so each
    /// also corrects what those left wrong. Costs about two forward passes over the final
    /// training's documents.
    #[arg(long)]
    linear_sequential: bool,
    /// What a trained candidate is scored by: the mean of its training steps' losses (the
    /// paper's), or the loss over all fit batches at the scalars it was trained to.
    #[arg(long, value_enum, default_value = "mean-train")]
    candidate_score: CandidateScoreArg,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum CandidateScoreArg {
    MeanTrain,
    Trained,
}

impl FitArgs {
    /// The options of a fit of `skip` blocks with `choice`'s method and objective.
    fn options(&self, skip: usize, choice: &ChoiceArgs) -> FitOptions {
        FitOptions {
            method: choice.method.into(),
            objective: choice.objective.into(),
            skip,
            train_scales: !choice.no_scales,
            ..self.shared()
        }
    }

    /// The settings every configuration of a sweep shares (method, objective, skip and scalar
    /// training at their defaults; the sweep sets them per configuration).
    fn shared(&self) -> FitOptions {
        FitOptions {
            fit_docs: self.fit_docs,
            final_docs: self.final_docs,
            candidate_steps: self.candidate_steps,
            final_steps: self.final_steps,
            lr: self.lr,
            final_lr: self.final_lr,
            batch_size: self.batch_size,
            max_seq_len: self.max_seq_len,
            seed: self.seed,
            exhaustive: self.exhaustive,
            shortlist: self.shortlist,
            screen: self.screen.into(),
            screen_batches: self.screen_batches,
            rescreen: self.rescreen,
            channel_gains: self.channel_gains,
            linear_attention: self.linear_attention,
            linear_lr: self.linear_lr,
            linear_sequential: self.linear_sequential,
            candidate_score: match self.candidate_score {
                CandidateScoreArg::MeanTrain => ScoreBy::MeanTrain,
                CandidateScoreArg::Trained => ScoreBy::Trained,
            },
            loss_tokens: match self.loss_tokens {
                LossTokensArg::Targets => LossTokens::Targets,
                LossTokensArg::All => LossTokens::All,
            },
            ..FitOptions::default()
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LossTokensArg {
    Targets,
    All,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Target {
    Gguf,
    Hf,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ObjectiveArg {
    Kl,
    Ce,
    Choice,
}

impl From<ObjectiveArg> for Objective {
    fn from(o: ObjectiveArg) -> Self {
        match o {
            ObjectiveArg::Kl => Objective::Kl,
            ObjectiveArg::Ce => Objective::Ce,
            ObjectiveArg::Choice => Objective::Choice,
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum MethodArg {
    Hopscotch,
    AttnCosine,
    Random,
}

impl From<MethodArg> for Method {
    fn from(m: MethodArg) -> Self {
        match m {
            MethodArg::Hopscotch => Method::Hopscotch,
            MethodArg::AttnCosine => Method::AttnCosine,
            MethodArg::Random => Method::Random,
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ScreenArg {
    SkipLoss,
    WarmSkipLoss,
    Gradient,
    ShortTrain,
}

impl From<ScreenArg> for Screen {
    fn from(s: ScreenArg) -> Self {
        match s {
            ScreenArg::SkipLoss => Screen::SkipLoss,
            ScreenArg::WarmSkipLoss => Screen::WarmSkipLoss,
            ScreenArg::Gradient => Screen::Gradient,
            ScreenArg::ShortTrain => Screen::ShortTrain,
        }
    }
}

/// Gives a fit `threads` threads (at least 1) and returns the count: rayon's pool runs that
/// many pieces of the fit side by side, each with candle at one thread per operation
/// (`hopscotch::fit::parallel`), and sets the allocator for it ([`malloc_settings`]). Read by
/// candle, rayon and glibc when they first run, so set before.
fn set_fit_threads(threads: usize) -> usize {
    malloc_settings();
    let threads = threads.max(1);
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    std::env::set_var("CANDLE_NUM_THREADS", "1");
    threads
}

fn threads_or_all(t: Option<usize>) -> usize {
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

/// Reads `--imatrix FILE` when given.
fn read_imatrix(path: Option<&std::path::Path>) -> Result<Option<hopscotch::imatrix::Imatrix>> {
    path.map(|p| hopscotch::imatrix::Imatrix::read(p).map_err(Into::into))
        .transpose()
}

fn main() {
    // An interrupt removes the temporary files of outputs being written, then exits.
    let _ = ctrlc::set_handler(|| {
        hopscotch::output::remove_temps();
        eprintln!("interrupted: no output was written");
        std::process::exit(130);
    });
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {}", chain(&e));
        std::process::exit(1);
    }
}

/// glibc's allocator set for a fit's tensors: one heap for every thread, and freed tensors
/// kept in it for the next ones instead of being handed back to the kernel.
///
/// By default glibc gives each thread that allocates a heap of its own, which keeps what that
/// thread frees for its own later allocations, and maps big blocks (a tensor of megabytes) from
/// the kernel and unmaps them when freed, so every training step faults in gigabytes of fresh
/// zeroed pages. Measured on SmolLM2-135M (the fit of `scripts/bench-threads.sh`, 2 cores):
/// with a heap per thread, 1 thread peaked at 10.7 GB RSS (the work runs on a rayon thread, the
/// rest on the main one) against 6.2 GB with one heap; with one heap and glibc's mapping, 2
/// threads took 243 s, 88 s of it in the kernel; with these settings 167 s, 13 s in the kernel,
/// and the same 6.3 GB peak.
fn malloc_settings() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only changes the allocator's settings, before the fit's threads start
    // (only the interrupt handler's waits); a setting this glibc refuses leaves its default.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        // -1: never trim (mallopt(3))
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
    }
}

/// The error and its causes, each cause left out when the message before already says it
/// (library errors carry their source's text in their own message).
fn chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Convert {
            input,
            output,
            qtype,
            to,
            imatrix,
            force,
            threads: t,
        } => {
            let q = QuantType::from_name(&qtype)?;
            let imatrix = read_imatrix(imatrix.as_deref())?;
            let started = std::time::Instant::now();
            let ck =
                Checkpoint::open(&input).with_context(|| format!("opening {}", input.display()))?;
            let bar = bytes_bar();
            let summary = match to {
                Target::Gguf => {
                    bar.set_message(format!("writing {}", output.display()));
                    hopscotch::convert::to_gguf(
                        &ck,
                        &output,
                        q,
                        force,
                        threads_or_all(t),
                        imatrix.as_ref(),
                        &bar,
                    )?
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
        Command::Speed {
            models,
            text,
            ctx,
            windows,
            rounds,
            threads,
            json,
        } => {
            let threads = threads_or_all(threads);
            let loaded = models
                .iter()
                .map(|m| hopscotch::llamacpp::LoadedModel::load(m))
                .collect::<Result<Vec<_>, _>>()?;
            let body = std::fs::read_to_string(&text)
                .with_context(|| format!("reading {}", text.display()))?;
            let tokens = loaded[0].tokenize(&body, true);
            let refs: Vec<&_> = loaded.iter().collect();
            let speeds = hopscotch::eval::speed::compare_prompt_speed(
                &refs, &tokens, ctx, windows, rounds, threads,
            )?;
            if json {
                let rows: Vec<_> = models
                    .iter()
                    .zip(&speeds)
                    .map(|(m, s)| serde_json::json!({"model": m, "prompt_tokens_per_s": s}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                for (m, s) in models.iter().zip(&speeds) {
                    println!("{:>9.1} prompt tokens/s  {}", s, m.display());
                }
            }
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
            task,
            ctx,
            chunks,
            limit,
            exclude_fit,
            reference,
            json,
            threads: t,
        } => {
            if let Some(task) = task {
                let selection = TaskSelection {
                    task,
                    limit,
                    exclude_fit,
                };
                return eval_task(
                    &model,
                    reference.as_deref(),
                    &selection,
                    ctx,
                    json,
                    threads_or_all(t),
                );
            }
            let text = text.context("give --text or --task")?;
            let ctx = ctx.unwrap_or(512);
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
                threads_or_all(t),
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
        Command::Export {
            model,
            plan,
            output,
            qtype,
            imatrix,
            force,
            threads: t,
        } => {
            let imatrix = read_imatrix(imatrix.as_deref())?;
            let opts = hopscotch::export::ExportOptions {
                qtype: QuantType::from_name(&qtype)?,
                force,
                threads: threads_or_all(t),
                imatrix: imatrix.as_ref(),
            };
            let started = std::time::Instant::now();
            let ck =
                Checkpoint::open(&model).with_context(|| format!("opening {}", model.display()))?;
            let p = hopscotch::fit::plan::Plan::load(&plan)?;
            let bar = bytes_bar();
            bar.set_message(format!("writing {}", output.display()));
            let s = hopscotch::export::export(&ck, &p, &plan, &output, &opts, &bar)?;
            let skipped = if s.skipped_blocks.is_empty() {
                "none".to_string()
            } else {
                format!("{:?}", s.skipped_blocks)
            };
            eprintln!(
                "wrote {} ({}, {} of {} attention blocks skipped: {skipped}; {} tensors, {:.1} MiB) in {:.1}s",
                s.gguf.path.display(),
                s.gguf_arch,
                s.skipped_blocks.len(),
                s.n_layer,
                s.gguf.n_tensors,
                s.gguf.file_bytes as f64 / (1 << 20) as f64,
                started.elapsed().as_secs_f64()
            );
            eprintln!(
                "wrote {} (chat template: {}); residual scale of the folded stream {:.3}..{:.3}",
                s.modelfile.display(),
                s.chat_template
                    .as_ref()
                    .map_or("not translated", |t| t.name()),
                s.residual_range.0,
                s.residual_range.1
            );
        }
        Command::Imatrix {
            model,
            task,
            plan,
            docs,
            seed,
            max_seq_len,
            output,
            threads: t,
            force,
            json,
        } => {
            // candle's CPU backend reads the thread count from this variable.
            std::env::set_var("RAYON_NUM_THREADS", t.max(1).to_string());
            let request = hopscotch::imatrix::ImatrixRequest {
                model,
                task,
                plan,
                docs,
                seed,
                max_seq_len,
                output,
                force,
            };
            let progress = hopscotch::fit::progress::Progress::stderr();
            let (s, _) = hopscotch::imatrix::run(&request, &progress)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!(
                    "wrote {} ({} weight matrices; {} documents, {} tokens; skipped blocks {:?}) in {:.1}s",
                    s.output.display(),
                    s.entries,
                    s.docs,
                    s.tokens,
                    s.skipped_blocks,
                    s.seconds
                );
                if s.beyond_plan > 0 {
                    println!(
                        "{} of the documents are beyond the plan's own: eval --exclude-fit does not hold them out",
                        s.beyond_plan
                    );
                }
            }
        }
        Command::Fit {
            model,
            task,
            skip,
            output,
            choice,
            fit,
            threads: t,
            force,
            resume,
            json,
        } => {
            set_fit_threads(threads_or_all(t));
            let request = hopscotch::fit::search::FitRequest {
                model,
                task,
                output,
                force,
                resume,
                options: fit.options(skip, &choice),
            };
            let progress = hopscotch::fit::progress::Progress::stderr();
            let report = hopscotch::fit::search::fit(&request, &progress)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("{report}");
            }
        }
        Command::Run {
            model,
            task,
            skip,
            output,
            eval,
            choice,
            fit,
            imatrix,
            force,
            json,
        } => {
            let request = hopscotch::pipeline::RunRequest {
                model,
                task,
                out_dir: output,
                qtype: QuantType::from_name(&eval.qtype)?,
                limit: eval.limit,
                fit: fit.options(skip, &choice),
                force,
                threads: eval.set_threads(),
                n_ctx: eval.ctx,
                imatrix,
            };
            let progress = hopscotch::fit::progress::Progress::stderr();
            let report = hopscotch::pipeline::run(&request, &progress)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.table());
                println!(
                    "answer agreement {:.2}%, accuracy difference {:+.2} points (paired 95% CI [{:+.2}, {:+.2}])",
                    report.paired.agreement * 100.0,
                    report.paired.accuracy_diff * 100.0,
                    report.paired.accuracy_diff_ci95[0] * 100.0,
                    report.paired.accuracy_diff_ci95[1] * 100.0
                );
                println!(
                    "report           {}",
                    request.out_dir.join("report.md").display()
                );
            }
        }
        Command::Sweep {
            model,
            mut tasks,
            eval_tasks,
            skip,
            method,
            objective,
            no_scales_too,
            output,
            eval,
            fit,
            force,
            json,
        } => {
            let threads = eval.set_threads();
            let fit_tasks = tasks.len();
            tasks.extend(eval_tasks);
            let request = hopscotch::sweep::SweepRequest {
                model,
                tasks,
                fit_tasks,
                skips: skip,
                methods: method.into_iter().map(Method::from).collect(),
                objectives: objective.into_iter().map(Objective::from).collect(),
                no_scales_too,
                qtype: QuantType::from_name(&eval.qtype)?,
                limit: eval.limit,
                fit: fit.shared(),
                out_dir: output,
                force,
                threads,
                n_ctx: eval.ctx,
            };
            let progress = hopscotch::fit::progress::Progress::stderr();
            let report = hopscotch::sweep::sweep(&request, &progress)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("{}", report.summary());
                println!(
                    "report           {}",
                    request.out_dir.join("sweep.md").display()
                );
            }
        }
    }
    Ok(())
}

/// What `eval --task` scores.
struct TaskSelection {
    task: PathBuf,
    limit: Option<usize>,
    exclude_fit: Option<PathBuf>,
}

/// `eval --task`: accuracy on a multiple-choice task, paired against a reference if given.
fn eval_task(
    model: &std::path::Path,
    reference: Option<&std::path::Path>,
    sel: &TaskSelection,
    ctx: Option<usize>,
    json: bool,
    threads: usize,
) -> Result<()> {
    use hopscotch::eval::task;
    use hopscotch::llamacpp::LoadedModel;
    let data = hopscotch::task::load(&sel.task)?;
    let plan = sel
        .exclude_fit
        .as_deref()
        .map(hopscotch::fit::plan::Plan::load)
        .transpose()?;
    let exclude = sel.exclude_fit.as_deref().zip(plan.as_ref());
    let selection = task::select_docs(&data, exclude, sel.limit)?;
    let m = LoadedModel::load(model)?;
    let r = reference.map(LoadedModel::load).transpose()?;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {pos}/{len} docs {per_sec} eta {eta}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    let rep = task::evaluate(
        &m,
        r.as_ref(),
        &data,
        &selection,
        ctx.unwrap_or(2048),
        threads,
        &bar,
    )?;
    if json {
        println!("{}", serde_json::to_string(&rep)?);
        return Ok(());
    }
    let pct = |x: f64| x * 100.0;
    println!("model            {}", model.display());
    println!(
        "task             {}: {} docs ({} held out as fit docs), {} requests ({} truncated)",
        sel.task.display(),
        rep.n_docs,
        rep.excluded_docs,
        rep.n_requests,
        rep.truncated_requests
    );
    for (name, value, [lo, hi]) in [
        ("accuracy", rep.accuracy, rep.accuracy_ci95),
        ("acc_norm", rep.acc_norm, rep.acc_norm_ci95),
    ] {
        println!(
            "{name:<16} {:.2}% (95% CI {:.2}-{:.2}%, Wilson)",
            pct(value),
            pct(lo),
            pct(hi)
        );
    }
    println!(
        "prompt tokens    {} in decodes of up to {} ({:.0} tokens/s)",
        rep.prompt_tokens, rep.n_ctx, rep.prompt_tokens_per_s
    );
    if rep.cached_prefix_tokens > 0 {
        println!(
            "shared prefix    {} tokens decoded once per model, reused by {} of {} docs",
            rep.cached_prefix_tokens, rep.cached_prefix_docs, rep.n_docs
        );
    }
    if let (Some(reference), Some(agreement), Some(diff), Some([lo, hi]), Some(kl)) = (
        &rep.reference,
        rep.agreement,
        rep.accuracy_diff,
        rep.accuracy_diff_ci95,
        rep.choice_kl_mean,
    ) {
        println!(
            "reference        accuracy {:.2}%, acc_norm {:.2}%",
            pct(reference.accuracy),
            pct(reference.acc_norm)
        );
        println!("agreement        {:.2}%", pct(agreement));
        println!(
            "accuracy diff    {:+.2} points (95% CI {:+.2} to {:+.2}, paired bootstrap)",
            pct(diff),
            pct(lo),
            pct(hi)
        );
        println!("choice KL mean   {kl:.6}");
    }
    Ok(())
}
