//! Tables 1 and 2 as Markdown and CSV: our numbers, aggregated over seeds,
//! beside the paper's (spec section 12).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::OnceLock;

use crate::rows::{Dataset, Embedding, PaperMethod, Row, Variant};
use crate::runs::{Eval, Summary};

/// The paper's numbers (Tables 1-3), as `data/paper.toml` states them.
struct Paper {
    test: BTreeMap<String, f64>,
    train: BTreeMap<String, f64>,
    memory_gb: BTreeMap<String, f64>,
    epochs: BTreeMap<String, usize>,
}

fn paper() -> &'static Paper {
    static PAPER: OnceLock<Paper> = OnceLock::new();
    PAPER.get_or_init(|| {
        let t: toml::Table = include_str!("../data/paper.toml")
            .parse()
            .expect("xtask/data/paper.toml is TOML");
        let section = |name: &str| -> BTreeMap<String, f64> {
            t[name]
                .as_table()
                .expect("a table")
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v.as_float()
                            .or(v.as_integer().map(|i| i as f64))
                            .expect("a number"),
                    )
                })
                .collect()
        };
        Paper {
            test: section("test"),
            train: section("train"),
            memory_gb: section("memory_gb"),
            epochs: section("epochs")
                .into_iter()
                .map(|(k, v)| (k, v as usize))
                .collect(),
        }
    })
}

/// `<dataset>-<method>`, the key of Tables 2 and 3.
fn method_key(method: PaperMethod, dataset: Dataset) -> String {
    format!("{}-{}", dataset.name(), method.name())
}

/// The paper's Table 1 test accuracy of a row, if it has one.
pub fn paper_test(row: &Row) -> Option<f64> {
    (row.variant == Variant::Table1)
        .then(|| paper().test.get(&row.name()).copied())
        .flatten()
}

/// The paper's train accuracy of a row, if it gives one.
pub fn paper_train(row: &Row) -> Option<f64> {
    (row.variant == Variant::Table1)
        .then(|| paper().train.get(&row.name()).copied())
        .flatten()
}

/// The paper's Table 2 peak memory of a method on a data set, in GB.
pub fn paper_memory_gb(method: PaperMethod, dataset: Dataset) -> f64 {
    paper()
        .memory_gb
        .get(&method_key(method, dataset))
        .copied()
        .unwrap_or(f64::NAN)
}

/// The epochs the paper trains for (Table 3 / spec sections 4, 8, 10).
pub fn paper_epochs(method: PaperMethod, dataset: Dataset) -> usize {
    paper()
        .epochs
        .get(&method_key(method, dataset))
        .copied()
        .unwrap_or(0)
}

/// Mean and standard error (the sample standard deviation over `sqrt(n)`)
/// of `xs`; the error is `None` for fewer than two values. The trainer's
/// evaluation reports its `test_acc_se` with this function, so the tables
/// aggregate exactly as a run records.
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
    Some((mean, Some(var.sqrt() / n.sqrt())))
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
    /// Started but unfinished runs, one per seed: their summaries so far.
    /// Table 1 shows their latest evaluations, marked as such, while the
    /// row has no finished run.
    pub unfinished: Vec<Summary>,
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
    /// Largest peak GPU memory over seeds and epochs, in bytes (CUDA runs).
    pub peak_device_bytes: Option<u64>,
    /// Largest peak GPU memory of epoch 1 over seeds, in bytes.
    pub first_epoch_device_bytes: Option<u64>,
}

/// One seed's part in a row's numbers.
struct SeedPoint<'a> {
    summary: &'a Summary,
    /// The evaluation reported; `None` adds the seed's epochs, time and
    /// memory only.
    eval: Option<&'a Eval>,
    epochs: usize,
    train_seconds: Option<f64>,
}

