//! The report of `hopscotch run`: the original and the slim model side by side, as a markdown
//! table, JSON, and an SVG plot of the search (loss per round) and the accuracy per k.

use serde::Serialize;

use crate::arch::Arch;
use crate::plan::QualityBudget;

/// KV cache bytes per token in llama.cpp's default f16 cache: keys and values of every layer
/// that keeps its attention.
pub fn kv_bytes_per_token(arch: &Arch, skipped: &[usize]) -> u64 {
    let attention_layers = arch.n_layer - skipped.len();
    (attention_layers * 2 * arch.kv_dim() * 2) as u64
}

/// One model's figures.
#[derive(Debug, Clone, Serialize)]
pub struct ModelFigures {
    /// The GGUF evaluated.
    pub path: String,
    /// Attention blocks skipped.
    pub skipped_blocks: Vec<usize>,
    /// Accuracy on the held-out documents.
    pub accuracy: f64,
    /// 95% Wilson interval of the accuracy.
    pub accuracy_ci95: [f64; 2],
    /// Length-normalised accuracy.
    pub acc_norm: f64,
    /// Documents evaluated.
    pub n_docs: usize,
    /// Size of the GGUF.
    pub file_bytes: u64,
    /// KV cache bytes per token (f16 cache).
    pub kv_bytes_per_token: u64,
    /// Prompt processing speed in llama.cpp.
    pub prompt_tokens_per_s: f64,
}

/// Paired comparison of the slim model against the original on the same documents.
#[derive(Debug, Clone, Serialize)]
pub struct Paired {
    /// Fraction of documents where both pick the same answer.
    pub agreement: f64,
    /// Slim accuracy minus original accuracy.
    pub accuracy_diff: f64,
    /// Paired 95% interval of that difference.
    pub accuracy_diff_ci95: [f64; 2],
    /// Mean KL(original || slim) of the choice distributions.
    pub choice_kl_mean: f64,
}

/// `K = 8 to 10 were`, or `K = 3 was` when `from == to`: the K a budget run left unfitted, as
/// the subject of a sentence.
pub fn k_range(from: usize, to: usize) -> String {
    if from == to {
        format!("K = {from} was")
    } else {
        format!("K = {from} to {to} were")
    }
}

/// A warning when the validation documents cannot resolve a drop budget: the paired interval
/// of the `chosen` K's drop (on the first task) is wider than the budget, and than half a
/// point, on either side of its estimate, so which K is within budget is decided as much by
/// the documents' noise.
pub fn noise_note(budget: &QualityBudget, chosen: &CurvePoint) -> Option<String> {
    let max_drop = budget.max_drop?;
    let half_width = (chosen.drop_ci95[1] - chosen.drop_ci95[0]) / 2.0;
    (half_width > max_drop.max(0.5)).then(|| {
        format!(
            "On {} validation documents the drop at K = {} is known to ±{half_width:.1} points \
             (paired 95% interval), wider than the {max_drop}-point budget: the K chosen is as \
             much the documents' noise as the model's. More --validation-docs narrow it (the \
             width falls with the square root of their number).",
            chosen.validation.n_docs, chosen.k
        )
    })
}

/// The original and the slim model on one more task of a run fitted on several (`--task`
/// given more than once), measured as the report's top-level figures are on the first.
#[derive(Debug, Clone, Serialize)]
pub struct TaskFigures {
    /// The task file.
    pub task: String,
    /// The original's figures on the task's held-out (or test) documents.
    pub original: ModelFigures,
    /// The slim model's on the same documents.
    pub slim: ModelFigures,
    /// Paired statistics.
    pub paired: Paired,
}

/// One greedy round, for the plot and the table.
#[derive(Debug, Clone, Serialize)]
pub struct RoundPoint {
    /// 1-based round (= k).
    pub k: usize,
    /// The block skipped.
    pub chosen: usize,
    /// Its score.
    pub loss: f32,
}

