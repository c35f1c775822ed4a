//! A quality budget: what `run` may lose on its validation documents, given instead of K. One
//! definition of the budget's options (the command line flattens [`QualityBudget`] as it is),
//! their checks, and the rule that picks K from the measured curve ([`QualityBudget::admits`]).

use serde::{Deserialize, Serialize};

/// Validation documents when `--validation-docs` is not given: at 200 documents a 95% interval
/// of an accuracy near 50% is about ±7 points, the least that still tells K apart on ARC-sized
/// tasks while keeping one evaluation per K short.
pub const DEFAULT_VALIDATION_DOCS: usize = 200;

/// Slack for the float comparisons of figures that are fractions of a document count.
const EPSILON: f64 = 1e-9;

/// `--help` heading of the budget's options.
const BUDGET: &str = "Quality budget (instead of --skip)";

/// What `run` may lose, measured on validation documents held out of the fit, and how far it
/// looks: the largest K up to `max_skip` whose slim model, and every smaller K's, stays within
/// the budget is exported.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
pub struct QualityBudget {
    /// Largest accuracy drop allowed on the validation documents, in points (the original's
    /// accuracy minus the slim model's, times 100). `run` then exports the largest K within it.
    #[arg(long, value_name = "POINTS", allow_negative_numbers = true, help_heading = BUDGET)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_drop: Option<f64>,
    /// Smallest answer agreement with the original allowed on the validation documents
    /// (0 to 1).
    #[arg(long, value_name = "FRACTION", allow_negative_numbers = true, help_heading = BUDGET)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_agreement: Option<f64>,
    /// Largest K tried (default: a third of the layers, rounded down).
    #[arg(long, help_heading = BUDGET)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_skip: Option<usize>,
    /// Validation documents: the next documents of the fit's seeded split after those trained
    /// on (default: 200). The test documents (the rest, the first --limit of them in file
    /// order) give the final figures.
    #[arg(long, help_heading = BUDGET)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub validation_docs: Option<usize>,
    /// Fit and score every K up to --max-skip. By default the run stops at the first K past
    /// the budget, since no larger K can be chosen.
    #[arg(long, help_heading = BUDGET)]
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub full_curve: bool,
}

/// A quality budget that cannot be used, found before any work.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BudgetError {
    /// `--skip` and a budget were both given.
    #[error(
        "--skip {skip} and a quality budget (--max-drop, --min-agreement) both choose K: give one"
    )]
    WithSkip {
        /// The K given.
        skip: usize,
    },
    /// Neither `--skip` nor a budget was given.
    #[error(
        "give --skip K, or a quality budget: --max-drop POINTS and/or --min-agreement FRACTION"
    )]
    NoTarget,
    /// One of the budget's other options was given without a budget.
    #[error("--{option} applies only with a quality budget (--max-drop, --min-agreement)")]
    WithoutBudget {
        /// The option, as spelled on the command line.
        option: &'static str,
    },
    /// `--max-drop` is negative or not a number.
    #[error("--max-drop {value}: give the points the task may lose, 0 or more")]
    BadDrop {
        /// The value given.
        value: f64,
    },
    /// `--min-agreement` is outside 0 to 1.
    #[error("--min-agreement {value}: give a fraction from 0 to 1")]
    BadAgreement {
        /// The value given.
        value: f64,
    },
    /// A count that must be at least 1 is 0.
    #[error("--{option} 0: give at least 1")]
    Zero {
        /// The option, as spelled on the command line.
        option: &'static str,
    },
    /// `--max-skip` is more blocks than the model can skip.
    #[error(
        "--max-skip {max_skip}: the model has {n_layer} layers, so at most {} attention blocks \
         can be skipped (layer 0 always keeps its attention)",
        n_layer.saturating_sub(1)
    )]
    TooManyBlocks {
        /// The value given.
        max_skip: usize,
        /// The model's layers.
        n_layer: usize,
    },
    /// The model has no block that can be skipped.
    #[error("the model has {n_layer} layer(s): no attention block can be skipped")]
    NothingToSkip {
        /// The model's layers.
        n_layer: usize,
    },
    /// `--imatrix` with a budget.
    #[error(
        "--imatrix is not supported with a quality budget yet: give --skip K, or leave out \
         --imatrix"
    )]
    Imatrix,
}