/// Means and standard errors over seeds: test accuracy over all stochastic
/// runs of all seeds pooled, the rest one value per seed.
fn aggregate_seeds(points: &[SeedPoint]) -> Aggregate {
    let evals: Vec<&Eval> = points.iter().filter_map(|p| p.eval).collect();
    let pooled: Vec<f64> = evals
        .iter()
        .flat_map(|e| {
            if e.test_acc_runs.is_empty() {
                vec![e.test_acc]
            } else {
                e.test_acc_runs.clone()
            }
        })
        .collect();
    let per_seed =
        |f: fn(&Eval) -> Option<f64>| -> Vec<f64> { evals.iter().filter_map(|e| f(e)).collect() };
    let largest = |f: fn(&Summary) -> Option<u64>| points.iter().filter_map(|p| f(p.summary)).max();
    let epochs = points.iter().map(|p| p.epochs);
    let secs: Vec<f64> = points.iter().filter_map(|p| p.train_seconds).collect();
    Aggregate {
        test: mean_se(&pooled),
        test_runs: pooled.len(),
        train: mean_se(&per_seed(|e| e.train_acc)),
        deterministic: mean_se(&per_seed(|e| e.test_acc_deterministic)),
        epochs: epochs.clone().min().zip(epochs.max()),
        train_seconds: (!secs.is_empty()).then(|| secs.iter().sum::<f64>() / secs.len() as f64),
        peak_rss_bytes: largest(|s| s.peak_rss_bytes),
        first_epoch_rss_bytes: largest(|s| s.first_epoch_rss_bytes),
        peak_device_bytes: largest(|s| s.peak_device_bytes),
        first_epoch_device_bytes: largest(|s| s.first_epoch_device_bytes),
    }
}

/// What Table 1 shows of a row.
#[derive(Debug, Clone, PartialEq)]
pub struct Shown {
    pub agg: Aggregate,
    /// Whether `agg` comes from finished runs; if not, it comes from the
    /// latest evaluation of each unfinished run (or there is nothing).
    pub finished: bool,
    /// Seeds behind `agg`.
    pub seeds: usize,
}

impl Shown {
    /// Whether the row's numbers are unfinished runs' latest evaluations.
    fn partial(&self) -> bool {
        !self.finished && self.seeds > 0
    }
}

impl RowResult {
    /// Means and standard errors over the finished seeds' last evaluations.
    pub fn aggregate(&self) -> Aggregate {
        let points: Vec<SeedPoint> = self
            .finished
            .iter()
            .map(|(_, s)| SeedPoint {
                summary: s,
                eval: s.final_eval(),
                epochs: s.epochs_done,
                train_seconds: s.train_seconds,
            })
            .collect();
        aggregate_seeds(&points)
    }

    /// The row's numbers for Table 1: its finished runs as [`aggregate`]
    /// has them; without any, the latest evaluation of each of its
    /// `unfinished` runs that has one, with the epochs and training time
    /// up to it.
    ///
    /// [`aggregate`]: RowResult::aggregate
    pub fn shown(&self) -> Shown {
        if !self.finished.is_empty() {
            return Shown {
                agg: self.aggregate(),
                finished: true,
                seeds: self.finished.len(),
            };
        }
        let points: Vec<SeedPoint> = self
            .unfinished
            .iter()
            .filter_map(|s| {
                let e = s.latest_eval()?;
                Some(SeedPoint {
                    summary: s,
                    eval: Some(e),
                    epochs: e.epoch,
                    train_seconds: e.train_seconds,
                })
            })
            .collect();
        Shown {
            agg: aggregate_seeds(&points),
            finished: false,
            seeds: points.len(),
        }
    }

    /// `3 × 5`, or `2 × 5 (1 unfinished)`, or what is missing; for
    /// unfinished runs' numbers `2 of 3 × 5 (unfinished)`, saying how many
    /// more have no evaluation yet.
    fn runs_cell(&self, shown: &Shown) -> String {
        let seeds = shown.seeds;
        let mut s = if seeds == 0 {
            format!("0 of {}", self.seeds_wanted)
        } else {
            let per = shown.agg.test_runs / seeds.max(1);
            if seeds < self.seeds_wanted {
                format!("{seeds} of {} × {per}", self.seeds_wanted)
            } else {
                format!("{seeds} × {per}")
            }
        };
        if shown.partial() {
            match self.unfinished.len().saturating_sub(seeds) {
                0 => s.push_str(" (unfinished)"),
                n => {
                    let _ = write!(s, " (unfinished; {n} more not evaluated yet)");
                }
            }
        } else if !self.unfinished.is_empty() {
            let _ = write!(s, " ({} unfinished)", self.unfinished.len());
        }
        s
    }
}

