//! The rows of the reproduction: every Table 1 configuration, plus the
//! ablation runs behind Figures 4 and 5, in the order they are run.

/// A data set of the paper, as noprop-data's catalogue knows it.
pub use noprop_data::DatasetKind as Dataset;

/// A training method of Table 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PaperMethod {
    Backprop,
    Dt,
    Adjoint,
    Ct,
    Fm,
}

impl PaperMethod {
    /// Table 1's order: the discrete-time rows, then the continuous-time ones.
    pub const ALL: [PaperMethod; 5] = [
        PaperMethod::Backprop,
        PaperMethod::Dt,
        PaperMethod::Adjoint,
        PaperMethod::Ct,
        PaperMethod::Fm,
    ];

    /// The name used in config file names (and in `method.kind`).
    pub fn name(self) -> &'static str {
        match self {
            PaperMethod::Backprop => "backprop",
            PaperMethod::Dt => "dt",
            PaperMethod::Adjoint => "adjoint",
            PaperMethod::Ct => "ct",
            PaperMethod::Fm => "fm",
        }
    }

    /// The name printed in tables and figures.
    pub fn title(self) -> &'static str {
        match self {
            PaperMethod::Backprop => "Backprop",
            PaperMethod::Dt => "NoProp-DT",
            PaperMethod::Adjoint => "Adjoint",
            PaperMethod::Ct => "NoProp-CT",
            PaperMethod::Fm => "NoProp-FM",
        }
    }

    /// The embeddings Table 1 reports for this method.
    pub fn embeddings(self) -> &'static [Embedding] {
        match self {
            PaperMethod::Adjoint => &[Embedding::OneHot],
            PaperMethod::Backprop | PaperMethod::Dt | PaperMethod::Ct | PaperMethod::Fm => {
                &Embedding::ALL
            }
        }
    }

    /// Whether inference integrates over continuous time (`method.steps` applies).
    pub fn continuous(self) -> bool {
        matches!(
            self,
            PaperMethod::Adjoint | PaperMethod::Ct | PaperMethod::Fm
        )
    }
}

/// A class embedding of Table 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Embedding {
    OneHot,
    Dim20,
    Prototype,
}

impl Embedding {
    pub const ALL: [Embedding; 3] = [Embedding::OneHot, Embedding::Dim20, Embedding::Prototype];

    /// The name used in config file names.
    pub fn name(self) -> &'static str {
        match self {
            Embedding::OneHot => "onehot",
            Embedding::Dim20 => "dim20",
            Embedding::Prototype => "prototype",
        }
    }

    /// The name printed in tables (the paper's column heads).
    pub fn title(self) -> &'static str {
        match self {
            Embedding::OneHot => "one-hot",
            Embedding::Dim20 => "dim=20",
            Embedding::Prototype => "prototype",
        }
    }
}

/// An initialisation of a learned `W_embed` with `d = C*H*W` (Figure 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Init {
    Orthogonal,
    Normal,
}

impl Init {
    /// The value of `model.embedding.init`.
    pub fn name(self) -> &'static str {
        match self {
            Init::Orthogonal => "orthogonal",
            Init::Normal => "normal",
        }
    }
}

/// What a row is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Variant {
    /// A Table 1 configuration as it stands in `configs/`.
    Table1,
    /// Figure 4: the same configuration with radial class probabilities
    /// (its softmax counterpart is the Table 1 row).
    Radial,
    /// Figure 5: the prototype row (a learned `W_embed` with `d = C*H*W`)
    /// with this `model.embedding.init` instead of the prototype images
    /// (the prototype initialisation is the Table 1 row itself).
    Init(Init),
}

/// The width of the radial class probabilities in the Figure 4 ablation
/// (the paper does not give it; the spec's default).
pub const RADIAL_SIGMA: f64 = 1.0;

/// One configuration that is trained with every seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Row {
    pub dataset: Dataset,
    pub method: PaperMethod,
    pub embedding: Embedding,
    pub variant: Variant,
}

