//! Learning-rate schedules: each a pure function of the optimizer step giving a factor on the base learning rate,
//! so resuming needs only the step.

use crate::{Result, TrainError};

/// A learning-rate schedule. `factor(step)` is the multiplier for the update numbered `step` (0 is the first).
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Schedule {
    /// Always 1.
    #[default]
    Constant,
    /// Rises linearly from `1/warmup_steps` to 1 over the first `warmup_steps` updates, then stays at 1.
    LinearWarmup {
        /// Updates until the full learning rate.
        warmup_steps: u64,
    },
    /// Linear warmup, then half a cosine from 1 down to `min_factor` at `total_steps`, then `min_factor`.
    Cosine {
        /// Updates of linear warmup (0 for none).
        warmup_steps: u64,
        /// The update at which the cosine reaches `min_factor`.
        total_steps: u64,
        /// The final factor (0 decays to nothing).
        min_factor: f64,
    },
    /// Linear warmup, then multiplied by `gamma` every `every` updates (PyTorch's StepLR counted in updates).
    Step {
        /// Updates of linear warmup (0 for none).
        warmup_steps: u64,
        /// Updates between decays.
        every: u64,
        /// Decay factor.
        gamma: f64,
    },
    /// `inner` up to update `from`, then stretched or squeezed: update `from + k` takes the factor `inner` gives at
    /// `from + k * scale` (between whole updates, as its formula gives there). Made when a job's ranks change part-way
    /// ([`LrPlan::continued`]), so that the rest of the run covers the rest of the schedule.
    Rebased {
        /// The schedule before the change.
        inner: Box<Schedule>,
        /// The update at which the ranks changed.
        from: u64,
        /// Updates of `inner` per update from `from` on.
        scale: f64,
    },
}

fn warmup(step: f64, warmup_steps: u64) -> f64 {
    if step < warmup_steps as f64 {
        (step + 1.0) / warmup_steps as f64
    } else {
        1.0
    }
}

impl Schedule {
    /// The learning-rate factor for update `step`.
    pub fn factor(&self, step: u64) -> f64 {
        self.factor_at(step as f64)
    }

    /// The factor at `step`, which a rebased schedule's inner schedule may be asked between whole updates.
    fn factor_at(&self, step: f64) -> f64 {
        match self {
            Schedule::Constant => 1.0,
            Schedule::LinearWarmup { warmup_steps } => warmup(step, *warmup_steps),
            Schedule::Cosine { warmup_steps, total_steps, min_factor } => {
                let (warmup_steps, min_factor) = (*warmup_steps, *min_factor);
                if step < warmup_steps as f64 {
                    return warmup(step, warmup_steps);
                }
                let span = total_steps.saturating_sub(warmup_steps).max(1) as f64;
                let progress = ((step - warmup_steps as f64) / span).min(1.0);
                min_factor + (1.0 - min_factor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
            Schedule::Step { warmup_steps, every, gamma } => {
                if step < *warmup_steps as f64 {
                    return warmup(step, *warmup_steps);
                }
                let decays = ((step - *warmup_steps as f64) / (*every).max(1) as f64).floor();
                gamma.powi(decays.min(i32::MAX as f64) as i32)
            }
            Schedule::Rebased { inner, from, scale } => {
                let from = *from as f64;
                inner.factor_at(if step < from { step } else { from + (step - from) * scale })
            }
        }
    }

    /// Parses the command-line form: `constant`, `warmup:<steps>`, `cosine:<total>[:<warmup>[:<min_factor>]]`,
    /// `step:<every>:<gamma>[:<warmup>]`.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |detail: &str| {
            TrainError::option(
                "schedule",
                format!(
                    "'{s}': {detail}; use constant, warmup:<steps>, cosine:<total>[:<warmup>[:<min_factor>]] or \
                     step:<every>:<gamma>[:<warmup>]"
                ),
            )
        };
        let parts: Vec<&str> = s.trim().split(':').collect();
        let int = |i: usize| -> Result<u64> {
            parts.get(i).ok_or_else(|| bad("missing a number"))?.parse::<u64>().map_err(|_| bad("not a whole number"))
        };
        let float = |i: usize| -> Result<f64> {
            parts.get(i).ok_or_else(|| bad("missing a number"))?.parse::<f64>().map_err(|_| bad("not a number"))
        };
        let schedule = match (parts[0], parts.len()) {
            ("constant", 1) => Schedule::Constant,
            ("warmup", 2) => Schedule::LinearWarmup { warmup_steps: int(1)? },
            ("cosine", 2..=4) => Schedule::Cosine {
                total_steps: int(1)?,
                warmup_steps: if parts.len() > 2 { int(2)? } else { 0 },
                min_factor: if parts.len() > 3 { float(3)? } else { 0.0 },
            },
            ("step", 3 | 4) => Schedule::Step {
                every: int(1)?,
                gamma: float(2)?,
                warmup_steps: if parts.len() > 3 { int(3)? } else { 0 },
            },
            _ => return Err(bad("unknown form")),
        };
        schedule.validate()?;
        Ok(schedule)
    }