/// `5 / 100`, `3–5 / 100`; `5 / 100 (unfinished)` for unfinished runs.
fn epochs_cell(shown: &Shown, paper: usize) -> String {
    let mut s = match shown.agg.epochs {
        None => format!("— / {paper}"),
        Some((a, b)) if a == b => format!("{a} / {paper}"),
        Some((a, b)) => format!("{a}–{b} / {paper}"),
    };
    if shown.partial() {
        s.push_str(" (unfinished)");
    }
    s
}

/// The mark on numbers of unfinished runs.
const UNFINISHED_MARK: &str = "*";
/// The footnote under a table with marked numbers (the `*` escaped, as a
/// line starting with `* ` is a Markdown list item).
const UNFINISHED_NOTE: &str =
    "\\* Unfinished runs: the latest evaluation, after the epochs shown, and the \
     training time up to it; not a final figure.\n";

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
    let shown = r.shown();
    let agg = &shown.agg;
    // Marks a number of unfinished runs; `—` stays as it is.
    let mark = |s: String| {
        if shown.partial() && s != "—" {
            s + UNFINISHED_MARK
        } else {
            s
        }
    };
    let embedding = match r.row.variant {
        Variant::Table1 => r.row.embedding.title().to_string(),
        Variant::Radial => format!("{}, radial", r.row.embedding.title()),
        Variant::Init(init) => format!("d=C·H·W, {} init", init.name()),
    };
    vec![
        r.row.method.title().to_string(),
        embedding,
        mark(fmt_mean_se(agg.test)),
        fmt_opt(paper_test(&r.row), 2),
        mark(fmt_mean_se(agg.train)),
        fmt_opt(paper_train(&r.row), 2),
        mark(fmt_mean_se(agg.deterministic)),
        epochs_cell(&shown, paper_epochs(r.row.method, r.row.dataset)),
        r.runs_cell(&shown),
        mark(agg.train_seconds.map_or("—".into(), fmt_duration)),
    ]
}

/// One Markdown table of Table 1 rows, with the footnote on unfinished
/// runs under it if it shows any.
fn t1_markdown(rows: &[&RowResult]) -> String {
    let mut out = markdown(
        &T1_HEADER,
        &T1_RIGHT,
        &rows.iter().map(|r| t1_cells(r)).collect::<Vec<_>>(),
    );
    if rows.iter().any(|r| r.shown().partial()) {
        out.push('\n');
        out.push_str(UNFINISHED_NOTE);
    }
    out
}

/// `table1.md`: for each data set, every row's test and train accuracy
/// beside the paper's, then the ablation runs, then notes on missing rows
/// and on what a quick run changed. A row without finished runs shows its
/// `unfinished` runs' latest evaluations, marked, with a footnote.
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
        out.push_str(&t1_markdown(&table));
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
            out.push_str(&t1_markdown(&ablation));
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

/// `table1.csv`: one line per row, every number of `table1.md` unformatted;
/// `finished` is false where the numbers are unfinished runs' latest
/// evaluations (or there are none).
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
        "finished",
    ];
    let num = |v: Option<f64>| v.map_or(String::new(), |x| format!("{x}"));
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            let shown = r.shown();
            let a = &shown.agg;
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
                shown.seeds.to_string(),
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
                shown.finished.to_string(),
            ]
        })
        .collect();
    csv(&header, &rows)
}

/// Which memory a Table 2 figure is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Memory {
    /// `train_peak_device_bytes`: GPU memory in use, what the paper measured.
    Gpu,
    /// `train_peak_rss_bytes`: the `noprop train` process's resident memory.
    HostRss,
}

