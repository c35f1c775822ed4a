//! The report of `hopscotch sweep`: per evaluation task, every slim model against the original
//! on the same documents (accuracy, acc_norm, paired accuracy difference with its bootstrap
//! interval, answer agreement, choice KL), a generalisation summary (fitted on the task
//! evaluated or on another), Hopscotch paired against every other configuration at the same K
//! ([`Comparison`]), what was computed and reused; as JSON and markdown (its SVG plots are drawn
//! in `plot`).

mod plot;

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::{Config, EvalRecord, Slim, SweepSeconds, Units};
use crate::arch::Arch;
use crate::eval::task::{pair_with_reference, wilson_ci95, DocScore};
use crate::pipeline::PipelineError;
use crate::plan::{FitSettings, Method, Screen};
use crate::report::{kv_bytes_per_token, Paired};

/// The original's figures on one task.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OriginalFigures {
    /// Fraction of documents answered correctly.
    pub accuracy: f64,
    /// 95% Wilson interval of the accuracy.
    pub accuracy_ci95: [f64; 2],
    /// Length-normalised accuracy.
    pub acc_norm: f64,
    /// Size of `original.gguf`.
    pub file_bytes: u64,
    /// KV cache bytes per token (f16 cache).
    pub kv_bytes_per_token: u64,
}

/// One evaluation task.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskSummary {
    /// The task's name.
    pub name: String,
    /// The task file as given.
    pub path: String,
    /// Documents evaluated (the same for every model).
    pub n_docs: usize,
    /// Documents held out of the evaluation as fit documents.
    pub excluded_docs: usize,
    /// The original on them.
    pub original: OriginalFigures,
}

/// One slim model on one evaluation task.
#[derive(Debug, Clone, Serialize)]
pub struct SweepRow {
    /// The task evaluated on.
    pub eval_task: String,
    /// The task fitted on.
    pub fit_task: String,
    /// How the blocks were chosen.
    pub method: String,
    /// The objective (`None`: a baseline without scalars, which no objective changes).
    pub objective: Option<String>,
    /// Whether scalars were trained.
    pub train_scales: bool,
    /// Attention blocks skipped.
    pub k: usize,
    /// The model's name (its files are `models/<model>.gguf`, `plans/<model>.json`).
    pub model: String,
    /// The blocks skipped, in the order chosen.
    pub skipped_blocks: Vec<usize>,
    /// KV cache bytes per token (f16 cache).
    pub kv_bytes_per_token: u64,
    /// Size of the GGUF.
    pub file_bytes: u64,
    /// Fraction of documents answered correctly.
    pub accuracy: f64,
    /// 95% Wilson interval of the accuracy.
    pub accuracy_ci95: [f64; 2],
    /// Length-normalised accuracy.
    pub acc_norm: f64,
    /// Paired against the original on the same documents.
    pub paired: Paired,
    /// The plan's fit loss with its trained scalars.
    pub fit_loss: Option<f32>,
}

/// How task-specific a choice is: for one method, objective, scalars and K, the mean accuracy
/// difference to the original over the evaluation tasks, of the models fitted on the task
/// evaluated and of those fitted on another.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Generalisation {
    /// The method.
    pub method: String,
    /// The objective (as in [`SweepRow::objective`]).
    pub objective: Option<String>,
    /// Whether scalars were trained.
    pub train_scales: bool,
    /// Blocks skipped.
    pub k: usize,
    /// Mean accuracy difference of models evaluated on their own fit task.
    pub same_task: Option<f64>,
    /// Mean accuracy difference of models evaluated on a task they were not fitted on.
    pub other_tasks: Option<f64>,
    /// Pairs in `same_task`.
    pub n_same: usize,
    /// Pairs in `other_tasks`.
    pub n_other: usize,
}

