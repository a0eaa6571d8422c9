//! One run's learning curve: its finished epochs from `metrics.jsonl`, as a
//! CSV table and an SVG figure beside the paper's Table 1 figure when the
//! run is a Table 1 configuration.

use serde_json::Value as Json;

#[cfg(feature = "svg")]
use crate::plot::{LinePlot, Series};
use crate::rows::{Dataset, Embedding, PaperMethod, Row};
use crate::runs::{as_usize, summarise, Eval};
use crate::table::mean_se;

/// One finished epoch of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochPoint {
    pub epoch: usize,
    /// Passes over the data in the epoch (DT: one per block).
    pub passes: usize,
    /// `[loss, ce, kl, denoise]`, each the mean over the epoch's passes.
    pub losses: [Option<f64>; 4],
    pub epoch_seconds: Option<f64>,
    /// Cumulative training seconds (evaluation excluded).
    pub train_seconds: Option<f64>,
    pub eval: Option<Eval>,
}

const LOSS_KEYS: [&str; 4] = ["loss", "ce", "kl", "denoise"];

fn mean(xs: impl Iterator<Item = f64>) -> Option<f64> {
    let (n, sum) = xs.fold((0usize, 0.0), |(n, s), x| (n + 1, s + x));
    (n > 0).then(|| sum / n as f64)
}

/// The finished epochs of `metrics.jsonl` text, in order. A pass repeated
/// for the same epoch and block (an epoch cut short, then trained again
/// after `--resume`) counts once, its last record.
pub fn epochs(metrics: &str) -> Vec<EpochPoint> {
    let events: Vec<Json> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let summary = summarise(metrics);
    let mut out: Vec<EpochPoint> = Vec::new();
    for v in events.iter().filter(|v| v["event"] == "epoch") {
        let Some(epoch) = as_usize(&v["epoch"]) else {
            continue;
        };
        if epoch == 0 || epoch > summary.epochs_done {
            continue;
        }
        let mut passes: Vec<(Option<usize>, &Json)> = Vec::new();
        for p in events
            .iter()
            .filter(|p| p["event"] == "pass" && as_usize(&p["epoch"]) == Some(epoch))
        {
            let block = as_usize(&p["block"]);
            passes.retain(|(b, _)| *b != block);
            passes.push((block, p));
        }
        let losses = LOSS_KEYS.map(|k| mean(passes.iter().filter_map(|(_, p)| p[k].as_f64())));
        out.retain(|e| e.epoch != epoch);
        out.push(EpochPoint {
            epoch,
            passes: passes.len(),
            losses,
            epoch_seconds: v["epoch_seconds"].as_f64(),
            train_seconds: v["train_seconds"].as_f64(),
            eval: summary.evals.iter().find(|e| e.epoch == epoch).cloned(),
        });
    }
    out.sort_by_key(|e| e.epoch);
    out
}

/// The lines of `metrics` up to the last finished epoch's `epoch` line (an
/// epoch's pass and eval lines come before it): a copy of a live run's
/// record holds no half-written line and no unfinished epoch.
pub fn finished_prefix(metrics: &str) -> &str {
    let (mut end, mut pos) = (0, 0);
    for line in metrics.split_inclusive('\n') {
        pos += line.len();
        if line.ends_with('\n')
            && serde_json::from_str::<Json>(line).is_ok_and(|v| v["event"] == "epoch")
        {
            end = pos;
        }
    }
    &metrics[..end]
}

/// A number in Rust's shortest round-trip form, with an exponent where it
/// is very small or large (`1.2e-31`, not 31 zeros).
fn cell(v: Option<f64>) -> String {
    v.map(|x| format!("{x:?}")).unwrap_or_default()
}

/// The curve as CSV, one line per finished epoch; accuracy cells are empty
/// where the epoch was not evaluated, `test_acc_se` also where it had one
/// stochastic run.
pub fn csv(points: &[EpochPoint]) -> String {
    let mut s = String::from(
        "epoch,passes,loss,ce,kl,denoise,epoch_seconds,train_seconds,\
         test_acc,test_acc_se,test_acc_deterministic,train_acc\n",
    );
    for p in points {
        let e = p.eval.as_ref();
        let se = e
            .and_then(|e| mean_se(&e.test_acc_runs))
            .and_then(|(_, se)| se);
        let cells: Vec<String> = [p.epoch.to_string(), p.passes.to_string()]
            .into_iter()
            .chain(p.losses.iter().map(|&l| cell(l)))
            .chain(
                [
                    p.epoch_seconds,
                    p.train_seconds,
                    e.map(|e| e.test_acc),
                    se,
                    e.and_then(|e| e.test_acc_deterministic),
                    e.and_then(|e| e.train_acc),
                ]
                .map(cell),
            )
            .collect();
        s.push_str(&cells.join(","));
        s.push('\n');
    }
    s
}