impl Memory {
    fn label(self) -> &'static str {
        match self {
            Memory::Gpu => "GPU",
            Memory::HostRss => "host RSS",
        }
    }
}

impl Aggregate {
    /// Table 2's figures of a row: peak GPU memory where its runs report
    /// it, else the process's peak RSS; (which, epoch 1, largest over epochs).
    fn memory(&self) -> (Memory, Option<u64>, Option<u64>) {
        if self.peak_device_bytes.is_some() || self.first_epoch_device_bytes.is_some() {
            (
                Memory::Gpu,
                self.first_epoch_device_bytes,
                self.peak_device_bytes,
            )
        } else {
            (
                Memory::HostRss,
                self.first_epoch_rss_bytes,
                self.peak_rss_bytes,
            )
        }
    }
}

/// A row's Table 2 figure (epoch 1, or with `largest` the largest over
/// epochs): `None` without finished runs, else which memory it is and the
/// bytes, if reported.
fn memory_of(r: Option<&RowResult>, largest: bool) -> Option<(Memory, Option<u64>)> {
    let r = r.filter(|r| !r.finished.is_empty())?;
    let (kind, first, max) = r.aggregate().memory();
    Some((kind, if largest { max } else { first }))
}

/// GB with two decimals, followed by `(GPU)` or `(host RSS)` with `label`;
/// `—` for a row without finished runs, `n/a` for runs that do not report
/// memory.
fn gb(m: Option<(Memory, Option<u64>)>, label: bool) -> String {
    match m {
        None => "—".into(),
        Some((_, None)) => "n/a".into(),
        Some((kind, Some(b))) if label => format!("{:.2} ({})", b as f64 / 1e9, kind.label()),
        Some((_, Some(b))) => format!("{:.2}", b as f64 / 1e9),
    }
}

/// `table2.md`: peak training memory per method and data set (the one-hot
/// rows, as the paper's table has one number per method), beside the
/// paper's, then every row. GPU memory where the runs report it, the
/// process's RSS otherwise; a column's header says which, or each figure
/// does where a column has both.
pub fn table2_markdown(ctx: &Context, results: &[RowResult]) -> String {
    let mut out = String::from("# Table 2: peak memory in training (GB)\n\n");
    let _ = writeln!(
        out,
        "Ours: the peak memory while training epoch 1 (on device `{}`), the largest over finished seeds. \
         Where the runs report it (CUDA), `train_peak_device_bytes`: GPU memory in use (the driver's total \
         minus free, so the CUDA context and candle's allocator pool count), which is what the paper \
         measured, so only these figures compare like for like. Otherwise `train_peak_rss_bytes`: the peak \
         resident memory of the `noprop train` process (host memory, which includes the data set held on \
         the host). A column's header says which (GPU or host RSS), or each figure does where a column has \
         both; \"n/a\" where the runs report neither, \"—\" where there is no finished run. The first epoch \
         is used because the figure of a later epoch also counts memory that the previous evaluation left \
         behind; the largest over all epochs is listed per row below. Paper: peak GPU memory in training, \
         Li, Teh, Pascanu (2025), Table 2. 1 GB = 10^9 bytes.{}\n",
        ctx.device,
        if ctx.quick { " A quick run trains on a subset of the data, which shrinks the host memory." } else { "" }
    );
    let datasets: Vec<Dataset> = Dataset::ALL
        .into_iter()
        .filter(|d| results.iter().any(|r| r.row.dataset == *d))
        .collect();
    // Per data set, each method's one-hot figure and the one kind they all
    // are, if they are one.
    let columns: Vec<_> = datasets
        .iter()
        .map(|d| {
            let cells: Vec<_> = PaperMethod::ALL
                .into_iter()
                .map(|m| {
                    let r = results
                        .iter()
                        .find(|r| r.row == Row::table1(*d, m, Embedding::OneHot));
                    memory_of(r, false)
                })
                .collect();
            let mut kinds = cells
                .iter()
                .filter_map(|c| c.filter(|(_, b)| b.is_some()).map(|(k, _)| k));
            let first = kinds.next();
            let one = first.filter(|k| kinds.all(|x| x == *k));
            (cells, one)
        })
        .collect();
    let mut header = vec!["method".to_string()];
    for (d, (cells, one)) in datasets.iter().zip(&columns) {
        let mixed = one.is_none() && cells.iter().any(|c| matches!(c, Some((_, Some(_)))));
        header.push(match (one, mixed) {
            (Some(k), _) => format!("{} (ours, {})", d.title(), k.label()),
            (None, true) => format!("{} (ours, GPU or host RSS)", d.title()),
            (None, false) => format!("{} (ours)", d.title()),
        });
        header.push(format!("{} (paper, GPU)", d.title()));
    }
    let mut rows = vec![];
    for (i, m) in PaperMethod::ALL.into_iter().enumerate() {
        let mut cells = vec![m.title().to_string()];
        for (d, (col, one)) in datasets.iter().zip(&columns) {
            cells.push(gb(col[i], one.is_none()));
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
            let first = memory_of(Some(r), false);
            vec![
                format!("`{}`", r.row.name()),
                first.map_or("—".into(), |(k, _)| k.label().to_string()),
                gb(first, false),
                gb(memory_of(Some(r), true), false),
            ]
        })
        .collect();
    out.push_str(&markdown(
        &["row", "memory", "epoch 1", "largest over epochs"],
        &[false, false, true, true],
        &all,
    ));
    out
}

