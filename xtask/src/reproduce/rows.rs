//! How `--only` selects rows, and how each run's effective configuration is
//! derived from the config file in `configs/`.

use anyhow::{bail, Context, Result};
use toml::{Table, Value};

pub use noprop_report::rows::*;

/// Whether `name` matches the glob `pattern` (`*` any run of characters,
/// `?` one character) as a whole.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    // Iterative matching with one backtrack point for the last `*`.
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Whether the dash-separated words of `pattern` occur, in order and
/// adjacent, among the words of `name` (`dt-onehot` in `mnist-dt-onehot`).
fn words_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<&str>, Vec<&str>) = (pattern.split('-').collect(), name.split('-').collect());
    !p.is_empty() && n.windows(p.len()).any(|w| w == p.as_slice())
}

/// The rows that `--only` selects, in their run order.
///
/// Each pattern (several may be given, or joined by commas) is a glob over
/// row names when it holds `*` or `?`. Without wildcards it selects the row
/// of exactly that name, or, when there is none, every row that contains it
/// as whole dash-separated words: `mnist`, `dt-onehot`, `radial`, `init`.
/// A pattern that selects nothing is an error naming the rows there are.
pub fn select(rows: &[Row], patterns: &[String]) -> Result<Vec<Row>> {
    let patterns: Vec<&str> = patterns
        .iter()
        .flat_map(|p| p.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    if patterns.is_empty() {
        return Ok(rows.to_vec());
    }
    let names: Vec<String> = rows.iter().map(Row::name).collect();
    let mut keep = vec![false; rows.len()];
    for pat in patterns {
        let hits: Vec<usize> = if pat.contains(['*', '?']) {
            (0..rows.len())
                .filter(|&i| glob_match(pat, &names[i]))
                .collect()
        } else if let Some(i) = names.iter().position(|n| n == pat) {
            vec![i]
        } else {
            (0..rows.len())
                .filter(|&i| words_match(pat, &names[i]))
                .collect()
        };
        if hits.is_empty() {
            bail!(
                "--only {pat:?} matches no row; the rows are: {}",
                names.join(", ")
            );
        }
        for i in hits {
            keep[i] = true;
        }
    }
    Ok(rows
        .iter()
        .zip(keep)
        .filter(|(_, k)| *k)
        .map(|(r, _)| *r)
        .collect())
}

/// The reduced settings of a `--quick` run, chosen so that the MNIST rows
/// with one seed finish in about half an hour on two CPU cores (see
/// docs/reproducing.md). Every value is written into the run's config, and
/// the tables state them.
#[derive(Debug, Clone, PartialEq)]
pub struct Quick {
    /// Epochs (the paper: 100 for DT, CT, FM and backprop on MNIST, 2 for adjoint).
    pub epochs: usize,
    /// Training images (the first N of the training set).
    pub train_limit: usize,
    /// Test images (the first N).
    pub test_limit: usize,
    /// Training images on which train accuracy is measured.
    pub train_subset: usize,
    /// Evaluate every N epochs (and after the last).
    pub eval_every: usize,
    /// CT/FM/adjoint: inference integration steps (the paper: 1000).
    pub eval_steps: Option<usize>,
    /// Adjoint: training solver steps (the paper: 1000).
    pub ode_steps: Option<usize>,
}

/// Training images of a quick run: 16 minibatches of 128.
pub const QUICK_TRAIN: usize = 2048;
/// Test images of a quick run (and the train-accuracy subset).
pub const QUICK_TEST: usize = 1000;
/// Test images of a quick run with an image-sized embedding, whose
/// evaluation costs about ten times as much per image.
pub const QUICK_TEST_IMAGE_SIZED: usize = 500;

impl Quick {
    pub fn for_row(row: &Row) -> Self {
        let epochs = match row.method {
            PaperMethod::Dt | PaperMethod::Backprop | PaperMethod::Adjoint => 2,
            // One network for all t: about a tenth of a DT epoch, so more
            // epochs give Figure 3 a curve.
            PaperMethod::Ct | PaperMethod::Fm => 6,
        };
        let test = if row.image_sized() {
            QUICK_TEST_IMAGE_SIZED
        } else {
            QUICK_TEST
        };
        Quick {
            epochs,
            train_limit: QUICK_TRAIN,
            test_limit: test,
            train_subset: test,
            // Evaluating an image-sized embedding runs a second image path
            // for every stochastic run and integration step: only at the end.
            eval_every: if row.image_sized() { epochs } else { 1 },
            eval_steps: row.method.continuous().then_some(20),
            ode_steps: (row.method == PaperMethod::Adjoint).then_some(20),
        }
    }

    /// One line for the tables: what a quick run changed.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "{} epochs, first {} training / {} test images, train accuracy on {} images",
            self.epochs, self.train_limit, self.test_limit, self.train_subset
        );
        if self.eval_every >= self.epochs && self.epochs > 1 {
            s.push_str(", evaluated after the last epoch only");
        }
        if let Some(n) = self.eval_steps {
            s.push_str(&format!(", {n} inference steps"));
        }
        if let Some(n) = self.ode_steps {
            s.push_str(&format!(", {n} training solver steps"));
        }
        s
    }
}