impl QualityBudget {
    /// Whether a budget was given (`--max-drop` or `--min-agreement`).
    pub fn is_given(&self) -> bool {
        self.max_drop.is_some() || self.min_agreement.is_some()
    }

    /// Checks the budget's options against `skip` (`--skip`): exactly one of the two must choose
    /// K. Returns the budget when it chooses, `None` when `skip` does.
    pub fn resolve(self, skip: Option<usize>) -> Result<Option<QualityBudget>, BudgetError> {
        if !self.is_given() {
            if let Some(option) = [
                self.full_curve.then_some("full-curve"),
                self.max_skip.map(|_| "max-skip"),
                self.validation_docs.map(|_| "validation-docs"),
            ]
            .into_iter()
            .flatten()
            .next()
            {
                return Err(BudgetError::WithoutBudget { option });
            }
            return match skip {
                Some(_) => Ok(None),
                None => Err(BudgetError::NoTarget),
            };
        }
        if let Some(skip) = skip {
            return Err(BudgetError::WithSkip { skip });
        }
        if let Some(value) = self.max_drop.filter(|v| !(*v >= 0.0 && v.is_finite())) {
            return Err(BudgetError::BadDrop { value });
        }
        if let Some(value) = self.min_agreement.filter(|v| !(0.0..=1.0).contains(v)) {
            return Err(BudgetError::BadAgreement { value });
        }
        if self.max_skip == Some(0) {
            return Err(BudgetError::Zero { option: "max-skip" });
        }
        if self.validation_docs == Some(0) {
            return Err(BudgetError::Zero {
                option: "validation-docs",
            });
        }
        Ok(Some(self))
    }

    /// The largest K tried on a model of `n_layer` layers: `max_skip`, or a third of the layers
    /// rounded down (at least 1). Refuses more than the `n_layer - 1` blocks that can be skipped.
    pub fn resolved_max_skip(&self, n_layer: usize) -> Result<usize, BudgetError> {
        let skippable = n_layer.saturating_sub(1);
        if skippable == 0 {
            return Err(BudgetError::NothingToSkip { n_layer });
        }
        match self.max_skip {
            Some(max_skip) if max_skip > skippable => {
                Err(BudgetError::TooManyBlocks { max_skip, n_layer })
            }
            Some(max_skip) => Ok(max_skip),
            None => Ok((n_layer / 3).clamp(1, skippable)),
        }
    }

    /// Validation documents: `validation_docs` or [`DEFAULT_VALIDATION_DOCS`].
    pub fn resolved_validation_docs(&self) -> usize {
        self.validation_docs.unwrap_or(DEFAULT_VALIDATION_DOCS)
    }

    /// Whether a slim model whose accuracy drop on the validation documents is `drop_points`
    /// (original minus slim, in points) and whose answer agreement with the original is
    /// `agreement` stays within the budget.
    pub fn admits(&self, drop_points: f64, agreement: f64) -> bool {
        self.max_drop.is_none_or(|max| drop_points <= max + EPSILON)
            && self
                .min_agreement
                .is_none_or(|min| agreement >= min - EPSILON)
    }

    /// The K exported for a curve of `(k, drop_points, agreement)` in increasing K from 1: the
    /// largest K such that it and every smaller K stay within the budget (0 when K = 1 does
    /// not). The models are nested (K + 1 skips K's blocks and one more), so a K past the first
    /// one out of budget that comes back within it does so by the validation documents' noise.
    pub fn choose(&self, curve: &[(usize, f64, f64)]) -> usize {
        curve
            .iter()
            .take_while(|(_, drop, agreement)| self.admits(*drop, *agreement))
            .last()
            .map_or(0, |(k, _, _)| *k)
    }

