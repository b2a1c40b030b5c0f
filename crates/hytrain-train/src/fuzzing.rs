//! The `train_config` fuzz target's body: a run's configuration layered from command-line flags, `HYTRAIN_*` and
//! `SM_HP_*` variables and SageMaker hyperparameters that all come from one byte string. Not API.
//!
//! The input is text (lossy UTF-8) of `[cli]`, `[env]` and `[hyperparameters]` sections holding `key=value`
//! lines; lines before the first section are hyperparameters.

use crate::config::{layer, ConfigSources};

/// Layers the configuration `data` describes and, when it is accepted, derives what a run derives from it (the
/// schedule for several run lengths, the optimizer, the DDP options). Panics only when a promise breaks: an
/// error message of more than one line, or a learning-rate factor that is negative or NaN.
pub fn config_sources(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut sources = ConfigSources::default();
    let mut section = &mut sources.hyperparameters;
    for line in text.lines() {
        match line.trim() {
            "[cli]" => section = &mut sources.cli,
            "[env]" => section = &mut sources.env,
            "[hyperparameters]" => section = &mut sources.hyperparameters,
            _ => {
                if let Some((k, v)) = line.split_once('=') {
                    section.insert(k.to_owned(), v.to_owned());
                }
            }
        }
    }
    let layered = match layer(&sources) {
        Ok(l) => l,
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.contains('\n'), "configuration error is not one line: {msg:?}");
            return;
        }
    };
    let config = layered.config;
    let _ = config.optimizer_config();
    let _ = config.ddp_options().validate();
    for steps_per_epoch in [0, 1, 7, u64::MAX] {
        let total = config.total_steps(steps_per_epoch);
        match config.schedule_for(total) {
            Ok(schedule) => {
                for step in [0, 1, total / 2, total.saturating_sub(1), total, u64::MAX] {
                    let f = schedule.factor(step);
                    // A step schedule may grow (gamma > 1, as PyTorch's StepLR allows), so only the sign is promised.
                    assert!(f >= 0.0, "factor {f} at step {step} of {schedule:?}");
                }
            }
            Err(e) => assert!(!e.to_string().contains('\n'), "schedule error is not one line: {e}"),
        }
    }
}
