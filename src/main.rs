//! The `hopscotch` command line: parse ([`cli`]), call the library, print.

mod cli;

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;

use cli::{Cli, Command, Target};
use hopscotch::checkpoint::{is_deci_folder, Checkpoint, DeciCheckpoint};
use hopscotch::convert;
use hopscotch::eval::perplexity::perplexity;
use hopscotch::eval::speed::{compare_prompt_speed, SpeedReport};
use hopscotch::eval::task::{evaluate, select_docs, write_samples};
use hopscotch::fit::parallel::set_threads;
use hopscotch::gguf::consts::QuantType;
use hopscotch::gguf::imatrix::Imatrix;
use hopscotch::llamacpp::LoadedModel;
use hopscotch::output::check_overwrite;
use hopscotch::plan::Plan;
use hopscotch::progress::{bytes_bar, docs_bar, Progress};

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

/// Reads `--imatrix FILE` when given.
fn read_imatrix(path: Option<&Path>) -> Result<Option<Imatrix>> {
    Ok(path.map(Imatrix::read).transpose()?)
}

/// Opens a checkpoint, naming it in the error.
fn open(path: &Path) -> Result<Checkpoint> {
    Checkpoint::open(path).with_context(|| format!("opening {}", path.display()))
}

/// Prints `value` as pretty JSON with `json`, else as its `Display`.
fn print(value: &(impl serde::Serialize + std::fmt::Display), json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        println!("{value}");
    }
    Ok(())
}

/// [`print`], and without `json` where the markdown report is.
fn print_report(
    value: &(impl serde::Serialize + std::fmt::Display),
    json: bool,
    markdown: &Path,
) -> Result<()> {
    print(value, json)?;
    if !json {
        println!("report           {}", markdown.display());
    }
    Ok(())
}

/// `eval`'s output: one line of JSON with `json`, else `head` (the files) and the `Display`.
fn print_eval(
    value: &(impl serde::Serialize + std::fmt::Display),
    json: bool,
    head: &str,
) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(value)?);
    } else {
        println!("{head}\n{value}");
    }
    Ok(())
}

