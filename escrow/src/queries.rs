//! The service side of a query: which tables the caller may name, the owners' policies and
//! settings, the privacy-budget ledger, and the sealed batch sources handed to the engine
//! (`escrow-query`). No HTTP here.
//!
//! ```text
//! SQL -> plan (only the caller's own and granted datasets registered)
//!     -> gate (allow-list; derives every column use)
//!     -> foreign datasets joined to one of the caller's   (unjoined_foreign_dataset)
//!     -> casbin decision for every use of another partner's column (usage_not_granted)
//!     -> protection from the owners' settings (strictest applies; metric bounds required)
//!     -> budget spent in the ledger, once per question and data versions, per data owner
//!        across all of its datasets (budget_exhausted)
//!     -> execution under memory and time limits -> answer
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arrow_schema::SchemaRef;
use escrow_policies::{ColumnUse, Decision, PolicySet, Usage};
use escrow_query::exec::KEYS_REDUCTION;
use escrow_query::{
    Answer, BatchIter, BatchSource, EntityHasher, Holder, Limits, Metric, Noise, NoiseKey,
    Protection, QueryTable, SharedMemory,
};
use escrow_query::{Executor, gate};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::audit::{Actor, Event, Outcome};
use crate::catalog::{BudgetCharge, QueryableDataset, Spend, VersionKey};
use crate::matching::{COMPANY_KEY, ID_CHECK, KEY_ID, NAME_ID, NAME_KEY, PLACE_ID, PLACE_KEY};
use crate::settings::{self, DatasetSettings};
use crate::store::{Form, ReadMark, Store, Transform};
use crate::{Error, Result};

/// δ of the partition selection for data-derived groups.
pub const DELTA: f64 = 1e-6;
/// Longest SQL text accepted.
pub const MAX_SQL_BYTES: usize = 64 << 10;
/// The most joined rows one company may yield in a protected question: L per table
/// instance with a GROUP BY column (1 per other). It bounds the work (and time) one company
/// can add to a question.
pub const MAX_FAN_OUT: u64 = 100;

/// Table instances a question on another partner's data may read.
pub const MAX_TABLE_INSTANCES: usize = 8;

/// Limits of query execution.
#[derive(Debug, Clone)]
pub struct QueryConfig {
    pub limits: Limits,
    pub timeout: Duration,
    /// Worker threads of the query runtime.
    pub threads: usize,
    /// Memory the admitted questions share (`escrow_query::memory`).
    pub shared_memory_bytes: usize,
}

impl Default for QueryConfig {
    fn default() -> Self {
        QueryConfig {
            limits: Limits::default(),
            timeout: Duration::from_secs(60),
            threads: std::thread::available_parallelism().map_or(2, usize::from),
            shared_memory_bytes: 8 * Limits::default().memory_bytes,
        }
    }
}

/// Runs queries for authenticated callers.
pub struct QueryService {
    pub(crate) store: Arc<Store>,
    pub(crate) noise_key: NoiseKey,
    /// Key columns execute as entity ids under this (derived from the noise key).
    pub(crate) entity_hasher: EntityHasher,
    pub(crate) config: QueryConfig,
    /// Queries execute on a runtime of their own, so the server's stays responsive.
    executor: Executor,
    shared: SharedMemory,
    policies: tokio::sync::Mutex<Option<(i64, Arc<PolicySet>)>>,
    /// What questions resolved (the datasets, versions, populations and settings they
    /// read), kept while the catalog's generations stand.
    resolved: std::sync::Mutex<Resolved>,
    /// What questions last read of their callers and ledgers, for the next to assume.
    pub copies: crate::assumed::Copies,
    /// Overlap sides being reduced, by name (one reduction of a name at a time).
    pub(crate) flights: Arc<crate::flights::Flights>,
}

/// Results of catalog reads a question made, by key, valid at the generations `at`: every
/// change those reads could see moves one of them (on whichever node made it), so a question
/// that finds the same generations finds the same results. An entry is kept only when the
/// generations read again after its reads are still `at` (no change slipped in between), and
/// everything goes when a question finds other generations. Kept per node, never across
/// partners (the key names the partner asking).
#[derive(Default)]
struct Resolved {
    at: Option<crate::catalog::Generations>,
    entries: std::collections::HashMap<String, Arc<dyn std::any::Any + Send + Sync>>,
}

impl Resolved {
    /// The entries valid at `at`: none when the cache was at other generations (what was
    /// resolved before a change goes at once: it may hold the wrapped keys of a deleted
    /// dataset's versions).
    fn at(
        &mut self,
        at: crate::catalog::Generations,
    ) -> &mut std::collections::HashMap<String, Arc<dyn std::any::Any + Send + Sync>> {
        if self.at != Some(at) {
            self.entries.clear();
            self.at = Some(at);
        }
        &mut self.entries
    }
}

/// Entries kept at most; past it they all go (a new generation empties it anyway).
const RESOLVED_MAX: usize = 4096;

/// What the audit record of a question says about it, gathered as it is checked.
#[derive(Debug, Default)]
pub(crate) struct Trace {
    /// `owner.dataset@vN` of every dataset read.
    pub datasets: Vec<String>,
    /// Partners whose datasets it read.
    pub owners: Vec<String>,
    /// SHA-256 of the plan, the versions read and the protection (hex).
    pub fingerprint: Option<String>,
}

/// Budget state of one dataset after a query.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct BudgetView {
    pub dataset: String,
    /// What the partner has spent on the dataset's owner, as the ε of one equivalent
    /// question: √(Σ ε²) over its questions (zCDP composition, `Catalog::spend`).
    pub spent: f64,
    pub budget: f64,
}

/// A question's charge: what it cost, and what is kept for it when the read that found it
/// paid read that too (`Catalog::spend`: one round trip fewer on a shared catalog).
pub(crate) struct Charged {
    pub(crate) cost: Cost,
    kept: Option<Option<Vec<u8>>>,
}

/// What an answer cost.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Cost {
    /// ε charged to each foreign dataset by this request (0 when repeated or own-only).
    pub epsilon_spent: f64,
    /// The same question on the same data was answered before: same answer, no new spend.
    pub repeated: bool,
    pub budgets: Vec<BudgetView>,
}

/// A query's answer with what it cost.
#[derive(Debug)]
pub struct QueryOutcome {
    pub answer: Answer,
    pub cost: Cost,
}

pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::internal(format!("blocking task failed: {e}")))?
}

/// Calls its function once: when asked to, or else when dropped.
struct StopOnDrop<F: FnOnce()>(Option<F>);

impl<F: FnOnce()> StopOnDrop<F> {
    fn now(&mut self) {
        if let Some(stop) = self.0.take() {
            stop()
        }
    }
}

impl<F: FnOnce()> Drop for StopOnDrop<F> {
    fn drop(&mut self) {
        self.now()
    }
}

/// Record an audit event from async code (the append is blocking I/O).
pub(crate) async fn record(store: Arc<Store>, event: Event) -> Result<()> {
    blocking(move || store.record(&event)).await
}

impl QueryService {
    /// Starts the query runtime (`config.threads` worker threads).
    pub fn new(store: Arc<Store>, noise_key: NoiseKey, config: QueryConfig) -> Result<Self> {
        let executor = Executor::new(config.threads)
            .map_err(|e| Error::internal(format!("cannot start the query runtime: {e}")))?;
        Ok(QueryService {
            store,
            entity_hasher: noise_key.entity_hasher(),
            noise_key,
            shared: SharedMemory::new(config.shared_memory_bytes),
            config,
            executor,
            policies: tokio::sync::Mutex::new(None),
            resolved: std::sync::Mutex::new(Resolved::default()),
            copies: crate::assumed::Copies::default(),
            flights: Arc::default(),
        })
    }

    /// What the server does in the background once version `number` of `owner`'s `dataset`,
    /// keyed by `key`, has committed: its entity columns and companies read
    /// ([`warm_entity_columns`]), then its overlap side ([`Self::side_ahead`]; after the
    /// columns, as the two would compete for the same cores). Outcomes are logged: a question
    /// that comes first reads what it needs itself.
    pub(crate) async fn after_upload(
        &self,
        owner: &str,
        dataset: &str,
        number: i64,
        key: Option<String>,
    ) {
        if let Some(key) = key {
            let (store, hasher) = (self.store.clone(), self.entity_hasher.clone());
            let threads = self.config.limits.target_partitions;
            let (o, d) = (owner.to_string(), dataset.to_string());
            let started = std::time::Instant::now();
            let warmed = blocking(move || {
                warm_entity_columns(&store, &hasher, (&o, &d), (number, &key), threads)
            });
            match warmed.await {
                Ok(()) => tracing::debug!(
                    dataset = %dataset,
                    ms = started.elapsed().as_millis() as u64,
                    "entity columns read into the cache after an upload"
                ),
                // A newer upload or a delete in between, say: the next question reads.
                Err(e) => {
                    tracing::debug!(dataset = %dataset, error = %e, "entity columns not read after an upload")
                }
            }
        }
        self.side_ahead(owner, dataset).await;
    }

