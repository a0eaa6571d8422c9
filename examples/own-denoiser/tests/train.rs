//! Short training runs of the example: each variant must learn the blobs.
//!
//! With 4 classes chance is 25% and the best possible accuracy about 97%;
//! each run must reach 70%, far above anything an untrained network or a
//! sign error in a loss term would give.

use noprop_core_example::{train_ct, train_dt, train_fm, Config};

fn short() -> Config {
    Config {
        steps: 150,
        test_size: 500,
        ..Config::default()
    }
}

#[test]
fn dt_learns_the_blobs() {
    let report = train_dt(&short(), 5).unwrap();
    eprintln!("{report:?}");
    assert!(report.stochastic > 0.7, "{report:?}");
    assert!(report.deterministic > 0.7, "{report:?}");
}

#[test]
fn ct_learns_the_blobs() {
    let report = train_ct(&short()).unwrap();
    eprintln!("{report:?}");
    assert!(report.eq3 > 0.7, "{report:?}");
    assert!(report.ode > 0.7, "{report:?}");
}

#[test]
fn fm_learns_the_blobs() {
    let accuracy = train_fm(&short()).unwrap();
    eprintln!("FM accuracy {accuracy}");
    assert!(accuracy > 0.7, "{accuracy}");
}

/// An untrained network must not pass the same bar, or the tests above
/// would prove nothing.
#[test]
fn untrained_networks_stay_near_chance() {
    let cfg = Config {
        steps: 0,
        test_size: 500,
        ..Config::default()
    };
    let dt = train_dt(&cfg, 5).unwrap();
    let fm = train_fm(&cfg).unwrap();
    assert!(dt.stochastic < 0.7 && fm < 0.7, "{dt:?} {fm}");
}
