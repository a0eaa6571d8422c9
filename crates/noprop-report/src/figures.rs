//! Figures 3, 4 and 5 as SVG, each with the CSV it was drawn from.
//! (Figure 2, the prototype images, is drawn by `noprop inspect embeddings`.)

use crate::plot::{BarGroup, BarPlot, LinePlot, Series};
use crate::rows::{Dataset, Embedding, Init, PaperMethod, Row, Variant};
use crate::table::{csv, mean_se, RowResult};
use crate::Output;

fn find<'a>(results: &'a [RowResult], row: &Row) -> Option<&'a RowResult> {
    results.iter().find(|r| r.row == *row)
}

/// One point of a learning curve: the seeds' mean at an epoch that every
/// finished seed evaluated.
#[derive(Debug, Clone, PartialEq)]
pub struct CurvePoint {
    pub epoch: usize,
    pub seeds: usize,
    pub train_seconds: f64,
    pub test_acc: f64,
    /// Standard error over all stochastic runs of all seeds at this epoch.
    pub test_acc_se: Option<f64>,
}

/// Test accuracy against cumulative training time, averaged over seeds.
pub fn curve(r: &RowResult) -> Vec<CurvePoint> {
    let Some((_, first)) = r.finished.first() else {
        return vec![];
    };
    let mut out = vec![];
    for e in &first.evals {
        let at: Vec<_> = r
            .finished
            .iter()
            .filter_map(|(_, s)| s.evals.iter().find(|x| x.epoch == e.epoch))
            .collect();
        let secs: Vec<f64> = at.iter().filter_map(|x| x.train_seconds).collect();
        if at.len() != r.finished.len() || secs.len() != at.len() {
            continue;
        }
        let runs: Vec<f64> = at
            .iter()
            .flat_map(|x| {
                if x.test_acc_runs.is_empty() {
                    vec![x.test_acc]
                } else {
                    x.test_acc_runs.clone()
                }
            })
            .collect();
        out.push(CurvePoint {
            epoch: e.epoch,
            seeds: at.len(),
            train_seconds: secs.iter().sum::<f64>() / secs.len() as f64,
            test_acc: at.iter().map(|x| x.test_acc).sum::<f64>() / at.len() as f64,
            test_acc_se: mean_se(&runs).and_then(|m| m.1),
        });
    }
    out
}

fn opt(v: Option<f64>) -> String {
    v.map_or(String::new(), |x| format!("{x}"))
}

/// Figure 3: test accuracy against cumulative training time for NoProp-CT,
/// NoProp-FM and the adjoint method (one-hot), one plot per data set.
pub fn figure3(results: &[RowResult]) -> Vec<Output> {
    let mut out = vec![];
    for ds in Dataset::ALL {
        let mut series = vec![];
        let mut lines = vec![];
        for m in [PaperMethod::Ct, PaperMethod::Fm, PaperMethod::Adjoint] {
            let Some(r) = find(results, &Row::table1(ds, m, Embedding::OneHot)) else {
                continue;
            };
            let pts = curve(r);
            for p in &pts {
                lines.push(vec![
                    m.title().to_string(),
                    r.row.name(),
                    p.epoch.to_string(),
                    p.seeds.to_string(),
                    format!("{}", p.train_seconds),
                    format!("{}", p.test_acc),
                    opt(p.test_acc_se),
                ]);
            }
            series.push(Series {
                name: m.title().into(),
                points: pts.iter().map(|p| (p.train_seconds, p.test_acc)).collect(),
                ..Default::default()
            });
        }
        if lines.is_empty() {
            continue;
        }
        let plot = LinePlot {
            title: format!("Figure 3: {} (one-hot), mean over seeds", ds.title()),
            x_label: "cumulative training time (s)".into(),
            y_label: "test accuracy (%)".into(),
            series,
            ..Default::default()
        };
        out.push(Output {
            name: format!("fig3-{}.svg", ds.name()),
            contents: plot.to_svg(),
        });
        out.push(Output {
            name: format!("fig3-{}.csv", ds.name()),
            contents: csv(
                &[
                    "method",
                    "row",
                    "epoch",
                    "seeds",
                    "train_seconds",
                    "test_acc",
                    "test_acc_se",
                ],
                &lines,
            ),
        });
    }
    out
}

