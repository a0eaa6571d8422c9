//! Tables 1 and 2 as Markdown and CSV: our numbers, aggregated over seeds,
//! beside the paper's (spec section 12).

use std::fmt::Write;

use super::rows::{Dataset, Embedding, Method, Row, Variant};
use super::runs::Summary;

/// Table 1 of the paper: test accuracy (%), `[method][embedding][dataset]`
/// with methods in [`Method::ALL`] order and embeddings one-hot, dim=20,
/// prototype (adjoint: one-hot only).
const PAPER_TEST: [[[f64; 3]; 3]; 5] = [
    // Backprop
    [
        [99.46, 79.92, 45.85],
        [99.43, 79.30, 46.57],
        [99.44, 79.58, 47.80],
    ],
    // NoProp-DT
    [
        [99.47, 79.25, 45.93],
        [99.49, 79.12, 45.19],
        [99.54, 80.54, 46.06],
    ],
    // Adjoint (one-hot only)
    [[98.62, 66.78, 25.03], [f64::NAN; 3], [f64::NAN; 3]],
    // NoProp-CT
    [
        [97.84, 73.35, 33.66],
        [97.70, 71.77, 33.99],
        [97.17, 66.54, 21.31],
    ],
    // NoProp-FM
    [
        [99.21, 73.14, 6.38],
        [99.29, 73.50, 31.14],
        [98.52, 75.18, 37.57],
    ],
];

/// Train accuracy (%) the paper gives, for NoProp-DT with one-hot embeddings only.
const PAPER_TRAIN_DT_ONEHOT: [f64; 3] = [99.92, 95.02, 84.97];

/// Table 2 of the paper: peak GPU memory in training (GB), `[method][dataset]`.
const PAPER_MEMORY_GB: [[f64; 3]; 5] = [
    [0.87, 1.17, 1.73],
    [0.49, 0.64, 1.23],
    [2.32, 6.23, 6.45],
    [1.05, 0.45, 0.50],
    [1.06, 0.44, 0.49],
];

fn method_index(m: Method) -> usize {
    Method::ALL.iter().position(|&x| x == m).unwrap_or(0)
}

/// The paper's Table 1 test accuracy of a row, if it has one.
pub fn paper_test(row: &Row) -> Option<f64> {
    if row.variant != Variant::Table1 {
        return None;
    }
    let v = PAPER_TEST[method_index(row.method)][row.embedding.index()][row.dataset.index()];
    v.is_finite().then_some(v)
}

/// The paper's train accuracy of a row, if it gives one.
pub fn paper_train(row: &Row) -> Option<f64> {
    (row.variant == Variant::Table1
        && row.method == Method::Dt
        && row.embedding == Embedding::OneHot)
        .then(|| PAPER_TRAIN_DT_ONEHOT[row.dataset.index()])
}

/// The paper's Table 2 peak memory of a method on a data set, in GB.
pub fn paper_memory_gb(method: Method, dataset: Dataset) -> f64 {
    PAPER_MEMORY_GB[method_index(method)][dataset.index()]
}

/// The epochs the paper trains for (Table 3 / spec sections 4, 8, 10).
pub fn paper_epochs(method: Method, dataset: Dataset) -> usize {
    match (method, dataset) {
        (Method::Dt | Method::Backprop, Dataset::Mnist) => 100,
        (Method::Dt | Method::Backprop, _) => 150,
        (Method::Ct | Method::Fm, Dataset::Mnist) => 100,
        (Method::Ct | Method::Fm, Dataset::Cifar10) => 500,
        (Method::Ct | Method::Fm, Dataset::Cifar100) => 1000,
        (Method::Adjoint, Dataset::Mnist) => 2,
        (Method::Adjoint, _) => 4,
    }
}

/// Mean and standard error (sample standard deviation over `sqrt(n)`) of
/// `xs`; the error is `None` for fewer than two values.
pub fn mean_se(xs: &[f64]) -> Option<(f64, Option<f64>)> {
    if xs.is_empty() {
        return None;
    }
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return Some((mean, None));
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    Some((mean, Some((var / n).sqrt())))
}

