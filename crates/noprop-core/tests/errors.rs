//! Out-of-range and ill-typed input to the public API returns this crate's
//! error, never a panic or a silently wrong value; and the error converts into
//! candle's so that `?` works inside a user's `Denoiser`.

use std::cell::Cell;

use candle_core::{DType, Device, Tensor};
use noprop_core::*;
use proptest::prelude::*;

fn cosine(t_max: usize) -> DiscreteSchedule {
    DiscreteSchedule::cosine(t_max, 0.008, 1.0 - 1e-4).unwrap()
}

proptest! {
    #[test]
    fn schedule_lookups_are_checked(t_max in 1usize..20, t in 0usize..40) {
        let sched = cosine(t_max);
        let block = (1..=t_max).contains(&t);
        match sched.coefficients(t) {
            Ok(_) => prop_assert!(block),
            Err(CoreError::BlockOutOfRange { t: got, blocks }) => {
                prop_assert!(!block);
                prop_assert_eq!((got, blocks), (t, t_max));
            }
            Err(e) => prop_assert!(false, "unexpected error {e}"),
        }
        match sched.dt_weight(t, 0.1) {
            Ok(w) => prop_assert!(block && w > 0.0),
            Err(CoreError::BlockOutOfRange { t: got, blocks }) => {
                prop_assert!(!block);
                prop_assert_eq!((got, blocks), (t, t_max));
            }
            Err(e) => prop_assert!(false, "unexpected error {e}"),
        }
        for result in [sched.alpha_bar(t), sched.snr(t)] {
            match result {
                Ok(_) => prop_assert!(t <= t_max),
                Err(CoreError::TimeOutOfRange { t: got, blocks }) => {
                    prop_assert!(t > t_max);
                    prop_assert_eq!((got, blocks), (t, t_max));
                }
                Err(e) => prop_assert!(false, "unexpected error {e}"),
            }
        }
        match sched.alpha(t) {
            Ok(a) => prop_assert!(t < t_max && a >= 0.0),
            Err(CoreError::AlphaOutOfRange { t: got, blocks }) => {
                prop_assert!(t >= t_max);
                prop_assert_eq!((got, blocks), (t, t_max));
            }
            Err(e) => prop_assert!(false, "unexpected error {e}"),
        }
        prop_assert_eq!(sched.check_block(t).is_ok(), block);
    }

    #[test]
    fn uniform_rejects_empty_and_non_finite_ranges(lo in -10.0f64..10.0, width in -10.0f64..0.0) {
        let mut rng = NoiseRng::new(0);
        // `lo + width <= lo`: an empty range, on which rand itself would panic.
        prop_assert!(rng.uniform(&[3], lo, lo + width, DType::F32, &Device::Cpu).is_err());
        prop_assert!(rng.uniform(&[3], lo, lo, DType::F32, &Device::Cpu).is_err());
        prop_assert!(rng.uniform(&[3], f64::NAN, lo, DType::F32, &Device::Cpu).is_err());
        prop_assert!(rng.uniform(&[3], lo, f64::INFINITY, DType::F32, &Device::Cpu).is_err());
        prop_assert!(rng.uniform(&[3], lo, lo + 1.0, DType::F32, &Device::Cpu).is_ok());
    }

    #[test]
    fn coefficients_between_checks_its_domain(s in -1.0f64..2.0, t in -1.0f64..2.0) {
        let valid = (0.0..1.0).contains(&t) && (0.0..=t).contains(&s);
        match coefficients_between(s, t) {
            Ok(k) => {
                prop_assert!(valid);
                prop_assert!(k.a.is_finite() && k.b.is_finite() && k.c >= 0.0);
            }
            Err(CoreError::BadArgument { .. }) => prop_assert!(!valid),
            Err(e) => prop_assert!(false, "unexpected error {e}"),
        }
    }
}

#[test]
fn the_reported_cases_are_errors_not_panics() {
    let sched = cosine(10);
    assert!(matches!(
        sched.coefficients(11),
        Err(CoreError::BlockOutOfRange { t: 11, blocks: 10 })
    ));
    assert!(matches!(
        sched.dt_weight(0, 0.1),
        Err(CoreError::BlockOutOfRange { t: 0, blocks: 10 })
    ));
    // `t + 1` would overflow here; the lookup must not.
    assert!(matches!(
        sched.alpha(usize::MAX),
        Err(CoreError::AlphaOutOfRange { .. })
    ));
    let u = Tensor::eye(3, DType::F32, &Device::Cpu).unwrap();
    for t in [0, 11] {
        assert!(matches!(
            dt_step(&sched, t, &u, &u, None),
            Err(CoreError::BlockOutOfRange { blocks: 10, .. })
        ));
    }
}