/// A model's figures on the validation documents of a quality-budget run, against the original
/// on the same documents.
#[derive(Debug, Clone, Serialize)]
pub struct ValidationFigures {
    /// Fraction of the validation documents answered correctly.
    pub accuracy: f64,
    /// Fraction where the model picks the original's answer.
    pub agreement: f64,
    /// Mean KL(original || model) of the choice distributions.
    pub choice_kl: f64,
    /// Validation documents evaluated.
    pub n_docs: usize,
}

/// A model's validation figures on one more task of a run fitted on several.
#[derive(Debug, Clone, Serialize)]
pub struct TaskValidation {
    /// The task file.
    pub task: String,
    /// The figures on the task's validation documents.
    pub validation: ValidationFigures,
    /// The original's accuracy minus this model's on them, in points.
    pub drop_points: f64,
    /// Paired 95% interval of `drop_points`.
    pub drop_ci95: [f64; 2],
}

/// One K of a quality-budget run's curve (K = 0: the original).
#[derive(Debug, Clone, Serialize)]
pub struct CurvePoint {
    /// Attention blocks skipped.
    pub k: usize,
    /// The blocks skipped, in the order chosen.
    pub skipped_blocks: Vec<usize>,
    /// Its figures on the validation documents (of the first task).
    pub validation: ValidationFigures,
    /// The original's accuracy minus this model's on the validation documents, in points.
    pub drop_points: f64,
    /// Paired 95% interval of `drop_points` (bootstrap over the documents): how far the
    /// validation documents can tell K apart.
    pub drop_ci95: [f64; 2],
    /// The same on every other task of a run fitted on several.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub other_tasks: Vec<TaskValidation>,
    /// Whether this K and every smaller one stay within the budget (on every task).
    pub within_budget: bool,
    /// Size of its GGUF.
    pub file_bytes: u64,
    /// KV cache bytes per token (f16 cache).
    pub kv_bytes_per_token: u64,
    /// Prompt processing speed in llama.cpp, on the validation documents' contexts.
    pub prompt_tokens_per_s: f64,
}

impl CurvePoint {
    /// `(k, drop_points, agreement)` on task `t` (0: the first task), as
    /// [`QualityBudget::choose`] takes them.
    pub fn on_task(&self, t: usize) -> (usize, f64, f64) {
        match t.checked_sub(1) {
            None => (self.k, self.drop_points, self.validation.agreement),
            Some(i) => {
                let o = &self.other_tasks[i];
                (self.k, o.drop_points, o.validation.agreement)
            }
        }
    }
}

/// The documents one stage of a run read, in the order the stages ran.
#[derive(Debug, Clone, Serialize)]
pub struct StageRead {
    /// `fit` (the search and the final trainings), `validation` (one K's evaluation) or `test`
    /// (the final figures).
    pub stage: String,
    /// The K evaluated (validation), or exported (test).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub k: Option<usize>,
    /// The task file the documents are of.
    pub task: String,
    /// The documents' ids, in file order.
    pub doc_ids: Vec<String>,
}

/// What a quality-budget run adds to the report: the budget, the curve, the K chosen and which
/// documents each stage read.
#[derive(Debug, Clone, Serialize)]
pub struct BudgetFigures {
    /// The budget.
    pub budget: QualityBudget,
    /// The largest K searched (`--max-skip` or its default).
    pub max_skip: usize,
    /// The K exported.
    pub chosen_skip: usize,
    /// One point per K, from the original (K = 0) to the first K past the budget, or to
    /// `max_skip` (every K with `--full-curve`).
    pub curve: Vec<CurvePoint>,
    /// The documents each stage read, in the order read.
    pub reads: Vec<StageRead>,
}

