//! Reading NoProp run folders: what a run's `metrics.jsonl` says, its
//! learning curve, the paper's Tables 1 and 2 beside a set of runs, and
//! the figures (SVG, with the `svg` feature, on by default).
//!
//! The crate reads the files `noprop train` writes and never writes into a
//! run folder; it links neither candle nor the trainer, so the reproduction
//! driver (`cargo xtask`) and `noprop plot` share it at no cost. The
//! paper's numbers are `data/paper.toml`, read once.
//!
//! ```
//! use noprop_report::{curve, mean_se};
//!
//! let metrics = r#"{"event":"pass","epoch":1,"block":0,"loss":2.0,"ce":1.0,"kl":0.0,"denoise":1.0}
//! {"event":"eval","epoch":1,"test_acc":97.0,"test_acc_runs":[96.0,98.0]}
//! {"event":"epoch","epoch":1,"epoch_seconds":3.0,"train_seconds":3.0}
//! "#;
//! let points = curve::epochs(metrics);
//! assert_eq!(points.len(), 1);
//! assert_eq!(points[0].eval.as_ref().map(|e| e.test_acc), Some(97.0));
//! assert_eq!(mean_se(&[96.0, 98.0]), Some((97.0, Some(1.0))));
//! ```

pub mod curve;
#[cfg(feature = "svg")]
pub mod figures;
#[cfg(feature = "svg")]
pub mod plot;
pub mod rows;
pub mod runs;
pub mod table;

pub use table::mean_se;

/// A file of a report (a table or a figure), to be written into a folder.
pub struct Output {
    pub name: String,
    pub contents: String,
}
