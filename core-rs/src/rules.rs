//! Threshold rules (spec §8): conditions, the in-process cooldown mirror and optional hysteresis.

use std::time::{Duration, Instant};

use crate::error::CoreError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Gt,
    Lt,
    Eq,
    Gte,
    Lte,
    Between,
    NotBetween,
}

impl Op {
    pub fn parse(s: &str) -> Result<Op, CoreError> {
        Ok(match s {
            "gt" => Op::Gt,
            "lt" => Op::Lt,
            "eq" => Op::Eq,
            "gte" => Op::Gte,
            "lte" => Op::Lte,
            "between" => Op::Between,
            "not_between" => Op::NotBetween,
            other => {
                return Err(CoreError::Config(format!(
                    "unknown rule operator {other:?}"
                )))
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Op::Gt => "gt",
            Op::Lt => "lt",
            Op::Eq => "eq",
            Op::Gte => "gte",
            Op::Lte => "lte",
            Op::Between => "between",
            Op::NotBetween => "not_between",
        }
    }
}

/// One enabled rule, compiled from its row.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub id: i32,
    pub name: String,
    pub op: Op,
    pub threshold: f64,
    pub threshold_high: Option<f64>,
    /// `webhook` or `log`.
    pub action_type: String,
    pub webhook_event_type: Option<String>,
    pub cooldown: Duration,
    pub clear_threshold: Option<f64>,
    pub rearm_on_clear: bool,
}

impl Rule {
    /// The spec's condition table.
    pub fn matches(&self, v: f64) -> bool {
        let t = self.threshold;
        match self.op {
            Op::Gt => v > t,
            Op::Lt => v < t,
            Op::Eq => (v - t).abs() < 1e-9,
            Op::Gte => v >= t,
            Op::Lte => v <= t,
            Op::Between => self.threshold_high.is_some_and(|h| t <= v && v <= h),
            Op::NotBetween => self.threshold_high.is_some_and(|h| v < t || v > h),
        }
    }

    /// Hysteresis is opt-in; without it the reference's behaviour (cooldown only) holds.
    pub fn has_hysteresis(&self) -> bool {
        self.rearm_on_clear || self.clear_threshold.is_some()
    }