    /// What was resolved for `key` at generations `at`, if it was.
    pub(crate) fn resolved<T: Clone + Send + Sync + 'static>(
        &self,
        at: crate::catalog::Generations,
        key: &str,
    ) -> Option<T> {
        // (Looked up only: generations that are not the cache's, possibly assumed and older,
        // find nothing and leave it as it is.)
        let r = self.resolved.lock().unwrap_or_else(|p| p.into_inner());
        if r.at != Some(at) {
            return None;
        }
        r.entries.get(key)?.downcast_ref::<T>().cloned()
    }

    /// Keep what was resolved for `key` from reads made after the generations were `at`.
    pub(crate) fn keep_resolved<T: Send + Sync + 'static>(
        &self,
        at: crate::catalog::Generations,
        key: String,
        value: T,
    ) {
        let mut r = self.resolved.lock().unwrap_or_else(|p| p.into_inner());
        let entries = r.at(at);
        if entries.len() >= RESOLVED_MAX {
            entries.clear();
        }
        entries.insert(key, Arc::new(value));
    }

    /// The casbin policy set of the current grants, rebuilt only after a change.
    pub(crate) async fn policy_set(&self) -> Result<Arc<PolicySet>> {
        Ok(self.policy_set_at().await?.0)
    }

    /// The policy set, and the catalog's generations it was read at (one read).
    pub(crate) async fn policy_set_at(
        &self,
    ) -> Result<(Arc<PolicySet>, crate::catalog::Generations)> {
        let mut cached = self.policies.lock().await;
        // Read from the catalog (a change made on another node moves it too): with the
        // caller's identity when this request read it, else now.
        let at = match crate::assumed::read_with_caller() {
            // Not when the set kept here is newer (built after a change the noted
            // generations predate): it would be rebuilt, and labelled older.
            Some(at) if cached.as_ref().is_none_or(|(g, _)| at.policy >= *g) => at,
            _ => {
                let store = self.store.clone();
                let read = std::time::Instant::now();
                let at = blocking(move || store.catalog().generations()).await?;
                self.copies.read_generations(read, at);
                at
            }
        };
        let generation = at.policy;
        if let Some((g, set)) = cached.as_ref()
            && *g == generation
        {
            return Ok((set.clone(), at));
        }
        let store = self.store.clone();
        let grants = blocking(move || {
            // The generation moves with every delete, on whichever node: plaintext of a
            // version gone from the catalog leaves this node's memory too.
            store.forget_unlisted()?;
            store.catalog().all_grants()
        })
        .await?;
        let set = Arc::new(
            PolicySet::build(grants)
                .await
                .map_err(|e| Error::internal(format!("policy set: {e}")))?,
        );
        *cached = Some((generation, set.clone()));
        self.copies.policy_moved();
        Ok((set, at))
    }

    /// Record an event; fails closed.
    pub(crate) async fn audit(&self, event: Event) -> Result<()> {
        record(self.store.clone(), event).await
    }

    /// Record a question's event, and with it confirm what its request assumed
    /// (`crate::assumed`): [`Error::Stale`], with nothing recorded, if that no longer holds.
    async fn audit_question(&self, event: Event) -> Result<()> {
        let assumed = crate::assumed::take_assumed();
        if assumed.is_empty() {
            return self.audit(event).await;
        }
        let store = self.store.clone();
        match blocking(move || store.record_assuming(&event, &assumed)).await? {
            true => Ok(()),
            false => Err(Error::Stale),
        }
    }

    /// Confirm what this request assumed, before it charges or computes anything (one read);
    /// [`Error::Stale`] if that no longer holds.
    pub(crate) async fn confirm_assumed(&self) -> Result<()> {
        let assumed = crate::assumed::take_assumed();
        if assumed.is_empty() {
            return Ok(());
        }
        let store = self.store.clone();
        match blocking(move || store.catalog().read(|tx| assumed.hold(tx))).await? {
            true => Ok(()),
            false => Err(Error::Stale),
        }
    }

    /// Record a question's outcome before it is released: the answer's `facts` when it was
    /// answered, the rule or code when not. If the record cannot be written, nothing is
    /// released and the audit's error is returned instead.
    pub(crate) async fn release<T>(
        &self,
        event: Event,
        result: Result<T>,
        facts: impl FnOnce(&T) -> serde_json::Value,
    ) -> Result<T> {
        match result {
            Ok(v) => {
                self.audit_question(event.with(facts(&v))).await?;
                Ok(v)
            }
            // Nothing happened: it is asked again.
            Err(Error::Stale) => Err(Error::Stale),
            Err(e) => {
                self.audit_question(event.failed(&e)).await?;
                Err(e)
            }
        }
    }

    /// Answer `sql` for `actor`'s partner, or refuse it; audited either way (also when the
    /// client goes away after the question was charged: [`AbandonedQuestion`]).
    pub async fn run(&self, actor: &Actor, sql: &str) -> Result<QueryOutcome> {
        let caller = actor.partner_name()?;
        let mut trace = Trace::default();
        let mut abandoned = AbandonedQuestion::new(self.store.clone());
        let on_charge = |t: &Trace| abandoned.charged(question_event(actor, sql, t));
        let result = self
            .answer_sql(caller, sql, &mut trace, &on_charge)
            .await
            .map_err(|e| point_to_explain(e, "escrow policy explain \"SQL\""));
        abandoned.disarm();
        let event = question_event(actor, sql, &trace);
        self.release(event, result, |o| {
            serde_json::json!({
                "rows": o.answer.suppressed.len(),
                "suppressed": o.answer.suppressed.iter().filter(|s| **s).count(),
                "epsilon_spent": o.cost.epsilon_spent,
                "repeated": o.cost.repeated,
            })
        })
        .await
    }

    async fn answer_sql(
        &self,
        caller: &str,
        sql: &str,
        trace: &mut Trace,
        on_charge: &(dyn Fn(&Trace) + Sync),
    ) -> Result<QueryOutcome> {
        let checked = self.check_sql(caller, sql, trace).await?;
        let (fp, versions) = (checked.fingerprint, checked.versions.clone());
        let (tables, report, protection) = checked.into_allowed(caller)?;
        let mut cost = Cost::default();
        let protection = match protection {
            None => None,
            Some((mut p, charges)) => {
                p.noise = Noise::new(self.noise_key.clone(), fp);
                let mut charged = self
                    .charge(
                        caller,
                        charges,
                        p.epsilon.as_f64(),
                        fp,
                        Some(versions.clone()),
                    )
                    .await?;
                on_charge(trace);
                let before = self.released_before(caller, fp, &mut charged).await?;
                cost = charged.cost;
                if let Some(bytes) = before {
                    let answer = kept::decode(&bytes)?;
                    return Ok(QueryOutcome { answer, cost });
                }
                Some(p)
            }
        };
        // What running it stands on is confirmed first.
        self.confirm_assumed().await?;
        let protected = protection.is_some();
        let run = async {
            let (runs, state) =
                escrow_query::plan_for_execution(sql, &tables, &self.config.limits, &report)
                    .await?;
            let stop = escrow_query::Stop::default();
            let stopping = stop.clone();
            let report = report.clone();
            let task = self.executor.spawn(async move {
                escrow_query::execute(&state, runs, &report, protection.as_ref(), &stopping).await
            });
            let abort = task.stopper();
            self.within_time_limit("query", async { Ok(task.await?) }, &stop, move || {
                abort.abort()
            })
            .await
        };
        let outcome = run.await;
        if let Ok(answer) = &outcome {
            for (stage, took) in &answer.stages {
                tracing::debug!(stage, ms = took.as_secs_f64() * 1e3, "question stage");
            }
        }
        if protected {
            self.keep_outcome(caller, fp, versions, &outcome, kept::encode)
                .await;
        }
        Ok(QueryOutcome {
            answer: outcome?,
            cost,
        })
    }

    /// Before a protected question runs: asked again, what was released for it, or the
    /// refusal `not_run_again` if it was not answered (or is running now: its charge marked
    /// it). `None`: run it.
    pub(crate) async fn released_before(
        &self,
        caller: &str,
        fingerprint: [u8; 32],
        charged: &mut Charged,
    ) -> Result<Option<Vec<u8>>> {
        if !charged.cost.repeated {
            return Ok(None);
        }
        let kept = match charged.kept.take() {
            Some(read_with_charge) => read_with_charge.map(Kept::from_bytes),
            None => self.kept(caller, fingerprint).await?,
        };
        match kept {
            Some(Kept::Released(bytes)) => Ok(Some(bytes)),
            Some(Kept::NotAnswered(why)) if why == "running" => Err(not_run_again(
                "it is running now, or the server stopped while it ran",
            )),
            Some(Kept::NotAnswered(why)) => Err(not_run_again(&why)),
            // charged before answers were kept: it runs
            None => Ok(None),
        }
    }

    /// After a protected question ran: keep what was released (`encode`d), or that it was
    /// not answered and why.
    pub(crate) async fn keep_outcome<T>(
        &self,
        caller: &str,
        fingerprint: [u8; 32],
        versions: Vec<String>,
        outcome: &Result<T>,
        encode: impl FnOnce(&T) -> Result<Vec<u8>>,
    ) {
        let kept = match outcome {
            Ok(v) => encode(v).map(Kept::Released),
            Err(e) => Ok(Kept::not_answered(e.code())),
        };
        self.keep(caller, fingerprint, versions, kept).await;
    }

    /// What was kept for `caller`'s question `fingerprint` (a query's answer or an overlap's
    /// matrix, or that it was charged and not answered), if anything.
    async fn kept(&self, caller: &str, fingerprint: [u8; 32]) -> Result<Option<Kept>> {
        let (store, who) = (self.store.clone(), caller.to_string());
        let bytes = blocking(move || {
            store
                .catalog()
                .released_answer(&who, &hex::encode(fingerprint))
        })
        .await?;
        Ok(bytes.map(Kept::from_bytes))
    }

    /// Keep what was released for `caller`'s question `fingerprint`, computed from the
    /// dataset versions `versions`. A failure to keep it is logged, not returned: the release
    /// stands either way (the question would then run again if asked again).
    async fn keep(
        &self,
        caller: &str,
        fingerprint: [u8; 32],
        versions: Vec<String>,
        what: Result<Kept>,
    ) {
        let (store, who) = (self.store.clone(), caller.to_string());
        let kept = match what.map(Kept::into_bytes) {
            Ok(bytes) => {
                blocking(move || {
                    store
                        .catalog()
                        .keep_answer(&who, &hex::encode(fingerprint), &versions, &bytes)
                })
                .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = kept {
            tracing::warn!(error = %e, "keeping a released answer failed");
        }
    }

    /// `work` under the per-question time limit: refused with `query_timeout` (naming
    /// `what`) when it runs longer, but only after it was stopped and has ended, so that
    /// the question's admission slot (held by the caller) is not given back while its work
    /// still takes a core. Stopping it is `question.request()`, then `abort`; `work` must
    /// end soon after (at its next yield or batch). If this future is dropped instead
    /// (client gone, shutdown), it is stopped then, without the wait. Work that `question`
    /// says is past its admission (`Stop::admit`: the rest bounded by its inputs' sizes, its
    /// time depending on who matches whom) is not cut off: it runs to its end.
    pub(crate) async fn within_time_limit<T>(
        &self,
        what: &str,
        work: impl Future<Output = Result<T>>,
        question: &escrow_query::Stop,
        abort: impl FnOnce(),
    ) -> Result<T> {
        let requested = question.clone();
        let mut stop = StopOnDrop(Some(move || {
            requested.request();
            abort()
        }));
        let mut work = std::pin::pin!(work);
        match tokio::time::timeout(self.config.timeout, work.as_mut()).await {
            Ok(result) => result,
            // Admitted first (and so not stopped): it runs to its end.
            Err(_) if !question.unless_admitted() => {
                tracing::info!(
                    what,
                    "work past its admission ran over the time limit: let finish"
                );
                work.await
            }
            Err(_) => {
                stop.now();
                let stopping = std::time::Instant::now();
                let _ = work.await;
                tracing::info!(
                    what,
                    stopped_after_ms = stopping.elapsed().as_millis() as u64,
                    "work over the time limit stopped"
                );
                Err(Error::bad(
                    "query_timeout",
                    format!(
                        "the {what} ran longer than the limit of {} s",
                        self.config.timeout.as_secs()
                    ),
                ))
            }
        }
    }

    /// Plan `sql` for `caller` and apply every check to it without spending or running
    /// anything: what `run` enforces and `explain` shows. Fails on what the gate refuses
    /// outright (no column uses to decide then).
    pub(crate) async fn check_sql(
        &self,
        caller: &str,
        sql: &str,
        trace: &mut Trace,
    ) -> Result<CheckedSql> {
        if sql.len() > MAX_SQL_BYTES {
            return Err(Error::bad(
                "query_too_long",
                format!("queries are limited to {MAX_SQL_BYTES} bytes"),
            ));
        }
        let set = self.policy_set().await?;
        let (tables, versions) = self.tables_for(caller, set.clone()).await?;
        let plan = escrow_query::plan_sql(sql, &tables).await?;
        for (owner, dataset) in gate::scanned_tables(&plan) {
            let version = versions
                .get(&(owner.clone(), dataset.clone()))
                .map(|v| v.number)
                .unwrap_or_default();
            trace.datasets.push(format!("{owner}.{dataset}@v{version}"));
            if !trace.owners.contains(&owner) {
                trace.owners.push(owner);
            }
        }
        let report = gate::check(&plan, &gate::keys_of(&tables))?;
        let standalone = |t: &escrow_query::TableInstance| {
            let u = ColumnUse::dataset_wide(&t.owner, &t.dataset, Usage::Standalone);
            matches!(set.decide(caller, &u), Ok(d) if d.allowed())
        };
        let joined = gate::check_foreign_joined(&report, caller, &standalone).map_err(Error::from);
        let decisions = report
            .uses
            .iter()
            .map(|u| Ok((u.clone(), decide(&set, caller, u)?)))
            .collect::<Result<Vec<_>>>()?;
        let protection = self.protection(caller, &report, &versions).await;
        let fp = fingerprint(
            &plan,
            &report,
            &versions,
            protection
                .as_ref()
                .ok()
                .and_then(|p| p.as_ref())
                .map(|(p, _)| p),
        );
        trace.fingerprint = Some(hex::encode(fp));
        let read = report
            .tables
            .iter()
            .filter_map(|t| versions.get(&(t.owner.clone(), t.dataset.clone())))
            .map(|v| v.id.clone())
            .collect();
        Ok(CheckedSql {
            versions: read,
            tables,
            report,
            decisions,
            joined,
            protection,
            fingerprint: fp,
        })
    }

    /// Spend `epsilon` of each charged dataset's budget for `caller`, once per question
    /// (`fingerprint`); refused when a budget would be exceeded. With `dry_run`, nothing is
    /// spent: the cost the question would have.
    /// Charge `caller` for the question `fingerprint`. Unless a dry run, reading `versions`:
    /// a new charge marks the question as running in the same catalog transaction, so the
    /// same question asked again at once (on any node) is refused, not run twice.
    pub(crate) async fn charge(
        &self,
        caller: &str,
        charges: Vec<BudgetCharge>,
        epsilon: f64,
        fingerprint: [u8; 32],
        versions: Option<Vec<String>>,
    ) -> Result<Charged> {
        let (store, who, fp_hex) = (
            self.store.clone(),
            caller.to_string(),
            hex::encode(fingerprint),
        );
        let dry_run = versions.is_none();
        // Asked again: paid, and what was kept for it, as this node last read them; assumed
        // (`crate::assumed`), confirmed with the question's audit record.
        if let Some(paid) = self.paid_copy(caller, &charges, fingerprint, dry_run) {
            crate::assumed::assume(|a| {
                for (owner, _, rows) in &paid.owners {
                    a.ledger(caller, owner, *rows);
                }
                a.kept(caller, &fp_hex, &paid.kept);
            });
            crate::faults::hit("query.charged")?;
            let totals = charges
                .iter()
                .map(|c| {
                    (paid.owners.iter())
                        .find(|(o, ..)| *o == c.owner)
                        .map_or(0.0, |(_, total, _)| *total)
                })
                .collect();
            return Ok(charged(
                &charges,
                epsilon,
                false,
                totals,
                Some(Some(paid.kept)),
            ));
        }
        // What anything charged or computed stands on is confirmed first.
        self.confirm_assumed().await?;
        let ch = charges.clone();
        let running = Kept::not_answered("running").into_bytes();
        let marker = running.clone();
        let spent = blocking(move || {
            let running = versions.as_deref().map(|v| (v, marker.as_slice()));
            store
                .catalog()
                .spend(&who, &ch, epsilon, &fp_hex, dry_run, running)
        })
        .await?;
        if !dry_run {
            crate::faults::hit("query.charged")?;
        }
        match spent {
            Spend::Charged {
                new,
                totals,
                kept,
                ledger,
            } => {
                if let Some(Some(bytes)) = &kept
                    && !ledger.is_empty()
                    && *bytes != running
                    && bytes.len() <= crate::assumed::PAID_COPY_MAX_BYTES
                {
                    let owners = ledger
                        .iter()
                        .map(|(owner, rows)| {
                            let total = (charges.iter().zip(&totals))
                                .find(|(c, _)| c.owner == *owner)
                                .map_or(0.0, |(_, t)| *t);
                            (owner.clone(), total, *rows)
                        })
                        .collect();
                    let paid = crate::assumed::Paid {
                        owners,
                        kept: bytes.clone(),
                    };
                    self.copies.keep_paid(caller, fingerprint, paid);
                }
                Ok(charged(&charges, epsilon, new, totals, kept))
            }
            Spend::Exhausted { charge: c, spent } => Err(Error::refused(
                "budget_exhausted",
                format!(
                    "your privacy budget on {}'s data is spent ({spent:.3} of {:.3}, the budget of {}.{}, counted over every dataset of {}; this question needs {epsilon:.3}, and the epsilon of questions add up in squares); its owner can raise it",
                    c.owner, c.budget, c.owner, c.dataset, c.owner
                ),
            )),
        }
    }

    /// The node's copy of what `caller`'s question `fingerprint`, charged to the owners of
    /// `charges`, last read of the ledger and its kept answer, when this request may
    /// assume it (a question, not a dry run).
    fn paid_copy(
        &self,
        caller: &str,
        charges: &[BudgetCharge],
        fingerprint: [u8; 32],
        dry_run: bool,
    ) -> Option<crate::assumed::Paid> {
        if dry_run || !crate::assumed::assuming() {
            return None;
        }
        let paid = self.copies.paid(caller, fingerprint)?;
        let owners: std::collections::BTreeSet<&str> =
            charges.iter().map(|c| c.owner.as_str()).collect();
        let same = owners.len() == paid.owners.len()
            && (paid.owners.iter()).all(|(o, ..)| owners.contains(o.as_str()));
        same.then_some(paid)
    }

    /// The caller's own and granted datasets as engine tables, with their live versions.
    /// Another partner's dataset is declared with its key column and the columns it granted
    /// the caller some use of, nothing else: a column it did not share answers as one that
    /// does not exist (`unknown_column`), so a question cannot tell whether it exists.
    async fn tables_for(
        &self,
        caller: &str,
        set: Arc<PolicySet>,
    ) -> Result<(Vec<QueryTable>, Live)> {
        let store = self.store.clone();
        let who = caller.to_string();
        let hasher = self.entity_hasher.clone();
        blocking(move || {
            let mut tables = Vec::new();
            let mut versions = BTreeMap::new();
            for d in store.catalog().queryable(&who)? {
                let sealed = store.schema_of(&d.live)?;
                versions.insert(
                    (d.owner.clone(), d.name.clone()),
                    LiveVersion {
                        id: d.live.version_id.clone(),
                        number: d.live.version,
                        rows: u64::try_from(d.rows).unwrap_or(0),
                    },
                );
                let QueryableDataset {
                    owner,
                    name,
                    key_column,
                    live,
                    ..
                } = d;
                let (schema, executes, form) = query_form(&sealed, key_column.as_deref(), &hasher)?;
                // SQL sees the uploaded columns only, not the name and place ids after them.
                let width = schema.fields().len();
                let executes = Arc::new(
                    executes
                        .project(&(0..width).collect::<Vec<_>>())
                        .map_err(|e| Error::internal(format!("query form: {e}")))?,
                );
                let schema = if owner == who {
                    schema
                } else {
                    shared_columns(&set, &who, &owner, &name, key_column.as_deref(), &schema)?
                };
                let source = Arc::new(SealedSource {
                    store: store.clone(),
                    version: live,
                    schema: executes,
                    form,
                    width,
                    asker: who.clone(),
                    ids: hasher.check(),
                });
                tables.push(QueryTable {
                    owner,
                    dataset: name,
                    key_column,
                    schema,
                    provider: escrow_query::source::table(source)
                        .map_err(|e| Error::internal(format!("table provider: {e}")))?,
                });
            }
            Ok((tables, versions))
        })
        .await
    }

    /// Protection for a query that reads other partners' datasets (`None` if it reads only
    /// the caller's own): the strictest settings of every dataset read, the budget charges.
    async fn protection(
        &self,
        caller: &str,
        report: &escrow_query::GateReport,
        versions: &Live,
    ) -> Result<Protected> {
        let Some(entity_table) = report.tables.iter().position(|t| t.owner != caller) else {
            return Ok(None);
        };
        // The privacy unit is an entity (a key value): a dataset without a key column has
        // no unit to count, bound or protect, so other partners cannot query it.
        if let Some(t) = report
            .tables
            .iter()
            .find(|t| t.owner != caller && t.key_column.is_none())
        {
            return Err(Error::refused(
                "no_privacy_unit",
                format!(
                    "{}.{} has no key column, so its entities cannot be counted or protected; only its owner can query it",
                    t.owner, t.dataset
                ),
            ));
        }
        let store = self.store.clone();
        let datasets: Vec<(String, String)> = report
            .tables
            .iter()
            .map(|t| (t.owner.clone(), t.dataset.clone()))
            .collect();
        let settings = blocking(move || {
            let mut m = BTreeMap::new();
            for (o, d) in datasets {
                let s = settings::of(&store, &o, &d)?;
                m.insert((o, d), s);
            }
            Ok(m)
        })
        .await?;
        let (min_entities, epsilon, max_groups) = strictest(
            settings
                .iter()
                .filter(|((o, _), _)| o != caller)
                .map(|(_, s)| s),
        );
        // Each table instance is reduced and held on its own before the joins; how many
        // is bounded so that the memory of that phase is too.
        if report.tables.len() > MAX_TABLE_INSTANCES {
            return Err(Error::refused(
                "too_many_tables",
                format!(
                    "a question on another partner's data reads at most {MAX_TABLE_INSTANCES} table instances; this one reads {}",
                    report.tables.len()
                ),
            ));
        }
        // Each table instance with a GROUP BY column holds at most L rows per company
        // after its reduction (one without, one row): one company yields at most
        // L^(such tables) joined rows, the work it alone can add, bounded so that the time
        // of a question cannot tell it apart (docs/THREAT_MODEL.md).
        let fan_out = escrow_query::exec::fan_out(report, max_groups);
        if fan_out > MAX_FAN_OUT {
            return Err(Error::refused(
                "fan_out_too_large",
                format!(
                    "with max_groups_per_entity {max_groups} over the table instances with GROUP BY columns, one company could yield {fan_out} joined rows, more than {MAX_FAN_OUT}: group by the columns of fewer tables, or the owners can lower max_groups_per_entity"
                ),
            ));
        }
        let mut bounds = Vec::new();
        for m in &report.aggregates {
            bounds.push(match m {
                Metric::Entities => None,
                Metric::Sum { table, column } | Metric::Avg { table, column } => {
                    let t = &report.tables[*table];
                    let s = &settings[&(t.owner.clone(), t.dataset.clone())];
                    let [lo, hi] = *s.bounds.get(column).ok_or_else(|| {
                        Error::refused(
                            "metric_bounds_missing",
                            format!(
                                "{}.{}.{column} has no clamping bounds; its owner sets them with `escrow policy set {} --bounds {column}=LOW:HIGH`",
                                t.owner, t.dataset, t.dataset
                            ),
                        )
                    })?;
                    Some((lo, hi))
                }
            });
        }
        let charges: Vec<BudgetCharge> = settings
            .iter()
            .filter(|((o, _), _)| o != caller)
            .map(|((o, d), s)| BudgetCharge {
                owner: o.clone(),
                dataset: d.clone(),
                budget: s.budget,
            })
            .collect();
        let p = Protection {
            min_entities,
            epsilon: escrow_query::Epsilon::at_most(epsilon),
            max_groups_per_entity: max_groups,
            delta: DELTA,
            entity_table,
            bounds,
            tables: (report.tables.iter())
                .map(
                    |t| match versions.get(&(t.owner.clone(), t.dataset.clone())) {
                        _ if t.owner == caller => Holder::Caller,
                        Some(v) => Holder::Partner {
                            stored_rows: v.rows,
                        },
                        None => Holder::Partner {
                            stored_rows: u64::MAX,
                        },
                    },
                )
                .collect(),
            shared: self.shared.share(caller),
            noise: Noise::new(self.noise_key.clone(), [0; 32]),
        };
        Ok(Some((p, charges)))
    }
}

/// The declared schema of `owner`'s `dataset` as `caller` may name it: the key column and
/// every column with a use granted to `caller`.
fn shared_columns(
    set: &PolicySet,
    caller: &str,
    owner: &str,
    dataset: &str,
    key: Option<&str>,
    schema: &SchemaRef,
) -> Result<SchemaRef> {
    let mut keep = Vec::new();
    for (i, f) in schema.fields().iter().enumerate() {
        let shared = Some(f.name().as_str()) == key
            || Usage::COLUMN.iter().any(|&usage| {
                let u = ColumnUse {
                    owner: owner.to_string(),
                    dataset: dataset.to_string(),
                    column: f.name().clone(),
                    usage,
                };
                matches!(set.decide(caller, &u), Ok(d) if d.allowed())
            });
        if shared {
            keep.push(i);
        }
    }
    schema
        .project(&keep)
        .map(Arc::new)
        .map_err(|e| Error::internal(format!("shared columns: {e}")))
}

/// A refusal by a policy rule (not a planning one) says where to see every rule the question
/// needs: `command` explains it.
pub(crate) fn point_to_explain(e: Error, command: &str) -> Error {
    match e {
        Error::Refused { rule, message } if !escrow_query::is_planning_rule(rule) => {
            Error::Refused {
                rule,
                message: format!("{message}; `{command}` shows each rule this question needs"),
            }
        }
        other => other,
    }
}

/// casbin's decision on one use (an engine failure is an internal error, never a refusal).
pub(crate) fn decide(set: &PolicySet, caller: &str, u: &ColumnUse) -> Result<Decision> {
    set.decide(caller, u)
        .map_err(|e| Error::internal(format!("policy decision: {e}")))
}

/// Every use of another partner's column must be granted to the caller.
pub(crate) fn check_grants<'a>(
    set: &PolicySet,
    caller: &str,
    uses: impl IntoIterator<Item = &'a ColumnUse>,
) -> Result<()> {
    let decided = uses
        .into_iter()
        .map(|u| Ok((u.clone(), decide(set, caller, u)?)))
        .collect::<Result<Vec<_>>>()?;
    refuse_missing(caller, &decided)
}