/// The Table 1 configuration a run's `config.json` is, if it is one: its
/// data set, method and embedding (dim=20 is a learned embedding of
/// dimension 20), with softmax class probabilities and, for prototypes,
/// the prototype initialisation (the Figure 4 and 5 ablations are not
/// Table 1 rows).
pub fn table1_row(config: &Json) -> Option<Row> {
    let model = &config["model"];
    let softmax = model["class_probability"]["kind"]
        .as_str()
        .is_none_or(|k| k == "softmax");
    if !softmax {
        return None;
    }
    let dataset = config["data"]["dataset"].as_str()?;
    let dataset = *Dataset::ALL.iter().find(|d| d.name() == dataset)?;
    let method = config["method"]["kind"].as_str()?;
    let method = *PaperMethod::ALL.iter().find(|m| m.name() == method)?;
    let embedding = &model["embedding"];
    let embedding = match embedding["kind"].as_str()? {
        "one-hot" => Embedding::OneHot,
        "prototype" if embedding["init"].as_str().is_none_or(|i| i == "prototype") => {
            Embedding::Prototype
        }
        "learned" if embedding["dim"].as_u64() == Some(20) => Embedding::Dim20,
        _ => return None,
    };
    Some(Row::table1(dataset, method, embedding))
}

/// The palette colour of the paper's line (black).
#[cfg(feature = "svg")]
const PAPER_COLOUR: usize = 6;