    /// The K exported for the curves of several tasks (each as [`QualityBudget::choose`] takes
    /// it): the largest K within the budget on every task, and the index of a task that allows
    /// no more (the first such).
    pub fn choose_on_every_task(&self, curves: &[Vec<(usize, f64, f64)>]) -> (usize, usize) {
        curves
            .iter()
            .map(|curve| self.choose(curve))
            .enumerate()
            .min_by_key(|&(task, k)| (k, task))
            .map_or((0, 0), |(task, k)| (k, task))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(max_drop: Option<f64>, min_agreement: Option<f64>) -> QualityBudget {
        QualityBudget {
            max_drop,
            min_agreement,
            ..Default::default()
        }
    }

    #[test]
    fn skip_or_budget_exactly_one() {
        assert_eq!(QualityBudget::default().resolve(Some(4)), Ok(None));
        assert_eq!(
            QualityBudget::default().resolve(None),
            Err(BudgetError::NoTarget)
        );
        assert_eq!(
            budget(Some(1.0), None).resolve(Some(4)),
            Err(BudgetError::WithSkip { skip: 4 })
        );
        assert_eq!(
            budget(Some(-0.5), None).resolve(None),
            Err(BudgetError::BadDrop { value: -0.5 })
        );
        assert!(matches!(
            budget(Some(f64::NAN), None).resolve(None),
            Err(BudgetError::BadDrop { .. })
        ));
        assert_eq!(
            budget(None, Some(1.5)).resolve(None),
            Err(BudgetError::BadAgreement { value: 1.5 })
        );
        let without = QualityBudget {
            max_skip: Some(3),
            ..Default::default()
        };
        assert_eq!(
            without.resolve(Some(2)),
            Err(BudgetError::WithoutBudget { option: "max-skip" })
        );
        let b = budget(Some(0.0), Some(0.9));
        assert_eq!(b.clone().resolve(None), Ok(Some(b)));
    }

    #[test]
    fn max_skip_defaults_to_a_third_of_the_layers_and_never_reaches_layer_0() {
        let b = budget(Some(1.0), None);
        assert_eq!(b.resolved_max_skip(30), Ok(10));
        assert_eq!(b.resolved_max_skip(32), Ok(10));
        assert_eq!(b.resolved_max_skip(2), Ok(1));
        assert_eq!(
            b.resolved_max_skip(1),
            Err(BudgetError::NothingToSkip { n_layer: 1 })
        );
        let at = |m| QualityBudget {
            max_skip: Some(m),
            ..b.clone()
        };
        assert_eq!(at(3).resolved_max_skip(4), Ok(3));
        assert_eq!(
            at(4).resolved_max_skip(4),
            Err(BudgetError::TooManyBlocks {
                max_skip: 4,
                n_layer: 4
            })
        );
    }

    #[test]
    fn the_choice_stops_at_the_first_k_out_of_budget() {
        let curve = [(1, 0.0, 1.0), (2, 0.5, 0.95), (3, 2.0, 0.9), (4, 0.0, 0.9)];
        assert_eq!(budget(Some(1.0), None).choose(&curve), 2);
        assert_eq!(budget(Some(0.0), None).choose(&curve), 1);
        assert_eq!(budget(Some(5.0), None).choose(&curve), 4);
        assert_eq!(budget(Some(5.0), Some(0.96)).choose(&curve), 1);
        assert_eq!(budget(None, Some(1.0)).choose(&curve[1..]), 0);
    }

    #[test]
    fn on_several_tasks_the_choice_holds_on_every_one() {
        let easy = vec![(1, 0.0, 1.0), (2, 0.5, 0.95), (3, 0.9, 0.9)];
        let hard = vec![(1, 0.0, 1.0), (2, 3.0, 0.8), (3, 4.0, 0.7)];
        let b = budget(Some(1.0), None);
        assert_eq!(b.choose_on_every_task(std::slice::from_ref(&easy)), (3, 0));
        assert_eq!(
            b.choose_on_every_task(&[easy.clone(), hard.clone()]),
            (1, 1)
        );
        assert_eq!(
            b.choose_on_every_task(&[hard.clone(), easy.clone()]),
            (1, 0)
        );
        let worse = vec![(1, 2.0, 0.9), (2, 3.0, 0.8), (3, 4.0, 0.7)];
        assert_eq!(b.choose_on_every_task(&[easy, hard, worse]), (0, 2));
    }
}
