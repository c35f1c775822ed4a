//! The command line's definitions: every subcommand and its arguments (clap derive). The fit's
//! options are the library's own [`FitSettings`], and the enums are the library's, so each
//! option has one definition.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use hopscotch::imatrix::ImatrixRequest;
use hopscotch::plan::{FitSettings, Method, Objective, QualityBudget};
use hopscotch::write::FloatType;

#[derive(Parser)]
#[command(
    name = "hopscotch",
    version,
    about = "Slim language models for a task and ship them as GGUF for llama.cpp"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Convert a Hugging Face folder or GGUF to GGUF (any llama-quantize type) or to a HF folder.
    Convert(ConvertArgs),
    /// Show what a GGUF file or Hugging Face folder holds.
    Inspect(InspectArgs),
    /// Prompt processing speed of GGUF files in llama.cpp (what llama-bench's pp test measures),
    /// measured in turns so that other work on the machine weighs on each alike; each file's
    /// fastest turn is reported.
    Speed(SpeedArgs),
    /// Evaluate a GGUF in llama.cpp: perplexity on a text or accuracy on a multiple-choice task,
    /// paired against a reference model.
    Eval(EvalArgs),
    /// Export a slim GGUF: the plan's attention blocks skipped (llama.cpp's `deci`), its scalars
    /// folded into the weights, and an Ollama Modelfile beside it.
    Export(ExportArgs),
    /// Compute an importance matrix for llama.cpp's quantizer from a task's documents: the mean
    /// square of every weight matrix's inputs, in the slim model when a plan is given. Written as
    /// llama.cpp's imatrix GGUF, for `--imatrix` here or `llama-quantize --imatrix`.
    Imatrix(ImatrixArgs),
    /// Choose the attention blocks to skip for a task and fit the scalars: writes a plan (JSON).
    Fit(FitArgs),
    /// The whole pipeline: fit, export the slim GGUF, write the original at the same type,
    /// evaluate both in llama.cpp on held-out documents, and write the report.
    Run(RunArgs),
    /// Fit and export every configuration (task x method x objective x K), evaluate every slim
    /// model on the held-out documents of every task against the original, and write
    /// sweep.json, sweep.md and SVG plots. Finished work in the folder is reused: an
    /// interrupted sweep continues where it stopped.
    Sweep(SweepArgs),
}

/// How `run` and `sweep` evaluate: the files' type, the documents and the decode.
#[derive(clap::Args)]
pub struct Evaluation {
    /// Type of every evaluated file (the original's and the slim models'): f32, f16, bf16 or
    /// any llama-quantize type.
    #[arg(short = 't', long = "type", default_value = "q4_k_m")]
    pub qtype: String,
    /// Held-out documents to evaluate per task (default: all); the same for every model.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Context of one evaluation decode, in tokens.
    #[arg(long, default_value_t = 4096)]
    pub ctx: usize,
    #[command(flatten)]
    pub threads: Threads,
}

/// How `fit` and `run` choose the blocks and train: one method, one objective (`sweep` takes
/// lists of these instead).
#[derive(clap::Args)]
pub struct ChoiceArgs {
    /// Training objective: KL to the original model's next-token distribution, cross-entropy
    /// of the targets, or (multiple-choice tasks) KL to the original's distribution over each
    /// doc's choices, what answer agreement measures (every choice's continuation is trained on).
    #[arg(long, value_enum, default_value_t = Objective::Kl)]
    pub objective: Objective,
    /// How to choose the blocks: the greedy search, or a baseline.
    #[arg(long, value_enum, default_value_t = Method::Hopscotch, help_heading = "Baselines")]
    pub method: Method,
    /// Train no scalars: score candidates by the loss with scalars at 1, keep them all at 1.
    #[arg(long, help_heading = "Baselines")]
    pub no_scales: bool,
    #[command(flatten)]
    pub stand_ins: StandInsFlag,
}

/// `--linear-attention`, the default since the stand-ins became it: still accepted, so that
/// command lines written before run as they did.
#[derive(clap::Args)]
pub struct StandInsFlag {
    /// Linear stand-ins for the skipped blocks (the default).
    #[arg(
        long = "linear-attention",
        hide = true,
        conflicts_with = "linear_attention"
    )]
    pub on: bool,
}

impl StandInsFlag {
    /// `fit` with the stand-ins on where the flag asks for them.
    pub fn apply(&self, fit: FitSettings) -> FitSettings {
        FitSettings {
            linear_attention: fit.linear_attention || self.on,
            ..fit
        }
    }
}

impl ChoiceArgs {
    /// `fit`'s settings for a fit of `skip` blocks with this method and objective.
    pub fn settings(&self, skip: usize, fit: FitSettings) -> FitSettings {
        FitSettings {
            method: self.method,
            objective: self.objective,
            skip,
            train_scales: !self.no_scales,
            ..self.stand_ins.apply(fit)
        }
    }
}

/// What `convert` and `export` write.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// A GGUF file.
    Gguf,
    /// A Hugging Face folder.
    Hf,
}