/// Everything `hopscotch run` reports.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// Tool version.
    pub tool_version: String,
    /// The input model.
    pub model: String,
    /// The task file (the first, when the fit drew from several).
    pub task: String,
    /// Quant type of both evaluated files.
    pub quant_type: String,
    /// The fit's method and objective.
    pub method: String,
    /// The fit's objective.
    pub objective: String,
    /// Blocks skipped in the order chosen.
    pub skipped_blocks: Vec<usize>,
    /// Whether the skipped blocks have linear stand-ins (the default; not with
    /// `--no-linear-attention`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub linear_stand_ins: bool,
    /// The greedy rounds.
    pub rounds: Vec<RoundPoint>,
    /// Fit loss with the scalars at 1 and trained.
    pub fit_loss_untrained: f32,
    /// Fit loss with the trained scalars.
    pub fit_loss: f32,
    /// The original at the same quant type (on the first task).
    pub original: ModelFigures,
    /// The slim model.
    pub slim: ModelFigures,
    /// Paired statistics.
    pub paired: Paired,
    /// The same figures on every other task, when the fit drew from several.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub other_tasks: Vec<TaskFigures>,
    /// Seconds per phase: fit, export, evaluation, total.
    pub seconds: Seconds,
    /// Fit documents each file's own importance matrix was computed on (`run --imatrix`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imatrix_docs: Option<usize>,
    /// With a quality budget: the curve and the K chosen (`original` and `slim` are then
    /// measured on the test documents).
    #[serde(flatten)]
    pub budget: Option<BudgetFigures>,
}

/// Wall time per phase.
#[derive(Debug, Clone, Serialize)]
pub struct Seconds {
    /// The fit.
    pub fit: f64,
    /// Export and conversion of both files.
    pub export: f64,
    /// Evaluation.
    pub eval: f64,
    /// Everything.
    pub total: f64,
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
}

impl std::fmt::Display for RunReport {
    /// The side-by-side table and the paired figures.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.table())?;
        write!(
            f,
            "answer agreement {:.2}%, accuracy difference {:+.2} points (paired 95% CI [{:+.2}, {:+.2}])",
            self.paired.agreement * 100.0,
            self.paired.accuracy_diff * 100.0,
            self.paired.accuracy_diff_ci95[0] * 100.0,
            self.paired.accuracy_diff_ci95[1] * 100.0
        )
    }
}

impl RunReport {
    /// The side-by-side table (markdown).
    pub fn table(&self) -> String {
        let row = |name: &str, m: &ModelFigures, kl: &str| {
            format!(
                "| {name} | {} | {} | {} | {:.2}% [{:.2}, {:.2}] | {:.2}% | {kl} | {:.0} |\n",
                if m.skipped_blocks.is_empty() {
                    "-".to_string()
                } else {
                    format!("{:?}", m.skipped_blocks)
                },
                mib(m.file_bytes),
                m.kv_bytes_per_token,
                m.accuracy * 100.0,
                m.accuracy_ci95[0] * 100.0,
                m.accuracy_ci95[1] * 100.0,
                m.acc_norm * 100.0,
                m.prompt_tokens_per_s
            )
        };
        let mut t = String::from(
            "| model | skipped blocks | file | KV bytes/token | accuracy [95% CI] | acc_norm | choice KL to original | prompt tokens/s |\n|---|---|---|---|---|---|---|---|\n",
        );
        t += &row("original", &self.original, "0");
        t += &row(
            "slim",
            &self.slim,
            &format!("{:.4}", self.paired.choice_kl_mean),
        );
        t
    }

