//! Configuration: every knob from flags, `HYTRAIN_*`, SageMaker hyperparameters or defaults, in that precedence,
//! and clear one-line errors for bad keys and values.

use std::collections::BTreeMap;

use hytrain_train::{layer, ConfigSources, OptimizerKind, Origin, Precision, Schedule, TrainConfig, TrainError};

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[test]
fn defaults_are_the_reference_scripts() {
    let c = TrainConfig::default();
    assert_eq!((c.batch_size, c.test_batch_size, c.epochs, c.seed, c.log_interval), (64, 1000, 10, 1, 10));
    assert_eq!((c.lr, c.momentum), (0.01, 0.5));
    assert_eq!(c.optimizer, OptimizerKind::Sgd);
}

#[test]
fn reference_flag_names_and_snake_case_are_both_accepted() {
    let mut c = TrainConfig::default();
    c.apply_hyperparameter("batch-size", "128").unwrap();
    assert_eq!(c.batch_size, 128);
    c.apply_hyperparameter("batch_size", "256").unwrap();
    assert_eq!(c.batch_size, 256);
    c.apply_hyperparameter("--test-batch-size", "500").unwrap();
    c.apply_hyperparameter("log-interval", "60").unwrap();
    c.apply_hyperparameter("backend", "\"gloo\"").unwrap();
    c.apply_hyperparameter("epochs", "\"3\"").unwrap(); // SageMaker SDK's JSON-encoded form
    c.apply_hyperparameter("checkpoint-every", "none").unwrap();
    c.apply_hyperparameter("optimizer", "AdamW").unwrap();
    c.apply_hyperparameter("clip-grad-norm", "1.5").unwrap();
    assert_eq!((c.test_batch_size, c.log_interval, c.epochs), (500, 60, 3));
    assert_eq!((c.checkpoint_every, c.optimizer, c.max_grad_norm), (None, OptimizerKind::Adamw, Some(1.5)));
}

#[test]
fn unknown_key_is_refused_naming_it_and_the_known_ones() {
    let err = TrainConfig::default().apply_hyperparameter("batchsize", "64").unwrap_err();
    assert!(matches!(err, TrainError::UnknownOption { .. }));
    let msg = err.to_string();
    assert!(msg.contains("'batchsize'") && msg.contains("batch_size"), "{msg}");
    assert!(!msg.contains('\n'));
}

#[test]
fn overlap_is_on_by_default_and_reaches_the_ddp_options() {
    let mut c = TrainConfig::default();
    assert!(c.overlap && c.ddp_options().overlap);
    c.apply_hyperparameter("--overlap", "false").unwrap();
    assert!(!c.overlap && !c.ddp_options().overlap);
    c.apply_hyperparameter("overlap", "\"true\"").unwrap();
    assert!(c.ddp_options().overlap);
}

#[test]
fn precision_is_fp32_by_default_and_comes_from_flag_env_or_hyperparameter_into_the_ddp_options() {
    assert_eq!(TrainConfig::default().precision, Precision::Fp32);
    let layered = |sources: ConfigSources| layer(&sources).unwrap().config.ddp_options().precision;
    let hp = map(&[("precision", "\"bf16\"")]);
    assert_eq!(layered(ConfigSources { hyperparameters: hp.clone(), ..Default::default() }), Precision::Bf16);
    let env = map(&[("HYTRAIN_PRECISION", "fp16")]);
    assert_eq!(
        layered(ConfigSources { hyperparameters: hp.clone(), env: env.clone(), ..Default::default() }),
        Precision::Fp16
    );
    let cli = map(&[("precision", "fp32")]);
    assert_eq!(layered(ConfigSources { hyperparameters: hp, env, cli }), Precision::Fp32);
    let sources = ConfigSources { env: map(&[("HYTRAIN_PRECISION", "half")]), ..Default::default() };
    let msg = layer(&sources).unwrap_err().to_string();
    assert!(msg.contains("HYTRAIN_PRECISION") && msg.contains("fp32, bf16 or fp16") && msg.contains("'half'"), "{msg}");
}

#[test]
fn bad_values_are_refused_with_a_one_line_error_naming_key_and_value() {
    for (key, value, says) in [
        ("lr", "fast", "number"),
        ("batch-size", "0", "at least 1"),
        ("batch-size", "-3", "whole number"),
        ("epochs", "2.5", "whole number"),
        ("nesterov", "maybe", "true or false"),
        ("optimizer", "adam", "sgd or adamw"),
        ("schedule", "cosine:x", "schedule"),
        ("momentum", "NaN", "finite"),
        ("bucket-mb", "0", "positive"),
        ("overlap", "sometimes", "true or false"),
        ("precision", "fp8", "fp32, bf16 or fp16"),
    ] {
        let msg = TrainConfig::default().apply_hyperparameter(key, value).unwrap_err().to_string();
        assert!(msg.contains(key) && msg.contains(says) && !msg.contains('\n'), "{key}={value}: {msg}");
    }
}