/// The figure: test accuracy (stochastic mean, deterministic, train
/// subset; each always in its own colour) against epoch, and the paper's
/// figure as a dashed line.
#[cfg(feature = "svg")]
pub fn svg(points: &[EpochPoint], title: &str, paper: Option<(f64, usize)>) -> String {
    let evals: Vec<&Eval> = points.iter().filter_map(|p| p.eval.as_ref()).collect();
    let series = |colour: usize, name: &str, f: &dyn Fn(&Eval) -> Option<f64>| Series {
        name: name.into(),
        points: evals
            .iter()
            .filter_map(|e| Some((e.epoch as f64, f(e)?)))
            .collect(),
        colour: Some(colour),
        dashed: false,
    };
    let mut lines = vec![
        series(0, "test (stochastic)", &|e| Some(e.test_acc)),
        series(1, "test (deterministic)", &|e| e.test_acc_deterministic),
        series(2, "train subset", &|e| e.train_acc),
    ];
    lines.retain(|s| !s.points.is_empty());
    if let (Some((acc, epochs)), Some(last)) = (paper, points.last()) {
        lines.push(Series {
            name: format!("paper ({epochs} ep.): {acc:.2}"),
            points: vec![(0.0, acc), (last.epoch.max(5) as f64, acc)],
            colour: Some(PAPER_COLOUR),
            dashed: true,
        });
    }
    LinePlot {
        title: title.into(),
        x_label: "epoch".into(),
        y_label: "accuracy (%)".into(),
        series: lines,
        integer_x: true,
    }
    .to_svg()
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(feature = "svg")]
    use crate::plot::tests::well_formed;
    use crate::table::paper_test;

    fn pass(epoch: usize, block: usize, loss: f64) -> String {
        format!(
            r#"{{"event":"pass","epoch":{epoch},"block":{block},"loss":{loss},"ce":{loss},"kl":0.0,"denoise":0.0}}"#
        )
    }

    fn epoch(epoch: usize, seconds: f64) -> String {
        format!(
            r#"{{"event":"epoch","epoch":{epoch},"epoch_seconds":{seconds},"train_seconds":{}}}"#,
            seconds * epoch as f64
        )
    }

    fn eval(epoch: usize, runs: &[f64]) -> String {
        let mean = runs.iter().sum::<f64>() / runs.len() as f64;
        format!(
            r#"{{"event":"eval","epoch":{epoch},"test_acc":{mean},"test_acc_runs":{runs:?},"test_acc_deterministic":99.0,"train_acc":98.0}}"#
        )
    }

    fn config(method: &str, model: &str) -> Json {
        serde_json::from_str(&format!(
            r#"{{"data":{{"dataset":"mnist"}},"method":{{"kind":"{method}"}},"model":{model},"train":{{"epochs":100}}}}"#
        ))
        .unwrap()
    }

    /// Two finished epochs (the second evaluated, its first pass repeated
    /// after a resume) and the start of a third.
    fn record() -> String {
        [
            pass(1, 0, 2.0),
            pass(1, 1, 4.0),
            epoch(1, 10.0),
            pass(2, 0, 9.0),
            pass(2, 0, 1.0),
            pass(2, 1, 3.0),
            eval(2, &[90.0, 92.0]),
            epoch(2, 10.0),
            pass(3, 0, 0.5),
        ]
        .join("\n")
    }

    #[test]
    fn repeated_passes_count_once_and_blocks_average() {
        let pts = epochs(&record());
        assert_eq!(pts.len(), 2);
        assert_eq!(pts[0].losses[0], Some(3.0));
        assert_eq!(pts[1].passes, 2);
        assert_eq!(pts[1].losses[0], Some(2.0));
        assert!(pts[0].eval.is_none());
        assert_eq!(pts[1].eval.as_ref().map(|e| e.test_acc), Some(91.0));
        let text = csv(&pts);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[1], "1,2,3.0,3.0,0.0,0.0,10.0,10.0,,,,");
        assert_eq!(lines[2], "2,2,2.0,2.0,0.0,0.0,10.0,20.0,91.0,1.0,99.0,98.0");
        assert_eq!(cell(Some(1.5e-31)), "1.5e-31");
    }

    #[test]
    fn a_copy_ends_at_the_last_finished_epoch() {
        let m = record();
        let kept = finished_prefix(&m);
        assert!(kept.ends_with(&format!("{}\n", epoch(2, 10.0))));
        assert!(!kept.contains(r#""epoch":3"#));
        assert_eq!(epochs(kept), epochs(&m));
        // An epoch line still being written is not finished.
        assert_eq!(finished_prefix(&epoch(1, 1.0)), "");
    }

    #[test]
    fn table1_rows_come_from_the_config_and_ablations_are_not_rows() {
        let ct = table1_row(&config("ct", r#"{"embedding":{"kind":"one-hot"}}"#)).unwrap();
        assert_eq!(paper_test(&ct), Some(97.84));
        let dim20 = table1_row(&config(
            "dt",
            r#"{"embedding":{"kind":"learned","dim":20}}"#,
        ));
        assert_eq!(dim20.as_ref().and_then(paper_test), Some(99.49));
        let proto = r#"{"embedding":{"kind":"prototype","init":"prototype"}}"#;
        assert!(table1_row(&config("dt", proto)).is_some());
        for model in [
            r#"{"embedding":{"kind":"learned","dim":32}}"#,
            r#"{"embedding":{"kind":"prototype","init":"orthogonal"}}"#,
            r#"{"embedding":{"kind":"one-hot"},"class_probability":{"kind":"radial"}}"#,
        ] {
            assert!(table1_row(&config("dt", model)).is_none(), "{model}");
        }
    }

    #[cfg(feature = "svg")]
    #[test]
    fn the_figure_has_a_dashed_paper_line_and_only_evaluated_epochs() {
        let m = [
            pass(1, 0, 2.0),
            epoch(1, 1.0),
            pass(2, 0, 1.0),
            eval(2, &[95.0]),
            epoch(2, 1.0),
        ]
        .join("\n");
        let s = svg(&epochs(&m), "CT & co", Some((97.84, 100)));
        well_formed(&s).unwrap();
        assert!(s.contains("CT &amp; co"));
        assert!(s.contains("paper (100 ep.): 97.84"));
        // The paper's line is drawn in dashes (many short strokes), with no markers.
        assert!(crate::plot::tests::count(&s, "polyline", "stroke-width=\"2\"") > 3);
        // One evaluated epoch for each of three accuracy series.
        assert_eq!(s.matches("<circle").count(), 3);
        // Short runs still get whole-number epoch ticks.
        assert!(!s.contains(">\n0.5\n<"));
    }
}