/// The type of a written GGUF and the importance matrix its quantizer takes (`convert`,
/// `export`).
#[derive(clap::Args)]
pub struct OutputType {
    /// Output type: f32, f16, bf16 or any llama-quantize type (q8_0, q4_k_m, iq4_nl, ...).
    #[arg(short = 't', long = "type", default_value = "f16")]
    pub qtype: String,
    /// Importance matrix for the quantizer (llama-quantize's --imatrix): a GGUF from
    /// `hopscotch imatrix` (with `--plan` for a slim model's) or llama-imatrix, or a legacy
    /// .dat. iq1_s, iq1_m, iq2_* and q2_k_s need one.
    #[arg(long, value_name = "FILE")]
    pub imatrix: Option<PathBuf>,
}

/// `--threads`, as every command takes it.
#[derive(clap::Args)]
pub struct Threads {
    /// Threads (default: all cores). A fit runs its candidates, batches and a training step's
    /// sequences side by side, one per thread, with the same plan at any count; llama.cpp
    /// decodes and quantizes on them.
    #[arg(long)]
    threads: Option<usize>,
}

impl Threads {
    /// The count asked for, or every core.
    pub fn count(&self) -> usize {
        self.threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            .max(1)
    }
}

/// The arguments of `hopscotch convert`.
#[derive(clap::Args)]
pub struct ConvertArgs {
    /// Input: a Hugging Face folder or a .gguf file.
    pub input: PathBuf,
    /// Output file (GGUF) or folder (with --to hf).
    #[arg(short, long)]
    pub output: PathBuf,
    #[command(flatten)]
    pub typed: OutputType,
    /// Output format.
    #[arg(long, value_enum, default_value = "gguf")]
    pub to: Target,
    /// Overwrite an existing output.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub threads: Threads,
}