/// `99.12 ± 0.03`, `99.12` without an error, `—` without a value.
pub fn fmt_mean_se(v: Option<(f64, Option<f64>)>) -> String {
    match v {
        None => "—".into(),
        Some((m, None)) => format!("{m:.2}"),
        Some((m, Some(se))) => format!("{m:.2} ± {se:.2}"),
    }
}

/// `45s`, `3m12s`, `2h05m`.
pub fn fmt_duration(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "—".into();
    }
    let s = secs.round() as u64;
    if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    }
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("—".into(), |x| format!("{x:.digits$}"))
}

/// A CSV document (RFC 4180 quoting: fields with commas, quotes or line
/// breaks are quoted, quotes doubled).
pub fn csv(header: &[&str], rows: &[Vec<String>]) -> String {
    fn field(s: &str) -> String {
        if s.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s.to_string()
        }
    }
    let mut out = header
        .iter()
        .map(|h| field(h))
        .collect::<Vec<_>>()
        .join(",");
    out.push('\n');
    for r in rows {
        out.push_str(&r.iter().map(|f| field(f)).collect::<Vec<_>>().join(","));
        out.push('\n');
    }
    out
}

/// A Markdown table; `right` marks right-aligned (numeric) columns.
pub fn markdown(header: &[&str], right: &[bool], rows: &[Vec<String>]) -> String {
    let cell = |s: &str| s.replace('|', "\\|");
    let mut out = format!(
        "| {} |\n|",
        header
            .iter()
            .map(|h| cell(h))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    for i in 0..header.len() {
        out.push_str(if right.get(i).copied().unwrap_or(false) {
            " ---: |"
        } else {
            " --- |"
        });
    }
    out.push('\n');
    for r in rows {
        let _ = writeln!(
            out,
            "| {} |",
            r.iter().map(|c| cell(c)).collect::<Vec<_>>().join(" | ")
        );
    }
    out
}

/// Everything known about one row: its finished runs and why others are missing.
#[derive(Debug, Clone)]
pub struct RowResult {
    pub row: Row,
    /// Seeds the reproduction trains this row with.
    pub seeds_wanted: usize,
    /// Finished runs: (seed, summary).
    pub finished: Vec<(u64, Summary)>,
    /// Seeds with a started but unfinished run.
    pub unfinished: usize,
    /// Why the row has no runs, if it has none (for example a missing config).
    pub note: Option<String>,
    /// What a quick run changed, if this is one.
    pub settings: Option<String>,
}

/// The aggregated numbers of one row.
#[derive(Debug, Clone, PartialEq)]
pub struct Aggregate {
    /// Test accuracy: all stochastic inference runs of all seeds pooled.
    pub test: Option<(f64, Option<f64>)>,
    /// Stochastic runs pooled in `test`.
    pub test_runs: usize,
    /// Train accuracy (one value per seed).
    pub train: Option<(f64, Option<f64>)>,
    /// Deterministic inference, one value per seed.
    pub deterministic: Option<(f64, Option<f64>)>,
    /// Epochs run (smallest and largest over seeds).
    pub epochs: Option<(usize, usize)>,
    /// Mean training seconds per seed.
    pub train_seconds: Option<f64>,
    /// Largest peak resident memory over seeds and epochs, in bytes.
    pub peak_rss_bytes: Option<u64>,
    /// Largest peak resident memory of epoch 1 over seeds, in bytes.
    pub first_epoch_rss_bytes: Option<u64>,
}

impl RowResult {
    /// Means and standard errors over the finished seeds' last evaluations.
    pub fn aggregate(&self) -> Aggregate {
        let finals: Vec<_> = self
            .finished
            .iter()
            .filter_map(|(_, s)| s.final_eval())
            .collect();
        let pooled: Vec<f64> = finals
            .iter()
            .flat_map(|e| {
                if e.test_acc_runs.is_empty() {
                    vec![e.test_acc]
                } else {
                    e.test_acc_runs.clone()
                }
            })
            .collect();
        let per_seed = |f: &dyn Fn(&super::runs::Eval) -> Option<f64>| -> Vec<f64> {
            finals.iter().filter_map(|e| f(e)).collect()
        };
        let epochs: Vec<usize> = self.finished.iter().map(|(_, s)| s.epochs_done).collect();
        let secs: Vec<f64> = self
            .finished
            .iter()
            .filter_map(|(_, s)| s.train_seconds)
            .collect();
        Aggregate {
            test: mean_se(&pooled),
            test_runs: pooled.len(),
            train: mean_se(&per_seed(&|e| e.train_acc)),
            deterministic: mean_se(&per_seed(&|e| e.test_acc_deterministic)),
            epochs: epochs
                .iter()
                .min()
                .zip(epochs.iter().max())
                .map(|(a, b)| (*a, *b)),
            train_seconds: (!secs.is_empty()).then(|| secs.iter().sum::<f64>() / secs.len() as f64),
            peak_rss_bytes: self
                .finished
                .iter()
                .filter_map(|(_, s)| s.peak_rss_bytes)
                .max(),
            first_epoch_rss_bytes: self
                .finished
                .iter()
                .filter_map(|(_, s)| s.first_epoch_rss_bytes)
                .max(),
        }
    }

    /// `3 × 5`, or `2 × 5 (1 unfinished)`, or what is missing.
    fn runs_cell(&self, agg: &Aggregate) -> String {
        let seeds = self.finished.len();
        let mut s = if seeds == 0 {
            format!("0 of {}", self.seeds_wanted)
        } else {
            let per = agg.test_runs / seeds.max(1);
            if seeds < self.seeds_wanted {
                format!("{seeds} of {} × {per}", self.seeds_wanted)
            } else {
                format!("{seeds} × {per}")
            }
        };
        if self.unfinished > 0 {
            let _ = write!(s, " ({} unfinished)", self.unfinished);
        }
        s
    }
}

fn epochs_cell(agg: &Aggregate, paper: usize) -> String {
    match agg.epochs {
        None => format!("— / {paper}"),
        Some((a, b)) if a == b => format!("{a} / {paper}"),
        Some((a, b)) => format!("{a}–{b} / {paper}"),
    }
}

/// How a table was made, printed above it.
#[derive(Debug, Clone)]
pub struct Context {
    pub quick: bool,
    pub device: String,
    pub seeds: usize,
}

const T1_HEADER: [&str; 10] = [
    "method",
    "embedding",
    "test % (ours)",
    "test % (paper)",
    "train % (ours)",
    "train % (paper)",
    "test %, deterministic",
    "epochs (ours / paper)",
    "seeds × runs",
    "training time per seed",
];
const T1_RIGHT: [bool; 10] = [false, false, true, true, true, true, true, true, true, true];

fn t1_cells(r: &RowResult) -> Vec<String> {
    let agg = r.aggregate();
    let embedding = match r.row.variant {
        Variant::Table1 => r.row.embedding.title().to_string(),
        Variant::Radial => format!("{}, radial", r.row.embedding.title()),
        Variant::Init(init) => format!("d=C·H·W, {} init", init.name()),
    };
    vec![
        r.row.method.title().to_string(),
        embedding,
        fmt_mean_se(agg.test),
        fmt_opt(paper_test(&r.row), 2),
        fmt_mean_se(agg.train),
        fmt_opt(paper_train(&r.row), 2),
        fmt_mean_se(agg.deterministic),
        epochs_cell(&agg, paper_epochs(r.row.method, r.row.dataset)),
        r.runs_cell(&agg),
        agg.train_seconds.map_or("—".into(), fmt_duration),
    ]
}

/// `table1.md`: for each data set, every row's test and train accuracy
/// beside the paper's, then the ablation runs, then notes on missing rows
/// and on what a quick run changed.
pub fn table1_markdown(ctx: &Context, results: &[RowResult]) -> String {
    let mut out = String::from("# Table 1: test accuracy (%)\n\n");
    let _ = writeln!(
        out,
        "Written by `cargo xtask reproduce{}` on device `{}`. Ours: mean ± standard error over all \
         stochastic inference runs of all finished seeds pooled ({} seed{} × `eval.runs` runs, \
         at the last epoch); train accuracy and deterministic inference (eps = 0): mean ± s.e. over \
         seeds. Paper: Li, Teh, Pascanu (2025), Table 1, 3 seeds × 5 runs; train accuracy only for \
         NoProp-DT one-hot. Epochs: what the runs did / what the paper trained for.\n",
        if ctx.quick { " --quick" } else { "" },
        ctx.device,
        ctx.seeds,
        if ctx.seeds == 1 { "" } else { "s" }
    );
    if ctx.quick {
        out.push_str(
            "**This is a quick smoke run, not a reproduction**: MNIST only, one seed, a subset of the data \
             and a few epochs (settings per row below); compare it with the paper's numbers only as a \
             sign of life.\n\n",
        );
    }
    let mut notes = vec![];
    for ds in Dataset::ALL {
        let table: Vec<&RowResult> = results
            .iter()
            .filter(|r| r.row.dataset == ds && r.row.variant == Variant::Table1)
            .collect();
        if table.is_empty() {
            continue;
        }
        let _ = writeln!(out, "## {}\n", ds.title());
        out.push_str(&markdown(
            &T1_HEADER,
            &T1_RIGHT,
            &table.iter().map(|r| t1_cells(r)).collect::<Vec<_>>(),
        ));
        let ablation: Vec<&RowResult> = results
            .iter()
            .filter(|r| r.row.dataset == ds && r.row.variant != Variant::Table1)
            .collect();
        if !ablation.is_empty() {
            let _ = writeln!(
                out,
                "\nAblation runs (Figures 4 and 5), NoProp-DT, {}:\n",
                ds.title()
            );
            out.push_str(&markdown(
                &T1_HEADER,
                &T1_RIGHT,
                &ablation.iter().map(|r| t1_cells(r)).collect::<Vec<_>>(),
            ));
        }
        out.push('\n');
        for r in table.iter().chain(&ablation) {
            if let Some(n) = &r.note {
                notes.push(format!("- `{}`: {n}", r.row.name()));
            }
        }
    }
    if !notes.is_empty() {
        out.push_str("## Rows without results\n\n");
        out.push_str(&notes.join("\n"));
        out.push_str("\n\n");
    }
    if ctx.quick {
        out.push_str("## Quick settings\n\n");
        let mut seen: Vec<String> = vec![];
        for r in results {
            if let Some(s) = &r.settings {
                if !seen.contains(s) {
                    seen.push(s.clone());
                }
            }
        }
        for s in seen {
            let rows: Vec<String> = results
                .iter()
                .filter(|r| r.settings.as_ref() == Some(&s))
                .map(|r| format!("`{}`", r.row.name()))
                .collect();
            let _ = writeln!(out, "- {s}: {}", rows.join(", "));
        }
        out.push('\n');
    }
    out
}

/// `table1.csv`: one line per row, every number of `table1.md` unformatted.
pub fn table1_csv(results: &[RowResult]) -> String {
    let header = [
        "row",
        "dataset",
        "method",
        "embedding",
        "variant",
        "seeds",
        "stochastic_runs",
        "epochs_min",
        "epochs_max",
        "paper_epochs",
        "test_mean",
        "test_se",
        "paper_test",
        "train_mean",
        "train_se",
        "paper_train",
        "deterministic_mean",
        "deterministic_se",
        "train_seconds_mean",
        "peak_rss_bytes",
    ];
    let num = |v: Option<f64>| v.map_or(String::new(), |x| format!("{x}"));
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            let a = r.aggregate();
            let variant = match r.row.variant {
                Variant::Table1 => "table1".to_string(),
                Variant::Radial => "radial".to_string(),
                Variant::Init(i) => format!("init-{}", i.name()),
            };
            vec![
                r.row.name(),
                r.row.dataset.name().into(),
                r.row.method.name().into(),
                r.row.embedding.name().into(),
                variant,
                r.finished.len().to_string(),
                a.test_runs.to_string(),
                a.epochs.map_or(String::new(), |e| e.0.to_string()),
                a.epochs.map_or(String::new(), |e| e.1.to_string()),
                paper_epochs(r.row.method, r.row.dataset).to_string(),
                num(a.test.map(|t| t.0)),
                num(a.test.and_then(|t| t.1)),
                num(paper_test(&r.row)),
                num(a.train.map(|t| t.0)),
                num(a.train.and_then(|t| t.1)),
                num(paper_train(&r.row)),
                num(a.deterministic.map(|t| t.0)),
                num(a.deterministic.and_then(|t| t.1)),
                num(a.train_seconds),
                a.peak_rss_bytes.map_or(String::new(), |b| b.to_string()),
            ]
        })
        .collect();
    csv(&header, &rows)
}