/// A bar chart over (group label, [(series, row)]) with its CSV; `None` if
/// no row in it has a result.
fn bars(
    name: &str,
    title: &str,
    series: &[&str],
    groups: &[(String, Vec<Row>)],
    results: &[RowResult],
) -> Vec<Output> {
    let mut lines = vec![];
    let mut plot_groups = vec![];
    for (label, rows) in groups {
        let mut vals = vec![];
        for (s, row) in series.iter().zip(rows) {
            let agg = find(results, row).map(RowResult::aggregate);
            let test = agg.as_ref().and_then(|a| a.test);
            if let (Some((m, se)), Some(r)) = (test, find(results, row)) {
                lines.push(vec![
                    label.clone(),
                    s.to_string(),
                    row.name(),
                    r.finished.len().to_string(),
                    format!("{m}"),
                    opt(se),
                ]);
            }
            vals.push(test.map(|(m, se)| (m, se.unwrap_or(f64::NAN))));
        }
        if vals.iter().any(Option::is_some) {
            plot_groups.push(BarGroup {
                label: label.clone(),
                bars: vals,
            });
        }
    }
    if lines.is_empty() {
        return vec![];
    }
    let plot = BarPlot {
        title: title.into(),
        x_label: String::new(),
        y_label: "test accuracy (%), mean ± s.e.".into(),
        series: series.iter().map(|s| s.to_string()).collect(),
        groups: plot_groups,
    };
    vec![
        Output {
            name: format!("{name}.svg"),
            contents: plot.to_svg(),
        },
        Output {
            name: format!("{name}.csv"),
            contents: csv(
                &["group", "series", "row", "seeds", "test_acc", "test_acc_se"],
                &lines,
            ),
        },
    ]
}

/// Figure 4: softmax against radial class probabilities (NoProp-DT), one
/// group per data set and embedding that has a radial row.
pub fn figure4(rows: &[Row], results: &[RowResult]) -> Vec<Output> {
    let groups: Vec<(String, Vec<Row>)> = rows
        .iter()
        .filter(|r| r.variant == Variant::Radial)
        .map(|r| {
            (
                format!("{} {}", r.dataset.title(), r.embedding.title()),
                vec![
                    Row {
                        variant: Variant::Table1,
                        ..*r
                    },
                    *r,
                ],
            )
        })
        .collect();
    bars(
        "fig4",
        "Figure 4: class probabilities, NoProp-DT",
        &["softmax", "radial"],
        &groups,
        results,
    )
}