/// The largest evaluation batch for rows with an image-sized embedding on
/// the CPU: evaluation stacks all 5 + 1 inference runs into one batch and
/// sends each through the second image path, so a batch of 1000 needs more
/// than 20 GB of memory (measured), 100 about 3.5 GB.
pub const CPU_IMAGE_SIZED_EVAL_BATCH: i64 = 100;

fn table_mut<'a>(t: &'a mut Table, key: &str) -> Result<&'a mut Table> {
    t.entry(key.to_string())
        .or_insert_with(|| Value::Table(Table::new()))
        .as_table_mut()
        .with_context(|| format!("[{key}] is not a table"))
}

fn set(t: &mut Table, section: &str, key: &str, v: impl Into<Value>) -> Result<()> {
    table_mut(t, section)?.insert(key.to_string(), v.into());
    Ok(())
}

fn int(n: usize) -> Value {
    Value::Integer(i64::try_from(n).unwrap_or(i64::MAX))
}

/// The configuration a run of `row` with `seed` trains with: the config file's
/// table with the seed, the row's variant, and (with `quick`) the reduced
/// settings written in. `device` is `cpu`, `cuda` or `metal`.
pub fn effective_config(
    base: &Table,
    row: &Row,
    seed: u64,
    quick: bool,
    device: &str,
) -> Result<Table> {
    let mut t = base.clone();
    set(
        &mut t,
        "train",
        "seed",
        Value::Integer(i64::try_from(seed).context("seed too large")?),
    )?;
    match row.variant {
        Variant::Table1 => {}
        Variant::Radial => {
            let mut cp = Table::new();
            cp.insert("kind".into(), "radial".into());
            cp.insert("sigma".into(), RADIAL_SIGMA.into());
            set(&mut t, "model", "class_probability", Value::Table(cp))?;
        }
        Variant::Init(init) => {
            // The prototype row's config (a learned `d = C*H*W` embedding)
            // with another initialisation.
            let model = table_mut(&mut t, "model")?;
            let embedding = model
                .entry("embedding".to_string())
                .or_insert_with(|| Value::Table(Table::new()));
            let embedding = embedding
                .as_table_mut()
                .context("model.embedding is not a table")?;
            embedding.insert("kind".into(), "prototype".into());
            embedding.insert("init".into(), init.name().into());
        }
    }
    if quick {
        let q = Quick::for_row(row);
        set(&mut t, "train", "epochs", int(q.epochs))?;
        set(&mut t, "data", "train_limit", int(q.train_limit))?;
        set(&mut t, "data", "test_limit", int(q.test_limit))?;
        set(&mut t, "eval", "train_subset", int(q.train_subset))?;
        set(&mut t, "eval", "every", int(q.eval_every))?;
        if let Some(n) = q.eval_steps {
            set(&mut t, "method", "steps", int(n))?;
        }
        if let Some(n) = q.ode_steps {
            set(&mut t, "method", "train_steps", int(n))?;
        }
    }
    if device == "cpu" && row.image_sized() {
        let eval = table_mut(&mut t, "eval")?;
        let current = eval
            .get("batch_size")
            .and_then(Value::as_integer)
            .unwrap_or(1000);
        eval.insert(
            "batch_size".into(),
            Value::Integer(current.min(CPU_IMAGE_SIZED_EVAL_BATCH)),
        );
    }
    Ok(t)
}