/// The arguments of `hopscotch inspect`.
#[derive(clap::Args)]
pub struct InspectArgs {
    /// A .gguf file or a Hugging Face folder.
    pub file: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// The arguments of `hopscotch speed`.
#[derive(clap::Args)]
pub struct SpeedArgs {
    /// The .gguf files to compare.
    #[arg(required = true)]
    pub models: Vec<PathBuf>,
    /// Text whose tokens are decoded (reused cyclically).
    #[arg(long)]
    pub text: PathBuf,
    /// Tokens per decoded window.
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Timed windows per turn.
    #[arg(long, default_value_t = 4)]
    pub windows: usize,
    /// Turns (every file once per turn).
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    #[command(flatten)]
    pub threads: Threads,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// The arguments of `hopscotch eval`.
// A mode's options conflict with the other mode's data: clap does not check `requires`
// beside a required group.
#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("data").required(true).args(["text", "task"])))]
pub struct EvalArgs {
    /// The model (.gguf).
    pub model: PathBuf,
    /// Plain text file: perplexity.
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Task file of multiple-choice log-likelihood requests (JSON lines, plain or gzip):
    /// accuracy and acc_norm.
    #[arg(long)]
    pub task: Option<PathBuf>,
    /// Context in tokens: the window with --text (default 512), the most tokens decoded at
    /// once with --task (default 2048).
    #[arg(long)]
    pub ctx: Option<usize>,
    /// Evaluate at most this many windows (--text).
    #[arg(long, conflicts_with = "task")]
    pub chunks: Option<usize>,
    /// Score the first N docs in file order, after --exclude-fit (--task).
    #[arg(long, conflicts_with = "text")]
    pub limit: Option<usize>,
    /// Hold out the docs this plan was fitted on, and those that chose its K (--task).
    #[arg(long, value_name = "PLAN", conflicts_with = "text")]
    pub exclude_fit: Option<PathBuf>,
    /// Reference model: KL and top-1 agreement (--text); answer agreement, accuracy
    /// difference and KL over the choices (--task).
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Write each doc's scores to FILE, one JSON object per line (--task): its id, the gold
    /// choice, the choices picked (`pred`, and `pred_norm` per character), every choice's
    /// log-likelihood and its length in characters, and the reference's log-likelihoods and
    /// pick with --reference.
    #[arg(long, value_name = "FILE", conflicts_with = "text")]
    pub log_samples: Option<PathBuf>,
    /// Overwrite an existing --log-samples file.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub threads: Threads,
}

/// The arguments of `hopscotch export`.
#[derive(clap::Args)]
pub struct ExportArgs {
    /// The model the plan was fitted on: a Hugging Face folder or a .gguf file.
    pub model: PathBuf,
    /// The plan (JSON) written by `hopscotch fit`.
    #[arg(long)]
    pub plan: PathBuf,
    /// Output GGUF, the Modelfile beside it (slim.gguf -> slim.Modelfile); or, with --to hf,
    /// the Hugging Face folder.
    #[arg(short, long)]
    pub output: PathBuf,
    #[command(flatten)]
    pub typed: OutputType,
    /// Output format: a GGUF for llama.cpp and Ollama, or a Hugging Face folder (DeciLM layout
    /// when blocks are skipped) for engines such as vLLM.
    #[arg(long, value_enum, default_value = "gguf")]
    pub to: Target,
    /// Float type of the Hugging Face folder's matrices (default: the input's; f32 for a
    /// quantized input). Only with --to hf.
    #[arg(long, value_enum)]
    pub dtype: Option<FloatType>,
    /// Overwrite existing outputs.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub threads: Threads,
}

/// The arguments of `hopscotch imatrix`.
#[derive(clap::Args)]
pub struct ImatrixArgs {
    #[command(flatten)]
    pub request: ImatrixRequest,
    #[command(flatten)]
    pub threads: Threads,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// The arguments of `hopscotch fit`.
#[derive(clap::Args)]
pub struct FitArgs {
    /// The model: a Hugging Face folder or a .gguf file (quantized ones are dequantized).
    pub model: PathBuf,
    /// The task file (JSON lines, plain or gzip): requests, text, chat or prompts. Give it
    /// more than once to fit one plan to several tasks: the fit documents (and the final
    /// training's) are drawn evenly from them.
    #[arg(long = "task", required = true)]
    pub tasks: Vec<PathBuf>,
    /// Attention blocks to skip (layer 0's always stays).
    #[arg(long)]
    pub skip: usize,
    /// Output plan (JSON).
    #[arg(short, long)]
    pub output: PathBuf,
    #[command(flatten)]
    pub choice: ChoiceArgs,
    #[command(flatten)]
    pub fit: FitSettings,
    #[command(flatten)]
    pub threads: Threads,
    /// Overwrite an existing plan.
    #[arg(long)]
    pub force: bool,
    /// Continue from <output>.partial.json (written after every round) when it exists.
    #[arg(long)]
    pub resume: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// The arguments of `hopscotch run`.
#[derive(clap::Args)]
pub struct RunArgs {
    /// The model: a Hugging Face folder or a .gguf file.
    pub model: PathBuf,
    /// The task file (log-likelihood requests, .jsonl or .jsonl.gz). Give it more than once
    /// to slim for several tasks: the fit draws its documents evenly from them, every task is
    /// evaluated, and a quality budget must hold on each.
    #[arg(long = "task", required = true)]
    pub tasks: Vec<PathBuf>,
    /// Attention blocks to skip (layer 0's always stays). Or give a quality budget instead
    /// (--max-drop, --min-agreement), and K is chosen on validation documents.
    #[arg(long)]
    pub skip: Option<usize>,
    /// Output folder.
    #[arg(short, long)]
    pub output: PathBuf,
    #[command(flatten)]
    pub budget: QualityBudget,
    #[command(flatten)]
    pub eval: Evaluation,
    #[command(flatten)]
    pub choice: ChoiceArgs,
    #[command(flatten)]
    pub fit: FitSettings,
    /// Quantize each file with its own importance matrix from the fit documents of the first
    /// --task (the slim model's with its skips and scalars), written beside it as
    /// *.imatrix.gguf. iq1_s, iq1_m, iq2_* and q2_k_s need it.
    #[arg(long)]
    pub imatrix: bool,
    /// Overwrite existing outputs in the folder.
    #[arg(long)]
    pub force: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// The arguments of `hopscotch sweep`.
#[derive(clap::Args)]
pub struct SweepArgs {
    /// The model: a Hugging Face folder or a .gguf file.
    pub model: PathBuf,
    /// A task file (multiple-choice log-likelihood requests); give --task once per task.
    /// Each is fitted on, and every model is evaluated on all of them.
    #[arg(long = "task", required = true)]
    pub tasks: Vec<PathBuf>,
    /// A task only evaluated on, not fitted on (to see how far plans fitted on the --task
    /// files carry); give it once per task.
    #[arg(long = "eval-task")]
    pub eval_tasks: Vec<PathBuf>,
    /// The numbers of attention blocks to skip, comma-separated (1,2,4,6,8,10). One search
    /// per configuration runs to the largest; smaller ones take its first blocks.
    #[arg(long, value_delimiter = ',', required = true)]
    pub skip: Vec<usize>,
    /// How to choose the blocks, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "hopscotch,attn-cosine,random"
    )]
    pub method: Vec<Method>,
    /// Training objectives, comma-separated (kl,ce compares them).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "kl")]
    pub objective: Vec<Objective>,
    /// Also every method without scalar training (for a baseline, one configuration
    /// whatever the objective).
    #[arg(long)]
    pub no_scales_too: bool,
    /// Output folder.
    #[arg(short, long)]
    pub output: PathBuf,
    #[command(flatten)]
    pub eval: Evaluation,
    #[command(flatten)]
    pub fit: FitSettings,
    #[command(flatten)]
    pub stand_ins: StandInsFlag,
    /// Start over: remove the folder's sweep files (needed when the folder holds a sweep
    /// of another model, task file, type, limit or fit settings).
    #[arg(long)]
    pub force: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}
