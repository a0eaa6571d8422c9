//! Helpers shared by the integration tests.

/// The method `$m` built from a checked config of that method.
macro_rules! typed {
    ($m:ident, $cfg:expr, $dev:expr, $train:expr) => {{
        let cfg: &noprop_train::Config = $cfg;
        let noprop_train::config::RawMethod::$m(p) = &cfg.method else {
            panic!("not a {} config", stringify!($m))
        };
        $m::new(p, &cfg.setup(), $dev, $train)
    }};
}
