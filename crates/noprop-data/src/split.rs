//! The two splits every supported data set comes in.
//!
//! This is a leaf module: the catalog, the format readers and the dispatcher
//! all name a split, so it must not depend on any of them.

use std::fmt;
use std::str::FromStr;

use crate::error::DataError;

/// The training or the test part of a data set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Split {
    /// The training examples (60,000 for MNIST, 50,000 for CIFAR).
    Train,
    /// The test examples (10,000 for each data set).
    Test,
}

impl Split {
    /// Both splits, training first.
    pub const ALL: [Split; 2] = [Split::Train, Split::Test];
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Split::Train => "train",
            Split::Test => "test",
        })
    }
}

impl FromStr for Split {
    type Err = DataError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "train" => Ok(Split::Train),
            "test" => Ok(Split::Test),
            _ => Err(DataError::UnknownSplit { name: s.to_owned() }),
        }
    }
}