/// `usage_not_granted`, naming every use no grant allows, if there is one.
pub(crate) fn refuse_missing(caller: &str, decided: &[(ColumnUse, Decision)]) -> Result<()> {
    let missing: Vec<String> = decided
        .iter()
        .filter(|(_, d)| !d.allowed())
        .map(|(u, _)| u.to_string())
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::refused(
            "usage_not_granted",
            format!(
                "not granted to {caller}: {} (the owner can grant it with `escrow policy grant`)",
                missing.join(", ")
            ),
        ))
    }
}

/// The protection of a question that reads other partners' data and the budget it charges
/// (`None`: it reads only the caller's own).
pub(crate) type Protected = Option<(Protection, Vec<BudgetCharge>)>;

/// A question checked by `check_sql`: the plan's tables and gate report, the decision on
/// every column use, and the outcome of each later rule.
pub(crate) struct CheckedSql {
    pub tables: Vec<QueryTable>,
    pub report: escrow_query::GateReport,
    /// Every use the plan makes, with casbin's decision.
    pub decisions: Vec<(ColumnUse, Decision)>,
    /// Foreign datasets joined to one of the caller's (or standalone granted).
    pub joined: Result<()>,
    /// The protection and budget charges, or the rule that refuses them.
    pub protection: Result<Protected>,
    pub fingerprint: [u8; 32],
    /// Version ids of the datasets the plan reads.
    pub versions: Vec<String>,
}