/// A Hopscotch model (scalars trained) against another configuration fitted on the same task at
/// the same K, paired on one evaluation task's documents: the evidence for "Hopscotch beats
/// the baselines" that differences to the original, each with its own interval, do not give.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Comparison {
    /// The task evaluated on.
    pub eval_task: String,
    /// The task both were fitted on.
    pub fit_task: String,
    /// Attention blocks skipped by both.
    pub k: usize,
    /// The Hopscotch model.
    pub model: String,
    /// The other model.
    pub against: String,
    /// The other model's configuration ("attn-cosine kl", "hopscotch kl (no scalars)").
    pub against_label: String,
    /// Hopscotch's accuracy minus the other's.
    pub accuracy_diff: f64,
    /// Paired bootstrap 95% interval of that difference.
    pub accuracy_diff_ci95: [f64; 2],
    /// Fraction of documents where both pick the same answer.
    pub agreement: f64,
}

impl Comparison {
    /// "better" or "worse" where the interval excludes 0, else "no measurable difference".
    pub fn verdict(&self) -> &'static str {
        let [lo, hi] = self.accuracy_diff_ci95;
        if lo > 0.0 {
            "better"
        } else if hi < 0.0 {
            "worse"
        } else {
            "no measurable difference"
        }
    }
}

/// Whether `other` is compared with `hop`: `hop` is a Hopscotch configuration with scalars, and
/// `other` is fitted on the same task and is a baseline (with scalars trained with the same
/// objective, or without scalars) or Hopscotch without scalars under the same objective.
pub fn compared(hop: &Config, other: &Config) -> bool {
    hop.method == Method::Hopscotch
        && hop.train_scales
        && other.fit_task == hop.fit_task
        && !(other.method == Method::Hopscotch && other.train_scales)
        && other.objective.is_none_or(|o| Some(o) == hop.objective)
}

/// `model`'s scores paired against `against`'s on the same documents (see [`Comparison`]).
fn comparison(
    hop: &SweepRow,
    against: &SweepRow,
    hop_docs: &[DocScore],
    against_docs: &[DocScore],
) -> Result<Comparison, PipelineError> {
    let mut docs = hop_docs.to_vec();
    let p = pair_with_reference(&mut docs, against_docs)?;
    Ok(Comparison {
        eval_task: hop.eval_task.clone(),
        fit_task: hop.fit_task.clone(),
        k: hop.k,
        model: hop.model.clone(),
        against: against.model.clone(),
        against_label: variant_label(
            &against.method,
            against.objective.as_deref(),
            against.train_scales,
        ),
        accuracy_diff: p.accuracy_diff,
        accuracy_diff_ci95: p.accuracy_diff_ci95,
        agreement: p.agreement,
    })
}

/// Everything `hopscotch sweep` reports (`sweep.json`).
#[derive(Debug, Clone, Serialize)]
pub struct SweepReport {
    /// Tool version.
    pub tool_version: String,
    /// The input model.
    pub model: String,
    /// Its layers.
    pub n_layer: usize,
    /// Quant type of every evaluated file.
    pub quant_type: String,
    /// Held-out documents per task.
    pub limit: Option<usize>,
    /// The fit settings every configuration shares (see [`super::SweepConfig::fit`]).
    pub fit: FitSettings,
    /// The K values.
    pub skips: Vec<usize>,
    /// The evaluation tasks, with the original's figures.
    pub tasks: Vec<TaskSummary>,
    /// Every slim model on every task.
    pub rows: Vec<SweepRow>,
    /// Same-task against other-task accuracy differences.
    pub generalisation: Vec<Generalisation>,
    /// Every Hopscotch model against the other configurations at its K.
    pub comparisons: Vec<Comparison>,
    /// Units computed and reused by this run.
    pub units: Units,
    /// Wall time of this run.
    pub seconds: SweepSeconds,
}