#[test]
fn an_initial_loss_scale_below_one_or_beyond_float32_is_refused_naming_the_flag() {
    let negative = TrainConfig::default().apply_hyperparameter("init_loss_scale", "-65536").unwrap_err().to_string();
    assert!(negative.contains("init_loss_scale") && !negative.contains('\n'), "{negative}");
    for value in ["0.5", "1e39"] {
        let mut config = TrainConfig::default();
        config.apply_hyperparameter("init_loss_scale", value).unwrap();
        let msg = config.validate().unwrap_err().to_string();
        assert!(
            msg.contains("--init-loss-scale") && msg.contains("from 1 to") && !msg.contains('\n'),
            "{value}: {msg}"
        );
    }
    let mut config = TrainConfig::default();
    config.apply_hyperparameter("init-loss-scale", "4294967296").unwrap();
    config.validate().unwrap();
    assert_eq!(config.ddp_options().init_loss_scale, 4294967296.0);
    assert_eq!(TrainConfig::default().ddp_options().init_loss_scale, 65536.0);
}

#[test]
fn cli_beats_hytrain_env_beats_sagemaker_hyperparameters_beats_defaults() {
    let sources = ConfigSources {
        cli: map(&[("epochs", "5")]),
        env: map(&[
            ("SM_HP_MOMENTUM", "0.9"),
            ("SM_HP_LR", "0.2"),
            ("SM_HP_EPOCHS", "2"),
            ("HYTRAIN_LR", "0.05"),
            ("HYTRAIN_EPOCHS", "4"),
            // Other parts of hytrain read these; the configuration leaves them alone.
            ("HYTRAIN_HOST_ALIASES", "a=127.0.0.1"),
            ("PATH", "/usr/bin"),
        ]),
        hyperparameters: map(&[
            ("batch-size", "\"32\""),
            ("lr", "\"0.1\""),
            ("epochs", "3"),
            ("sagemaker_program", "\"train.py\""),
        ]),
    };
    let l = layer(&sources).unwrap();
    assert_eq!(l.config.epochs, 5);
    assert_eq!(l.origins["epochs"], Origin::Cli);
    assert_eq!(l.config.lr, 0.05);
    assert_eq!(l.origins["lr"], Origin::Env("HYTRAIN_LR".into()));
    assert_eq!(l.config.batch_size, 32);
    assert_eq!(l.origins["batch_size"], Origin::SageMakerHyperparameters);
    assert_eq!(l.config.momentum, 0.9);
    assert_eq!(l.origins["momentum"], Origin::SageMakerEnv("SM_HP_MOMENTUM".into()));
    assert_eq!(l.config.seed, 1);
    assert_eq!(l.origins["seed"], Origin::Default);
    assert!(l.unknown.is_empty(), "{:?}", l.unknown);
}

#[test]
fn keys_the_config_does_not_know_are_handed_back_for_the_caller() {
    let sources = ConfigSources {
        hyperparameters: map(&[("model", "\"lenet\""), ("lr", "0.1")]),
        cli: map(&[("data-dir", "/data")]),
        ..Default::default()
    };
    let l = layer(&sources).unwrap();
    let unknown: Vec<_> = l.unknown.iter().map(|(o, k, _)| (o.clone(), k.as_str())).collect();
    assert_eq!(unknown, vec![(Origin::SageMakerHyperparameters, "model"), (Origin::Cli, "data-dir")]);
}

#[test]
fn a_bad_layered_value_names_where_it_came_from() {
    let sources = ConfigSources { env: map(&[("HYTRAIN_LR", "abc")]), ..Default::default() };
    let msg = layer(&sources).unwrap_err().to_string();
    assert!(msg.contains("HYTRAIN_LR") && msg.contains("abc") && !msg.contains('\n'), "{msg}");
    let sources = ConfigSources { hyperparameters: map(&[("batch-size", "\"many\"")]), ..Default::default() };
    let msg = layer(&sources).unwrap_err().to_string();
    assert!(msg.contains("SageMaker hyperparameters") && msg.contains("many"), "{msg}");
}

#[test]
fn a_layered_config_with_nothing_to_train_is_refused() {
    let sources = ConfigSources { cli: map(&[("epochs", "0")]), ..Default::default() };
    assert!(layer(&sources).unwrap_err().to_string().contains("nothing to train"));
}

#[test]
fn bare_cosine_spans_the_run_and_warmup_joins_a_schedule_without_one() {
    let mut c = TrainConfig { schedule: "cosine".into(), warmup: 10, ..Default::default() };
    assert_eq!(c.schedule_for(300).unwrap(), Schedule::Cosine { warmup_steps: 10, total_steps: 300, min_factor: 0.0 });
    c.schedule = "constant".into();
    assert_eq!(c.schedule_for(300).unwrap(), Schedule::LinearWarmup { warmup_steps: 10 });
    c.schedule = "step:100:0.1:5".into();
    assert_eq!(c.schedule_for(300).unwrap(), Schedule::Step { warmup_steps: 5, every: 100, gamma: 0.1 });
}

#[test]
fn a_bare_cosine_with_the_largest_warmup_is_refused_not_an_overflow() {
    // Found by the train_config fuzz target's seed corpus: `warmup + 1` overflowed for warmup = u64::MAX.
    let mut c = TrainConfig::default();
    c.apply_hyperparameter("schedule", "cosine").unwrap();
    c.apply_hyperparameter("warmup", &u64::MAX.to_string()).unwrap();
    let e = c.schedule_for(100).unwrap_err().to_string();
    assert!(e.contains("must exceed its warmup"), "{e}");
}