/// `table2.csv`: every row's peak memory in bytes (process RSS, and GPU
/// memory where reported), with the paper's per-method GB.
pub fn table2_csv(results: &[RowResult]) -> String {
    let bytes = |b: Option<u64>| b.map_or(String::new(), |b| b.to_string());
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            let a = r.aggregate();
            vec![
                r.row.name(),
                r.row.dataset.name().into(),
                r.row.method.name().into(),
                r.row.embedding.name().into(),
                bytes(a.first_epoch_rss_bytes),
                bytes(a.peak_rss_bytes),
                format!("{}", paper_memory_gb(r.row.method, r.row.dataset)),
                bytes(a.first_epoch_device_bytes),
                bytes(a.peak_device_bytes),
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
            "epoch1_peak_device_bytes",
            "max_peak_device_bytes",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runs::summarise;

    /// The data file names every Table 1 row, method and data set, and nothing else.
    #[test]
    fn the_paper_file_covers_every_row() {
        let rows = super::super::rows::all_rows(false);
        let table1: Vec<&Row> = rows
            .iter()
            .filter(|r| r.variant == Variant::Table1)
            .collect();
        assert_eq!(paper().test.len(), table1.len());
        for r in &table1 {
            assert!(paper_test(r).is_some(), "{}", r.name());
            assert!(paper_epochs(r.method, r.dataset) > 0, "{}", r.name());
            assert!(
                paper_memory_gb(r.method, r.dataset).is_finite(),
                "{}",
                r.name()
            );
        }
        assert_eq!(paper().train.len(), 3);
        assert_eq!(paper().memory_gb.len(), 15);
        assert_eq!(paper().epochs.len(), 15);
    }

    /// The summary of a run with `epochs` evaluated epochs, each scoring
    /// `accs` on its stochastic test runs and `train` on the training set,
    /// 10 s apart, with `rss` bytes of peak memory if given.
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

    /// The summary of a started run: one epoch done in 10 s, no evaluation yet.
    fn not_evaluated() -> Summary {
        summarise("{\"event\":\"epoch\",\"epoch\":1,\"train_seconds\":10.0}\n")
    }

    /// The summary of a run whose epochs report memory only: per epoch, the
    /// peak host RSS and, for a CUDA run, the peak GPU memory, in bytes.
    fn memory(epochs: &[(u64, Option<u64>)]) -> Summary {
        let mut text = String::new();
        for (e, (rss, device)) in (1..).zip(epochs) {
            let device = device.map_or(String::new(), |b| {
                format!(",\"train_peak_device_bytes\":{b}")
            });
            text.push_str(&format!(
                "{{\"event\":\"epoch\",\"epoch\":{e},\"train_peak_rss_bytes\":{rss}{device}}}\n"
            ));
        }
        summarise(&text)
    }

    /// Table 1's MNIST row of `method` with the one-hot embedding.
    fn mnist(method: PaperMethod) -> Row {
        Row::table1(Dataset::Mnist, method, Embedding::OneHot)
    }

    /// A row's result with three seeds wanted and no runs yet; a test adds
    /// the runs it needs with the `with_*` methods below.
    fn result(row: Row) -> RowResult {
        RowResult {
            row,
            seeds_wanted: 3,
            finished: vec![],
            unfinished: vec![],
            note: None,
            settings: None,
        }
    }

    impl RowResult {
        /// Adds a finished run as the next seed (0, 1, ...).
        fn with_finished(mut self, s: Summary) -> Self {
            self.finished.push((self.finished.len() as u64, s));
            self
        }

        /// Adds a started but unfinished run.
        fn with_unfinished(mut self, s: Summary) -> Self {
            self.unfinished.push(s);
            self
        }
    }

    /// How the tests' tables are made unless a test says otherwise: a full
    /// reproduction on the CPU with three seeds.
    fn ctx() -> Context {
        Context {
            quick: false,
            device: "cpu".into(),
            seeds: 3,
        }
    }

    /// Table 1 of `r` alone, made as [`ctx`] says: the Markdown and the
    /// CSV row.
    fn table1(r: &RowResult) -> (String, Vec<(String, String)>) {
        let rs = std::slice::from_ref(r);
        (table1_markdown(&ctx(), rs), csv_row(&table1_csv(rs)))
    }

    /// The cells of the row in a CSV document with a header line, by column name.
    fn csv_row(csv: &str) -> Vec<(String, String)> {
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines.len(), 2, "{csv}");
        lines[0]
            .split(',')
            .map(String::from)
            .zip(lines[1].split(',').map(String::from))
            .collect()
    }

    fn cell<'a>(row: &'a [(String, String)], name: &str) -> &'a str {
        &row.iter().find(|(h, _)| h == name).unwrap().1
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
        let r = result(mnist(PaperMethod::Dt))
            .with_finished(run(&[99.0, 99.2], 99.5, 2, Some(5)))
            .with_finished(run(&[99.4, 99.6], 99.7, 2, Some(7)));
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
        let ok = result(Row::table1(
            Dataset::Mnist,
            PaperMethod::Fm,
            Embedding::Dim20,
        ))
        .with_finished(run(&[97.0, 98.0], 98.0, 3, None));
        let mut missing = result(mnist(PaperMethod::Backprop));
        missing.note = Some("configs/mnist-backprop-onehot.toml does not exist yet".into());
        let ablation = result(Row {
            dataset: Dataset::Mnist,
            method: PaperMethod::Dt,
            embedding: Embedding::Dim20,
            variant: Variant::Radial,
        });
        let quick = Context {
            quick: true,
            seeds: 1,
            ..ctx()
        };
        let md = table1_markdown(&quick, &[missing, ok, ablation]);
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
        let csv = table1_csv(&[result(mnist(PaperMethod::Dt)).with_finished(run(
            &[99.0],
            99.0,
            1,
            Some(123),
        ))]);
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
        let with = result(mnist(PaperMethod::Dt)).with_finished(run(
            &[99.0],
            99.0,
            1,
            Some(1_234_000_000),
        ));
        let without = result(mnist(PaperMethod::Ct)).with_finished(run(&[97.0], 97.0, 1, None));
        let not_run = result(mnist(PaperMethod::Fm));
        let cuda = Context {
            device: "cuda".into(),
            ..ctx()
        };
        let md = table2_markdown(&cuda, &[with, without, not_run]);
        assert!(md.contains("| NoProp-DT | 1.23 | 0.49 |"), "{md}");
        assert!(md.contains("| NoProp-CT | n/a | 1.05 |"), "{md}");
        assert!(md.contains("| NoProp-FM | — | 1.06 |"), "{md}");
        assert!(md.contains("| Adjoint | — | 2.32 |"), "{md}");
        assert!(
            md.contains("| `mnist-dt-onehot` | host RSS | 1.23 | 1.23 |"),
            "{md}"
        );
        assert!(md.contains("| `mnist-fm-onehot` | — | — | — |"), "{md}");
        assert!(
            md.contains("| method | MNIST (ours, host RSS) | MNIST (paper, GPU) |"),
            "{md}"
        );
        assert!(!md.contains("CIFAR"));
    }

    #[test]
    fn table2_uses_the_first_epoch() {
        // Epoch 1 at 1 GB, epoch 2 (after an evaluation) at 1 GB + 2 GB.
        let r = result(mnist(PaperMethod::Dt))
            .with_finished(memory(&[(1_000_000_000, None), (3_000_000_000, None)]));
        let quick = Context {
            quick: true,
            seeds: 1,
            ..ctx()
        };
        let md = table2_markdown(&quick, &[r]);
        assert!(md.contains("| NoProp-DT | 1.00 | 0.49 |"), "{md}");
        assert!(
            md.contains("| `mnist-dt-onehot` | host RSS | 1.00 | 3.00 |"),
            "{md}"
        );
    }

    #[test]
    fn finished_row_is_shown_as_before() {
        let mut r = result(mnist(PaperMethod::Dt))
            .with_finished(run(&[99.0, 99.2], 99.5, 2, None))
            .with_finished(run(&[99.4, 99.6], 99.7, 2, None));
        let cells = t1_cells(&r);
        assert_eq!(
            cells[2..],
            [
                "99.30 ± 0.13",
                "99.47",
                "99.60 ± 0.10",
                "99.92",
                "99.20 ± 0.20",
                "2 / 100",
                "2 of 3 × 2",
                "20s"
            ]
        );
        // With an unfinished seed the numbers stay those of the finished ones.
        r.unfinished.push(run(&[10.0], 10.0, 1, None));
        assert_eq!(r.shown().agg, r.aggregate());
        let mut expect = cells.clone();
        expect[8] = "2 of 3 × 2 (1 unfinished)".into();
        assert_eq!(t1_cells(&r), expect);
        let (md, row) = table1(&r);
        assert!(!md.contains('*'), "{md}");
        assert_eq!(cell(&row, "finished"), "true");
        assert_eq!(cell(&row, "seeds"), "2");
        assert_eq!(
            cell(&row, "test_mean"),
            format!("{}", (99.0 + 99.2 + 99.4 + 99.6) / 4.0)
        );
    }

    #[test]
    fn unfinished_row_shows_latest_evaluations_marked() {
        // Two of three seeds started, evaluated up to epochs 3 and 5 of 100.
        let mut r = result(mnist(PaperMethod::Dt))
            .with_unfinished(run(&[96.0, 97.0], 97.5, 3, Some(100)))
            .with_unfinished(run(&[98.0, 99.0], 98.5, 5, Some(300)));
        let shown = r.shown();
        assert!(!shown.finished && shown.partial());
        assert_eq!((shown.seeds, shown.agg.test_runs), (2, 4));
        assert_eq!(shown.agg.epochs, Some((3, 5)));
        // Training time up to each seed's evaluation: 30 s and 50 s.
        assert_eq!(shown.agg.train_seconds, Some(40.0));
        let cells = t1_cells(&r);
        assert_eq!(
            cells[2..],
            [
                "97.50 ± 0.65*",
                "99.47",
                "98.00 ± 0.50*",
                "99.92",
                "97.00 ± 1.00*",
                "3–5 / 100 (unfinished)",
                "2 of 3 × 2 (unfinished)",
                "40s*"
            ]
        );
        // One seed: `5 / 100 (unfinished)`.
        let one = result(mnist(PaperMethod::Dt)).with_unfinished(r.unfinished[1].clone());
        let cells = t1_cells(&one);
        assert_eq!(
            (cells[2].as_str(), cells[7].as_str()),
            ("98.50 ± 0.50*", "5 / 100 (unfinished)")
        );
        // A started seed without an evaluation yet is said, not counted.
        r.unfinished.push(not_evaluated());
        assert_eq!(
            t1_cells(&r)[8],
            "2 of 3 × 2 (unfinished; 1 more not evaluated yet)"
        );

        let (md, row) = table1(&r);
        assert!(
            md.contains("| NoProp-DT | one-hot | 97.50 ± 0.65* | 99.47 |"),
            "{md}"
        );
        assert!(
            md.contains("\n\n\\* Unfinished runs: the latest evaluation, after the epochs shown"),
            "{md}"
        );
        assert_eq!(cell(&row, "finished"), "false");
        assert_eq!(
            (
                cell(&row, "seeds"),
                cell(&row, "epochs_min"),
                cell(&row, "epochs_max")
            ),
            ("2", "3", "5")
        );
        assert_eq!(cell(&row, "test_mean"), "97.5");
        assert_eq!(cell(&row, "peak_rss_bytes"), "300");
        // A row without unfinished runs shows nothing.
        assert_eq!(result(mnist(PaperMethod::Fm)).shown().seeds, 0);
    }

    #[test]
    fn unfinished_run_without_evaluation_shows_as_before() {
        let r = result(mnist(PaperMethod::Dt)).with_unfinished(not_evaluated());
        let cells = t1_cells(&r);
        assert_eq!(
            cells[2..],
            [
                "—",
                "99.47",
                "—",
                "99.92",
                "—",
                "— / 100",
                "0 of 3 (1 unfinished)",
                "—"
            ]
        );
        let (md, row) = table1(&r);
        assert!(!md.contains('*'), "{md}");
        assert_eq!(
            (cell(&row, "finished"), cell(&row, "test_mean")),
            ("false", "")
        );
    }

    #[test]
    fn table2_prefers_gpu_memory() {
        // A CUDA run: 0.5 GB of GPU memory in epoch 1, 0.6 GB later, beside
        // 2 GB and 3 GB of process RSS.
        let gpu = result(mnist(PaperMethod::Dt)).with_finished(memory(&[
            (2_000_000_000, Some(500_000_000)),
            (3_000_000_000, Some(600_000_000)),
        ]));
        let a = gpu.aggregate();
        assert_eq!(
            (a.first_epoch_device_bytes, a.peak_device_bytes),
            (Some(500_000_000), Some(600_000_000))
        );
        let cuda = Context {
            device: "cuda".into(),
            seeds: 1,
            ..ctx()
        };
        let md = table2_markdown(&cuda, std::slice::from_ref(&gpu));
        assert!(
            md.contains("| method | MNIST (ours, GPU) | MNIST (paper, GPU) |"),
            "{md}"
        );
        assert!(md.contains("| NoProp-DT | 0.50 | 0.49 |"), "{md}");
        assert!(
            md.contains("| `mnist-dt-onehot` | GPU | 0.50 | 0.60 |"),
            "{md}"
        );
        // Beside a CPU run in the same column, each figure says which it is.
        let cpu = result(mnist(PaperMethod::Ct)).with_finished(run(
            &[97.0],
            97.0,
            1,
            Some(1_234_000_000),
        ));
        let md = table2_markdown(&cuda, &[gpu.clone(), cpu]);
        assert!(
            md.contains("| method | MNIST (ours, GPU or host RSS) |"),
            "{md}"
        );
        assert!(md.contains("| NoProp-DT | 0.50 (GPU) | 0.49 |"), "{md}");
        assert!(
            md.contains("| NoProp-CT | 1.23 (host RSS) | 1.05 |"),
            "{md}"
        );
        assert!(
            md.contains("| `mnist-ct-onehot` | host RSS | 1.23 | 1.23 |"),
            "{md}"
        );
        let row = csv_row(&table2_csv(&[gpu]));
        assert_eq!(
            (
                cell(&row, "epoch1_peak_device_bytes"),
                cell(&row, "max_peak_device_bytes")
            ),
            ("500000000", "600000000")
        );
        assert_eq!(cell(&row, "epoch1_peak_rss_bytes"), "2000000000");
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