/// GB with two decimals; `—` for a row without finished runs, `n/a` for
/// runs that do not report memory.
fn gb(r: Option<&RowResult>, bytes: impl Fn(&Aggregate) -> Option<u64>) -> String {
    match r.filter(|r| !r.finished.is_empty()) {
        None => "—".into(),
        Some(r) => bytes(&r.aggregate()).map_or("n/a".into(), |b| format!("{:.2}", b as f64 / 1e9)),
    }
}

/// `table2.md`: peak training memory per method and data set (the one-hot
/// rows, as the paper's table has one number per method), beside the
/// paper's, then every row.
pub fn table2_markdown(ctx: &Context, results: &[RowResult]) -> String {
    let mut out = String::from("# Table 2: peak memory in training (GB)\n\n");
    let _ = writeln!(
        out,
        "Ours: `train_peak_rss_bytes` of the first epoch (the peak resident memory of the `noprop train` \
         process while it trained epoch 1, on device `{}`: host memory, which includes the data set held on \
         the host), the largest over finished seeds; \"n/a\" where the runs do not report it, \"—\" where \
         there is no finished run. The first epoch is used because the figure of a later epoch also counts \
         memory that the previous evaluation left resident; the largest over all epochs is listed per row \
         below. Paper: peak GPU memory in training, Li, Teh, Pascanu (2025), Table 2. 1 GB = 10^9 bytes.{}\n",
        ctx.device,
        if ctx.quick { " A quick run trains on a subset of the data, which shrinks the host memory." } else { "" }
    );
    let datasets: Vec<Dataset> = Dataset::ALL
        .into_iter()
        .filter(|d| results.iter().any(|r| r.row.dataset == *d))
        .collect();
    let mut header = vec!["method".to_string()];
    for d in &datasets {
        header.push(format!("{} (ours)", d.title()));
        header.push(format!("{} (paper)", d.title()));
    }
    let mut rows = vec![];
    for m in Method::ALL {
        let mut cells = vec![m.title().to_string()];
        for d in &datasets {
            let r = results
                .iter()
                .find(|r| r.row == Row::table1(*d, m, Embedding::OneHot));
            cells.push(gb(r, |a| a.first_epoch_rss_bytes));
            cells.push(format!("{:.2}", paper_memory_gb(m, *d)));
        }
        rows.push(cells);
    }
    let header_refs: Vec<&str> = header.iter().map(String::as_str).collect();
    let right: Vec<bool> = (0..header.len()).map(|i| i > 0).collect();
    out.push_str(&markdown(&header_refs, &right, &rows));
    out.push_str("\nEvery row (ours, GB):\n\n");
    let all: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            vec![
                format!("`{}`", r.row.name()),
                gb(Some(r), |a| a.first_epoch_rss_bytes),
                gb(Some(r), |a| a.peak_rss_bytes),
            ]
        })
        .collect();
    out.push_str(&markdown(
        &["row", "epoch 1", "largest over epochs"],
        &[false, true, true],
        &all,
    ));
    out
}