    /// Whether `v` re-arms a fired rule.
    pub fn clears(&self, v: f64) -> bool {
        match (self.clear_threshold, self.op) {
            (Some(c), Op::Gt | Op::Gte) => v <= c,
            (Some(c), Op::Lt | Op::Lte) => v >= c,
            _ => !self.matches(v),
        }
    }
}

/// Per-rule mutable state, kept across catalog reloads (keyed by rule id).
#[derive(Debug, Clone, Default)]
pub struct RuleState {
    last_fired: Option<Instant>,
    disarmed: bool,
}

/// Evaluate one value; returns whether the rule fires now. A firing is produced at most once per cooldown
/// per rule in this process; the database's conditional UPDATE then picks one winner among processes.
pub fn evaluate(rule: &Rule, state: &mut RuleState, v: f64, now: Instant) -> bool {
    if state.disarmed {
        // The clearing value itself never fires, even where a misconfigured clear threshold overlaps.
        if rule.clears(v) {
            state.disarmed = false;
        }
        return false;
    }
    if !rule.matches(v) {
        return false;
    }
    if let Some(last) = state.last_fired {
        if now.saturating_duration_since(last) < rule.cooldown {
            return false;
        }
    }
    state.last_fired = Some(now);
    state.disarmed = rule.has_hysteresis();
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(op: Op, t: f64, high: Option<f64>) -> Rule {
        Rule {
            id: 1,
            name: "r".into(),
            op,
            threshold: t,
            threshold_high: high,
            action_type: "log".into(),
            webhook_event_type: None,
            cooldown: Duration::ZERO,
            clear_threshold: None,
            rearm_on_clear: false,
        }
    }

    #[test]
    fn condition_table() {
        assert!(rule(Op::Gt, 1.0, None).matches(1.5) && !rule(Op::Gt, 1.0, None).matches(1.0));
        assert!(rule(Op::Lt, 1.0, None).matches(0.5) && !rule(Op::Lt, 1.0, None).matches(1.0));
        assert!(
            rule(Op::Eq, 1.0, None).matches(1.0 + 1e-10)
                && !rule(Op::Eq, 1.0, None).matches(1.00001)
        );
        assert!(rule(Op::Gte, 1.0, None).matches(1.0) && !rule(Op::Gte, 1.0, None).matches(0.9));
        assert!(rule(Op::Lte, 1.0, None).matches(1.0) && !rule(Op::Lte, 1.0, None).matches(1.1));
        let b = rule(Op::Between, 1.0, Some(2.0));
        assert!(b.matches(1.0) && b.matches(2.0) && !b.matches(2.1) && !b.matches(0.9));
        assert!(!rule(Op::Between, 1.0, None).matches(1.0));
        let nb = rule(Op::NotBetween, 1.0, Some(2.0));
        assert!(nb.matches(0.9) && nb.matches(2.1) && !nb.matches(1.0) && !nb.matches(2.0));
        assert!(!rule(Op::NotBetween, 1.0, None).matches(100.0));
        for op in ["gt", "lt", "eq", "gte", "lte", "between", "not_between"] {
            assert_eq!(Op::parse(op).unwrap().as_str(), op);
        }
        assert!(Op::parse("ge").is_err());
    }

    #[test]
    fn cooldown_limits_firings() {
        let mut r = rule(Op::Gt, 10.0, None);
        r.cooldown = Duration::from_secs(60);
        let mut s = RuleState::default();
        let t0 = Instant::now();
        assert!(evaluate(&r, &mut s, 11.0, t0));
        assert!(!evaluate(&r, &mut s, 12.0, t0 + Duration::from_secs(59)));
        assert!(!evaluate(&r, &mut s, 5.0, t0 + Duration::from_secs(61)));
        assert!(evaluate(&r, &mut s, 12.0, t0 + Duration::from_secs(61)));
    }

    #[test]
    fn zero_cooldown_fires_every_match() {
        let r = rule(Op::Gte, 10.0, None);
        let mut s = RuleState::default();
        let t0 = Instant::now();
        assert!((0..5).all(|_| evaluate(&r, &mut s, 10.0, t0)));
        assert!(!evaluate(&r, &mut s, 9.0, t0));
    }

    #[test]
    fn hysteresis_with_clear_threshold() {
        let mut r = rule(Op::Gt, 80.0, None);
        r.clear_threshold = Some(70.0);
        let mut s = RuleState::default();
        let t = Instant::now();
        assert!(evaluate(&r, &mut s, 85.0, t));
        // Still hot, or cooled only below the trip point: stays disarmed.
        assert!(!evaluate(&r, &mut s, 90.0, t));
        assert!(!evaluate(&r, &mut s, 75.0, t));
        assert!(!evaluate(&r, &mut s, 85.0, t));
        // Clearing re-arms without firing; the next excursion fires.
        assert!(!evaluate(&r, &mut s, 70.0, t));
        assert!(evaluate(&r, &mut s, 81.0, t));

        let mut low = rule(Op::Lte, 10.0, None);
        low.clear_threshold = Some(15.0);
        let mut s = RuleState::default();
        assert!(evaluate(&low, &mut s, 10.0, t));
        assert!(!evaluate(&low, &mut s, 14.0, t));
        assert!(!evaluate(&low, &mut s, 9.0, t));
        assert!(!evaluate(&low, &mut s, 15.0, t));
        assert!(evaluate(&low, &mut s, 1.0, t));
    }

    #[test]
    fn rearm_on_clear_uses_the_condition() {
        let mut r = rule(Op::Between, 1.0, Some(2.0));
        r.rearm_on_clear = true;
        let mut s = RuleState::default();
        let t = Instant::now();
        assert!(evaluate(&r, &mut s, 1.5, t));
        assert!(!evaluate(&r, &mut s, 1.6, t));
        assert!(!evaluate(&r, &mut s, 3.0, t));
        assert!(evaluate(&r, &mut s, 1.7, t));
    }

    #[test]
    fn without_hysteresis_only_cooldown_applies() {
        let r = rule(Op::Gt, 0.0, None);
        let mut s = RuleState::default();
        let t = Instant::now();
        assert!(evaluate(&r, &mut s, 1.0, t) && evaluate(&r, &mut s, 1.0, t));
    }
}