    /// The whole markdown report.
    pub fn markdown(&self) -> String {
        let imatrix = match self.imatrix_docs {
            Some(n) => format!(
                ", each quantized with its own importance matrix from the {n} fit documents"
            ),
            None => String::new(),
        };
        let stand_ins = if self.linear_stand_ins {
            ", each skipped block replaced by a linear stand-in (deci linear attention)"
        } else {
            ""
        };
        let held_out = if self.budget.is_some() {
            "test"
        } else {
            "held-out"
        };
        let tasks = if self.other_tasks.is_empty() {
            format!(
                "task `{}`, {} {held_out} documents",
                self.task, self.slim.n_docs
            )
        } else {
            let all: Vec<String> = std::iter::once(&self.task)
                .chain(self.other_tasks.iter().map(|t| &t.task))
                .map(|t| format!("`{t}`"))
                .collect();
            format!(
                "tasks {} (fitted on together; {held_out} documents of each, the table on the \
                 first: {} documents)",
                all.join(", "),
                self.slim.n_docs
            )
        };
        let mut s = format!(
            "# hopscotch run\n\nModel `{}`, {tasks}, both files {}{imatrix}.\n\
             Fit: method {}, objective {}{stand_ins}, loss {:.4} (scalars at 1: {:.4}).\n\n",
            self.model,
            self.quant_type,
            self.method,
            self.objective,
            self.fit_loss,
            self.fit_loss_untrained
        );
        s += &self.table();
        s += &format!(
            "\nAnswer agreement with the original: {:.2}%. Accuracy difference: {:+.2} points \
             (paired 95% CI [{:+.2}, {:+.2}]).\n\n",
            self.paired.agreement * 100.0,
            self.paired.accuracy_diff * 100.0,
            self.paired.accuracy_diff_ci95[0] * 100.0,
            self.paired.accuracy_diff_ci95[1] * 100.0
        );
        if !self.other_tasks.is_empty() {
            s += &self.tasks_table();
        }
        if let Some(b) = &self.budget {
            s += &b.markdown(&self.task);
        }
        if !self.rounds.is_empty() {
            s += "| k | block skipped | fit loss |\n|---|---|---|\n";
            for r in &self.rounds {
                s += &format!("| {} | {} | {:.4} |\n", r.k, r.chosen, r.loss);
            }
        }
        s += &format!(
            "\nTime: fit {:.0} s, export {:.0} s, evaluation {:.0} s, total {:.0} s.\n\n![search](report.svg)\n",
            self.seconds.fit, self.seconds.export, self.seconds.eval, self.seconds.total
        );
        s
    }

    /// Every task of a run fitted on several, a column each: documents, both accuracies, the
    /// paired difference, agreement and choice KL (markdown).
    fn tasks_table(&self) -> String {
        let first = TaskFigures {
            task: self.task.clone(),
            original: self.original.clone(),
            slim: self.slim.clone(),
            paired: self.paired.clone(),
        };
        let tasks: Vec<&TaskFigures> = std::iter::once(&first).chain(&self.other_tasks).collect();
        let row = |name: &str, cell: &dyn Fn(&TaskFigures) -> String| {
            let cells: Vec<String> = tasks.iter().map(|t| cell(t)).collect();
            format!("| {name} | {} |\n", cells.join(" | "))
        };
        let names: Vec<String> = tasks
            .iter()
            .map(|t| crate::task::task_name(std::path::Path::new(&t.task)))
            .collect();
        let mut s = format!(
            "## Every task\n\n| | {} |\n|---|{}\n",
            names.join(" | "),
            "---|".repeat(tasks.len())
        );
        s += &row("documents", &|t| t.slim.n_docs.to_string());
        s += &row("original accuracy", &|t| {
            format!("{:.2}%", t.original.accuracy * 100.0)
        });
        s += &row("slim accuracy", &|t| {
            format!("{:.2}%", t.slim.accuracy * 100.0)
        });
        s += &row("difference [paired 95% CI]", &|t| {
            format!(
                "{:+.2} [{:+.2}, {:+.2}]",
                t.paired.accuracy_diff * 100.0,
                t.paired.accuracy_diff_ci95[0] * 100.0,
                t.paired.accuracy_diff_ci95[1] * 100.0
            )
        });
        s += &row("answer agreement", &|t| {
            format!("{:.2}%", t.paired.agreement * 100.0)
        });
        s += &row("choice KL to original", &|t| {
            format!("{:.4}", t.paired.choice_kl_mean)
        });
        s + "\n"
    }