impl CheckedSql {
    /// The first refusal in the order the rules apply (joins, grants, protection), or the
    /// tables, report and protection to run with (`None`: only the caller's own data).
    pub(crate) fn into_allowed(
        self,
        caller: &str,
    ) -> Result<(Vec<QueryTable>, escrow_query::GateReport, Protected)> {
        self.joined?;
        refuse_missing(caller, &self.decisions)?;
        Ok((self.tables, self.report, self.protection?))
    }
}

/// The strictest protection of several datasets' settings: the largest k, the smallest ε and
/// the smallest L.
pub(crate) fn strictest<'a>(
    settings: impl IntoIterator<Item = &'a DatasetSettings>,
) -> (u64, f64, u32) {
    let mut settings = settings.into_iter().peekable();
    if settings.peek().is_none() {
        let d = DatasetSettings::default();
        return (d.min_entities, d.epsilon, d.max_groups_per_entity);
    }
    settings.fold((0, f64::INFINITY, u32::MAX), |(k, e, l), s| {
        (
            k.max(s.min_entities),
            e.min(s.epsilon),
            l.min(s.max_groups_per_entity),
        )
    })
}

/// The live version of every dataset a caller may query, by (owner, name).
type Live = BTreeMap<(String, String), LiveVersion>;

#[derive(Debug, Clone)]
struct LiveVersion {
    id: String,
    number: i64,
    rows: u64,
}