/// What the report is built from.
pub(crate) struct Inputs<'a> {
    pub model: String,
    pub arch: &'a Arch,
    pub quant_type: String,
    pub limit: Option<usize>,
    pub fit: FitSettings,
    pub task_names: &'a [String],
    pub task_paths: Vec<String>,
    pub skips: &'a [usize],
    pub slims: &'a [Slim],
    /// (model, task) -> its evaluation.
    pub records: &'a BTreeMap<(String, String), EvalRecord>,
    pub original_bytes: u64,
    /// model -> size of its GGUF.
    pub model_bytes: BTreeMap<String, u64>,
    pub units: Units,
    pub seconds: SweepSeconds,
}

fn record<'a>(
    records: &'a BTreeMap<(String, String), EvalRecord>,
    model: &str,
    task: &str,
) -> &'a EvalRecord {
    &records[&(model.to_string(), task.to_string())]
}

fn correct(r: &EvalRecord) -> usize {
    r.docs.iter().filter(|d| d.pred == d.gold).count()
}

/// Builds the report: the paired statistics of every slim model against the original's cached
/// scores, task by task.
pub(crate) fn build(inputs: &Inputs<'_>) -> Result<SweepReport, PipelineError> {
    let mut tasks = Vec::new();
    let mut rows = Vec::new();
    let mut comparisons = Vec::new();
    for (t, task) in inputs.task_names.iter().enumerate() {
        let original = record(inputs.records, "original", task);
        let n = original.docs.len();
        tasks.push(TaskSummary {
            name: task.clone(),
            path: inputs.task_paths[t].clone(),
            n_docs: n,
            excluded_docs: original.excluded_docs,
            original: OriginalFigures {
                accuracy: original.accuracy,
                accuracy_ci95: wilson_ci95(correct(original), n),
                acc_norm: original.acc_norm,
                file_bytes: inputs.original_bytes,
                kv_bytes_per_token: kv_bytes_per_token(inputs.arch, &[]),
            },
        });
        // Fits on this task first, then the others, each in configuration order.
        let mut slims: Vec<&Slim> = inputs.slims.iter().collect();
        slims.sort_by_key(|s| s.config.fit_task != t);
        for s in slims {
            let r = record(inputs.records, &s.name, task);
            let mut docs = r.docs.clone();
            let p = pair_with_reference(&mut docs, &original.docs)?;
            rows.push(SweepRow {
                eval_task: task.clone(),
                fit_task: inputs.task_names[s.config.fit_task].clone(),
                method: s.config.method.name().to_string(),
                objective: s.config.objective.map(|o| o.name().to_string()),
                train_scales: s.config.train_scales,
                k: s.k,
                model: s.name.clone(),
                skipped_blocks: s.plan.skipped_blocks.clone(),
                kv_bytes_per_token: kv_bytes_per_token(inputs.arch, &s.plan.skipped_blocks),
                file_bytes: inputs.model_bytes.get(&s.name).copied().unwrap_or(0),
                accuracy: r.accuracy,
                accuracy_ci95: wilson_ci95(correct(r), docs.len()),
                acc_norm: r.acc_norm,
                paired: Paired {
                    agreement: p.agreement,
                    accuracy_diff: p.accuracy_diff,
                    accuracy_diff_ci95: p.accuracy_diff_ci95,
                    choice_kl_mean: p.choice_kl_mean,
                },
                fit_loss: s.plan.final_loss,
            });
        }
        let row = |s: &Slim| {
            rows.iter()
                .find(|r| r.model == s.name && r.eval_task == *task)
        };
        let docs = |s: &Slim| &record(inputs.records, &s.name, task).docs;
        for hop in inputs.slims {
            for other in inputs.slims {
                if other.k != hop.k || !compared(&hop.config, &other.config) {
                    continue;
                }
                let (Some(hop_row), Some(other_row)) = (row(hop), row(other)) else {
                    continue;
                };
                comparisons.push(comparison(hop_row, other_row, docs(hop), docs(other))?);
            }
        }
    }
    let generalisation = generalisation(&rows);
    Ok(SweepReport {
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
        model: inputs.model.clone(),
        n_layer: inputs.arch.n_layer,
        quant_type: inputs.quant_type.clone(),
        limit: inputs.limit,
        fit: inputs.fit.clone(),
        skips: inputs.skips.to_vec(),
        tasks,
        rows,
        generalisation,
        comparisons,
        units: inputs.units,
        seconds: inputs.seconds,
    })
}