/// The number of epochs a config asks for.
pub fn config_epochs(t: &Table) -> Result<usize> {
    t.get("train")
        .and_then(|v| v.get("epochs"))
        .and_then(Value::as_integer)
        .and_then(|e| usize::try_from(e).ok())
        .context("the config has no train.epochs")
}

/// The workers a run of `config` trains on when `--workers k` is asked:
/// NoProp-DT splits its blocks (at most one worker per block) with a
/// one-hot embedding (the default), or any embedding with `order =
/// "synchronous"`; `None` for a run that cannot be split.
pub fn split_workers(config: &Table, k: usize) -> Option<usize> {
    let get = |section: &str, key: &str| config.get(section)?.get(key).cloned();
    let text = |v: Option<Value>, default: &str| {
        v.and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_else(|| default.to_string())
    };
    let embedding = config
        .get("model")
        .and_then(|m| m.get("embedding"))
        .and_then(|e| e.get("kind"))
        .cloned();
    let splits = text(embedding, "one-hot") == "one-hot"
        || text(get("method", "order"), "sequential") == "synchronous";
    if get("method", "kind")?.as_str() != Some("dt") || !splits || k < 2 {
        return None;
    }
    let blocks = get("method", "blocks")
        .and_then(|b| b.as_integer())
        .map_or(10, |b| b.max(1) as usize);
    Some(k.min(blocks))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(rows: &[Row]) -> Vec<String> {
        rows.iter().map(Row::name).collect()
    }

    #[test]
    fn glob() {
        assert!(glob_match("mnist-*", "mnist-dt-onehot"));
        assert!(glob_match("*-onehot", "cifar10-fm-onehot"));
        assert!(glob_match("*dt*", "mnist-dt-onehot"));
        assert!(glob_match("mnist-?t-onehot", "mnist-ct-onehot"));
        assert!(!glob_match("mnist-?t-onehot", "mnist-adjoint-onehot"));
        assert!(!glob_match("mnist-*", "cifar10-dt-onehot"));
        assert!(glob_match("*", ""));
        assert!(!glob_match("a*b", "acbd"));
        assert!(glob_match("a*b*", "acbd"));
    }

    #[test]
    fn exact_name_selects_one_row() {
        let rows = all_rows(false);
        let got = select(&rows, &["mnist-dt-onehot".into()]).unwrap();
        assert_eq!(names(&got), ["mnist-dt-onehot"]);
    }

    #[test]
    fn words_select_a_family() {
        let rows = all_rows(false);
        let got = select(&rows, &["mnist".into()]).unwrap();
        assert!(!got.is_empty() && got.iter().all(|r| r.dataset == Dataset::Mnist));
        // `cifar10` is a whole word: it does not pick up CIFAR-100.
        let got = select(&rows, &["cifar10".into()]).unwrap();
        assert!(got.iter().all(|r| r.dataset == Dataset::Cifar10));
        let got = select(&rows, &["dt-onehot".into()]).unwrap();
        assert_eq!(
            names(&got),
            [
                "mnist-dt-onehot",
                "mnist-dt-onehot-radial",
                "cifar10-dt-onehot",
                "cifar10-dt-onehot-radial",
                "cifar100-dt-onehot",
                "cifar100-dt-onehot-radial"
            ]
        );
    }

    #[test]
    fn several_patterns_keep_run_order_without_duplicates() {
        let rows = all_rows(false);
        let got = select(
            &rows,
            &[
                "mnist-fm-onehot, mnist-dt-onehot".into(),
                "mnist-dt-onehot".into(),
            ],
        )
        .unwrap();
        assert_eq!(names(&got), ["mnist-dt-onehot", "mnist-fm-onehot"]);
        // A glob reaches the ablation row too, which runs after Table 1's rows.
        let got = select(&rows, &["mnist-fm-onehot".into(), "mnist-dt-o*".into()]).unwrap();
        assert_eq!(
            names(&got),
            [
                "mnist-dt-onehot",
                "mnist-fm-onehot",
                "mnist-dt-onehot-radial"
            ]
        );
    }

    #[test]
    fn unknown_pattern_is_an_error() {
        let rows = all_rows(true);
        let err = select(&rows, &["svhn".into()]).unwrap_err().to_string();
        assert!(
            err.contains("svhn") && err.contains("mnist-dt-onehot"),
            "{err}"
        );
        assert_eq!(select(&rows, &[]).unwrap().len(), rows.len());
    }

    fn base() -> Table {
        toml::from_str(
            "[data]\ndataset = \"mnist\"\n[model]\nembedding = { kind = \"prototype\" }\n[method]\nkind = \"dt\"\n\
             [train]\nepochs = 100\nseed = 0\n[eval]\nruns = 5\nbatch_size = 1000\n",
        )
        .unwrap()
    }

    #[test]
    fn effective_config_full() {
        let row = Row::table1(Dataset::Mnist, PaperMethod::Dt, Embedding::OneHot);
        let t = effective_config(&base(), &row, 2, false, "cuda").unwrap();
        assert_eq!(t["train"]["seed"].as_integer(), Some(2));
        assert_eq!(config_epochs(&t).unwrap(), 100);
        assert_eq!(t["eval"]["batch_size"].as_integer(), Some(1000));
        assert!(t["data"].get("train_limit").is_none());
    }

    #[test]
    fn effective_config_quick_and_variants() {
        let row = Row {
            dataset: Dataset::Mnist,
            method: PaperMethod::Dt,
            embedding: Embedding::Prototype,
            variant: Variant::Init(Init::Normal),
        };
        let t = effective_config(&base(), &row, 0, true, "cpu").unwrap();
        assert_eq!(t["model"]["embedding"]["kind"].as_str(), Some("prototype"));
        assert_eq!(t["model"]["embedding"]["init"].as_str(), Some("normal"));
        assert_eq!(config_epochs(&t).unwrap(), 2);
        assert_eq!(
            t["data"]["train_limit"].as_integer(),
            Some(QUICK_TRAIN as i64)
        );
        assert_eq!(t["eval"]["every"].as_integer(), Some(2));
        assert_eq!(
            t["eval"]["batch_size"].as_integer(),
            Some(CPU_IMAGE_SIZED_EVAL_BATCH)
        );
        assert_eq!(
            t["data"]["test_limit"].as_integer(),
            Some(QUICK_TEST_IMAGE_SIZED as i64)
        );
        assert!(t["method"].get("steps").is_none());

        let row = Row {
            dataset: Dataset::Mnist,
            method: PaperMethod::Dt,
            embedding: Embedding::Dim20,
            variant: Variant::Radial,
        };
        let t = effective_config(&base(), &row, 0, false, "cpu").unwrap();
        assert_eq!(
            t["model"]["class_probability"]["kind"].as_str(),
            Some("radial")
        );
        assert_eq!(
            t["model"]["class_probability"]["sigma"].as_float(),
            Some(RADIAL_SIGMA)
        );

        let row = Row::table1(Dataset::Mnist, PaperMethod::Adjoint, Embedding::OneHot);
        let t = effective_config(&base(), &row, 0, true, "cpu").unwrap();
        assert_eq!(t["method"]["train_steps"].as_integer(), Some(20));
        assert_eq!(t["method"]["steps"].as_integer(), Some(20));
        // The written TOML reads back to the same table.
        let text = toml::to_string(&t).unwrap();
        assert_eq!(toml::from_str::<Table>(&text).unwrap(), t);
    }

    #[test]
    fn only_dt_one_hot_runs_split_their_blocks() {
        let cfg = |text: &str| -> Table { text.parse().unwrap() };
        let dt = cfg(
            "[method]\nkind = \"dt\"\nblocks = 10\n[model]\nembedding = { kind = \"one-hot\" }\n",
        );
        assert_eq!(split_workers(&dt, 4), Some(4));
        assert_eq!(split_workers(&dt, 40), Some(10));
        assert_eq!(split_workers(&dt, 1), None);
        let learned =
            cfg("[method]\nkind = \"dt\"\n[model]\nembedding = { kind = \"learned\", dim = 20 }\n");
        assert_eq!(split_workers(&learned, 4), None);
        let synchronous = cfg("[method]\nkind = \"dt\"\norder = \"synchronous\"\n[model]\nembedding = { kind = \"learned\", dim = 20 }\n");
        assert_eq!(split_workers(&synchronous, 4), Some(4));
        assert_eq!(split_workers(&cfg("[method]\nkind = \"dt\"\n"), 3), Some(3));
        let fm = cfg("[method]\nkind = \"fm\"\n[model]\nembedding = { kind = \"one-hot\" }\n");
        assert_eq!(split_workers(&fm, 4), None);
    }
}