/// What makes two questions "the same": the allowed plan, the data versions it reads and the
/// protection applied (not the budget). Whitespace and keyword case in the SQL do not matter.
fn fingerprint(
    plan: &escrow_query::LogicalPlan,
    report: &escrow_query::GateReport,
    versions: &Live,
    p: Option<&Protection>,
) -> [u8; 32] {
    let mut h = Sha256::new();
    // v3: discrete Gaussian noise (an answer kept from v2 had Laplace noise).
    h.update(b"escrow-question-v3\0");
    let field = |h: &mut Sha256, bytes: &[u8]| {
        h.update((bytes.len() as u64).to_be_bytes());
        h.update(bytes);
    };
    field(&mut h, plan.display_indent().to_string().as_bytes());
    // The plan's text prints text literals without escaping them (`IN ('a', 'b"), Utf8("c')`
    // prints as `IN ('a','b','c')` does), so every literal is hashed too, each on its own:
    // two questions share a fingerprint only if their plans and all their values are equal.
    let literals = gate::literals(plan);
    field(&mut h, &(literals.len() as u64).to_be_bytes());
    for l in &literals {
        field(&mut h, l.as_bytes());
    }
    for t in &report.tables {
        let v = versions
            .get(&(t.owner.clone(), t.dataset.clone()))
            .map(|v| v.id.as_str())
            .unwrap_or("");
        h.update(format!("\0{}.{}@{v}", t.owner, t.dataset).as_bytes());
    }
    if let Some(p) = p {
        h.update(
            format!(
                "\0k={} eps={} L={} delta={} bounds={:?}",
                p.min_entities,
                p.epsilon.as_f64(),
                p.max_groups_per_entity,
                p.delta,
                p.bounds
            )
            .as_bytes(),
        );
    }
    h.finalize().into()
}