/// The configuration part of a row: method, objective, scalars.
type Variant = (String, Option<String>, bool);

fn variant(r: &SweepRow) -> Variant {
    (r.method.clone(), r.objective.clone(), r.train_scales)
}

/// Per (method, objective, scalars, K), in the rows' order: the mean accuracy difference on
/// the fit task and on the other tasks.
pub fn generalisation(rows: &[SweepRow]) -> Vec<Generalisation> {
    let mut keys: Vec<(Variant, usize)> = Vec::new();
    for r in rows {
        let key = (variant(r), r.k);
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    keys.sort_by(|a, b| {
        let pos = |v: &Variant| keys_order(rows, v);
        pos(&a.0).cmp(&pos(&b.0)).then(a.1.cmp(&b.1))
    });
    keys.into_iter()
        .map(|((method, objective, train_scales), k)| {
            let mean = |same: bool| {
                let v: Vec<f64> = rows
                    .iter()
                    .filter(|r| {
                        r.k == k
                            && r.method == method
                            && r.objective == objective
                            && r.train_scales == train_scales
                            && (r.fit_task == r.eval_task) == same
                    })
                    .map(|r| r.paired.accuracy_diff)
                    .collect();
                let n = v.len();
                ((n > 0).then(|| v.iter().sum::<f64>() / n as f64), n)
            };
            let ((same_task, n_same), (other_tasks, n_other)) = (mean(true), mean(false));
            Generalisation {
                method,
                objective,
                train_scales,
                k,
                same_task,
                other_tasks,
                n_same,
                n_other,
            }
        })
        .collect()
}

/// Where a variant first appears in the rows.
fn keys_order(rows: &[SweepRow], v: &Variant) -> usize {
    rows.iter().position(|r| variant(r) == *v).unwrap_or(0)
}

fn pct(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

fn points(x: f64) -> String {
    format!("{:+.1}", x * 100.0)
}

fn mib(b: u64) -> String {
    format!("{:.1}", b as f64 / (1u64 << 20) as f64)
}

fn variant_label(method: &str, objective: Option<&str>, train_scales: bool) -> String {
    let mut s = method.to_string();
    if let Some(o) = objective {
        s += " ";
        s += o;
    }
    if !train_scales {
        s += " (no scalars)";
    }
    s
}

impl std::fmt::Display for SweepReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.summary())
    }
}