    /// Refuses schedules that would divide by zero or produce negative learning rates.
    pub fn validate(&self) -> Result<()> {
        let bad = |detail: String| TrainError::option("schedule", detail);
        match *self {
            Schedule::Constant => Ok(()),
            Schedule::LinearWarmup { warmup_steps: 0 } => Err(bad("warmup needs at least 1 step".into())),
            Schedule::LinearWarmup { .. } => Ok(()),
            Schedule::Cosine { warmup_steps, total_steps, min_factor } => {
                if total_steps <= warmup_steps {
                    Err(bad(format!("cosine total steps ({total_steps}) must exceed its warmup ({warmup_steps})")))
                } else if !(0.0..=1.0).contains(&min_factor) {
                    Err(bad(format!("cosine min_factor must be in [0, 1], got {min_factor}")))
                } else {
                    Ok(())
                }
            }
            Schedule::Rebased { ref inner, scale, .. } => {
                if scale.is_finite() && scale > 0.0 {
                    inner.validate()
                } else {
                    Err(bad(format!("a rebased schedule needs a positive scale, got {scale}")))
                }
            }
            Schedule::Step { every, gamma, .. } => {
                if every == 0 {
                    Err(bad("step schedule needs every >= 1".into()))
                } else if !(gamma.is_finite() && gamma > 0.0) {
                    Err(bad(format!("step gamma must be a positive number, got {gamma}")))
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// A run's learning-rate schedule and the update at which the run is planned to end. When the job's ranks change
/// part-way through a run of epochs, an epoch takes another number of updates, and the plan is continued so that the
/// rest of the run covers the rest of the schedule ([`LrPlan::continued`]): the learning rate stays a function of
/// how far through its data the run is, with no jump at the change. Global rank 0's plan is every rank's after a
/// change, a rank that joins included (see [`crate::elastic`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LrPlan {
    /// The schedule.
    pub schedule: Schedule,
    /// The update at which the run is planned to end.
    pub end: u64,
}

impl LrPlan {
    /// This plan for a run whose ranks changed at update `from` and which is now planned to end at `end`: the
    /// updates left are mapped onto what the schedule had left. Unchanged when nothing was left of either.
    pub fn continued(&self, from: u64, end: u64) -> LrPlan {
        let (left_before, left_now) = (self.end.saturating_sub(from), end.saturating_sub(from));
        if left_before == 0 || left_now == 0 || left_before == left_now {
            return LrPlan { schedule: self.schedule.clone(), end };
        }
        let schedule = Schedule::Rebased {
            inner: Box::new(self.schedule.clone()),
            from,
            scale: left_before as f64 / left_now as f64,
        };
        LrPlan { schedule, end }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_continued_at_another_length_covers_the_rest_of_the_schedule_without_a_jump() {
        let plan = LrPlan { schedule: Schedule::parse("cosine:400:20").unwrap(), end: 400 };
        // Four ranks became three at update 100: the 300 updates left became 400.
        let after = plan.continued(100, 500);
        assert_eq!(after.end, 500);
        for step in [0, 10, 99, 100] {
            assert_eq!(after.schedule.factor(step), plan.schedule.factor(step), "before the change, at {step}");
        }
        assert!(close(after.schedule.factor(101), plan.schedule.factor_at(100.75)));
        assert!(close(after.schedule.factor(300), plan.schedule.factor(250)), "half of what was left");
        assert!(close(after.schedule.factor(500), plan.schedule.factor(400)), "the end at the new end");
        // And again, back to four at update 300 (250 of the first plan's): 100 updates left of it.
        let again = after.continued(300, 450);
        assert!(close(again.schedule.factor(300), plan.schedule.factor(250)));
        assert!(close(again.schedule.factor(375), after.schedule.factor(400)));
        assert!(close(again.schedule.factor(450), plan.schedule.factor(400)));
        again.schedule.validate().unwrap();
        // Nothing to map: the same schedule.
        assert_eq!(plan.continued(400, 500).schedule, plan.schedule);
        assert_eq!(plan.continued(100, 400).schedule, plan.schedule);
    }

    #[test]
    fn a_rebased_step_schedule_decays_at_the_same_share_of_the_run_and_round_trips_through_json() {
        let plan = LrPlan { schedule: Schedule::parse("step:100:0.5").unwrap(), end: 400 };
        // From update 200 on, the 200 updates left take 100: the decays every 100 come every 50.
        let after = plan.continued(200, 300);
        assert_eq!(after.schedule.factor(249), 0.25);
        assert_eq!(after.schedule.factor(250), 0.125);
        let json = serde_json::to_string(&after).unwrap();
        assert_eq!(serde_json::from_str::<LrPlan>(&json).unwrap(), after);
        let bad = Schedule::Rebased { inner: Box::new(Schedule::Constant), from: 1, scale: 0.0 };
        assert!(bad.validate().unwrap_err().to_string().contains("needs a positive scale, got 0"));
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn constant_is_one_at_every_step() {
        for s in [0, 1, 1000, u64::MAX] {
            assert_eq!(Schedule::Constant.factor(s), 1.0);
        }
    }

    #[test]
    fn linear_warmup_rises_to_one_then_stays() {
        let s = Schedule::LinearWarmup { warmup_steps: 4 };
        let got: Vec<f64> = (0..6).map(|i| s.factor(i)).collect();
        assert_eq!(got, vec![0.25, 0.5, 0.75, 1.0, 1.0, 1.0]);
    }

    #[test]
    fn cosine_warms_up_then_follows_half_cosine_to_min() {
        let s = Schedule::Cosine { warmup_steps: 2, total_steps: 10, min_factor: 0.1 };
        assert!(close(s.factor(0), 0.5));
        assert!(close(s.factor(1), 1.0));
        assert!(close(s.factor(2), 1.0));
        // Halfway through the 8 cosine steps: (1 + 0.1) / 2.
        assert!(close(s.factor(6), 0.55));
        // A quarter: 0.1 + 0.9 * (1 + cos(pi/4)) / 2.
        assert!(close(s.factor(4), 0.1 + 0.9 * 0.5 * (1.0 + std::f64::consts::FRAC_1_SQRT_2)));
        assert!(close(s.factor(10), 0.1));
        assert!(close(s.factor(500), 0.1));
        let decreasing = (2..=10).map(|i| s.factor(i)).collect::<Vec<_>>();
        assert!(decreasing.windows(2).all(|w| w[1] < w[0]), "{decreasing:?}");
    }

    #[test]
    fn step_decays_by_gamma_every_n_updates() {
        let s = Schedule::Step { warmup_steps: 0, every: 3, gamma: 0.1 };
        let got: Vec<f64> = (0..7).map(|i| s.factor(i)).collect();
        let want = [1.0, 1.0, 1.0, 0.1, 0.1, 0.1, 0.01];
        assert!(got.iter().zip(want).all(|(g, w)| close(*g, w)), "{got:?}");
        let warm = Schedule::Step { warmup_steps: 2, every: 2, gamma: 0.5 };
        let got: Vec<f64> = (0..6).map(|i| warm.factor(i)).collect();
        assert_eq!(got, vec![0.5, 1.0, 1.0, 1.0, 0.5, 0.5]);
    }

    #[test]
    fn parse_accepts_each_form() {
        assert_eq!(Schedule::parse("constant").unwrap(), Schedule::Constant);
        assert_eq!(Schedule::parse("warmup:100").unwrap(), Schedule::LinearWarmup { warmup_steps: 100 });
        assert_eq!(
            Schedule::parse("cosine:1000:100:0.05").unwrap(),
            Schedule::Cosine { total_steps: 1000, warmup_steps: 100, min_factor: 0.05 }
        );
        assert_eq!(
            Schedule::parse("cosine:1000").unwrap(),
            Schedule::Cosine { total_steps: 1000, warmup_steps: 0, min_factor: 0.0 }
        );
        assert_eq!(Schedule::parse("step:30:0.1").unwrap(), Schedule::Step { every: 30, gamma: 0.1, warmup_steps: 0 });
    }

    #[test]
    fn parse_rejects_bad_forms_with_the_accepted_ones_named() {
        for bad in [
            "",
            "linear",
            "warmup",
            "warmup:0",
            "warmup:x",
            "cosine:10:10",
            "cosine:10:1:2",
            "step:0:0.1",
            "step:3:-1",
            "step:3",
        ] {
            let e = Schedule::parse(bad).unwrap_err().to_string();
            assert!(e.starts_with("invalid schedule"), "{bad}: {e}");
        }
        assert!(Schedule::parse("foo").unwrap_err().to_string().contains("cosine:<total>"));
    }

    #[test]
    fn schedule_round_trips_through_json() {
        let s = Schedule::Cosine { warmup_steps: 5, total_steps: 50, min_factor: 0.0 };
        let j = serde_json::to_string(&s).unwrap();
        assert!(j.contains("\"kind\":\"cosine\""), "{j}");
        assert_eq!(serde_json::from_str::<Schedule>(&j).unwrap(), s);
    }
}