#[test]
fn bad_scalars_are_errors() {
    let dev = Device::Cpu;
    let u = Tensor::eye(3, DType::F32, &dev).unwrap();
    let mut rng = NoiseRng::new(0);
    for abar in [-0.1, 1.5, f64::NAN] {
        assert!(matches!(
            q_sample(&u, abar, &mut rng),
            Err(CoreError::BadArgument { name: "abar", .. })
        ));
        assert!(matches!(
            q_sample_with(&u, abar, &u),
            Err(CoreError::BadArgument { name: "abar", .. })
        ));
    }
    for abar0 in [1.0, -0.5, f64::NAN] {
        assert!(matches!(
            kl_prior(&u, abar0),
            Err(CoreError::BadArgument { name: "abar0", .. })
        ));
    }
    for weight in [-1.0, f64::NAN, f64::INFINITY] {
        assert!(matches!(
            denoise_loss(&u, &u, weight),
            Err(CoreError::BadArgument { name: "weight", .. })
        ));
    }
    let snr = Tensor::ones(3, DType::F32, &dev).unwrap();
    assert!(matches!(
        ct_denoise_loss(&u, &u, &snr, -1.0),
        Err(CoreError::BadArgument { name: "eta", .. })
    ));
    let negative_variance = Eq3Coefficients {
        a: 1.0,
        b: 0.0,
        c: -0.5,
    };
    assert!(matches!(
        eq3_update(negative_variance, &u, &u, None),
        Err(CoreError::BadArgument { name: "c", .. })
    ));
    let nan = Eq3Coefficients {
        a: f64::NAN,
        b: 0.0,
        c: 0.5,
    };
    assert!(matches!(
        eq3_update(nan, &u, &u, None),
        Err(CoreError::BadArgument { name: "a", .. })
    ));
    // Equal alpha-bars, including both 0, are the identity step rather than 0 / 0.
    for abar in [0.0, 0.3] {
        assert_eq!(
            coefficients_between(abar, abar).unwrap(),
            Eq3Coefficients {
                a: 0.0,
                b: 1.0,
                c: 0.0
            }
        );
    }
    // Zero solver steps would return z(0) as if it were z(1).
    let f = |z: &Tensor, _t: f64| z.zeros_like();
    assert!(matches!(
        odeint_euler(f, &u, 0),
        Err(CoreError::BadArgument { name: "steps", .. })
    ));
    assert!(matches!(
        adjoint_euler(f, &u, &u, &[], 0),
        Err(CoreError::BadArgument { name: "steps", .. })
    ));
    // No classes to be nearest to.
    let empty = Tensor::zeros((0, 3), DType::F32, &dev).unwrap();
    assert!(matches!(
        nearest_embedding(&u, &empty),
        Err(CoreError::Shape { .. })
    ));
    // A label outside 0..m is candle's index error, not a panic.
    let y = Tensor::new(&[0u32, 1, 3], &dev).unwrap();
    assert!(cross_entropy(&u, &y).is_err());
}

/// A denoiser that counts its calls and fails, through `?` on this crate's
/// error, if asked for a block its schedule does not have.
struct Checked {
    sched: DiscreteSchedule,
    blocks: usize,
    calls: Cell<usize>,
}

impl Denoiser for Checked {
    fn blocks(&self) -> usize {
        self.blocks
    }
    fn latent_dim(&self) -> usize {
        2
    }
    fn denoise(&self, t: usize, z: &Tensor, _x: &Tensor) -> candle_core::Result<Tensor> {
        self.calls.set(self.calls.get() + 1);
        // Both are `noprop_core::Result`s; `?` must convert them into
        // `candle_core::Error`. This would not compile without the conversion.
        let k = self.sched.coefficients(t)?;
        let scaled = q_sample_with(z, 0.0, &z.zeros_like()?)?;
        scaled * k.b
    }
}