impl Row {
    pub fn table1(dataset: Dataset, method: PaperMethod, embedding: Embedding) -> Self {
        Self {
            dataset,
            method,
            embedding,
            variant: Variant::Table1,
        }
    }

    /// The row's name: `mnist-dt-onehot`, `mnist-dt-dim20-radial`,
    /// `mnist-dt-init-normal`. Run folders and generated configs are named
    /// after it.
    pub fn name(&self) -> String {
        let (ds, m) = (self.dataset.name(), self.method.name());
        match self.variant {
            Variant::Table1 => format!("{ds}-{m}-{}", self.embedding.name()),
            Variant::Radial => format!("{ds}-{m}-{}-radial", self.embedding.name()),
            Variant::Init(init) => format!("{ds}-{m}-init-{}", init.name()),
        }
    }

    /// The stem of the file in `configs/` this row's config is derived from.
    pub fn base_config(&self) -> String {
        format!(
            "{}-{}-{}",
            self.dataset.name(),
            self.method.name(),
            self.embedding.name()
        )
    }

    /// Whether `z` has the image's dimension, so that it runs through a
    /// second copy of the image path (the expensive rows).
    pub fn image_sized(&self) -> bool {
        self.embedding == Embedding::Prototype
    }
}

/// The ablation rows of Figures 4 and 5 for one data set. Both ablate
/// NoProp-DT, the paper's main method: Figure 4 compares radial with softmax
/// class probabilities for each embedding; Figure 5 compares the
/// initialisations of a learned `W_embed` with `d = C*H*W`, the only size
/// at which all three (orthogonal, normal, prototype) exist.
fn ablation_rows(dataset: Dataset, quick: bool) -> Vec<Row> {
    // A quick run keeps one radial row, the learned dim=20 embedding (where
    // radial probabilities measure distances between learned embeddings).
    let radial: &[Embedding] = if quick {
        &[Embedding::Dim20]
    } else {
        &Embedding::ALL
    };
    let mut rows: Vec<Row> = radial
        .iter()
        .map(|&embedding| Row {
            dataset,
            method: PaperMethod::Dt,
            embedding,
            variant: Variant::Radial,
        })
        .collect();
    for init in [Init::Orthogonal, Init::Normal] {
        rows.push(Row {
            dataset,
            method: PaperMethod::Dt,
            embedding: Embedding::Prototype,
            variant: Variant::Init(init),
        });
    }
    rows
}

/// Every row, in the order they are run: for each data set, Table 1 in the
/// paper's order, then the ablations. A quick run covers MNIST only.
pub fn all_rows(quick: bool) -> Vec<Row> {
    let datasets: &[Dataset] = if quick {
        &[Dataset::Mnist]
    } else {
        &Dataset::ALL
    };
    let mut rows = vec![];
    for &dataset in datasets {
        for method in PaperMethod::ALL {
            for &embedding in method.embeddings() {
                rows.push(Row::table1(dataset, method, embedding));
            }
        }
        rows.extend(ablation_rows(dataset, quick));
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(rows: &[Row]) -> Vec<String> {
        rows.iter().map(Row::name).collect()
    }

    #[test]
    fn table1_has_every_method_embedding_and_dataset() {
        let rows: Vec<Row> = all_rows(false)
            .into_iter()
            .filter(|r| r.variant == Variant::Table1)
            .collect();
        // (3 + 3 + 1 + 3 + 3) rows per data set.
        assert_eq!(rows.len(), 39);
        assert!(names(&rows).contains(&"cifar100-adjoint-onehot".to_string()));
        assert!(!names(&rows).contains(&"mnist-adjoint-dim20".to_string()));
        assert_eq!(rows[0].name(), "mnist-backprop-onehot");
    }

    #[test]
    fn quick_is_mnist_only() {
        let rows = all_rows(true);
        assert!(rows.iter().all(|r| r.dataset == Dataset::Mnist));
        assert_eq!(
            rows.iter().filter(|r| r.variant == Variant::Table1).count(),
            13
        );
        assert!(names(&rows).contains(&"mnist-dt-init-normal".to_string()));
        assert_eq!(rows.len(), 13 + 1 + 2);
    }
}