/// Figure 5: initialisations of a learned `W_embed` with `d = C*H*W`
/// (NoProp-DT), one group per data set.
pub fn figure5(rows: &[Row], results: &[RowResult]) -> Vec<Output> {
    let groups: Vec<(String, Vec<Row>)> = Dataset::ALL
        .into_iter()
        .filter(|ds| {
            rows.iter()
                .any(|r| r.dataset == *ds && matches!(r.variant, Variant::Init(_)))
        })
        .map(|ds| {
            let init = |i| Row {
                dataset: ds,
                method: PaperMethod::Dt,
                embedding: Embedding::Prototype,
                variant: Variant::Init(i),
            };
            (
                ds.title().to_string(),
                vec![
                    init(Init::Orthogonal),
                    init(Init::Normal),
                    Row::table1(ds, PaperMethod::Dt, Embedding::Prototype),
                ],
            )
        })
        .collect();
    bars(
        "fig5",
        "Figure 5: embedding initialisation (d = C·H·W), NoProp-DT",
        &["orthogonal", "normal", "prototype"],
        &groups,
        results,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plot::tests::well_formed;
    use crate::rows::all_rows;
    use crate::runs::summarise;

    fn summary(points: &[(f64, f64)]) -> super::super::runs::Summary {
        let mut text = String::new();
        for (i, (secs, acc)) in points.iter().enumerate() {
            let e = i + 1;
            text.push_str(&format!(
                "{{\"event\":\"eval\",\"epoch\":{e},\"test_acc\":{acc},\"test_acc_runs\":[{},{}],\"train_seconds\":{secs}}}\n",
                acc - 0.5,
                acc + 0.5
            ));
            text.push_str(&format!(
                "{{\"event\":\"epoch\",\"epoch\":{e},\"train_seconds\":{secs}}}\n"
            ));
        }
        summarise(&text)
    }

    fn result(row: Row, finished: Vec<(u64, super::super::runs::Summary)>) -> RowResult {
        RowResult {
            row,
            seeds_wanted: finished.len().max(1),
            finished,
            unfinished: vec![],
            note: None,
            settings: None,
        }
    }

    #[test]
    fn curve_averages_seeds_per_epoch() {
        let r = result(
            Row::table1(Dataset::Mnist, PaperMethod::Ct, Embedding::OneHot),
            vec![
                (0, summary(&[(10.0, 90.0), (20.0, 94.0)])),
                (1, summary(&[(12.0, 92.0)])),
            ],
        );
        // Epoch 2 is missing for seed 1, so only epoch 1 is a point.
        let c = curve(&r);
        assert_eq!(c.len(), 1);
        assert_eq!(
            (c[0].epoch, c[0].seeds, c[0].train_seconds, c[0].test_acc),
            (1, 2, 11.0, 91.0)
        );
        assert!(c[0].test_acc_se.is_some());
    }

    #[test]
    fn figure3_has_a_point_per_epoch_and_matching_csv() {
        let results = vec![
            result(
                Row::table1(Dataset::Mnist, PaperMethod::Ct, Embedding::OneHot),
                vec![(0, summary(&[(5.0, 80.0), (10.0, 90.0), (15.0, 93.0)]))],
            ),
            result(
                Row::table1(Dataset::Mnist, PaperMethod::Fm, Embedding::OneHot),
                vec![(0, summary(&[(6.0, 85.0), (12.0, 95.0)]))],
            ),
            result(
                Row::table1(Dataset::Mnist, PaperMethod::Adjoint, Embedding::OneHot),
                vec![],
            ),
        ];
        let out = figure3(&results);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].name, "fig3-mnist.svg");
        well_formed(&out[0].contents).unwrap();
        assert_eq!(out[0].contents.matches("<circle").count(), 5);
        // Header plus one line per point.
        assert_eq!(out[1].contents.lines().count(), 6);
        assert!(out[1]
            .contents
            .lines()
            .nth(1)
            .unwrap()
            .starts_with("NoProp-CT,mnist-ct-onehot,1,1,5,80,"));
    }

    #[test]
    fn ablation_bars() {
        let rows = all_rows(true);
        let dim20 = Row::table1(Dataset::Mnist, PaperMethod::Dt, Embedding::Dim20);
        let results = vec![
            result(dim20, vec![(0, summary(&[(1.0, 97.0)]))]),
            result(
                Row {
                    variant: Variant::Radial,
                    ..dim20
                },
                vec![(0, summary(&[(1.0, 96.0)]))],
            ),
        ];
        let out = figure4(&rows, &results);
        assert_eq!(out.len(), 2);
        well_formed(&out[0].contents).unwrap();
        assert_eq!(super::super::plot::tests::bars(&out[0].contents), 2);
        assert_eq!(out[1].contents.lines().count(), 3);
        assert!(figure5(&rows, &results).is_empty());
        let proto = Row::table1(Dataset::Mnist, PaperMethod::Dt, Embedding::Prototype);
        let normal = Row {
            variant: Variant::Init(Init::Normal),
            ..proto
        };
        let results = vec![
            result(proto, vec![(0, summary(&[(1.0, 97.0)]))]),
            result(normal, vec![(0, summary(&[(1.0, 95.0)]))]),
        ];
        let out = figure5(&rows, &results);
        assert_eq!(super::super::plot::tests::bars(&out[0].contents), 2);
        assert!(out[1]
            .contents
            .contains("MNIST,normal,mnist-dt-init-normal,1,95,"));
    }
}
