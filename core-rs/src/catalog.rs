//! The catalog: an immutable snapshot of events, the running experiment and compiled rules, loaded by SQL.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;

use crate::error::CoreError;
use crate::rules::{Op, Rule};

#[derive(Debug, Clone, PartialEq)]
pub struct EventEntry {
    pub id: i32,
    pub public_id: Arc<str>,
    /// Mapped to at least one enabled plugin instance (the phantom-data guard, spec §6).
    pub active: bool,
    /// The enabled plugin instances the event is mapped to (what a plugin-bound token may feed).
    pub instances: Vec<i32>,
    pub rules: Vec<Arc<Rule>>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Catalog {
    pub events: HashMap<Arc<str>, EventEntry>,
    pub event_public_ids: HashMap<i32, Arc<str>>,
    pub experiment_public_ids: HashMap<i32, Arc<str>>,
    /// The experiment new datapoints belong to: the lowest id still running.
    pub running_experiment: Option<i32>,
}

const EVENTS_SQL: &str = "SELECT e.id, e.public_id, coalesce((
        SELECT array_agg(DISTINCT p.id) FROM channel_mappings m JOIN plugin_instances p ON p.id = m.plugin_instance_id
        WHERE m.event_public_id = e.public_id AND p.enabled), '{}'::int4[]) FROM events e";
const EXPERIMENTS_SQL: &str = "SELECT id, public_id, stopped_on IS NULL FROM experiments";
const RULES_SQL: &str =
    "SELECT r.id, r.name, r.event_public_id, r.operator, r.threshold, r.threshold_high,
        r.action_type, r.webhook_event_type, r.cooldown_seconds, r.clear_threshold, r.rearm_on_clear
        FROM rules r WHERE r.enabled ORDER BY r.id";

impl Catalog {
    /// Read a consistent snapshot (one repeatable-read transaction).
    pub async fn load(client: &mut Client) -> Result<Catalog, CoreError> {
        let tx = client
            .build_transaction()
            .read_only(true)
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead);
        let tx = tx.start().await?;
        let events = tx.query(EVENTS_SQL, &[]).await?;
        let experiments = tx.query(EXPERIMENTS_SQL, &[]).await?;
        let rules = tx.query(RULES_SQL, &[]).await?;
        tx.commit().await?;

        let mut cat = Catalog::default();
        for row in events {
            let public_id: Arc<str> = Arc::from(row.try_get::<_, &str>(1)?);
            let id: i32 = row.try_get(0)?;
            let instances: Vec<i32> = row.try_get(2)?;
            cat.event_public_ids.insert(id, public_id.clone());
            cat.events.insert(
                public_id.clone(),
                EventEntry {
                    id,
                    public_id,
                    active: !instances.is_empty(),
                    instances,
                    rules: Vec::new(),
                },
            );
        }
        for row in experiments {
            let id: i32 = row.try_get(0)?;
            cat.experiment_public_ids
                .insert(id, Arc::from(row.try_get::<_, &str>(1)?));
            if row.try_get::<_, bool>(2)? && cat.running_experiment.is_none_or(|r| id < r) {
                cat.running_experiment = Some(id);
            }
        }
        for row in rules {
            let event: &str = row.try_get(2)?;
            let Some(entry) = cat.events.get_mut(event) else {
                continue;
            };
            // A CHECK constraint limits operators; an unknown one would mean a newer schema: skip the rule.
            let Ok(op) = Op::parse(row.try_get(3)?) else {
                continue;
            };
            let cooldown: i32 = row.try_get(8)?;
            entry.rules.push(Arc::new(Rule {
                id: row.try_get(0)?,
                name: row.try_get(1)?,
                op,
                threshold: row.try_get(4)?,
                threshold_high: row.try_get(5)?,
                action_type: row.try_get(6)?,
                webhook_event_type: row.try_get(7)?,
                cooldown: Duration::from_secs(cooldown.max(0) as u64),
                clear_threshold: row.try_get(9)?,
                rearm_on_clear: row.try_get(10)?,
            }));
        }
        Ok(cat)
    }

    pub fn experiment_public_id(&self, id: Option<i32>) -> Option<Arc<str>> {
        id.and_then(|i| self.experiment_public_ids.get(&i).cloned())
    }
}