/// `table2.csv`: every row's peak memory in bytes, with the paper's per-method GB.
pub fn table2_csv(results: &[RowResult]) -> String {
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            vec![
                r.row.name(),
                r.row.dataset.name().into(),
                r.row.method.name().into(),
                r.row.embedding.name().into(),
                r.aggregate()
                    .first_epoch_rss_bytes
                    .map_or(String::new(), |b| b.to_string()),
                r.aggregate()
                    .peak_rss_bytes
                    .map_or(String::new(), |b| b.to_string()),
                format!("{}", paper_memory_gb(r.row.method, r.row.dataset)),
            ]
        })
        .collect();
    csv(
        &[
            "row",
            "dataset",
            "method",
            "embedding",
            "epoch1_peak_rss_bytes",
            "max_peak_rss_bytes",
            "paper_gpu_gb",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::super::runs::summarise;
    use super::*;

    fn run(accs: &[f64], train: f64, epochs: usize, rss: Option<u64>) -> Summary {
        let mut text = String::new();
        for e in 1..=epochs {
            let runs: Vec<String> = accs.iter().map(|a| a.to_string()).collect();
            text.push_str(&format!(
                "{{\"event\":\"eval\",\"epoch\":{e},\"test_acc\":{},\"test_acc_runs\":[{}],\"test_acc_deterministic\":{},\"train_acc\":{train},\"train_seconds\":{}}}\n",
                accs.iter().sum::<f64>() / accs.len() as f64,
                runs.join(","),
                accs[0],
                e as f64 * 10.0
            ));
            let rss = rss.map_or(String::new(), |b| format!(",\"train_peak_rss_bytes\":{b}"));
            text.push_str(&format!(
                "{{\"event\":\"epoch\",\"epoch\":{e},\"train_seconds\":{}{rss}}}\n",
                e as f64 * 10.0
            ));
        }
        summarise(&text)
    }

    fn result(row: Row, finished: Vec<(u64, Summary)>) -> RowResult {
        RowResult {
            row,
            seeds_wanted: 3,
            finished,
            unfinished: 0,
            note: None,
            settings: None,
        }
    }

    #[test]
    fn mean_and_standard_error() {
        assert_eq!(mean_se(&[]), None);
        assert_eq!(mean_se(&[2.0]), Some((2.0, None)));
        let (m, se) = mean_se(&[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert!((m - 2.5).abs() < 1e-12);
        // sd = sqrt(5/3), se = sd / 2.
        assert!((se.unwrap() - (5.0f64 / 3.0).sqrt() / 2.0).abs() < 1e-12);
        assert_eq!(fmt_mean_se(Some((99.123, Some(0.0456)))), "99.12 ± 0.05");
        assert_eq!(fmt_mean_se(Some((99.0, None))), "99.00");
        assert_eq!(fmt_mean_se(None), "—");
    }

    #[test]
    fn pooled_over_seeds_and_runs() {
        let row = Row::table1(Dataset::Mnist, Method::Dt, Embedding::OneHot);
        let r = result(
            row,
            vec![
                (0, run(&[99.0, 99.2], 99.5, 2, Some(5))),
                (1, run(&[99.4, 99.6], 99.7, 2, Some(7))),
            ],
        );
        let a = r.aggregate();
        let (m, se) = a.test.unwrap();
        assert!((m - 99.3).abs() < 1e-9);
        let expect = mean_se(&[99.0, 99.2, 99.4, 99.6]).unwrap().1.unwrap();
        assert!((se.unwrap() - expect).abs() < 1e-12);
        assert_eq!(a.test_runs, 4);
        assert!((a.train.unwrap().0 - 99.6).abs() < 1e-9);
        assert_eq!(a.epochs, Some((2, 2)));
        assert_eq!(a.peak_rss_bytes, Some(7));
        assert_eq!(a.train_seconds, Some(20.0));
        let cells = t1_cells(&r);
        assert_eq!(cells[2], "99.30 ± 0.13");
        assert_eq!(cells[3], "99.47");
        assert_eq!(cells[5], "99.92");
        assert_eq!(cells[7], "2 / 100");
        assert_eq!(cells[8], "2 of 3 × 2");
        assert_eq!(cells[9], "20s");
    }

    #[test]
    fn table1_lists_rows_notes_and_paper_numbers() {
        let ok = result(
            Row::table1(Dataset::Mnist, Method::Fm, Embedding::Dim20),
            vec![(0, run(&[97.0, 98.0], 98.0, 3, None))],
        );
        let mut missing = result(
            Row::table1(Dataset::Mnist, Method::Backprop, Embedding::OneHot),
            vec![],
        );
        missing.note = Some("configs/mnist-backprop-onehot.toml does not exist yet".into());
        let ablation = result(
            Row {
                dataset: Dataset::Mnist,
                method: Method::Dt,
                embedding: Embedding::Dim20,
                variant: Variant::Radial,
            },
            vec![],
        );
        let ctx = Context {
            quick: true,
            device: "cpu".into(),
            seeds: 1,
        };
        let md = table1_markdown(&ctx, &[missing, ok, ablation]);
        assert!(md.contains("## MNIST"));
        assert!(!md.contains("## CIFAR-10"));
        assert!(
            md.contains("| NoProp-FM | dim=20 | 97.50 ± 0.50 | 99.29 |"),
            "{md}"
        );
        assert!(md.contains("| Backprop | one-hot | — | 99.46 |"), "{md}");
        assert!(md.contains("does not exist yet"));
        assert!(md.contains("| NoProp-DT | dim=20, radial | — |"), "{md}");
        assert!(md.contains("quick smoke run"));
        // Every table line has the same number of cells as the header.
        for line in md.lines().filter(|l| l.starts_with("| ")) {
            assert_eq!(line.matches(" | ").count(), T1_HEADER.len() - 1, "{line}");
        }
        let csv = table1_csv(&[result(
            Row::table1(Dataset::Mnist, Method::Dt, Embedding::OneHot),
            vec![(0, run(&[99.0], 99.0, 1, Some(123)))],
        )]);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].split(',').count(), lines[1].split(',').count());
        assert!(
            lines[1].starts_with("mnist-dt-onehot,mnist,dt,onehot,table1,1,1,1,1,100,99,"),
            "{}",
            lines[1]
        );
    }

    #[test]
    fn table2_prints_na_without_memory() {
        let with = result(
            Row::table1(Dataset::Mnist, Method::Dt, Embedding::OneHot),
            vec![(0, run(&[99.0], 99.0, 1, Some(1_234_000_000)))],
        );
        let without = result(
            Row::table1(Dataset::Mnist, Method::Ct, Embedding::OneHot),
            vec![(0, run(&[97.0], 97.0, 1, None))],
        );
        let not_run = result(
            Row::table1(Dataset::Mnist, Method::Fm, Embedding::OneHot),
            vec![],
        );
        let md = table2_markdown(
            &Context {
                quick: false,
                device: "cuda".into(),
                seeds: 3,
            },
            &[with, without, not_run],
        );
        assert!(md.contains("| NoProp-DT | 1.23 | 0.49 |"), "{md}");
        assert!(md.contains("| NoProp-CT | n/a | 1.05 |"), "{md}");
        assert!(md.contains("| NoProp-FM | — | 1.06 |"), "{md}");
        assert!(md.contains("| Adjoint | — | 2.32 |"), "{md}");
        assert!(md.contains("| `mnist-dt-onehot` | 1.23 | 1.23 |"), "{md}");
        assert!(!md.contains("CIFAR"));
    }

    #[test]
    fn table2_uses_the_first_epoch() {
        // Epoch 1 at 1 GB, epoch 2 (after an evaluation) at 1 GB + 2 GB.
        let text = "{\"event\":\"epoch\",\"epoch\":1,\"train_peak_rss_bytes\":1000000000}\n\
                    {\"event\":\"epoch\",\"epoch\":2,\"train_peak_rss_bytes\":3000000000}\n";
        let r = result(
            Row::table1(Dataset::Mnist, Method::Dt, Embedding::OneHot),
            vec![(0, summarise(text))],
        );
        let md = table2_markdown(
            &Context {
                quick: true,
                device: "cpu".into(),
                seeds: 1,
            },
            &[r],
        );
        assert!(md.contains("| NoProp-DT | 1.00 | 0.49 |"), "{md}");
        assert!(md.contains("| `mnist-dt-onehot` | 1.00 | 3.00 |"), "{md}");
    }

    #[test]
    fn csv_quotes_what_needs_it() {
        let s = csv(
            &["a", "b"],
            &[
                vec!["x,y".into(), "say \"hi\"".into()],
                vec!["plain".into(), "".into()],
            ],
        );
        assert_eq!(s, "a,b\n\"x,y\",\"say \"\"hi\"\"\"\nplain,\n");
    }

    #[test]
    fn markdown_escapes_pipes() {
        let s = markdown(
            &["a", "b"],
            &[false, true],
            &[vec!["p(y|z)".into(), "1".into()]],
        );
        assert_eq!(s, "| a | b |\n| --- | ---: |\n| p(y\\|z) | 1 |\n");
    }

    #[test]
    fn durations() {
        assert_eq!(fmt_duration(44.6), "45s");
        assert_eq!(fmt_duration(192.0), "3m12s");
        assert_eq!(fmt_duration(7500.0), "2h05m");
    }
}