/// Reads the entity columns of a dataset's live version (its key's entity ids, and its name
/// and place keys where it has them) into the plaintext cache, and reduces its key column to
/// its companies as a SQL question joining the version on its key alone does
/// (`escrow_query::exec::reduce_keys`, kept for every asker). Every overlap matrix and every
/// SQL join over the version reads them, so the first question after an upload finds them
/// decrypted: the server calls this when version `number` of `dataset`, keyed by `key`, has
/// just committed, in the background (a question that comes first reads them itself), with
/// the `threads` a question reduces on. Nothing is read once another version is live (its
/// key may be another column).
pub(crate) fn warm_entity_columns(
    store: &Arc<Store>,
    hasher: &EntityHasher,
    (owner, dataset): (&str, &str),
    (number, key): (i64, &str),
    threads: usize,
) -> Result<()> {
    let version = store.live_version(owner, dataset)?;
    if version.version != number {
        return Ok(());
    }
    let mark = store.read_mark(&version)?;
    let sealed = store.schema_of(&version)?;
    let (_, whole, form) = query_form(&sealed, Some(key), hasher)?;
    let columns: Vec<usize> = [key, NAME_KEY, PLACE_KEY]
        .iter()
        .filter_map(|c| whole.index_of(c).ok())
        .collect();
    // The key's ids come first when it has them: kept from the same read for its companies.
    let keyed = columns
        .first()
        .is_some_and(|&c| whole.field(c).name() == key);
    let mut keys = Vec::new();
    for batch in store.batches(&version, mark, &form, &columns)? {
        let batch = batch?;
        if keyed {
            keys.push(batch.column(0).clone());
        }
    }
    if !keyed {
        return Ok(());
    }
    let (companies, bytes) = escrow_query::exec::reduce_keys(keys, threads)
        .map_err(|e| Error::internal(format!("a version's companies: {e}")))?;
    seal_companies_later(store, &version, hasher.check(), companies.clone());
    // Kept as a question keeps them: under the name every asker looks up (no asker's own).
    let keeper = SourceKeeper {
        store: store.clone(),
        version,
        mark,
        asker: String::new(),
        ids: hasher.check(),
        reseal: Default::default(),
    };
    escrow_query::Keeper::keep(&keeper, KEYS_REDUCTION, companies, bytes);
    Ok(())
}

/// How a sealed version is queried: the declared schema (what users plan against: the
/// uploaded columns), the schema it executes with, and its form (each column's stored
/// column, and how it is turned into what executes). The
/// key column executes as entity ids of each row's company key (the hidden column
/// `matching::COMPANY_KEY`, sealed at upload for website keys; null for unmatched rows) or,
/// for id keys and versions without that column, of the key text itself. A version sealed
/// with name keys executes with one more column at the end, `matching::NAME_KEY` as the
/// entity ids those keys would have, and one with places one more again,
/// `matching::PLACE_KEY` as ids of its places (for the overlap engine; SQL sees the uploaded
/// columns only). Ids sealed at upload (`matching::KEY_ID`, `NAME_ID`, `PLACE_ID`) under
/// this hash are read as they are, not hashed again. A version has this one form: the
/// plaintext cache holds its columns by their place in it.
pub(crate) fn query_form(
    sealed: &SchemaRef,
    key: Option<&str>,
    hasher: &EntityHasher,
) -> Result<(SchemaRef, SchemaRef, Form)> {
    let (shown, declared) = crate::matching::declared_schema(sealed)
        .map_err(|e| Error::internal(format!("declared schema: {e}")))?;
    let Some(key) = key else {
        let columns = shown.iter().map(|&i| (i, None)).collect();
        return Ok((
            declared.clone(),
            declared.clone(),
            Form {
                schema: declared,
                columns,
            },
        ));
    };
    let mut executes = escrow_query::source::entity_schema(&declared, key)
        .map_err(|e| Error::internal(format!("entity schema: {e}")))?;
    let company = sealed.index_of(COMPANY_KEY).ok();
    let name_keys = sealed.index_of(NAME_KEY).ok();
    let places = sealed
        .index_of(PLACE_KEY)
        .ok()
        .filter(|_| name_keys.is_some());
    if name_keys.is_some() {
        let mut fields: Vec<arrow_schema::FieldRef> = executes.fields().iter().cloned().collect();
        fields.push(Arc::new(arrow_schema::Field::new(
            NAME_KEY,
            arrow_schema::DataType::UInt64,
            true,
        )));
        if let Some(p) = places {
            fields.push(Arc::new(
                arrow_schema::Field::new(PLACE_KEY, arrow_schema::DataType::UInt64, true)
                    .with_metadata(sealed.field(p).metadata().clone()),
            ));
        }
        executes = Arc::new(arrow_schema::Schema::new_with_metadata(
            fields,
            executes.metadata().clone(),
        ));
    }
    let key_index = declared
        .index_of(key)
        .map_err(|e| Error::internal(format!("key column: {e}")))?;
    let ids = |what: &'static str| -> Transform {
        let hasher = hasher.clone();
        Arc::new(move |a: &dyn arrow_array::Array| {
            hasher
                .ids(a)
                .map_err(|e| Error::internal(format!("{what} ids: {e}")))
        })
    };
    // Ids sealed at upload under this hash are read as they are; else the texts are hashed.
    let check = hasher.check().to_string();
    let stored = |id: &str| {
        sealed
            .index_of(id)
            .ok()
            .filter(|&i| sealed.field(i).metadata().get(ID_CHECK) == Some(&check))
    };
    let from = |id: &str, text: usize, what: &'static str| -> (usize, Option<Transform>) {
        match stored(id) {
            Some(i) => (i, None),
            None => (text, Some(ids(what))),
        }
    };
    let mut columns: Vec<(usize, Option<Transform>)> = shown.iter().map(|&i| (i, None)).collect();
    columns[key_index] = from(KEY_ID, company.unwrap_or(shown[key_index]), "entity");
    columns.extend(name_keys.map(|n| from(NAME_ID, n, "name")));
    columns.extend(places.map(|p| from(PLACE_ID, p, "place")));
    Ok((
        declared,
        executes.clone(),
        Form {
            schema: executes,
            columns,
        },
    ))
}

/// The entity-id hash, for ids sealed at upload (`ingest::KeySpec::ids`).
pub(crate) fn stored_ids(hasher: &EntityHasher) -> crate::matching::StoredIds {
    let (check, hasher) = (hasher.check(), hasher.clone());
    crate::matching::StoredIds {
        hash: Arc::new(move |a: &dyn arrow_array::Array| {
            hasher
                .ids(a)
                .map_err(|e| Error::internal(format!("entity ids: {e}")))
        }),
        check,
    }
}

/// A sealed dataset version in query form.
struct SealedSource {
    store: Arc<Store>,
    version: VersionKey,
    /// The schema it executes with (key column as entity ids).
    schema: SchemaRef,
    form: Form,
    /// The columns SQL sees: the first `width` of the version's query form.
    width: usize,
    /// The partner asking: what its questions compute from this version is kept for its own
    /// questions only.
    asker: String,
    /// Which key its entity ids are hashed under (`EntityHasher::check`).
    ids: u64,
}

impl std::fmt::Debug for SealedSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SealedSource({})", self.version.version_id)
    }
}

impl BatchSource for SealedSource {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn open(&self, columns: &[usize]) -> std::result::Result<BatchIter, String> {
        // SQL's columns are the first `width` of the query form, in its order.
        if columns.iter().any(|&c| c >= self.width) {
            return Err("a column past the dataset's".into());
        }
        let batches = self
            .store
            .read_mark(&self.version)
            .and_then(|mark| self.store.batches(&self.version, mark, &self.form, columns))
            .map_err(|e| e.to_string())?;
        Ok(Box::new(batches.map(|b| b.map_err(|e| e.to_string()))))
    }

    fn keeper(&self) -> Option<Box<dyn escrow_query::Keeper>> {
        let mark = self.store.read_mark(&self.version).ok()?;
        Some(Box::new(SourceKeeper {
            store: self.store.clone(),
            version: self.version.clone(),
            mark,
            asker: self.asker.clone(),
            ids: self.ids,
            reseal: Default::default(),
        }))
    }
}

/// Values computed from a version for one asking partner, kept in the plaintext cache beside
/// the version's columns (`Store::keep_derived`): the same budget, eviction and forgetting.
/// Keyed by the asker, so that another partner's question never finds them: how fast a
/// question is then tells the asker about its own earlier questions only. Except the
/// version's companies (`KEYS_REDUCTION`), which depend on no question: kept once for every
/// asker, as the key column they come from is, and made after an upload
/// ([`warm_entity_columns`]).
struct SourceKeeper {
    store: Arc<Store>,
    version: VersionKey,
    mark: ReadMark,
    asker: String,
    /// Which key the entity ids are hashed under (`EntityHasher::check`).
    ids: u64,
    /// The version's companies were not found sealed: seal them once kept.
    reseal: std::sync::atomic::AtomicBool,
}

type Value = Arc<dyn std::any::Any + Send + Sync>;

impl SourceKeeper {
    fn name(&self, name: &str) -> String {
        kept_name(&self.asker, name)
    }
}

/// What partner `asker`'s questions keep as `name` is kept under in the store: per asker,
/// but the version's companies for every asker.
fn kept_name(asker: &str, name: &str) -> String {
    match name == KEYS_REDUCTION {
        true => every_askers(name),
        false => serde_json::json!(["sql", asker, name]).to_string(),
    }
}