    /// An SVG with two panels: the fit loss of the block chosen in each round, and the
    /// accuracy at k = 0 (original) and k = K (slim) with their intervals.
    pub fn svg(&self) -> String {
        let (w, h) = (720.0, 300.0);
        let mut s = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
        );
        let panel = |x0: f64, title: &str| {
            format!(
                "<text x=\"{}\" y=\"20\" text-anchor=\"middle\" font-size=\"14\">{title}</text>\n<line x1=\"{}\" y1=\"260\" x2=\"{}\" y2=\"260\" stroke=\"black\"/>\n<line x1=\"{}\" y1=\"40\" x2=\"{}\" y2=\"260\" stroke=\"black\"/>\n",
                x0 + 150.0, x0 + 30.0, x0 + 320.0, x0 + 30.0, x0 + 30.0
            )
        };
        s += &panel(0.0, "fit loss of the block chosen, per round");
        s += &panel(
            360.0,
            if self.budget.is_some() {
                "validation accuracy per k (chosen k in red)"
            } else {
                "accuracy per k (held-out docs)"
            },
        );
        // loss panel
        let losses: Vec<f32> = self.rounds.iter().map(|r| r.loss).collect();
        if !losses.is_empty() {
            let lo = losses
                .iter()
                .copied()
                .fold(f32::INFINITY, f32::min)
                .min(self.fit_loss) as f64;
            let hi = losses.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let span = (hi - lo).max(1e-6);
            let n = losses.len() as f64;
            let x = |i: usize| 30.0 + 290.0 * (i as f64 + 1.0) / (n + 1.0);
            let y = |v: f64| 250.0 - 200.0 * (v - lo) / span;
            let pts: Vec<String> = losses
                .iter()
                .enumerate()
                .map(|(i, &l)| format!("{:.1},{:.1}", x(i), y(l as f64)))
                .collect();
            s += &format!(
                "<polyline points=\"{}\" fill=\"none\" stroke=\"steelblue\" stroke-width=\"2\"/>\n",
                pts.join(" ")
            );
            for (i, r) in self.rounds.iter().enumerate() {
                s += &format!(
                    "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"steelblue\"/><text x=\"{:.1}\" y=\"275\" text-anchor=\"middle\">k={} (L{})</text><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{:.3}</text>\n",
                    x(i), y(r.loss as f64), x(i), r.k, r.chosen, x(i), y(r.loss as f64) - 8.0, r.loss
                );
            }
        }
        if let Some(b) = &self.budget {
            s += &b.svg_panel();
            s += "</svg>\n";
            return s;
        }
        // accuracy panel
        let pts = [
            (0usize, &self.original),
            (self.skipped_blocks.len(), &self.slim),
        ];
        let lo = pts.iter().map(|p| p.1.accuracy_ci95[0]).fold(1.0, f64::min) - 0.02;
        let hi = pts.iter().map(|p| p.1.accuracy_ci95[1]).fold(0.0, f64::max) + 0.02;
        let span = (hi - lo).max(1e-6);
        let kmax = self.skipped_blocks.len().max(1) as f64;
        let x = |k: usize| 390.0 + 40.0 + 230.0 * k as f64 / kmax;
        let y = |v: f64| 250.0 - 200.0 * (v - lo) / span;
        for (k, m) in pts {
            s += &format!(
                "<line x1=\"{0:.1}\" y1=\"{1:.1}\" x2=\"{0:.1}\" y2=\"{2:.1}\" stroke=\"gray\"/><circle cx=\"{0:.1}\" cy=\"{3:.1}\" r=\"5\" fill=\"darkorange\"/><text x=\"{0:.1}\" y=\"275\" text-anchor=\"middle\">k={4}</text><text x=\"{5:.1}\" y=\"{3:.1}\">{6:.1}%</text>\n",
                x(k),
                y(m.accuracy_ci95[0]),
                y(m.accuracy_ci95[1]),
                y(m.accuracy),
                k,
                x(k) + 8.0,
                m.accuracy * 100.0
            );
        }
        s += "</svg>\n";
        s
    }
}