impl SweepReport {
    /// The markdown report (`sweep.md`).
    pub fn markdown(&self) -> String {
        let mut s = String::from("# hopscotch sweep\n\n");
        let _ = writeln!(
            s,
            "Model `{}` ({} layers); every model evaluated as {} in llama.cpp; K = {}.",
            self.model,
            self.n_layer,
            self.quant_type,
            self.skips
                .iter()
                .map(|k| k.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let f = &self.fit;
        let _ = writeln!(
            s,
            "Fit: {} documents per task (seed {}), batches of {} x {} tokens, lr {} / final lr {}, {}.\n",
            f.fit_docs,
            f.seed,
            f.batch_size,
            f.max_seq_len,
            f.lr,
            f.final_lr,
            if f.exhaustive {
                "every candidate trained".to_string()
            } else {
                let rescreen = match f.rescreen {
                    0 => "every candidate screened every round".to_string(),
                    n => format!("after round 1 the {n} best of the latest screening rescreened"),
                };
                format!(
                    "screened by {} on {} batch(es) ({rescreen}), {} trained per round",
                    f.screen.map_or("-", Screen::name),
                    f.screen_batches,
                    f.shortlist
                )
            }
        );
        s += "Every model of a task is scored on the same held-out documents as the original: \
              Δ acc is its accuracy minus the original's with a paired bootstrap 95% interval, \
              agreement the share of documents where both pick the same answer, choice KL the \
              mean KL(original || model) of the distributions over the choices.\n";
        for t in &self.tasks {
            let _ = write!(
                s,
                "\n## {} ({} held-out documents, {} fit documents excluded)\n\n![accuracy vs K](accuracy-{}.svg)\n\n",
                t.name, t.n_docs, t.excluded_docs, t.name
            );
            s += "| fit task | method | objective | scales | K | skipped blocks | KV bytes/token | file MiB | accuracy [95% CI] | acc_norm | Δ acc [95% CI] | agreement | choice KL |\n";
            s += "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
            let o = &t.original;
            let _ = writeln!(
                s,
                "| original | - | - | - | 0 | - | {} | {} | {} [{}, {}] | {} | - | - | - |",
                o.kv_bytes_per_token,
                mib(o.file_bytes),
                pct(o.accuracy),
                pct(o.accuracy_ci95[0]),
                pct(o.accuracy_ci95[1]),
                pct(o.acc_norm)
            );
            for r in self.rows.iter().filter(|r| r.eval_task == t.name) {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {:?} | {} | {} | {} [{}, {}] | {} | {} [{}, {}] | {} | {:.4} |",
                    r.fit_task,
                    r.method,
                    r.objective.as_deref().unwrap_or("-"),
                    if r.train_scales { "yes" } else { "no" },
                    r.k,
                    r.skipped_blocks,
                    r.kv_bytes_per_token,
                    mib(r.file_bytes),
                    pct(r.accuracy),
                    pct(r.accuracy_ci95[0]),
                    pct(r.accuracy_ci95[1]),
                    pct(r.acc_norm),
                    points(r.paired.accuracy_diff),
                    points(r.paired.accuracy_diff_ci95[0]),
                    points(r.paired.accuracy_diff_ci95[1]),
                    pct(r.paired.agreement),
                    r.paired.choice_kl_mean
                );
            }
            let versus: Vec<&Comparison> = self
                .comparisons
                .iter()
                .filter(|c| c.eval_task == t.name)
                .collect();
            if !versus.is_empty() {
                s +=
                    "\nHopscotch (scalars trained) against each other configuration fitted on the \
                      same task at the same K, paired on these documents: Δ acc is Hopscotch's \
                      accuracy minus the other's with a paired bootstrap 95% interval; the \
                      verdict says whether the interval excludes 0.\n\n";
                s += "| fit task | K | Hopscotch | against | Δ acc [95% CI] | agreement | verdict |\n";
                s += "|---|---|---|---|---|---|---|\n";
                for c in versus {
                    let _ = writeln!(
                        s,
                        "| {} | {} | {} | {} | {} [{}, {}] | {} | {} |",
                        c.fit_task,
                        c.k,
                        c.model,
                        c.against_label,
                        points(c.accuracy_diff),
                        points(c.accuracy_diff_ci95[0]),
                        points(c.accuracy_diff_ci95[1]),
                        pct(c.agreement),
                        c.verdict()
                    );
                }
            }
        }
        s += "\n## Generalisation\n\nMean accuracy difference to the original (points) over the \
              evaluation tasks, of the models fitted on the task evaluated and of those fitted \
              on another task: the gap says how task-specific the choice is. Rows differing only \
              in the objective compare the objectives.\n\n";
        s += "| method | objective | scales | K | fitted on the same task | fitted on another task |\n|---|---|---|---|---|---|\n";
        for g in &self.generalisation {
            let cell = |v: Option<f64>, n: usize| {
                v.map_or("-".to_string(), |v| format!("{} ({n})", points(v)))
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} |",
                g.method,
                g.objective.as_deref().unwrap_or("-"),
                if g.train_scales { "yes" } else { "no" },
                g.k,
                cell(g.same_task, g.n_same),
                cell(g.other_tasks, g.n_other)
            );
        }
        s += "\n![answer agreement vs K](agreement.svg)\n\n## Work\n\n";
        let (c, r) = (&self.units.computed, &self.units.reused);
        let _ = writeln!(
            s,
            "Wall time {:.0} s (prepare {:.0} s, fit {:.0} s, export {:.0} s, evaluation {:.0} s). \
             One search per configuration up to the largest K; each smaller K takes its first \
             blocks and trains its own final scalars.\n",
            self.seconds.total,
            self.seconds.prepare,
            self.seconds.fit,
            self.seconds.export,
            self.seconds.eval
        );
        s += "| unit | computed | reused |\n|---|---|---|\n";
        for (name, a, b) in [
            ("original at the type", c.original, r.original),
            ("greedy search rounds", c.search_rounds, r.search_rounds),
            ("plans (final trainings)", c.plans, r.plans),
            ("exported models", c.models, r.models),
            ("evaluations (model x task)", c.evals, r.evals),
        ] {
            let _ = writeln!(s, "| {name} | {a} | {b} |");
        }
        s
    }