/// The name of a value computed from a version that depends on no question or asker.
fn every_askers(name: &str) -> String {
    serde_json::json!(["sql", null, name]).to_string()
}

/// The name a version's companies are sealed under beside it ([`seal_companies`]): their
/// format, and the key their entity ids are hashed under (`EntityHasher::check`: ids of
/// another key, after the noise secret changed, are never read as this one's).
fn companies_sealed_as(ids: u64) -> String {
    let format = escrow_query::exec::KEYS_FORMAT;
    format!("sql companies v{format} ids {ids:016x}")
}

/// Seal a version's companies (`KEYS_REDUCTION`) beside it, so that the first join over it
/// in another process (a restarted server, another node) reads them instead of reducing its
/// key column again: later, off every question's path (`Store::later`). A failure is logged:
/// that process reduces them.
fn seal_companies_later(store: &Arc<Store>, version: &VersionKey, ids: u64, companies: Value) {
    let (sealer, at) = (store.clone(), version.clone());
    store.later(version, &companies_sealed_as(ids), move || {
        seal_companies(&sealer, &at, ids, companies.as_ref())
    });
}

/// [`seal_companies_later`]'s job.
fn seal_companies(
    store: &Store,
    version: &VersionKey,
    ids: u64,
    companies: &(dyn std::any::Any + Send + Sync),
) {
    let Some(bytes) = escrow_query::exec::encode_keys(companies) else {
        tracing::error!("a version's companies are not a reduction of keys: not sealed");
        return;
    };
    match store.seal_derived(version, &companies_sealed_as(ids), &bytes) {
        Ok(()) => tracing::debug!(
            version = %version.version_id,
            bytes = bytes.len(),
            "a version's companies sealed beside it"
        ),
        Err(e) => tracing::warn!(
            version = %version.version_id,
            error = %e,
            "a version's companies not sealed: the next process reduces them again"
        ),
    }
}

/// A version's companies sealed beside it ([`seal_companies`]), if they read back; ones that
/// do not (altered, or of another format) are logged and reduced again.
fn sealed_companies(store: &Store, version: &VersionKey, ids: u64) -> Option<(Value, usize)> {
    let read = store
        .open_derived(version, &companies_sealed_as(ids))
        .and_then(|bytes| match bytes {
            Some(b) => escrow_query::exec::decode_keys(&b)
                .map(Some)
                .map_err(|e| Error::internal(format!("{e}"))),
            None => Ok(None),
        });
    match read {
        Ok(companies) => companies,
        Err(e) => {
            tracing::warn!(
                version = %version.version_id,
                error = %e,
                "a version's sealed companies do not read back: reduced again"
            );
            None
        }
    }
}

impl escrow_query::Keeper for SourceKeeper {
    fn get(&self, name: &str) -> Option<Value> {
        let key = self.name(name);
        if let Some(kept) = self.store.derived::<Value>(&self.version, self.mark, &key) {
            return Some(Value::clone(&kept));
        }
        if name != KEYS_REDUCTION {
            return None;
        }
        let Some((companies, bytes)) = sealed_companies(&self.store, &self.version, self.ids)
        else {
            // The question reduces them: sealed once it keeps them (`keep`).
            self.reseal
                .store(true, std::sync::atomic::Ordering::Relaxed);
            return None;
        };
        tracing::debug!(version = %self.version.version_id, "a version's companies read from their seal");
        self.keep(name, companies.clone(), bytes);
        Some(companies)
    }

    fn keep(&self, name: &str, value: Value, bytes: usize) {
        if name == KEYS_REDUCTION && self.reseal.load(std::sync::atomic::Ordering::Relaxed) {
            seal_companies_later(&self.store, &self.version, self.ids, value.clone());
        }
        let name = self.name(name);
        (self.store).keep_derived(&self.version, self.mark, &name, Arc::new(value), bytes);
    }
}

/// Output encodings of an answer.
pub mod output {
    use arrow_array::{Array, RecordBatch, cast::AsArray, types};
    use arrow_cast::display::{ArrayFormatter, FormatOptions};
    use arrow_schema::DataType;
    use serde_json::{Value, json};

    use super::QueryOutcome;
    use crate::{Error, Result};

    /// One value as JSON: numbers as numbers, text as strings, null as null; other types in
    /// Arrow's display form.
    fn value(a: &dyn Array, i: usize) -> Result<Value> {
        if a.is_null(i) {
            return Ok(Value::Null);
        }
        Ok(match a.data_type() {
            DataType::Boolean => json!(a.as_boolean().value(i)),
            DataType::Int8 => json!(a.as_primitive::<types::Int8Type>().value(i)),
            DataType::Int16 => json!(a.as_primitive::<types::Int16Type>().value(i)),
            DataType::Int32 => json!(a.as_primitive::<types::Int32Type>().value(i)),
            DataType::Int64 => json!(a.as_primitive::<types::Int64Type>().value(i)),
            DataType::UInt8 => json!(a.as_primitive::<types::UInt8Type>().value(i)),
            DataType::UInt16 => json!(a.as_primitive::<types::UInt16Type>().value(i)),
            DataType::UInt32 => json!(a.as_primitive::<types::UInt32Type>().value(i)),
            DataType::UInt64 => json!(a.as_primitive::<types::UInt64Type>().value(i)),
            DataType::Float32 => json!(a.as_primitive::<types::Float32Type>().value(i)),
            DataType::Float64 => json!(a.as_primitive::<types::Float64Type>().value(i)),
            DataType::Utf8 => json!(a.as_string::<i32>().value(i)),
            DataType::LargeUtf8 => json!(a.as_string::<i64>().value(i)),
            DataType::Utf8View => json!(a.as_string_view().value(i)),
            _ => {
                let f = ArrayFormatter::try_new(a, &FormatOptions::default())
                    .map_err(|e| Error::internal(format!("formatting a result: {e}")))?;
                json!(f.value(i).to_string())
            }
        })
    }

    /// The answer's rows as JSON values, one array per row (`wire::QueryAnswer`).
    pub fn rows(a: &escrow_query::Answer) -> Result<Vec<Vec<Value>>> {
        let mut rows = Vec::new();
        for b in &a.batches {
            for i in 0..b.num_rows() {
                let row: Result<Vec<Value>> =
                    b.columns().iter().map(|c| value(c.as_ref(), i)).collect();
                rows.push(row?);
            }
        }
        Ok(rows)
    }

    /// CSV with a header line.
    pub fn to_csv(o: &QueryOutcome) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        {
            let mut w = arrow_csv::WriterBuilder::new()
                .with_header(true)
                .build(&mut out);
            if o.answer.batches.is_empty() {
                w.write(&RecordBatch::new_empty(o.answer.schema.clone()))
                    .map_err(|e| Error::internal(format!("csv: {e}")))?;
            }
            for b in &o.answer.batches {
                w.write(b)
                    .map_err(|e| Error::internal(format!("csv: {e}")))?;
            }
        }
        Ok(out)
    }

    /// An Arrow IPC stream.
    pub fn to_arrow(o: &QueryOutcome) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let err = |e: arrow_schema::ArrowError| Error::internal(format!("arrow: {e}"));
        let mut w =
            arrow_ipc::writer::StreamWriter::try_new(&mut out, &o.answer.schema).map_err(err)?;
        for b in &o.answer.batches {
            w.write(b).map_err(err)?;
        }
        w.finish().map_err(err)?;
        drop(w);
        Ok(out)
    }
}

/// The audit record of a question about `sql`, from what its checks gathered.
fn question_event(actor: &Actor, sql: &str, trace: &Trace) -> Event {
    Event::new(
        "query",
        actor.clone(),
        Outcome::Ok,
        serde_json::json!({
            "sql": sql,
            "fingerprint": trace.fingerprint,
            "datasets": trace.datasets,
        }),
    )
    .touching(trace.owners.iter().map(String::as_str))
}

/// A question whose client went away after it was charged (the request's future dropped)
/// still gets its audit record, `client_gone`, appended on a task of its own: every ε spent
/// is in the log its owners read. Queries and overlap-shaped questions alike.
pub(crate) struct AbandonedQuestion {
    store: Arc<Store>,
    /// Set once the question is charged: its record.
    charged: std::sync::Mutex<Option<Event>>,
}

impl AbandonedQuestion {
    pub(crate) fn new(store: Arc<Store>) -> Self {
        AbandonedQuestion {
            store,
            charged: std::sync::Mutex::new(None),
        }
    }

