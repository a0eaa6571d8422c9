//! Every shipped config parses, validates, and trains a few steps on
//! synthetic data of its data set's shape (CIFAR ones included, although
//! no CIFAR copy is needed for this).

use candle_core::{DType, Device};
use noprop_core::NoiseRng;
use noprop_data::Dataset;
use noprop_train::config::{
    AdjointParams, BackpropParams, CtParams, DtParams, FmParams, RawMethod,
};
use noprop_train::{build_trainer, fit, DeviceData, RawConfig, RunData, Silent};

fn synthetic(n: usize, (c, h, w): (usize, usize, usize), classes: usize, seed: u64) -> Dataset {
    let mut images = vec![0f32; n * c * h * w];
    NoiseRng::new(seed).fill_normal(&mut images);
    let labels = (0..n as u32).map(|i| i % classes as u32).collect();
    Dataset {
        images,
        labels,
        channels: c,
        height: h,
        width: w,
        num_classes: classes,
    }
}

#[test]
fn every_config_validates_and_trains_a_few_steps() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    names.sort();
    // 3 data sets x (DT, CT, FM, backprop x 3 embeddings + adjoint one-hot).
    assert_eq!(names.len(), 39, "one config per Table 1 row and data set");
    let dev = Device::Cpu;
    for path in names {
        let text = std::fs::read_to_string(&path).unwrap();
        let mut cfg: RawConfig =
            toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        cfg.clone()
            .validate()
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // Shrink it to a few steps.
        let kind = cfg.data.dataset;
        // Prototypes need an image of every class.
        let n = kind.num_classes().max(8);
        cfg.train.epochs = 1;
        cfg.train.batch_size = n / 2;
        match &mut cfg.method {
            RawMethod::Dt(DtParams { blocks, .. })
            | RawMethod::Backprop(BackpropParams { blocks, .. }) => *blocks = (*blocks).min(2),
            RawMethod::Ct(CtParams { steps, .. }) | RawMethod::Fm(FmParams { steps, .. }) => {
                *steps = 2
            }
            RawMethod::Adjoint(AdjointParams {
                train_steps, steps, ..
            }) => (*train_steps, *steps) = (2, 2),
        }
        cfg.eval.runs = 1;
        cfg.eval.batch_size = 8;
        cfg.eval.train_subset = 0;
        let train = synthetic(n, kind.shape(), kind.num_classes(), 1);
        let test = synthetic(8, kind.shape(), kind.num_classes(), 2);
        let mut trainer =
            build_trainer(cfg.validate().unwrap(), dev.clone(), Some(&train)).unwrap();
        let data = RunData {
            train: DeviceData::new(&train, DType::F32, &dev).unwrap(),
            test: DeviceData::new(&test, DType::F32, &dev).unwrap(),
            train_subset: None,
        };
        let report = fit(&mut trainer, &data, None, &mut Silent)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .unwrap();
        assert!(
            (0.0..=100.0).contains(&report.test_acc),
            "{}",
            path.display()
        );
    }
}
