//! Fast CPU kernels for NoProp's convolutional blocks (work in progress).

#[cfg(feature = "wip")]
mod conv;
#[cfg(feature = "wip")]
mod elem;