    /// The question was charged: `event` is its record if the client goes away.
    pub(crate) fn charged(&self, event: Event) {
        *self.charged.lock().unwrap_or_else(|p| p.into_inner()) = Some(event);
    }

    /// The question came back (answered or not): the caller records it.
    pub(crate) fn disarm(&mut self) {
        *self.charged.get_mut().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

impl Drop for AbandonedQuestion {
    fn drop(&mut self) {
        let charged = self
            .charged
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let (Some(event), Ok(runtime)) = (charged, tokio::runtime::Handle::try_current()) else {
            return;
        };
        let event = event.failed(&Error::bad(
            "client_gone",
            "the client went away before the answer; the question was charged",
        ));
        let store = self.store.clone();
        runtime.spawn(async move {
            if let Err(e) = record(store, event).await {
                tracing::warn!(error = %e, "recording an abandoned question failed");
            }
        });
    }
}

/// What the catalog keeps for a charged question that read other partners' data: what was
/// released, or that it was not answered (still running, failed, or its client went away).
/// A charged question runs at most once: asked again, it gets what was released, or the
/// refusal `not_run_again`, so its time and outcome can never be measured twice.
enum Kept {
    Released(Vec<u8>),
    /// The error code of the first run, or `running`.
    NotAnswered(String),
}

const NOT_ANSWERED: &[u8] = b"escrow-not-answered\0";

impl Kept {
    fn not_answered(code: &str) -> Kept {
        Kept::NotAnswered(code.to_string())
    }

    fn from_bytes(bytes: Vec<u8>) -> Kept {
        match bytes.strip_prefix(NOT_ANSWERED) {
            Some(code) => Kept::NotAnswered(String::from_utf8_lossy(code).into_owned()),
            None => Kept::Released(bytes),
        }
    }

    fn into_bytes(self) -> Vec<u8> {
        match self {
            Kept::Released(b) => b,
            Kept::NotAnswered(code) => [NOT_ANSWERED, code.as_bytes()].concat(),
        }
    }
}

/// A question's charge: its cost from `charges` and each one's total spent afterwards.
fn charged(
    charges: &[BudgetCharge],
    epsilon: f64,
    new: bool,
    totals: Vec<f64>,
    kept: Option<Option<Vec<u8>>>,
) -> Charged {
    Charged {
        cost: Cost {
            repeated: !new,
            epsilon_spent: if new { epsilon } else { 0.0 },
            budgets: charges
                .iter()
                .zip(totals)
                .map(|(c, spent)| BudgetView {
                    dataset: format!("{}.{}", c.owner, c.dataset),
                    spent,
                    budget: c.budget,
                })
                .collect(),
        },
        kept,
    }
}

/// The refusal of a charged question that was not answered, asked again.
fn not_run_again(why: &str) -> Error {
    Error::refused(
        "not_run_again",
        format!(
            "this question was charged before and not answered ({why}); a charged question runs at most once, so that its time and outcome cannot be measured twice: ask a different question"
        ),
    )
}

/// Answers kept for repeated questions (catalog `released_answers`): a length-prefixed JSON
/// header (suppressed flags, protection applied), then the rows as an Arrow IPC stream.
pub(crate) mod kept {
    use std::sync::Arc;

    use escrow_query::{Answer, Applied};
    use serde_json::{Value, json};

    use crate::{Error, Result};

    fn bad(what: impl std::fmt::Display) -> Error {
        Error::internal(format!("kept answer: {what}"))
    }

    /// The protection an answer or a matrix was released with, as kept.
    pub(crate) fn applied_json(p: &Applied) -> Value {
        json!({
            "min_entities": p.min_entities,
            "threshold": p.threshold,
            "epsilon": p.epsilon,
            "max_groups_per_entity": p.max_groups_per_entity,
            "count_sd": p.count_sd,
        })
    }

    pub(crate) fn applied_of(p: &Value) -> Result<Applied> {
        Ok(Applied {
            min_entities: p["min_entities"].as_u64().ok_or_else(|| bad("k"))?,
            threshold: p["threshold"].as_f64().ok_or_else(|| bad("threshold"))?,
            epsilon: p["epsilon"].as_f64().ok_or_else(|| bad("epsilon"))?,
            max_groups_per_entity: p["max_groups_per_entity"]
                .as_u64()
                .and_then(|l| u32::try_from(l).ok())
                .ok_or_else(|| bad("L"))?,
            count_sd: p["count_sd"].as_f64().ok_or_else(|| bad("count_sd"))?,
        })
    }

    pub(super) fn encode(a: &Answer) -> Result<Vec<u8>> {
        let header = json!({
            "suppressed": a.suppressed,
            "protection": a.protection.as_ref().map(applied_json),
        })
        .to_string();
        let mut out = (header.len() as u32).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        let mut w = arrow_ipc::writer::StreamWriter::try_new(&mut out, &a.schema).map_err(bad)?;
        for b in &a.batches {
            w.write(b).map_err(bad)?;
        }
        w.finish().map_err(bad)?;
        drop(w);
        Ok(out)
    }

    pub(super) fn decode(bytes: &[u8]) -> Result<Answer> {
        let (len, rest) = bytes.split_first_chunk::<4>().ok_or_else(|| bad("short"))?;
        let len = u32::from_le_bytes(*len) as usize;
        let header: Value =
            serde_json::from_slice(rest.get(..len).ok_or_else(|| bad("short header"))?)
                .map_err(bad)?;
        let reader = arrow_ipc::reader::StreamReader::try_new(&rest[len..], None).map_err(bad)?;
        let schema = reader.schema();
        let batches = reader
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(bad)?;
        let suppressed: Vec<bool> =
            serde_json::from_value(header["suppressed"].clone()).map_err(bad)?;
        let protection = match &header["protection"] {
            Value::Null => None,
            p => Some(applied_of(p)?),
        };
        Ok(Answer {
            schema: Arc::clone(&schema),
            batches,
            suppressed,
            protection,
            stages: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use arrow_schema::{DataType, Field, Schema};

    use super::*;

    /// What one partner's questions keep is found by its own questions only; the version's
    /// companies, made after an upload under the name every asker looks up, by all.
    #[test]
    fn kept_reductions_are_per_asker_but_a_versions_companies() {
        let shape = "protected reduction v1;9:filters 0;";
        assert_ne!(kept_name("acme", shape), kept_name("globex", shape));
        assert_eq!(kept_name("acme", shape), kept_name("acme", shape));
        // The name the warm-up after an upload keeps the companies under.
        let warmed = every_askers(KEYS_REDUCTION);
        assert_eq!(kept_name("acme", KEYS_REDUCTION), warmed);
        assert_eq!(kept_name("globex", KEYS_REDUCTION), warmed);
        // A partner named like the shared slot is still itself.
        assert_ne!(kept_name("null", shape), every_askers(shape));
    }

    /// Ids sealed at upload are read as they are when their check is this hash's; otherwise
    /// (an older version, another escrow's hash) the texts are hashed.
    #[test]
    fn stored_ids_are_read_only_under_their_own_hash() {
        let hasher = NoiseKey::new([3; 32]).entity_hasher();
        let sealed = |check: Option<u64>| -> SchemaRef {
            let mut fields = vec![
                Field::new("website", DataType::Utf8, true),
                Field::new("status", DataType::Utf8, true),
                Field::new(COMPANY_KEY, DataType::Utf8, true),
                Field::new(NAME_KEY, DataType::Utf8, true),
            ];
            if let Some(c) = check {
                for id in [KEY_ID, NAME_ID] {
                    fields.push(
                        Field::new(id, DataType::UInt64, true)
                            .with_metadata([(ID_CHECK.to_string(), c.to_string())].into()),
                    );
                }
            }
            Arc::new(Schema::new(fields))
        };
        let sources = |check| {
            let (_, executes, form) =
                query_form(&sealed(check), Some("website"), &hasher).expect("form");
            assert_eq!(executes, form.schema);
            assert_eq!(executes.field(0).data_type(), &DataType::UInt64);
            (form.columns.iter())
                .map(|(s, t)| (*s, t.is_some()))
                .collect::<Vec<_>>()
        };
        // key ids, status, name ids
        assert_eq!(
            sources(Some(hasher.check())),
            [(4, false), (1, false), (5, false)]
        );
        assert_eq!(
            sources(Some(hasher.check() ^ 1)),
            [(2, true), (1, false), (3, true)]
        );
        assert_eq!(sources(None), [(2, true), (1, false), (3, true)]);
    }
}