#[test]
fn question_mark_works_in_a_denoiser_and_keeps_the_message() {
    let x = Tensor::zeros((4, 1), DType::F32, &Device::Cpu).unwrap();
    let ok = Checked {
        sched: cosine(3),
        blocks: 3,
        calls: Cell::new(0),
    };
    let z = sample_dt(
        &ok,
        &cosine(3),
        &x,
        Inference::Deterministic,
        &mut NoiseRng::new(0),
    )
    .unwrap();
    assert_eq!(z.dims(), &[4, 2]);
    assert_eq!(ok.calls.get(), 3);

    // The denoiser's own schedule has 2 blocks, so its block 3 fails inside
    // `denoise`; the message of the CoreError survives the round trip.
    let failing = Checked {
        sched: cosine(2),
        blocks: 3,
        calls: Cell::new(0),
    };
    let err = sample_dt(
        &failing,
        &cosine(3),
        &x,
        Inference::Deterministic,
        &mut NoiseRng::new(0),
    )
    .unwrap_err();
    assert!(matches!(err, CoreError::Candle(_)), "{err:?}");
    assert!(
        err.to_string().contains("block index 3 is outside 1..=2"),
        "{err}"
    );

    // A candle error carried by a CoreError comes back as the same error, not
    // wrapped twice.
    let candle_err = Tensor::zeros(2, DType::F32, &Device::Cpu)
        .unwrap()
        .matmul(&x)
        .unwrap_err();
    let message = candle_err.to_string();
    let back: candle_core::Error = CoreError::from(candle_err).into();
    assert_eq!(back.to_string(), message);
    let schedule_err: candle_core::Error = ScheduleError::TooShort { len: 1 }.into();
    assert!(
        schedule_err.to_string().contains("T >= 1"),
        "{schedule_err}"
    );
}

#[test]
fn block_count_mismatch_is_reported_before_any_block_runs() {
    let x = Tensor::zeros((4, 1), DType::F32, &Device::Cpu).unwrap();
    let five = Checked {
        sched: cosine(10),
        blocks: 5,
        calls: Cell::new(0),
    };
    let err = sample_dt(
        &five,
        &cosine(10),
        &x,
        Inference::Stochastic,
        &mut NoiseRng::new(0),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            CoreError::BlockCountMismatch {
                denoiser: 5,
                schedule: 10
            }
        ),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains("denoiser has 5 block(s) but the schedule has 10"),
        "{message}"
    );
    assert_eq!(five.calls.get(), 0);
}

struct Zero;

impl ContinuousDenoiser for Zero {
    fn latent_dim(&self) -> usize {
        2
    }
    fn denoise(&self, z: &Tensor, _x: &Tensor, _t: &Tensor) -> candle_core::Result<Tensor> {
        z.zeros_like()
    }
}

impl VelocityField for Zero {
    fn latent_dim(&self) -> usize {
        2
    }
    fn velocity(&self, z: &Tensor, _x: &Tensor, _t: &Tensor) -> candle_core::Result<Tensor> {
        z.zeros_like()
    }
}

#[test]
fn samplers_reject_integer_input_instead_of_drawing_zero_noise() {
    let dev = Device::Cpu;
    let pixels = Tensor::full(200u8, (4, 3), &dev).unwrap();
    let mut rng = NoiseRng::new(0);
    let not_float = |r: Result<Tensor>| {
        matches!(
            r,
            Err(CoreError::NotFloat {
                dtype: DType::U8,
                ..
            })
        )
    };
    let dt = Checked {
        sched: cosine(3),
        blocks: 3,
        calls: Cell::new(0),
    };
    assert!(not_float(sample_dt(
        &dt,
        &cosine(3),
        &pixels,
        Inference::Stochastic,
        &mut rng
    )));
    let sched = FixedLinearGamma::default();
    assert!(not_float(sample_ct_eq3(
        &Zero,
        &sched,
        &pixels,
        4,
        Inference::Stochastic,
        &mut rng
    )));
    assert!(not_float(sample_ct_ode(
        &Zero,
        &sched,
        &pixels,
        4,
        OdeSolver::Euler,
        &mut rng
    )));
    assert!(not_float(sample_fm(
        &Zero,
        &pixels,
        4,
        OdeSolver::Euler,
        &mut rng
    )));
    let labels = Tensor::new(&[[1u32, 0], [0, 1]], &dev).unwrap();
    assert!(matches!(
        q_sample(&labels, 0.5, &mut rng),
        Err(CoreError::NotFloat { .. })
    ));
    assert!(matches!(
        sample_t(3, DType::U32, &dev, &mut rng),
        Err(CoreError::NotFloat { .. })
    ));
    assert!(rng.randn(&[3], DType::U8, &dev).is_err());

    // The same input as floats samples, and z takes the input's float dtype.
    for dtype in [DType::F32, DType::F64] {
        let x = pixels.to_dtype(dtype).unwrap();
        let z = sample_fm(&Zero, &x, 4, OdeSolver::Euler, &mut rng).unwrap();
        assert_eq!(z.dtype(), dtype);
        // With a zero velocity z_1 = z_0 ~ N(0, I), which is not all zeros.
        let spread = z
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(spread > 0.1, "{spread}");
    }
}

/// The re-exported candle is the very crate this test depends on, so a user
/// can take `Tensor` from either path.
#[test]
fn reexported_candle_is_the_same_crate() {
    fn same(t: candle_core::Tensor) -> noprop_core::candle_core::Tensor {
        t
    }
    let t = same(Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap());
    assert_eq!(t.dims(), &[1]);
}