    /// A short summary for the terminal: per task, the original and each configuration fitted
    /// on it, accuracy (difference in points) per K.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        for t in &self.tasks {
            let _ = writeln!(
                s,
                "{}: {} documents, original {}",
                t.name,
                t.n_docs,
                pct(t.original.accuracy)
            );
            let rows: Vec<&SweepRow> = self
                .rows
                .iter()
                .filter(|r| r.eval_task == t.name && r.fit_task == t.name)
                .collect();
            let mut variants: Vec<Variant> = Vec::new();
            for r in &rows {
                if !variants.contains(&variant(r)) {
                    variants.push(variant(r));
                }
            }
            for v in variants {
                let label = variant_label(&v.0, v.1.as_deref(), v.2);
                let cells: Vec<String> = rows
                    .iter()
                    .filter(|r| variant(r) == v)
                    .map(|r| {
                        format!(
                            "K={} {} ({})",
                            r.k,
                            pct(r.accuracy),
                            points(r.paired.accuracy_diff)
                        )
                    })
                    .collect();
                let _ = writeln!(s, "  {label:<30} {}", cells.join("  "));
            }
        }
        let (c, r) = (&self.units.computed, &self.units.reused);
        let _ = write!(
            s,
            "{:.0} s; computed {} plans, {} models, {} evaluations, {} search rounds; reused {} plans, {} models, {} evaluations",
            self.seconds.total, c.plans, c.models, c.evals, c.search_rounds, r.plans, r.models, r.evals
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(eval: &str, fit: &str, k: usize, diff: f64) -> SweepRow {
        SweepRow {
            eval_task: eval.into(),
            fit_task: fit.into(),
            method: "hopscotch".into(),
            objective: Some("kl".into()),
            train_scales: true,
            k,
            model: format!("{fit}-hopscotch-kl-k{k}"),
            skipped_blocks: vec![1],
            kv_bytes_per_token: 10,
            file_bytes: 1 << 20,
            accuracy: 0.5,
            accuracy_ci95: [0.4, 0.6],
            acc_norm: 0.5,
            paired: Paired {
                agreement: 0.9,
                accuracy_diff: diff,
                accuracy_diff_ci95: [diff - 0.1, diff + 0.1],
                choice_kl_mean: 0.01,
            },
            fit_loss: Some(0.1),
        }
    }

    #[test]
    fn generalisation_averages_same_and_other_task_fits() {
        let rows = vec![
            row("a", "a", 1, -0.1),
            row("a", "b", 1, -0.3),
            row("b", "b", 1, 0.1),
            row("b", "a", 1, -0.1),
            row("a", "a", 2, -0.2),
        ];
        let g = generalisation(&rows);
        assert_eq!(g.len(), 2);
        assert_eq!((g[0].k, g[0].n_same, g[0].n_other), (1, 2, 2));
        assert!((g[0].same_task.unwrap() - 0.0).abs() < 1e-12);
        assert!((g[0].other_tasks.unwrap() + 0.2).abs() < 1e-12);
        assert_eq!((g[1].k, g[1].n_other, g[1].other_tasks), (2, 0, None));
    }

    #[test]
    fn hopscotch_is_compared_with_the_baselines_and_its_untrained_search_only() {
        use crate::plan::Objective;
        let configs = Config::all(
            2,
            &[Method::Hopscotch, Method::AttnCosine, Method::Random],
            &[Objective::Kl, Objective::Ce],
            true,
        );
        let name = |c: &Config| c.name(&["a".into(), "b".into()]);
        let hop = configs
            .iter()
            .find(|c| name(c) == "a-hopscotch-kl")
            .unwrap();
        let mut against: Vec<String> = configs
            .iter()
            .filter(|c| compared(hop, c))
            .map(name)
            .collect();
        against.sort();
        assert_eq!(
            against,
            [
                "a-attn-cosine-kl",
                "a-attn-cosine-noscales",
                "a-hopscotch-kl-noscales",
                "a-random-kl",
                "a-random-noscales",
            ]
        );
        // only Hopscotch with scalars is compared with the others
        for c in &configs {
            let n = configs.iter().filter(|o| compared(c, o)).count();
            let hop_with_scalars = c.method == Method::Hopscotch && c.train_scales;
            assert_eq!(n > 0, hop_with_scalars, "{}", name(c));
        }
    }

    #[test]
    fn a_comparison_is_hopscotch_minus_the_other_on_the_same_documents() {
        let doc = |id: usize, pred: usize| DocScore {
            doc_id: id.to_string(),
            gold: 0,
            loglikelihoods: if pred == 0 {
                vec![-1.0, -2.0]
            } else {
                vec![-2.0, -1.0]
            },
            choice_chars: vec![3, 3],
            pred,
            pred_norm: pred,
            reference_loglikelihoods: None,
            reference_pred: None,
        };
        // Hopscotch right on 8 of 10, the other on 2 of 10, disagreeing on 6 documents
        let hop: Vec<DocScore> = (0..10).map(|i| doc(i, usize::from(i >= 8))).collect();
        let other: Vec<DocScore> = (0..10).map(|i| doc(i, usize::from(i >= 2))).collect();
        let (h, mut o) = (row("t", "t", 2, 0.0), row("t", "t", 2, 0.0));
        o.method = "attn-cosine".into();
        o.model = "t-attn-cosine-kl-k2".into();
        let c = comparison(&h, &o, &hop, &other).unwrap();
        assert!((c.accuracy_diff - 0.6).abs() < 1e-12);
        assert!((c.agreement - 0.4).abs() < 1e-12);
        assert_eq!(
            (c.against.as_str(), c.against_label.as_str()),
            ("t-attn-cosine-kl-k2", "attn-cosine kl")
        );
        assert!(c.accuracy_diff_ci95[0] > 0.0 && c.accuracy_diff_ci95[1] <= 0.6 + 0.4);
        assert_eq!(c.verdict(), "better");
        let back = comparison(&o, &h, &other, &hop).unwrap();
        assert!((back.accuracy_diff + 0.6).abs() < 1e-12);
        assert_eq!(back.verdict(), "worse");
        let same = comparison(&h, &h, &hop, &hop).unwrap();
        assert_eq!((same.accuracy_diff, same.agreement), (0.0, 1.0));
        assert_eq!(same.verdict(), "no measurable difference");
        // documents that do not line up are refused, not paired
        assert!(comparison(&h, &o, &hop, &other[..9]).is_err());
    }
}