impl BudgetFigures {
    /// The SVG elements of the curve's panel in [`RunReport::svg`]: validation accuracy per K,
    /// the chosen K in red.
    fn svg_panel(&self) -> String {
        let accuracies = self.curve.iter().map(|p| p.validation.accuracy);
        let lo = accuracies.clone().fold(1.0, f64::min) - 0.02;
        let hi = accuracies.fold(0.0, f64::max) + 0.02;
        let span = (hi - lo).max(1e-6);
        let kmax = self.curve.last().map_or(1, |p| p.k.max(1)) as f64;
        let x = |k: usize| 430.0 + 230.0 * k as f64 / kmax;
        let y = |v: f64| 250.0 - 200.0 * (v - lo) / span;
        let line: Vec<String> = self
            .curve
            .iter()
            .map(|p| format!("{:.1},{:.1}", x(p.k), y(p.validation.accuracy)))
            .collect();
        let mut s = format!(
            "<polyline points=\"{}\" fill=\"none\" stroke=\"darkorange\" stroke-width=\"2\"/>\n",
            line.join(" ")
        );
        for p in &self.curve {
            let colour = if p.k == self.chosen_skip {
                "red"
            } else {
                "darkorange"
            };
            s += &format!(
                "<circle cx=\"{0:.1}\" cy=\"{1:.1}\" r=\"5\" fill=\"{colour}\"/><text x=\"{0:.1}\" y=\"275\" text-anchor=\"middle\">k={2}</text><text x=\"{0:.1}\" y=\"{3:.1}\" text-anchor=\"middle\">{4:.1}%</text>\n",
                x(p.k),
                y(p.validation.accuracy),
                p.k,
                y(p.validation.accuracy) - 9.0,
                p.validation.accuracy * 100.0
            );
        }
        s
    }

    /// The budget, the K chosen and the curve table (markdown), the chosen K marked; with
    /// several tasks, the validation figures of every task (`first_task` names the first).
    pub fn markdown(&self, first_task: &str) -> String {
        let mut limits = Vec::new();
        if let Some(d) = self.budget.max_drop {
            let unit = if d == 1.0 { "point" } else { "points" };
            limits.push(format!("an accuracy drop of at most {d} {unit}"));
        }
        if let Some(a) = self.budget.min_agreement {
            limits.push(format!("answer agreement of at least {:.2}%", a * 100.0));
        }
        let n_docs = self.curve.first().map_or(0, |p| p.validation.n_docs);
        let mut s = format!(
            "## K chosen by the quality budget\n\nBudget: {} on {n_docs} validation documents \
             (held out of the fit; the figures above are on test documents that neither the fit \
             nor the choice of K read). Chosen: K = {}, the largest K that stays within the \
             budget with every smaller K.\n\n\
             | K | skipped blocks | validation accuracy | drop (points) [95% CI] | agreement | choice KL | file | KV bytes/token | prompt tokens/s |\n\
             |---|---|---|---|---|---|---|---|---|\n",
            limits.join(" and "),
            self.chosen_skip
        );
        for p in &self.curve {
            let k = if p.k == self.chosen_skip {
                format!("**{}** (chosen)", p.k)
            } else {
                p.k.to_string()
            };
            s += &format!(
                "| {k} | {} | {:.2}% | {:+.2} [{:+.2}, {:+.2}] | {:.2}% | {:.4} | {} | {} | {:.0} |\n",
                if p.skipped_blocks.is_empty() {
                    "-".to_string()
                } else {
                    format!("{:?}", p.skipped_blocks)
                },
                p.validation.accuracy * 100.0,
                p.drop_points,
                p.drop_ci95[0],
                p.drop_ci95[1],
                p.validation.agreement * 100.0,
                p.validation.choice_kl,
                mib(p.file_bytes),
                p.kv_bytes_per_token,
                p.prompt_tokens_per_s
            );
        }
        if let Some(last) = self.curve.last().filter(|p| p.k < self.max_skip) {
            s += &format!(
                "\nThe curve stops at K = {}, the first K past the budget: no larger K can be \
                 chosen, so {} not fitted (`--full-curve` scores every K all the same).\n",
                last.k,
                k_range(last.k + 1, self.max_skip)
            );
        }
        if self.curve.iter().any(|p| !p.other_tasks.is_empty()) {
            s += &self.tasks_markdown(first_task);
        }
        if let Some(note) = self
            .curve
            .iter()
            .find(|p| p.k == self.chosen_skip)
            .and_then(|p| noise_note(&self.budget, p))
        {
            s += &format!("\n{note}\n");
        }
        s + "\n"
    }