/// A text file's contents, naming it in the error.
fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn run(cli: Cli) -> Result<()> {
    let started = Instant::now();
    match cli.command {
        Command::Convert(a) => {
            let q = QuantType::from_name(&a.typed.qtype)?;
            let imatrix = read_imatrix(a.typed.imatrix.as_deref())?;
            let bar = bytes_bar(format!("writing {}", a.output.display()));
            let out = &a.output;
            let opts = hopscotch::write::WriteOptions {
                qtype: q,
                force: a.force,
                threads: a.threads.count(),
                imatrix: imatrix.as_ref(),
            };
            if is_deci_folder(&a.input) {
                if a.to == Target::Hf {
                    bail!(
                        "{} is already a Hugging Face folder (DeciLM); convert writes it as GGUF",
                        a.input.display()
                    );
                }
                let deci = DeciCheckpoint::open(&a.input)
                    .with_context(|| format!("opening {}", a.input.display()))?;
                let summary = convert::deci_to_gguf(&deci, out, &opts, &bar)?;
                eprintln!("wrote {summary} in {:.1}s", started.elapsed().as_secs_f64());
                return Ok(());
            }
            let ck = open(&a.input)?;
            let summary = match a.to {
                Target::Gguf => convert::to_gguf(&ck, out, &opts, &bar)?,
                Target::Hf if a.typed.qtype != "f16" => bail!("--type applies to GGUF output; a Hugging Face folder keeps float tensors (quantized ones become f32)"),
                Target::Hf => convert::to_hf(&ck, out, a.force, &bar)?,
            };
            eprintln!("wrote {summary} in {:.1}s", started.elapsed().as_secs_f64());
        }
        Command::Speed(a) => {
            let loaded = a.models.iter().map(|m| LoadedModel::load(m));
            let loaded = loaded.collect::<Result<Vec<_>, _>>()?;
            let tokens = loaded[0].tokenize(&read(&a.text)?, true);
            let refs: Vec<&_> = loaded.iter().collect();
            let (ctx, windows, rounds, threads) = (a.ctx, a.windows, a.rounds, a.threads.count());
            let speeds = compare_prompt_speed(&refs, &tokens, ctx, windows, rounds, threads)?;
            print(&SpeedReport::new(&a.models, &speeds), a.json)?;
        }
        Command::Inspect(a) => print(&hopscotch::inspect::inspect(&a.file)?, a.json)?,
        Command::Eval(a) => {
            let load = || -> Result<_> {
                let m = LoadedModel::load(&a.model)?;
                Ok((
                    m,
                    a.reference.as_deref().map(LoadedModel::load).transpose()?,
                ))
            };
            let Some(task) = &a.task else {
                let text = a.text.as_deref().context("give --text or --task")?;
                let body = read(text)?;
                let (m, r) = load()?;
                let ctx = a.ctx.unwrap_or(512);
                let rep = perplexity(
                    &m,
                    r.as_ref(),
                    &body,
                    text,
                    ctx,
                    a.chunks,
                    a.threads.count(),
                )?;
                return print_eval(
                    &rep,
                    a.json,
                    &format!("model            {}", a.model.display()),
                );
            };
            if let Some(path) = &a.log_samples {
                check_overwrite(path, a.force)?;
            }
            let data = hopscotch::task::load(task)?;
            let plan = a.exclude_fit.as_deref().map(Plan::load).transpose()?;
            let exclude = a.exclude_fit.as_deref().zip(plan.as_ref());
            let selection = select_docs(&data, exclude, a.limit)?;
            let ((m, r), threads) = (load()?, a.threads.count());
            let ctx = a.ctx.unwrap_or(2048);
            let rep = evaluate(&m, r.as_ref(), &data, &selection, ctx, threads, &docs_bar())?;
            if let Some(path) = &a.log_samples {
                write_samples(path, &rep.docs, a.force)?;
            }
            print_eval(&rep, a.json, &rep.heading(&a.model, task))?;
        }
        Command::Export(a) if a.to == Target::Hf => {
            if a.typed.qtype != "f16" || a.typed.imatrix.is_some() {
                bail!("--type and --imatrix apply to GGUF output; give a Hugging Face folder's float type with --dtype");
            }
            let (ck, plan) = (open(&a.model)?, Plan::load(&a.plan)?);
            let bar = bytes_bar(format!("writing {}", a.output.display()));
            let s = hopscotch::export_hf::export_hf(
                &ck, &plan, &a.plan, &a.output, a.dtype, a.force, &bar,
            )?;
            eprintln!("{s}\ntook {:.1}s", started.elapsed().as_secs_f64());
        }
        Command::Export(a) => {
            if a.dtype.is_some() {
                bail!("--dtype applies to --to hf; a GGUF's type is --type");
            }
            let imatrix = read_imatrix(a.typed.imatrix.as_deref())?;
            let opts = hopscotch::write::WriteOptions {
                qtype: QuantType::from_name(&a.typed.qtype)?,
                force: a.force,
                threads: a.threads.count(),
                imatrix: imatrix.as_ref(),
            };
            let (ck, plan) = (open(&a.model)?, Plan::load(&a.plan)?);
            let bar = bytes_bar(format!("writing {}", a.output.display()));
            let s = hopscotch::export::export(&ck, &plan, &a.plan, &a.output, &opts, &bar)?;
            eprintln!("{s}\ntook {:.1}s", started.elapsed().as_secs_f64());
        }
        Command::Imatrix(a) => {
            // candle's CPU backend reads the thread count from this variable.
            std::env::set_var("RAYON_NUM_THREADS", a.threads.count().to_string());
            print(
                &hopscotch::imatrix::run(&a.request, &Progress::stderr())?.0,
                a.json,
            )?;
        }
        Command::Fit(a) => {
            set_threads(a.threads.count());
            let request = hopscotch::fit::session::FitRequest {
                model: a.model,
                tasks: a.tasks,
                output: a.output,
                force: a.force,
                resume: a.resume,
                options: a.choice.settings(a.skip, a.fit),
            };
            print(
                &hopscotch::fit::session::fit(&request, &Progress::stderr())?,
                a.json,
            )?;
        }
        Command::Run(a) => {
            let budget = a.budget.resolve(a.skip)?;
            let request = hopscotch::pipeline::RunRequest {
                model: a.model,
                tasks: a.tasks,
                out_dir: a.output,
                qtype: QuantType::from_name(&a.eval.qtype)?,
                limit: a.eval.limit,
                fit: a.choice.settings(a.skip.unwrap_or_default(), a.fit),
                force: a.force,
                threads: set_threads(a.eval.threads.count()),
                n_ctx: a.eval.ctx,
                imatrix: a.imatrix,
                budget,
            };
            let report = hopscotch::pipeline::run(&request, &Progress::stderr())?;
            print_report(&report, a.json, &request.out_dir.join("report.md"))?;
        }
        Command::Sweep(a) => {
            let fit_tasks = a.tasks.len();
            let request = hopscotch::sweep::SweepRequest {
                model: a.model,
                tasks: [a.tasks, a.eval_tasks].concat(),
                fit_tasks,
                skips: a.skip,
                methods: a.method,
                objectives: a.objective,
                no_scales_too: a.no_scales_too,
                qtype: QuantType::from_name(&a.eval.qtype)?,
                limit: a.eval.limit,
                fit: a.stand_ins.apply(a.fit),
                out_dir: a.output,
                force: a.force,
                threads: set_threads(a.eval.threads.count()),
                n_ctx: a.eval.ctx,
            };
            let report = hopscotch::sweep::sweep(&request, &Progress::stderr())?;
            print_report(&report, a.json, &request.out_dir.join("sweep.md"))?;
        }
    }
    Ok(())
}