    /// Validation drop and agreement per K on every task, a column each (markdown).
    fn tasks_markdown(&self, first_task: &str) -> String {
        let name = |t: &str| crate::task::task_name(std::path::Path::new(t));
        let mut names = vec![name(first_task)];
        if let Some(p) = self.curve.first() {
            names.extend(p.other_tasks.iter().map(|t| name(&t.task)));
        }
        let mut s = format!(
            "\nValidation per task, drop (points) / agreement; K must stay within the budget on \
             every task:\n\n| K | {} |\n|---|{}\n",
            names.join(" | "),
            "---|".repeat(names.len())
        );
        for p in &self.curve {
            let cells: Vec<String> = (0..names.len())
                .map(|t| {
                    let (_, drop, agreement) = p.on_task(t);
                    format!("{drop:+.2} / {:.2}%", agreement * 100.0)
                })
                .collect();
            s += &format!("| {} | {} |\n", p.k, cells.join(" | "));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(k: usize, drop_ci95: [f64; 2]) -> CurvePoint {
        CurvePoint {
            k,
            skipped_blocks: vec![1; k],
            validation: ValidationFigures {
                accuracy: 0.5,
                agreement: 0.9,
                choice_kl: 0.1,
                n_docs: 200,
            },
            drop_points: (drop_ci95[0] + drop_ci95[1]) / 2.0,
            drop_ci95,
            other_tasks: Vec::new(),
            within_budget: true,
            file_bytes: 1,
            kv_bytes_per_token: 1,
            prompt_tokens_per_s: 1.0,
        }
    }

    #[test]
    fn k_range_says_one_k_or_a_range() {
        assert_eq!(k_range(3, 3), "K = 3 was");
        assert_eq!(k_range(8, 10), "K = 8 to 10 were");
    }

    #[test]
    fn a_drop_interval_wider_than_the_budget_is_said() {
        let budget = |max_drop, min_agreement| QualityBudget {
            max_drop,
            min_agreement,
            ..Default::default()
        };
        let note = noise_note(&budget(Some(1.0), None), &point(6, [-3.0, 4.0])).unwrap();
        assert!(note.contains("200 validation documents"), "{note}");
        assert!(note.contains("K = 6 is known to ±3.5 points"), "{note}");
        assert!(note.contains("1-point budget"), "{note}");
        // an interval within the budget, or a budget on agreement alone, needs no note
        assert_eq!(
            noise_note(&budget(Some(1.0), None), &point(6, [0.2, 1.8])),
            None
        );
        assert_eq!(
            noise_note(&budget(Some(5.0), None), &point(6, [-3.0, 4.0])),
            None
        );
        assert_eq!(
            noise_note(&budget(None, Some(0.9)), &point(6, [-3.0, 4.0])),
            None
        );
    }
}
